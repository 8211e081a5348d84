/* WebSocket connections (RFC 6455) and the telemetry protocol on them.
 *
 * The HTTP module responds to the opening handshake and then hands the socket
 * over as a byte stream: it keeps owning the socket and the connection's
 * lifetime, and calls the ws_conn_on_* functions with what happens on it.
 * A ws connection turns those bytes into messages with wslay, calls an
 * application handler for each text or binary message, and sends messages
 * and close frames back through the stream's operations. The telemetry
 * protocol of GET /v1/ws (ws_ingest_open) is one such application, and
 * MQTT over WebSocket at GET /mqtt (ws_mqtt_open) is another, which hands
 * the bytes to an MQTT session of the mqtt module.
 *
 * Everything runs on the event loop thread that owns the stream.
 */
#ifndef INGESTD_WS_WS_H
#define INGESTD_WS_WS_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "auth/auth.h"
#include "net/tls.h"
#include "pipeline/pipeline.h"

/* ---- Opening handshake ---- */

#define WS_ACCEPT_LEN 28 /* base64 of a 20-byte SHA-1 digest */

/* Returns 1 if `key` is a valid Sec-WebSocket-Key: the base64 encoding of
 * 16 bytes, which is 24 characters ending in "==". */
int ws_handshake_key_valid(const char *key);

/* Computes the Sec-WebSocket-Accept value for `key`: the base64 encoding
 * of SHA-1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"). Writes
 * WS_ACCEPT_LEN characters and a NUL to `out`. Returns 0, ING_EINVAL for an
 * invalid key, or ING_EIO when OpenSSL fails. */
int ws_handshake_accept(const char *key, char out[WS_ACCEPT_LEN + 1]);

/* ---- The byte stream under a connection ---- */

/* Operations of the stream's owner. `ctx` is ws_stream_t.ctx. None of them
 * calls back into the ws connection before it returns. */
typedef struct ws_stream_ops {
    /* Queues `len` bytes for sending and takes ownership of the malloc'd
     * `data`, also on failure. Returns 0 or -1. */
    int (*write)(void *ctx, char *data, size_t len);
    /* Returns the number of bytes queued and not yet written. */
    size_t (*write_queue_size)(void *ctx);
    /* Starts (on != 0) or stops reading the socket. */
    void (*set_reading)(void *ctx, int on);
    /* Closes the stream once the queued bytes are written. The owner then
     * calls ws_conn_on_stream_closed. */
    void (*close)(void *ctx);
} ws_stream_ops_t;

typedef struct ws_stream {
    const ws_stream_ops_t *ops;
    void *ctx;
    uv_loop_t *loop;
    uint64_t conn_id; /* for logs */
    const char *peer; /* "ip:port", copied */
    /* The verified TLS client certificate of the connection, or NULL. It
     * lives as long as the stream. */
    const tls_peer_t *cert;
} ws_stream_t;

typedef struct ws_options {
    uint64_t max_message_size; /* bytes after reassembly; larger: 1009 */
    /* Frames of one data message, the first one included; more: 1009.
     * 0 means no limit. */
    uint64_t max_fragments;
    uint64_t idle_timeout_ms;  /* no input this long: close; 0: never */
    uint64_t ping_interval_ms; /* no input this long: ping; 0: never */
} ws_options_t;

/* ---- Connections ---- */

/* Close codes from RFC 6455 section 7.4.1 that ingestd sends. */
enum ws_close_code {
    WS_CLOSE_NORMAL = 1000,
    WS_CLOSE_GOING_AWAY = 1001,
    WS_CLOSE_PROTOCOL_ERROR = 1002,
    WS_CLOSE_UNSUPPORTED_DATA = 1003,
    WS_CLOSE_ABNORMAL = 1006, /* never sent: the TCP connection just ended */
    WS_CLOSE_INVALID_DATA = 1007,
    WS_CLOSE_POLICY_VIOLATION = 1008,
    WS_CLOSE_MESSAGE_TOO_BIG = 1009,
    WS_CLOSE_INTERNAL_ERROR = 1011,
};

#define WS_CLOSE_REASON_MAX 123 /* bytes; a close frame payload is <= 125 */

typedef struct ws_conn ws_conn_t;

/* The application protocol on a connection. Callbacks run on the loop
 * thread, never from inside a ws_conn_* call that the application made,
 * so a callback may call any ws_conn_* function. */
typedef struct ws_handler {
    /* A complete text message, valid UTF-8 (wslay checks it). `data` is
     * valid during the call only. */
    void (*on_text)(ws_conn_t *ws, const char *data, size_t len, void *arg);
    /* A complete binary message, or NULL to close with 1003. */
    void (*on_binary)(ws_conn_t *ws, const uint8_t *data, size_t len,
                      void *arg);
    /* The server is stopping. The application replies to what it has
     * accepted and then calls ws_conn_close with 1001. NULL closes with
     * 1001 at once. */
    void (*on_drain)(ws_conn_t *ws, void *arg);
    /* The deadline set with ws_conn_set_timeout passed. */
    void (*on_timeout)(ws_conn_t *ws, void *arg);
    /* The connection is gone, `code` being the close code sent or
     * received, or 1006 when the TCP connection ended without one. This
     * is the last callback, and `ws` is freed right after it returns. */
    void (*on_close)(ws_conn_t *ws, uint16_t code, void *arg);
} ws_handler_t;

