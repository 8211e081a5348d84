/* The sink runner: one thread per configured sink, each reading batches
 * from its own spool reader and delivering them.
 *
 * The sink reports an outcome per record. The runner walks the outcomes in
 * spool order: records the destination acknowledged (OK) or rejected for
 * good (REJECTED, written to the dead-letter file first) are committed,
 * up to the first record that must be sent again (RETRY). From there the
 * reader rewinds to the committed cursor and the rest of the batch is
 * retried after an exponential backoff with jitter. Records after the first
 * RETRY that were acknowledged are sent again, so delivery is at least once,
 * in spool order, and one bad record does not block those behind it.
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
#include "sinks/sinks_internal.h"
#include "sinks/template.h"

#define DEFAULT_BATCH_RECORDS 512
#define READ_TIMEOUT_MS 1000
#define DRAIN_POLL_MS 10

/* Sink implementations by config kind. A new broker adds its ops here. */
static const sink_ops_t *const sink_kinds[] = {
    [CONFIG_SINK_FILE] = &sink_file_ops,
    [CONFIG_SINK_KAFKA] = &sink_kafka_ops,
    [CONFIG_SINK_REDIS] = &sink_redis_ops,
    [CONFIG_SINK_RABBITMQ] = &sink_rabbitmq_ops,
    [CONFIG_SINK_NATS] = &sink_nats_ops,
    [CONFIG_SINK_MQTT] = &sink_mqtt_ops,
};

/* Used when a sink's config leaves retry_min or retry_max at 0, which
 * config_load never does. */
static const sinks_backoff_t default_backoff = {
    .initial_ms = 100,
    .max_ms = 30000,
};

typedef struct sink_runner sink_runner_t;

struct sink_ctx {
    const char *name;
    metrics_gauge_t *connected_gauge;
    atomic_int connected;
};

struct sink_runner {
    char *name;
    const sink_ops_t *ops;
    void *state;
    spool_reader_t *reader;
    size_t batch_records;
    spool_record_t *recs;
    sink_outcome_t *out;
    sinks_backoff_t backoff;
    uint64_t rng;
    sink_ctx_t ctx;
    sink_dead_letter_t dead_letter;
    sink_stats_t stats;
    sink_metrics_t metrics;
    int metrics_registered;

    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cv; /* wakes a backoff sleep when stopping */
    int stopping;
    atomic_int healthy;
};

struct sinks {
    sink_runner_t *runners;
    size_t count;
};

void sink_set_connected(sink_ctx_t *ctx, bool connected)
{
    int was;

    if (ctx == NULL)
        return;
    was = atomic_exchange(&ctx->connected, connected ? 1 : 0);
    if (ctx->connected_gauge != NULL)
        metrics_gauge_set(ctx->connected_gauge, connected ? 1 : 0);
    if (was == (connected ? 1 : 0))
        return;
    if (connected)
        log_info("sink connected", "sink=%s", ctx->name);
    else
        log_warn("sink disconnected", "sink=%s", ctx->name);
}

const char *sink_log_name(const sink_ctx_t *ctx)
{
    return ctx != NULL ? ctx->name : "";
}

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

/* Handles a failed delivery or read: logs `msg`, rewinds to the committed
 * cursor and waits out the backoff, drawn from [initial_ms, delay].
 * Returns the next delay. */
static uint64_t retry_later(sink_runner_t *r, const char *msg,
                            const char *reason, size_t n, uint64_t delay)
{
    uint64_t low = r->backoff.initial_ms;
    uint64_t wait_ms = low + next_random(r) % (delay - low + 1);
    char ebuf[256];

    atomic_store(&r->healthy, 0);
    metrics_counter_add(r->metrics.failures_total, 1);
    log_write_limited("sink_delivery_failed", 10, LOG_LEVEL_WARN, msg,
                      "sink=%s records=%zu committed=%" PRIu64
                      " error=%s retry_ms=%" PRIu64,
                      r->name, n, spool_reader_committed(r->reader),
                      log_quote(ebuf, sizeof(ebuf), reason), wait_ms);
    spool_reader_rewind(r->reader);
    sleep_unless_stopping(r, wait_ms);
    delay *= 2;
    return delay < r->backoff.max_ms ? delay : r->backoff.max_ms;
}

/* Records what was read, for the lag gauges. recs[0] is the oldest record
 * not committed, because every batch starts at the committed cursor. */
static void note_batch_read(sink_runner_t *r, size_t n)
{
    sink_envelope_t env;
    uint64_t bytes = 0;
    int64_t oldest = 0;

    for (size_t i = 0; i < n; i++)
        bytes += r->recs[i].end - r->recs[i].pos;
    atomic_fetch_add(&r->stats.read_records, n);
    atomic_fetch_add(&r->stats.read_bytes, bytes);
    if (sink_envelope_parse(r->recs[0].data, r->recs[0].len, &env) == 0)
        oldest = sink_parse_received_at(env.received_at);
    atomic_store(&r->stats.oldest_ms, oldest);
}

