/* The sink runner: one thread per configured sink, each reading batches
 * from its own spool reader, delivering them, and committing the cursor
 * after a successful delivery. A failed delivery rewinds the reader to
 * the committed cursor and retries after an exponential backoff with full
 * jitter, so records arrive at least once and in spool order.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/errors.h"
#include "core/log.h"
#include "core/metrics.h"
#include "sinks/sinks_internal.h"

#define DEFAULT_BATCH_RECORDS 512
#define READ_TIMEOUT_MS 1000
#define LABELS_MAX 160

/* Sink implementations by config kind. A new broker adds its ops here. */
static const sink_ops_t *const sink_kinds[] = {
    [CONFIG_SINK_FILE] = &sink_file_ops,
};

static const sinks_backoff_t default_backoff = {
    .initial_ms = 100,
    .max_ms = 30000,
};

typedef struct sink_runner {
    char *name;
    const sink_ops_t *ops;
    void *state;
    spool_reader_t *reader;
    size_t batch_records;
    spool_record_t *recs;
    sinks_backoff_t backoff;
    uint64_t rng;

    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cv; /* wakes a backoff sleep when stopping */
    int stopping;
    atomic_int healthy;

    char labels[LABELS_MAX];
    metrics_counter_t *records_total;
    metrics_counter_t *bytes_total;
    metrics_counter_t *failures_total;
} sink_runner_t;

struct sinks {
    sink_runner_t *runners;
    size_t count;
};

static const sink_ops_t *ops_for_kind(enum config_sink_kind kind)
{
    if ((size_t)kind >= sizeof(sink_kinds) / sizeof(sink_kinds[0]))
        return NULL;
    return sink_kinds[kind];
}

static int stopping(sink_runner_t *r)
{
    int stop;

    pthread_mutex_lock(&r->lock);
    stop = r->stopping;
    pthread_mutex_unlock(&r->lock);
    return stop;
}

/* Returns a pseudo-random number (xorshift64); jitter needs no quality. */
static uint64_t next_random(sink_runner_t *r)
{
    uint64_t x = r->rng;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r->rng = x;
    return x;
}

/* Sleeps up to `ms`, returning early when the sink is stopping. */
static void sleep_unless_stopping(sink_runner_t *r, uint64_t ms)
{
    struct timespec deadline;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += (time_t)(ms / 1000);
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&r->lock);
    while (!r->stopping) {
        if (pthread_cond_timedwait(&r->cv, &r->lock, &deadline) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&r->lock);
}

static int64_t lag_gauge(void *arg)
{
    sink_runner_t *r = arg;

    return (int64_t)spool_reader_lag_bytes(r->reader);
}

static int64_t zero_gauge(void *arg)
{
    return 0;
}

static void register_metrics(sink_runner_t *r)
{
    snprintf(r->labels, sizeof(r->labels), "sink=\"%s\"", r->name);
    r->records_total =
        metrics_counter("ingestd_sink_records_total",
                        "Records delivered by the sink.", r->labels);
    r->bytes_total =
        metrics_counter("ingestd_sink_bytes_total",
                        "Payload bytes delivered by the sink.", r->labels);
    r->failures_total = metrics_counter(
        "ingestd_sink_failures_total",
        "Failed deliveries of the sink, each retried later.", r->labels);
    metrics_gauge_func("ingestd_sink_lag_bytes",
                       "Spool bytes the sink has not committed yet.", r->labels,
                       lag_gauge, r);
}

/* Handles a failed delivery or read: counts it, logs `msg`, rewinds to
 * the committed cursor and waits out the backoff. Returns the next
 * delay. */
