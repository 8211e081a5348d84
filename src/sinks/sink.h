/* Sinks deliver spooled records to their destination.
 *
 * Each configured sink runs on its own thread with its own spool reader:
 * it reads a batch, hands it to the sink's deliver function, and gets an
 * outcome per record. Records the destination acknowledged or rejected for
 * good (which go to the dead-letter file) let the cursor move on. When any
 * record must be sent again, the runner rewinds to the committed cursor and
 * retries the batch after an exponential backoff with full jitter, so
 * delivery is at least once and in spool order. See docs/sinks.md.
 */
#ifndef INGESTD_SINKS_SINK_H
#define INGESTD_SINKS_SINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/config.h"
#include "spool/spool.h"

enum sink_record_status {
    SINK_RECORD_OK = 0,      /* acknowledged by the destination */
    SINK_RECORD_RETRY = 1,   /* not acknowledged: send again later */
    SINK_RECORD_REJECTED = 2 /* rejected for good: dead-letter it */
};

/* The outcome of one record of a batch. */
typedef struct sink_outcome {
    int status; /* enum sink_record_status */
    /* For REJECTED: why, such as "message too large (1.2 MiB > 1 MiB
     * broker limit)". Written into the dead-letter file. */
    char reason[200];
} sink_outcome_t;

/* The runner's services for one sink, valid from open until close. */
typedef struct sink_ctx sink_ctx_t;

/* Sets the ingestd_sink_connected{sink} gauge (1 connected, 0 not) and the
 * connection state shown by /readyz. Thread-safe. */
void sink_set_connected(sink_ctx_t *ctx, bool connected);

/* Returns the sink's configured name, for log lines. */
const char *sink_log_name(const sink_ctx_t *ctx);

typedef struct sink_ops {
    const char *kind; /* the config type, such as "file" or "redis" */

    /* Creates the sink's state from its configuration. A sink may connect
     * here or on the first deliver; an unreachable broker must not fail
     * open, because the runner retries deliver but not open. Returns 0 or a
     * negative ING_E* with a message in `err`. */
    int (*open)(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                char *err, size_t errlen);

    /* Sends n records and waits (bounded by cfg->timeout_ms) for the
     * broker's acknowledgements. Fills out[i] for each record. Returns
     * 0 when every outcome is set (OK or REJECTED or RETRY), or a
     * negative ING_E* when the connection failed as a whole (all RETRY). */
    int (*deliver)(void *state, const spool_record_t *recs, size_t n,
                   sink_outcome_t *out);

    void (*close)(void *state);
} sink_ops_t;

extern const sink_ops_t sink_file_ops;
extern const sink_ops_t sink_kafka_ops;
extern const sink_ops_t sink_mqtt_ops;
extern const sink_ops_t sink_nats_ops;
extern const sink_ops_t sink_rabbitmq_ops;
extern const sink_ops_t sink_redis_ops;

typedef struct sinks sinks_t;

/* Opens a reader and starts a thread for each sink in `cfg`. Returns 0 or a
 * negative ing_error with a message in `err`. */
int sinks_start(const config_t *cfg, spool_t *spool, sinks_t **out, char *err,
                size_t errlen);

/* Waits until every sink has delivered everything in the spool, or
 * `drain_ms` passed, or a sink is failing (retrying). Call it after the
 * listeners stopped and before sinks_stop, so that a clean stop with a
 * healthy destination leaves the spool empty. Accepts NULL. */
void sinks_drain(sinks_t *s, uint64_t drain_ms);

/* Stops the sinks: each finishes or abandons its current batch within
 * `timeout_ms` (what is not committed stays in the spool for the next
 * start), then closes its reader. */
void sinks_stop(sinks_t *s, uint64_t timeout_ms);

/* Returns 1 when every sink delivered its last batch without error. */
int sinks_healthy(sinks_t *s);

/* Writes a JSON object describing each sink, such as
 * {"redis":{"connected":true,"lag_records":0}}, into `buf`. Returns the
 * length written, truncated to fit `size`. Thread-safe. */
size_t sinks_describe(sinks_t *s, char *buf, size_t size);

#endif