/* Returns how many leading records of the batch can be committed: those
 * before the first RETRY. Their REJECTED records are written to the
 * dead-letter file first; when that fails, only the records before the
 * first REJECTED one can be committed. */
static size_t settle_rejected(sink_runner_t *r, size_t n, size_t *rejected)
{
    size_t done = 0;
    char ebuf[256];

    *rejected = 0;
    while (done < n && r->out[done].status != SINK_RECORD_RETRY) {
        if (r->out[done].status == SINK_RECORD_REJECTED) {
            if (sink_dead_letter_add(&r->dead_letter, &r->recs[done],
                                     r->out[done].reason) < 0)
                break;
            (*rejected)++;
            log_write_limited("sink_record_rejected", 10, LOG_LEVEL_WARN,
                              "destination rejected a record; writing it "
                              "to the dead-letter file",
                              "sink=%s pos=%" PRIu64 " reason=%s", r->name,
                              r->recs[done].pos,
                              log_quote(ebuf, sizeof(ebuf),
                                        r->out[done].reason));
        }
        done++;
    }
    if (*rejected > 0 && sink_dead_letter_flush(&r->dead_letter) < 0) {
        sink_dead_letter_discard(&r->dead_letter);
        *rejected = 0;
        for (done = 0; done < n && r->out[done].status == SINK_RECORD_OK;
             done++)
            ;
    }
    return done;
}

/* Commits the first `done` records of the batch and counts them. Returns
 * 0, or a negative ing_error when the cursor failed to persist. */
static int commit_prefix(sink_runner_t *r, size_t done, size_t rejected)
{
    uint64_t bytes = 0;
    char ebuf[64];
    int rc;

    for (size_t i = 0; i < done; i++) {
        if (r->out[i].status == SINK_RECORD_OK)
            bytes += r->recs[i].len;
    }
    metrics_counter_add(r->metrics.records_total, done - rejected);
    metrics_counter_add(r->metrics.bytes_total, bytes);
    metrics_counter_add(r->metrics.dead_lettered_total, rejected);
    /* The records are delivered either way. A cursor that failed to
     * persist only means a redelivery after a restart, and the next
     * commit covers these records too. */
    rc = spool_reader_commit(r->reader, r->recs[done - 1].end);
    if (rc < 0)
        log_write_limited("sink_commit_failed", 10, LOG_LEVEL_ERROR,
                          "committing sink cursor failed",
                          "sink=%s pos=%" PRIu64 " error=%s", r->name,
                          r->recs[done - 1].end,
                          log_quote(ebuf, sizeof(ebuf), ing_strerror(rc)));
    return rc;
}

static void deliver_batch(sink_runner_t *r, size_t n, uint64_t *delay)
{
    size_t done, rejected;
    const char *reason;
    int rc;

    for (size_t i = 0; i < n; i++) {
        r->out[i].status = SINK_RECORD_RETRY;
        r->out[i].reason[0] = '\0';
    }
    note_batch_read(r, n);
    metrics_gauge_set(r->metrics.in_flight, (int64_t)n);
    rc = r->ops->deliver(r->state, r->recs, n, r->out);
    metrics_gauge_set(r->metrics.in_flight, 0);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++)
            r->out[i].status = SINK_RECORD_RETRY;
    }
    done = settle_rejected(r, n, &rejected);
    if (done > 0 && commit_prefix(r, done, rejected) < 0) {
        atomic_store(&r->healthy, 0);
        return;
    }
    if (done == n) {
        atomic_store(&r->healthy, 1);
        if (spool_reader_lag_bytes(r->reader) == 0)
            atomic_store(&r->stats.oldest_ms, 0);
        *delay = r->backoff.initial_ms;
        return;
    }
    /* Progress since the last failure restarts the backoff, so a single
     * unacknowledged record does not inherit a long delay. */
    if (done > 0)
        *delay = r->backoff.initial_ms;
    metrics_counter_add(r->metrics.retries_total, n - done);
    reason = rc < 0                      ? ing_strerror(rc)
             : r->out[done].reason[0]    ? r->out[done].reason
             : r->out[done].status == SINK_RECORD_REJECTED
                 ? "writing the dead-letter file failed"
                 : "not acknowledged";
    *delay = retry_later(r, "sink delivery failed; retrying", reason,
                         n - done, *delay);
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
            metrics_counter_add(r->metrics.failures_total, 1);
            continue;
        }
        if (rc < 0) {
            delay = retry_later(r,
                                "reading the spool for a sink failed; "
                                "retrying",
                                ing_strerror(rc), 0, delay);
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
    if (r->metrics_registered)
        sink_metrics_unregister(&r->metrics);
    if (r->state != NULL)
        r->ops->close(r->state);
    if (r->reader != NULL)
        spool_reader_close(r->reader);
    sink_dead_letter_close(&r->dead_letter);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->lock);
    free(r->recs);
    free(r->out);
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
    r->dead_letter.fd = -1;
    r->ops = ops;
    if (backoff != NULL)
        r->backoff = *backoff;
    else if (cfg->retry_min_ms > 0 && cfg->retry_max_ms >= cfg->retry_min_ms)
        r->backoff = (sinks_backoff_t){cfg->retry_min_ms, cfg->retry_max_ms};
    else
        r->backoff = default_backoff;
    r->batch_records =
        cfg->batch_records > 0 ? cfg->batch_records : DEFAULT_BATCH_RECORDS;
    r->rng =
        (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)r ^ 0x9E3779B97F4A7C15ull;
    r->name = strdup(cfg->name);
    r->recs = calloc(r->batch_records, sizeof(*r->recs));
    r->out = calloc(r->batch_records, sizeof(*r->out));
    if (r->name == NULL || r->recs == NULL || r->out == NULL)
        goto nomem;
    if (cfg->dead_letter == NULL) {
        snprintf(err, errlen, "sink %s: dead_letter is not set", cfg->name);
        return ING_ECONFIG;
    }
    if (sink_dead_letter_init(&r->dead_letter, cfg->dead_letter, r->name) < 0)
        goto nomem;
    rc = spool_reader_open(spool, cfg->name, &r->reader);
    if (rc < 0) {
        r->reader = NULL;
        snprintf(err, errlen, "sink %s: opening its spool reader failed: %s",
                 cfg->name, ing_strerror(rc));
        return rc;
    }
    r->stats.reader = r->reader;
    sink_metrics_register(&r->metrics, r->name, &r->stats);
    r->metrics_registered = 1;
    r->ctx.name = r->name;
    r->ctx.connected_gauge = r->metrics.connected;
    rc = ops->open(cfg, &r->ctx, &r->state, err, errlen);
    if (rc < 0) {
        r->state = NULL;
        return rc;
    }
    return 0;

