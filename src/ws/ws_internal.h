/* Declarations shared by the files of the ws module, not by other modules.
 *
 * conn.c drives wslay over the stream, ingest.c and ingest_message.c hold
 * the telemetry protocol, and ws_metrics.c caches the metric series.
 */
#ifndef INGESTD_WS_WS_INTERNAL_H
#define INGESTD_WS_WS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "ws/ws.h"

/* ---- Metrics (ws_metrics.c) ---- */

enum ws_message_result {
    WS_MESSAGE_ACK = 0,
    WS_MESSAGE_INVALID = 1,
    WS_MESSAGE_FORBIDDEN = 2,
    WS_MESSAGE_ERROR = 3,
};

enum ws_reading_result {
    WS_READING_ACCEPTED = 0,
    WS_READING_INVALID = 1,
    WS_READING_FORBIDDEN = 2,
    WS_READING_UNPARSABLE = 3,
};

void ws_metrics_connection(int delta);
void ws_metrics_message(enum ws_message_result result);
void ws_metrics_close(uint16_t code);
void ws_metrics_bytes(uint64_t received, uint64_t sent);
void ws_metrics_readings(enum ws_reading_result result, uint64_t n);

/* ---- Telemetry messages (ingest_message.c) ---- */

/* One data message after parsing: either a batch ready to submit or an
 * reply to send instead. */
typedef struct ws_parsed {
    json_t *id;                    /* the envelope's correlation id, or NULL */
    pipeline_batch_t *batch;       /* readings to submit, or NULL */
    json_t *reply;                 /* an error reply, or NULL */
    enum ws_message_result result; /* of `reply` */
} ws_parsed_t;

/* Parses a text message from device `dev` into `out`. The batch is built
 * with the all-or-nothing policy of POST /v1/data: if a reading is
 * invalid, `out` contains a reply listing every rejected reading and no
 * batch. Returns 0, or ING_ENOMEM with nothing in `out`. */
int ws_message_parse(const ws_ingest_config_t *cfg, const auth_device_t *dev,
                     const char *text, size_t len, ws_parsed_t *out);

/* Frees what `p` contains and clears it. */
void ws_parsed_clear(ws_parsed_t *p);

/* Returns {"type":"ack","id":id,"ids":[...]} for a durable batch, or NULL
 * on allocation failure. `id` (borrowed) may be NULL. */
json_t *ws_reply_ack(const json_t *id, const pipeline_batch_t *b);

/* Returns {"type":"error","id":id,"error":code,"message":message}, or NULL
 * on allocation failure. */
json_t *ws_reply_error(const json_t *id, const char *code, const char *message);

/* Returns the reply to a batch that pipeline_batch_submit or its
 * completion failed with `status`, and sets `*fatal` when the connection
 * must close with 1011 after it. Returns NULL on allocation failure. */
json_t *ws_reply_failed(const json_t *id, int status, uint64_t retry_after_s,
                        int *fatal);

#endif
