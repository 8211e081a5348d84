/* The pipeline turns authenticated readings into durable spool records.
 *
 * A protocol adapter creates a batch for one request or message, adds each
 * reading (validated against the schema of the device's type and wrapped
 * in an envelope with a new UUIDv7 message id), then submits the batch. The
 * completion runs on the adapter's own event loop once the spool's
 * fdatasync covering the batch returned, and only then may the adapter
 * acknowledge the device. Adapters never touch the spool directly.
 *
 * Envelope, one JSON object per spool record:
 *   {"message_id":"...","device_id":"...","device_type":"...",
 *    "protocol":"http","received_at":"2026-12-04T17:00:00.123Z",
 *    "content_type":"application/json","payload":{...the reading...}}
 * plus any field set with pipeline_batch_set_metadata, placed before
 * "payload".
 */
#ifndef INGESTD_PIPELINE_PIPELINE_H
#define INGESTD_PIPELINE_PIPELINE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <uv.h>

#include "auth/auth.h"
#include "core/config.h"
#include "pipeline/limits.h"
#include "spool/spool.h"

typedef struct pipeline pipeline_t;
typedef struct pipeline_loop pipeline_loop_t;
typedef struct pipeline_batch pipeline_batch_t;

/* Compiles every device type's schema and binds the spool. Returns 0, or
 * ING_ECONFIG with a message naming the device type in `err`. */
int pipeline_create(const config_t *cfg, spool_t *spool, pipeline_t **out,
                    char *err, size_t errlen);
void pipeline_destroy(pipeline_t *p);

/* Binds the pipeline to an event loop, so that completions run on that
 * loop's thread. Call from the loop's thread. Returns NULL on allocation
 * failure. Detach (also from that thread) only after every batch submitted
 * through it completed; detaching closes a libuv handle, so run the loop
 * once more afterwards. */
pipeline_loop_t *pipeline_loop_attach(pipeline_t *p, uv_loop_t *loop);
void pipeline_loop_detach(pipeline_loop_t *pl);

/* Number of submitted batches whose completion has not run yet. */
size_t pipeline_loop_pending(pipeline_loop_t *pl);

/* Starts a batch of readings from device `dev` arriving over `protocol`
 * ("http", "ws", "mqtt"). `content_type` may be NULL. Returns NULL on
 * allocation failure. */
pipeline_batch_t *pipeline_batch_new(pipeline_loop_t *pl,
                                     const auth_device_t *dev,
                                     const char *protocol,
                                     const char *content_type);

/* Adds field `key` with `value` (reference stolen) to the envelope of
 * every reading added afterwards, such as "mqtt" with the topic and user
 * properties of an MQTT message. Call before the first pipeline_batch_add.
 * `key` must not name a standard envelope field. Returns 0, ING_EINVAL for
 * a reserved key or a batch with readings, or ING_ENOMEM. */
int pipeline_batch_set_metadata(pipeline_batch_t *b, const char *key,
                                json_t *value);

enum pipeline_add_result {
    PIPELINE_ACCEPTED = 0,  /* valid, enveloped, waiting for submit */
    PIPELINE_INVALID = 1,   /* failed validation, errors recorded */
    PIPELINE_FORBIDDEN = 2, /* its device_id names another device */
};

/* Validates `reading` (borrowed) and adds it to the batch. Every reading
 * is checked, also after a failed one, so that the errors list all
 * failures. Returns an enum pipeline_add_result, or ING_ENOMEM. */
int pipeline_batch_add(pipeline_batch_t *b, const json_t *reading);

/* Records a reading that could not even be parsed (for NDJSON lines), so
 * that its index and reason appear in the errors. */
void pipeline_batch_add_unparsable(pipeline_batch_t *b, const char *reason);

/* Adds a reading as pipeline_batch_add does, validating the parsed
 * `reading` (borrowed), but stores `raw`, the JSON text it was parsed
 * from, as the envelope's payload: byte for byte apart from whitespace
 * outside strings, so numbers keep the form the device sent. A reading
 * nested deeper than limits.max_json_depth is recorded as invalid.
 * Returns an enum pipeline_add_result, or ING_ENOMEM. */
int pipeline_batch_add_raw(pipeline_batch_t *b, const json_t *reading,
                           const char *raw, size_t raw_len);

size_t pipeline_batch_count(const pipeline_batch_t *b);     /* all added */
size_t pipeline_batch_invalid(const pipeline_batch_t *b);   /* invalid */
size_t pipeline_batch_forbidden(const pipeline_batch_t *b); /* forbidden */

/* Returns a new JSON array describing each rejected reading:
 * [{"index":0,"errors":[{"pointer":"/sensor_value",
 *   "reason":"must be <= 100, got 120"}]}]. The caller owns it. */
json_t *pipeline_batch_errors(const pipeline_batch_t *b);

