/* Parts of the sink runner shared between its files, and hooks that let
 * tests run the runner with their own sink_ops and short retry delays.
 * Not part of the module interface.
 */
#ifndef INGESTD_SINKS_SINKS_INTERNAL_H
#define INGESTD_SINKS_SINKS_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "core/metrics.h"
#include "sinks/sink.h"

/* Exponential backoff after a failed delivery: the delay starts at
 * `initial_ms` and doubles per failure up to `max_ms`, and each wait is
 * drawn uniformly from [initial_ms, delay] (full jitter above the
 * minimum). */
typedef struct sinks_backoff {
    uint64_t initial_ms;
    uint64_t max_ms;
} sinks_backoff_t;

/* Like sinks_start, but sink i uses `ops[i]` instead of the ops of its
 * kind (when `ops` is not NULL), and `backoff` instead of the sink's
 * retry_min and retry_max (when `backoff` is not NULL). */
int sinks_start_with(const config_t *cfg, const sink_ops_t *const *ops,
                     const sinks_backoff_t *backoff, spool_t *spool,
                     sinks_t **out, char *err, size_t errlen);

/* ---- Metrics of one sink (sinks_metrics.c) ---- */

/* The values behind the scrape-time gauges, updated by the runner thread
 * and read by scrapes. */
typedef struct sink_stats {
    spool_reader_t *reader;     /* for the lag in bytes */
    atomic_uint_least64_t read_records; /* every record read, retries too */
    atomic_uint_least64_t read_bytes;   /* their frame sizes */
    atomic_int_least64_t oldest_ms; /* received_at of the oldest record not
                                     * committed, in Unix ms; 0 if none */
} sink_stats_t;

typedef struct sink_metrics {
    char labels[160];
    metrics_counter_t *records_total;
    metrics_counter_t *bytes_total;
    metrics_counter_t *retries_total;
    metrics_counter_t *failures_total;
    metrics_counter_t *dead_lettered_total;
    metrics_gauge_t *in_flight;
    metrics_gauge_t *connected;
} sink_metrics_t;

/* Registers the series of sink `name`; the lag gauges read `stats`. */
void sink_metrics_register(sink_metrics_t *m, const char *name,
                           sink_stats_t *stats);

/* Points the lag gauges away from `stats`, which is about to be freed. */
void sink_metrics_unregister(sink_metrics_t *m);

/* Estimated records behind the committed cursor: the lag in bytes divided
 * by the average frame size of the records read so far. */
int64_t sink_stats_lag_records(sink_stats_t *stats);

/* Parses an envelope's received_at (such as 2024-05-01T12:00:00.123Z) into
 * Unix milliseconds. Returns 0 when it is not in that form. */
int64_t sink_parse_received_at(const char *text);

/* ---- Dead-letter file (sinks_dead_letter.c) ---- */

/* A dead-letter file: one JSON line per record rejected for good,
 * {"sink":..,"reason":..,"dead_lettered_at":..,"record":<envelope>}. */
typedef struct sink_dead_letter {
    char *path;
    const char *sink_name;
    int fd; /* -1 until the first rejected record */
    char *buf;
    size_t len;
    size_t cap;
} sink_dead_letter_t;

/* Prepares `dl` for the file at `path`; nothing is created yet. */
int sink_dead_letter_init(sink_dead_letter_t *dl, const char *path,
                          const char *sink_name);

/* Adds the line for `rec`, rejected for `reason`, to the pending lines. */
int sink_dead_letter_add(sink_dead_letter_t *dl, const spool_record_t *rec,
                         const char *reason);

/* Appends the pending lines and fsyncs the file, creating it and its
 * folder when missing. On failure the file is cut back to its length
 * before, and the lines stay pending. Returns 0, ING_EIO or ING_ENOMEM. */
int sink_dead_letter_flush(sink_dead_letter_t *dl);

/* Drops the pending lines, because their records will be sent again. */
void sink_dead_letter_discard(sink_dead_letter_t *dl);

void sink_dead_letter_close(sink_dead_letter_t *dl);

#endif