/* Starts a WebSocket connection on `stream` (copied) after a successful
 * opening handshake, and starts reading. `handler` must outlive the
 * connection. Returns NULL on allocation failure; the caller then closes
 * the stream itself. */
ws_conn_t *ws_conn_open(const ws_stream_t *stream, const ws_options_t *opts,
                        const ws_handler_t *handler, void *arg);

/* Entry points for the stream's owner. */

/* Passes bytes read from the socket. */
void ws_conn_on_read(ws_conn_t *ws, const char *data, size_t len);
/* Reports that a write completed, so queued output may have drained. */
void ws_conn_on_written(ws_conn_t *ws);
/* Reports that the server is stopping (see ws_handler_t.on_drain). */
void ws_conn_on_drain(ws_conn_t *ws);
/* Reports that the stream closed. The owner makes no further call, and
 * the stream's operations are not used any more. */
void ws_conn_on_stream_closed(ws_conn_t *ws);

/* Functions for the application. After the connection started closing
 * they do nothing and return ING_ESHUTDOWN where they return a code. */

/* Queues a text message, which must be valid UTF-8. Returns 0,
 * ING_ENOMEM or ING_ESHUTDOWN. */
int ws_conn_send_text(ws_conn_t *ws, const char *data, size_t len);

/* Queues a binary message. Returns 0, ING_ENOMEM or ING_ESHUTDOWN. */
int ws_conn_send_binary(ws_conn_t *ws, const uint8_t *data, size_t len);

/* Starts the closing handshake with `code` and a `reason` of at most
 * WS_CLOSE_REASON_MAX bytes of UTF-8 (longer reasons are cut). Messages
 * queued before are sent first; messages received after are dropped. */
void ws_conn_close(ws_conn_t *ws, uint16_t code, const char *reason);

/* Stops (paused != 0) or resumes handing messages to the application and
 * reading the socket. This is how an application applies backpressure. */
void ws_conn_pause(ws_conn_t *ws, int paused);

/* Calls handler->on_timeout once after `ms` milliseconds; 0 cancels. */
void ws_conn_set_timeout(ws_conn_t *ws, uint64_t ms);

uint64_t ws_conn_id(const ws_conn_t *ws);
const char *ws_conn_peer(const ws_conn_t *ws);

/* ---- Telemetry protocol of GET /v1/ws ---- */

typedef struct ws_ingest_config {
    auth_t *auth;
    pipeline_loop_t *pl;
    ws_options_t ws;
    uint64_t auth_timeout_ms; /* first-message authentication window */
    uint64_t max_readings;    /* per message */
    uint64_t retry_after_s;   /* sent with spool_full and shutting_down */
} ws_ingest_config_t;

/* Opens a telemetry session on `stream`, as ws_conn_open does. `key` is the
 * credential (API key or JWT) that the upgrade request sent in a header, or
 * NULL, in which case the first message must be
 * {"type":"auth","key":"..."}. The credential is checked again before each
 * message, so that disabling the device or revoking the key also ends open
 * connections, and a session authenticated by a JWT closes with 1008
 * "token expired" at the token's exp. Without a header credential, a
 * verified TLS client certificate (stream->cert) authenticates the
 * session instead of the first message, and its device is checked again
 * before each message. Returns the connection, or NULL on allocation
 * failure. */
ws_conn_t *ws_ingest_open(const ws_stream_t *stream,
                          const ws_ingest_config_t *cfg, const char *key);

/* ---- MQTT over WebSocket (GET /mqtt) ---- */

/* Subprotocols that GET /mqtt accepts, in order of preference. MQTT 3.1.1
 * and 5.0 (section 6 of each) require "mqtt"; clients of MQTT 3.1, such
 * as old Paho releases, offer "mqttv3.1". Names compare case-sensitively,
 * because a browser fails the handshake unless the server echoes one of
 * the names it offered exactly. */
#define WS_MQTT_SUBPROTOCOL "mqtt"
#define WS_MQTT_SUBPROTOCOL_V31 "mqttv3.1"

/* Returns 1 if `loop` has an MQTT context (mqtt_listener_for_loop) that
 * WebSocket connections can open sessions on, else 0. Thread-safe. */
int ws_mqtt_available(uv_loop_t *loop);

/* Opens an MQTT session of the loop's MQTT context on `stream`, as
 * ws_conn_open does: each binary message carries MQTT bytes, split or
 * joined anyhow, and each packet the server sends goes out as one binary
 * message. A text message closes the connection with 1003. When the
 * session ends the connection closes with 1000, or with 1001 when the
 * server drains. A close from the client ends the session as a TCP
 * disconnect does. Returns the connection, or NULL when the loop has no
 * MQTT context or on allocation failure; the caller then closes the
 * stream itself. */
ws_conn_t *ws_mqtt_open(const ws_stream_t *stream, const ws_options_t *opts);

#endif