static uint64_t retry_later(sink_runner_t *r, const char *msg, int rc, size_t n,
                            uint64_t delay)
{
    uint64_t wait_ms = next_random(r) % (delay + 1);
    char ebuf[64];

    atomic_store(&r->healthy, 0);
    metrics_counter_add(r->failures_total, 1);
    log_write_limited("sink_delivery_failed", 10, LOG_LEVEL_WARN, msg,
                      "sink=%s records=%zu committed=%" PRIu64
                      " error=%s retry_ms=%" PRIu64,
                      r->name, n, spool_reader_committed(r->reader),
                      log_quote(ebuf, sizeof(ebuf), ing_strerror(rc)), wait_ms);
    spool_reader_rewind(r->reader);
    sleep_unless_stopping(r, wait_ms);
    delay *= 2;
    return delay < r->backoff.max_ms ? delay : r->backoff.max_ms;
}

static void deliver_batch(sink_runner_t *r, size_t n, uint64_t *delay)
{
    uint64_t bytes = 0;
    char ebuf[64];
    int rc = r->ops->deliver(r->state, r->recs, n);

    if (rc < 0) {
        *delay =
            retry_later(r, "sink delivery failed; retrying", rc, n, *delay);
        return;
    }
    for (size_t i = 0; i < n; i++)
        bytes += r->recs[i].len;
    metrics_counter_add(r->records_total, n);
    metrics_counter_add(r->bytes_total, bytes);
    *delay = r->backoff.initial_ms;
    /* The batch is delivered either way. A cursor that failed to persist
     * only means a redelivery after a restart, and the next commit
     * covers this batch too. */
    rc = spool_reader_commit(r->reader, r->recs[n - 1].end);
    if (rc < 0) {
        atomic_store(&r->healthy, 0);
        log_write_limited("sink_commit_failed", 10, LOG_LEVEL_ERROR,
                          "committing sink cursor failed",
                          "sink=%s pos=%" PRIu64 " error=%s", r->name,
                          r->recs[n - 1].end,
                          log_quote(ebuf, sizeof(ebuf), ing_strerror(rc)));
        return;
    }
    atomic_store(&r->healthy, 1);
}

static void *runner_main(void *arg)
{
    sink_runner_t *r = arg;
    uint64_t delay = r->backoff.initial_ms;

    log_info("sink started", "sink=%s kind=%s committed=%" PRIu64, r->name,
             r->ops->kind, spool_reader_committed(r->reader));
    while (!stopping(r)) {
        size_t n = 0;
        int rc = spool_reader_next(r->reader, r->recs, r->batch_records,
                                   READ_TIMEOUT_MS, &n);
        if (rc == ING_ESHUTDOWN)
            break;
        if (rc == ING_ECORRUPT) {
            /* The reader logged and skipped the damage. */
            metrics_counter_add(r->failures_total, 1);
            continue;
        }
        if (rc < 0) {
            delay = retry_later(r,
                                "reading the spool for a sink failed; "
                                "retrying",
                                rc, 0, delay);
            continue;
        }
        if (n > 0)
            deliver_batch(r, n, &delay);
    }
    log_info("sink stopped", "sink=%s committed=%" PRIu64, r->name,
             spool_reader_committed(r->reader));
    return NULL;
}

/* Frees a runner whose thread is not running. */
static void runner_free(sink_runner_t *r)
{
    if (r->reader != NULL) {
        /* Re-registering takes the metrics lock, so no scrape is still
         * reading this reader's lag once it returns. */
        metrics_gauge_func("ingestd_sink_lag_bytes",
                           "Spool bytes the sink has not committed yet.",
                           r->labels, zero_gauge, NULL);
        spool_reader_close(r->reader);
    }
    if (r->state != NULL)
        r->ops->close(r->state);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->lock);
    free(r->recs);
    free(r->name);
}

