/* Metrics of each sink: counters of delivered, retried, failed and
 * dead-lettered records, and gauges of its connection, its batch in flight
 * and how far it lags behind the spool.
 */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "sinks/sinks_internal.h"

/* A frame is a 4-byte length and a 4-byte CRC before the payload. */
#define FRAME_HEADER_BYTES 8

static int64_t lag_bytes_gauge(void *arg)
{
    sink_stats_t *stats = arg;

    return (int64_t)spool_reader_lag_bytes(stats->reader);
}

int64_t sink_stats_lag_records(sink_stats_t *stats)
{
    uint64_t lag = spool_reader_lag_bytes(stats->reader);
    uint64_t records = atomic_load(&stats->read_records);
    uint64_t bytes = atomic_load(&stats->read_bytes);
    uint64_t average;

    if (lag == 0)
        return 0;
    /* Before the first read there is no average yet; a frame with an
     * empty payload is the smallest possible record. */
    average = records > 0 ? bytes / records : FRAME_HEADER_BYTES;
    if (average == 0)
        average = FRAME_HEADER_BYTES;
    return (int64_t)((lag + average - 1) / average);
}

static int64_t lag_records_gauge(void *arg)
{
    return sink_stats_lag_records(arg);
}

static int64_t lag_seconds_gauge(void *arg)
{
    sink_stats_t *stats = arg;
    int64_t oldest = atomic_load(&stats->oldest_ms);
    struct timespec now;
    int64_t now_ms;

    if (oldest == 0)
        return 0;
    clock_gettime(CLOCK_REALTIME, &now);
    now_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
    return now_ms > oldest ? (now_ms - oldest) / 1000 : 0;
}

static int64_t zero_gauge(void *arg)
{
    return 0;
}

static const struct {
    const char *name;
    const char *help;
    int64_t (*fn)(void *);
} lag_gauges[] = {
    {"ingestd_sink_lag_bytes", "Spool bytes the sink has not committed yet.",
     lag_bytes_gauge},
    {"ingestd_sink_lag_records",
     "Estimated records the sink has not committed yet: lag bytes divided "
     "by the average record size read.",
     lag_records_gauge},
    {"ingestd_sink_lag_seconds",
     "Age of the oldest record the sink has not delivered, from its "
     "received_at; 0 when caught up.",
     lag_seconds_gauge},
};

void sink_metrics_register(sink_metrics_t *m, const char *name,
                           sink_stats_t *stats)
{
    snprintf(m->labels, sizeof(m->labels), "sink=\"%s\"", name);
    m->records_total = metrics_counter(
        "ingestd_sink_records_total",
        "Records the sink's destination acknowledged.", m->labels);
    m->bytes_total =
        metrics_counter("ingestd_sink_bytes_total",
                        "Bytes of the records the sink's destination "
                        "acknowledged.",
                        m->labels);
    m->retries_total = metrics_counter(
        "ingestd_sink_retries_total",
        "Records the sink sends again because the destination did not "
        "acknowledge them.",
        m->labels);
    m->failures_total = metrics_counter(
        "ingestd_sink_failures_total",
        "Failed deliveries of a batch or spool reads of the sink, each "
        "retried later.",
        m->labels);
    m->dead_lettered_total = metrics_counter(
        "ingestd_sink_dead_lettered_total",
        "Records the destination rejected for good, written to the "
        "sink's dead-letter file.",
        m->labels);
    m->in_flight =
        metrics_gauge("ingestd_sink_in_flight",
                      "Records in the batch the sink is delivering.",
                      m->labels);
    m->connected = metrics_gauge(
        "ingestd_sink_connected",
        "1 when the sink is connected to its destination, else 0.",
        m->labels);
    metrics_gauge_set(m->in_flight, 0);
    for (size_t i = 0; i < sizeof(lag_gauges) / sizeof(lag_gauges[0]); i++)
        metrics_gauge_func(lag_gauges[i].name, lag_gauges[i].help, m->labels,
                           lag_gauges[i].fn, stats);
}

void sink_metrics_unregister(sink_metrics_t *m)
{
    /* Re-registering takes the metrics lock, so no scrape is still reading
     * the stats once this returns. */
    for (size_t i = 0; i < sizeof(lag_gauges) / sizeof(lag_gauges[0]); i++)
        metrics_gauge_func(lag_gauges[i].name, lag_gauges[i].help, m->labels,
                           zero_gauge, NULL);
    metrics_gauge_set(m->in_flight, 0);
    metrics_gauge_set(m->connected, 0);
}

int64_t sink_parse_received_at(const char *text)
{
    struct tm tm = {0};
    int millis = 0;
    int used = 0;
    time_t seconds;

    if (sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
               &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &used) != 6)
        return 0;
    if (text[used] == '.') {
        int digits = 0;

        for (const char *p = text + used + 1; *p >= '0' && *p <= '9'; p++) {
            if (digits < 3)
                millis = millis * 10 + (*p - '0');
            digits++;
        }
        for (; digits < 3; digits++)
            millis *= 10;
    }
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    seconds = timegm(&tm);
    if (seconds <= 0)
        return 0;
    return (int64_t)seconds * 1000 + millis;
}
