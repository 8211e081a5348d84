/* Metric series of WebSocket connections, looked up once and then cached.
 *
 * Worker threads may race to fill a cache slot. The registry returns the
 * same stable pointer to each of them, so the race only stores the same
 * value twice, and atomics keep it defined.
 */
#include <stdatomic.h>
#include <stdio.h>

#include "core/metrics.h"
#include "ws/ws_internal.h"

static const char *const message_results[] = {"ack", "invalid", "forbidden",
                                              "error"};
static const char *const reading_results[] = {"accepted", "invalid",
                                              "forbidden", "unparsable"};

/* Close codes 1000 to 1015 get a cached series; others are looked up. */
#define CLOSE_FIRST 1000
#define CLOSE_COUNT 16

static _Atomic(metrics_gauge_t *) open_conns;
static _Atomic(metrics_counter_t *) messages[4];
static _Atomic(metrics_counter_t *) closes[CLOSE_COUNT];
static _Atomic(metrics_counter_t *) received;
static _Atomic(metrics_counter_t *) sent;
static _Atomic(metrics_counter_t *) readings[4];

void ws_metrics_connection(int delta)
{
    metrics_gauge_t *g = atomic_load(&open_conns);

    if (g == NULL) {
        g = metrics_gauge("ingestd_ws_connections",
                          "Open WebSocket connections", NULL);
        atomic_store(&open_conns, g);
    }
    metrics_gauge_add(g, delta);
}

void ws_metrics_message(enum ws_message_result result)
{
    metrics_counter_t *c = atomic_load(&messages[result]);
    char labels[32];

    if (c == NULL) {
        snprintf(labels, sizeof(labels), "result=\"%s\"",
                 message_results[result]);
        c = metrics_counter("ingestd_ws_messages_total",
                            "WebSocket data messages replied to, by result",
                            labels);
        atomic_store(&messages[result], c);
    }
    metrics_counter_add(c, 1);
}

void ws_metrics_close(uint16_t code)
{
    int cached = code >= CLOSE_FIRST && code < CLOSE_FIRST + CLOSE_COUNT;
    metrics_counter_t *c =
        cached ? atomic_load(&closes[code - CLOSE_FIRST]) : NULL;
    char labels[32];

    if (c == NULL) {
        snprintf(labels, sizeof(labels), "code=\"%u\"", (unsigned)code);
        c = metrics_counter("ingestd_ws_closes_total",
                            "WebSocket connections ended, by the close code "
                            "sent or received (1006: no close frame)",
                            labels);
        if (cached)
            atomic_store(&closes[code - CLOSE_FIRST], c);
    }
    metrics_counter_add(c, 1);
}

void ws_metrics_bytes(uint64_t in, uint64_t out)
{
    metrics_counter_t *r = atomic_load(&received);
    metrics_counter_t *s = atomic_load(&sent);

    if (r == NULL) {
        r = metrics_counter("ingestd_ws_bytes_received_total",
                            "Bytes read from WebSocket connections after "
                            "the opening handshake",
                            NULL);
        atomic_store(&received, r);
    }
    if (s == NULL) {
        s = metrics_counter("ingestd_ws_bytes_sent_total",
                            "Bytes queued for sending on WebSocket "
                            "connections after the opening handshake",
                            NULL);
        atomic_store(&sent, s);
    }
    if (in > 0)
        metrics_counter_add(r, in);
    if (out > 0)
        metrics_counter_add(s, out);
}

void ws_metrics_readings(enum ws_reading_result result, uint64_t n)
{
    metrics_counter_t *c = atomic_load(&readings[result]);
    char labels[64];

    if (n == 0)
        return;
    if (c == NULL) {
        snprintf(labels, sizeof(labels), "protocol=\"ws\",result=\"%s\"",
                 reading_results[result]);
        c = metrics_counter("ingestd_readings_total",
                            "Readings received, by protocol and result",
                            labels);
        atomic_store(&readings[result], c);
    }
    metrics_counter_add(c, n);
}