nomem:
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
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

/* Returns 1 while a healthy sink has records left to deliver. A failing
 * sink is not waited for: its destination is unlikely to recover within
 * the drain time, and its records stay in the spool. */
static int drain_pending(sinks_t *s)
{
    for (size_t i = 0; i < s->count; i++) {
        sink_runner_t *r = &s->runners[i];

        if (r->started && atomic_load(&r->healthy) &&
            spool_reader_lag_bytes(r->reader) > 0)
            return 1;
    }
    return 0;
}

void sinks_drain(sinks_t *s, uint64_t drain_ms)
{
    struct timespec pause = {0, DRAIN_POLL_MS * 1000000L};
    uint64_t waited = 0;

    if (s == NULL)
        return;
    while (waited < drain_ms && drain_pending(s)) {
        nanosleep(&pause, NULL);
        waited += DRAIN_POLL_MS;
    }
    for (size_t i = 0; i < s->count; i++) {
        sink_runner_t *r = &s->runners[i];
        uint64_t lag;

        if (!r->started)
            continue;
        lag = spool_reader_lag_bytes(r->reader);
        if (lag == 0)
            continue;
        log_warn("sink has undelivered records at stop; they stay in the "
                 "spool for the next start",
                 "sink=%s lag_bytes=%" PRIu64 " lag_records=%" PRId64
                 " drain_ms=%" PRIu64,
                 r->name, lag, sink_stats_lag_records(&r->stats), drain_ms);
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
             * stuck in it delays shutdown past the timeout, by up to the
             * sink's timeout. Its reader must stay open until deliver
             * returns. */
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
            snprintf(err, errlen,
                     "sink %s: this build has no sink of that type", sc->name);
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
    return sinks_start_with(cfg, NULL, NULL, spool, out, err, errlen);
}

int sinks_healthy(sinks_t *s)
{
    for (size_t i = 0; i < s->count; i++) {
        if (!atomic_load(&s->runners[i].healthy))
            return 0;
    }
    return 1;
}

size_t sinks_describe(sinks_t *s, char *buf, size_t size)
{
    size_t used = 0;

    if (size == 0)
        return 0;
    used += (size_t)snprintf(buf, size, "{");
    for (size_t i = 0; s != NULL && i < s->count && used < size; i++) {
        sink_runner_t *r = &s->runners[i];

        /* Sink names are [a-z0-9_-], so they need no JSON escaping. */
        used += (size_t)snprintf(
            buf + used, size - used,
            "%s\"%s\":{\"type\":\"%s\",\"connected\":%s,\"healthy\":%s,"
            "\"lag_records\":%" PRId64 "}",
            i ? "," : "", r->name, r->ops->kind,
            atomic_load(&r->ctx.connected) ? "true" : "false",
            atomic_load(&r->healthy) ? "true" : "false",
            r->reader ? sink_stats_lag_records(&r->stats) : 0);
    }
    if (used < size)
        used += (size_t)snprintf(buf + used, size - used, "}");
    return used < size ? used : size - 1;
}