static int runner_init(sink_runner_t *r, const config_sink_t *cfg,
                       const sink_ops_t *ops, const sinks_backoff_t *backoff,
                       spool_t *spool, char *err, size_t errlen)
{
    int rc;

    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->cv, NULL);
    atomic_store(&r->healthy, 1);
    r->ops = ops;
    r->backoff = *backoff;
    r->batch_records =
        cfg->batch_records > 0 ? cfg->batch_records : DEFAULT_BATCH_RECORDS;
    r->rng =
        (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)r ^ 0x9E3779B97F4A7C15ull;
    r->name = strdup(cfg->name);
    r->recs = calloc(r->batch_records, sizeof(*r->recs));
    if (r->name == NULL || r->recs == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    rc = ops->open(cfg, &r->state, err, errlen);
    if (rc < 0) {
        r->state = NULL;
        return rc;
    }
    rc = spool_reader_open(spool, cfg->name, &r->reader);
    if (rc < 0) {
        r->reader = NULL;
        snprintf(err, errlen, "sink %s: opening its spool reader failed: %s",
                 cfg->name, ing_strerror(rc));
        return rc;
    }
    register_metrics(r);
    return 0;
}

/* Asks every started runner to stop and wakes it wherever it waits. */
static void signal_stop(sinks_t *s)
{
    for (size_t i = 0; i < s->count; i++) {
        sink_runner_t *r = &s->runners[i];
        if (!r->started)
            continue;
        pthread_mutex_lock(&r->lock);
        r->stopping = 1;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->lock);
        spool_reader_wake(r->reader);
    }
}

void sinks_stop(sinks_t *s, uint64_t timeout_ms)
{
    struct timespec deadline;

    if (s == NULL)
        return;
    signal_stop(s);
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)(timeout_ms / 1000);
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    for (size_t i = 0; i < s->count; i++) {
        sink_runner_t *r = &s->runners[i];
        if (r->started && pthread_timedjoin_np(r->thread, NULL, &deadline)) {
            /* NOTE: deliver cannot be interrupted from outside, so a sink
             * stuck in it delays shutdown past the timeout. Its reader
             * must stay open until deliver returns. */
            log_warn("sink did not stop in time; waiting for its delivery "
                     "to return",
                     "sink=%s timeout_ms=%" PRIu64, r->name, timeout_ms);
            pthread_join(r->thread, NULL);
        }
        runner_free(r);
    }
    free(s->runners);
    free(s);
}

int sinks_start_with(const config_t *cfg, const sink_ops_t *const *ops,
                     const sinks_backoff_t *backoff, spool_t *spool,
                     sinks_t **out, char *err, size_t errlen)
{
    sinks_t *s = calloc(1, sizeof(*s));
    int rc = 0;

    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    s->runners =
        calloc(cfg->sink_count ? cfg->sink_count : 1, sizeof(*s->runners));
    if (s->runners == NULL) {
        free(s);
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    for (size_t i = 0; i < cfg->sink_count; i++) {
        const config_sink_t *sc = &cfg->sinks[i];
        const sink_ops_t *o = ops ? ops[i] : ops_for_kind(sc->kind);
        sink_runner_t *r = &s->runners[i];

        s->count = i + 1;
        if (o == NULL) {
            snprintf(err, errlen, "sink %s: unsupported kind %d", sc->name,
                     (int)sc->kind);
            rc = ING_ECONFIG;
            goto error;
        }
        rc = runner_init(r, sc, o, backoff, spool, err, errlen);
        if (rc < 0)
            goto error;
        if (pthread_create(&r->thread, NULL, runner_main, r) != 0) {
            snprintf(err, errlen, "sink %s: starting its thread failed",
                     sc->name);
            rc = ING_ENOMEM;
            goto error;
        }
        r->started = 1;
    }
    *out = s;
    return 0;

error:
    /* Started runners see the stop flag at once. The timeout is reached
     * only when a sink's deliver hangs. */
    sinks_stop(s, 10000);
    return rc;
}

int sinks_start(const config_t *cfg, spool_t *spool, sinks_t **out, char *err,
                size_t errlen)
{
    return sinks_start_with(cfg, NULL, &default_backoff, spool, out, err,
                            errlen);
}

int sinks_healthy(sinks_t *s)
{
    for (size_t i = 0; i < s->count; i++) {
        if (!atomic_load(&s->runners[i].healthy))
            return 0;
    }
    return 1;
}
