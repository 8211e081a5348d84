/* Metric series of the HTTP listeners, looked up once and then cached.
 *
 * Several worker threads may look up the same series at the same time.
 * The registry returns the same stable pointer to each of them, so a race
 * only stores the same value twice; atomics keep that race defined.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "core/metrics.h"
#include "http/http_internal.h"

#define KINDS 2

static const char *const kind_names[KINDS] = {"api", "admin"};

/* Status codes that get a cached series; others are looked up each time. */
static const int cached_statuses[] = {200, 202, 400, 401, 403, 404, 405,
                                      408, 411, 413, 415, 431, 500, 503};
#define STATUSES (sizeof(cached_statuses) / sizeof(cached_statuses[0]))

static const char *const reasons[] = {
    "timeout",        "too_large",        "headers_too_large",
    "bad_framing",    "length_required",  "too_many_connections",
    "spool_full",
};
#define REASONS (sizeof(reasons) / sizeof(reasons[0]))

static const char *const results[] = {"accepted", "invalid", "forbidden",
                                      "unparsable"};

static _Atomic(metrics_counter_t *) requests[KINDS][STATUSES];
static _Atomic(metrics_histogram_t *) durations[KINDS];
static _Atomic(metrics_gauge_t *) open_conns[KINDS];
static _Atomic(metrics_counter_t *) conns_total[KINDS];
static _Atomic(metrics_counter_t *) received[KINDS];
static _Atomic(metrics_counter_t *) sent[KINDS];
static _Atomic(metrics_counter_t *) rejected[REASONS];
static _Atomic(metrics_counter_t *) readings[4];

static metrics_counter_t *requests_series(enum http_listener_kind kind,
                                          int status)
{
    char labels[64];

    snprintf(labels, sizeof(labels), "listener=\"%s\",status=\"%d\"",
             kind_names[kind], status);
    return metrics_counter("ingestd_http_requests_total",
                           "HTTP responses sent, by listener and status code",
                           labels);
}

static char *listener_label(enum http_listener_kind kind, char *buf,
                            size_t size)
{
    snprintf(buf, size, "listener=\"%s\"", kind_names[kind]);
    return buf;
}

void http_metrics_request(enum http_listener_kind kind, int status,
                          double seconds)
{
    metrics_counter_t *c = NULL;
    metrics_histogram_t *h = atomic_load(&durations[kind]);
    char labels[32];
    size_t i;

    for (i = 0; i < STATUSES && cached_statuses[i] != status; i++)
        ;
    if (i < STATUSES)
        c = atomic_load(&requests[kind][i]);
    if (c == NULL) {
        c = requests_series(kind, status);
        if (i < STATUSES)
            atomic_store(&requests[kind][i], c);
    }
    metrics_counter_add(c, 1);

    if (h == NULL) {
        h = metrics_histogram(
            "ingestd_http_request_duration_seconds",
            "Time from a request's first byte until its response was queued",
            listener_label(kind, labels, sizeof(labels)));
        atomic_store(&durations[kind], h);
    }
    metrics_histogram_observe(h, seconds);
}

void http_metrics_connection(enum http_listener_kind kind, int delta)
{
    metrics_gauge_t *g = atomic_load(&open_conns[kind]);
    metrics_counter_t *c = atomic_load(&conns_total[kind]);
    char labels[32];

    listener_label(kind, labels, sizeof(labels));
    if (g == NULL) {
        g = metrics_gauge("ingestd_http_connections",
                          "Open HTTP connections", labels);
        atomic_store(&open_conns[kind], g);
    }
    if (c == NULL) {
        c = metrics_counter("ingestd_http_connections_total",
                            "HTTP connections accepted", labels);
        atomic_store(&conns_total[kind], c);
    }
    metrics_gauge_add(g, delta);
    if (delta > 0)
        metrics_counter_add(c, (uint64_t)delta);
}

void http_metrics_bytes(enum http_listener_kind kind, uint64_t in,
                        uint64_t out)
{
    metrics_counter_t *r = atomic_load(&received[kind]);
    metrics_counter_t *s = atomic_load(&sent[kind]);
    char labels[32];

    listener_label(kind, labels, sizeof(labels));
    if (r == NULL) {
        r = metrics_counter("ingestd_http_bytes_received_total",
                            "Bytes read from HTTP connections", labels);
        atomic_store(&received[kind], r);
    }
    if (s == NULL) {
        s = metrics_counter("ingestd_http_bytes_sent_total",
                            "Bytes queued for sending on HTTP connections",
                            labels);
        atomic_store(&sent[kind], s);
    }
    if (in > 0)
        metrics_counter_add(r, in);
    if (out > 0)
        metrics_counter_add(s, out);
}

void http_metrics_rejected(const char *reason)
{
    char labels[64];
    size_t i;

    for (i = 0; i < REASONS && strcmp(reasons[i], reason) != 0; i++)
        ;
    metrics_counter_t *c = i < REASONS ? atomic_load(&rejected[i]) : NULL;
    if (c == NULL) {
        snprintf(labels, sizeof(labels), "reason=\"%s\"", reason);
        c = metrics_counter("ingestd_http_rejected_total",
                            "HTTP requests or connections rejected before "
                            "routing, by reason",
                            labels);
        if (i < REASONS)
            atomic_store(&rejected[i], c);
    }
    metrics_counter_add(c, 1);
}

void http_metrics_readings(enum http_reading_result result, uint64_t n)
{
    metrics_counter_t *c = atomic_load(&readings[result]);
    char labels[64];

    if (n == 0)
        return;
    if (c == NULL) {
        snprintf(labels, sizeof(labels), "protocol=\"http\",result=\"%s\"",
                 results[result]);
        c = metrics_counter("ingestd_readings_total",
                            "Readings received, by protocol and result",
                            labels);
        atomic_store(&readings[result], c);
    }
    metrics_counter_add(c, n);
}