/* Number of readings accepted into the batch so far, including those
 * answered with the ids of an earlier acceptance of their idempotency key.
 * After a replayed request key, the number of ids that request got. */
size_t pipeline_batch_accepted(const pipeline_batch_t *b);

/* Returns the message id of accepted reading `i`, in the order they were
 * added (the original id for a replayed key), or NULL when `i` is out of
 * range. */
const char *pipeline_batch_id(const pipeline_batch_t *b, size_t i);

/* Sets the request-level idempotency key (HTTP Idempotency-Key, an MQTT 5
 * user property, the WebSocket "idempotency_key"), which covers every
 * reading of the batch and replaces their per-reading keys. Call before
 * the first pipeline_batch_add. When the device used the key within
 * idempotency.window, the batch becomes a replay: readings added later are
 * ignored, nothing is stored, and the completion reports the original ids.
 * Without idempotency.enabled the key is ignored. Returns 0 (new key or
 * replay), ING_EBUSY while a batch with that key is in flight (answer
 * "retry later"), ING_EINVAL for a key that is empty, over 255 bytes, not
 * UTF-8 or has control characters, or ING_ENOMEM.
 *
 * Per-reading keys come from the reading field named by
 * idempotency.field, a string or an integer, and are handled inside
 * pipeline_batch_add. A reading whose key another batch holds in flight
 * makes pipeline_batch_submit return ING_EBUSY. */
int pipeline_batch_set_idempotency_key(pipeline_batch_t *b, const char *key,
                                       size_t len);

/* Number of accepted readings answered with original ids, not stored. */
size_t pipeline_batch_replayed(const pipeline_batch_t *b);

/* Called on the batch's loop thread. `status` is 0 when every reading is
 * durable, ING_EFULL, ING_EIO or ING_ESHUTDOWN otherwise. The batch stays
 * valid until pipeline_batch_free. */
typedef void (*pipeline_done_fn)(pipeline_batch_t *b, int status, void *arg);

/* Appends the batch's accepted readings to the spool as one unit, after
 * the flow-control checks that every protocol shares: the spool's high
 * mark (see pipeline_spool_full), then the device's rate limits and daily
 * quota. Returns 0 when submitted (the completion will run exactly once),
 * or, when nothing was submitted (no completion runs): ING_EFULL (spool
 * past its high mark or full), ING_ERATE or ING_EQUOTA (see
 * pipeline_batch_retry_after_ms), ING_ETOOBIG or ING_ESHUTDOWN. Each
 * batch turned away by flow control is counted once in
 * ingestd_rejected_total, or in ingestd_throttled_total after
 * pipeline_batch_set_retrying. A batch must not be submitted with invalid
 * or forbidden readings; a batch is all or nothing. */
int pipeline_batch_submit(pipeline_batch_t *b, pipeline_done_fn done,
                          void *arg);

void pipeline_batch_free(pipeline_batch_t *b);

/* Returns the milliseconds after which a batch that pipeline_batch_submit
 * turned away with ING_ERATE or ING_EQUOTA may pass, or 0. */
uint64_t pipeline_batch_retry_after_ms(const pipeline_batch_t *b);

/* Marks the batch as held by its adapter, which submits it again until it
 * passes instead of answering the device (MQTT QoS 0 and 3.1.1), so that
 * turning it away counts in ingestd_throttled_total. */
void pipeline_batch_set_retrying(pipeline_batch_t *b);

/* Counts a reading, request or connection that an adapter turned away for
 * `reason` before it reached pipeline_batch_submit, in
 * ingestd_rejected_total{protocol,reason}. Thread-safe. */
void pipeline_count_rejected(const char *protocol, const char *reason);

/* Returns the flow-control state shared by every loop: token buckets,
 * connection counts (see pipeline/limits.h). */
limits_t *pipeline_limits(pipeline_t *p);

/* Returns the configuration the pipeline was created with. */
const config_t *pipeline_config(pipeline_t *p);

/* Counts a session (MQTT or WebSocket) of device `dev` against
 * limits.max_connections_per_device. Returns 0, and then
 * pipeline_device_disconnect must follow, or ING_EQUOTA when the device
 * has as many sessions as allowed. */
int pipeline_device_connect(pipeline_t *p, const auth_device_t *dev);
void pipeline_device_disconnect(pipeline_t *p, const auth_device_t *dev);

/* Returns the pipeline a loop is attached to. */
pipeline_t *pipeline_loop_pipeline(pipeline_loop_t *pl);

/* Returns 1 while the spool is congested, so that adapters can answer "try
 * later" before reading a body: from when its size reaches
 * spool.high_mark percent of spool.max_size until it drops below
 * spool.low_mark percent (hysteresis), and whenever it is full. */
int pipeline_spool_full(pipeline_t *p);

#endif
