/* Prometheus metrics: counters, gauges and histograms, rendered in the text
 * exposition format (version 0.0.4).
 *
 * A family is registered once by name; each series inside it is identified
 * by its label string, written as in the exposition format without braces,
 * for example `protocol="http",status="202"`. Lookups return a stable pointer
 * that the caller keeps, so the hot path is one atomic add. All functions are
 * thread-safe.
 */
#ifndef INGESTD_CORE_METRICS_H
#define INGESTD_CORE_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metrics_counter metrics_counter_t;
typedef struct metrics_gauge metrics_gauge_t;
typedef struct metrics_histogram metrics_histogram_t;

/* Returns the counter series `name{labels}`, creating it (and its family
 * with `help`) on first use. `labels` may be NULL or "". Never NULL:
 * allocation failure aborts, since it happens only at start-up. */
metrics_counter_t *metrics_counter(const char *name, const char *help,
                                   const char *labels);
void metrics_counter_add(metrics_counter_t *c, uint64_t n);

metrics_gauge_t *metrics_gauge(const char *name, const char *help,
                               const char *labels);
void metrics_gauge_set(metrics_gauge_t *g, int64_t v);
void metrics_gauge_add(metrics_gauge_t *g, int64_t delta);

/* A gauge whose value `fn(arg)` computes at scrape time. */
void metrics_gauge_func(const char *name, const char *help,
                        const char *labels, int64_t (*fn)(void *), void *arg);

/* Histogram of seconds with fixed buckets from 50us to 10s. */
metrics_histogram_t *metrics_histogram(const char *name, const char *help,
                                       const char *labels);
void metrics_histogram_observe(metrics_histogram_t *h, double seconds);

/* Renders every family into a new malloc'd NUL-terminated string and stores
 * its length in `*len`. Returns NULL on allocation failure. */
char *metrics_render(size_t *len);

/* Reads a counter's or gauge's current value, for tests and /readyz. */
uint64_t metrics_counter_value(const metrics_counter_t *c);
int64_t metrics_gauge_value(const metrics_gauge_t *g);

#endif
