/* Declarations shared by the files of the HTTP module, not by other modules.
 *
 * listener.c owns sockets and connection lifetimes, conn.c turns bytes into
 * requests and responses into bytes, response.c formats responses, payload.c
 * parses request headers and bodies, api.c and admin.c hold the routes, and
 * http_metrics.c caches the metric series.
 */
#ifndef INGESTD_HTTP_HTTP_INTERNAL_H
#define INGESTD_HTTP_HTTP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <uv.h>

#include "auth/auth.h"
#include "http/http.h"
#include "net/conn.h"
#include "pipeline/pipeline.h"
#include "ws/ws.h"

/* ---- Limits ---- */

typedef struct http_limits {
    uint64_t max_header_bytes; /* URL plus header names and values */
    uint64_t max_body_bytes;
    uint64_t max_readings;
    uint64_t header_timeout_ms;
    uint64_t body_timeout_ms;
    uint64_t idle_timeout_ms;
    uint64_t max_connections;
    uint64_t retry_after_s;
} http_limits_t;

/* ---- Responses (response.c) ---- */

/* A complete response before it is serialized. `headers` contains extra header
 * lines, each ending in CRLF, or NULL. Both strings are owned. */
typedef struct http_response {
    int status;
    const char *content_type;
    char *headers;
    char *body;
    size_t body_len;
    int close;        /* close the connection after this response */
    const char *code; /* static error code for the log, or NULL */
} http_response_t;

enum http_conn_mode {
    HTTP_MODE_CLOSE = 0,      /* sends Connection: close */
    HTTP_MODE_KEEP_10 = 1,    /* HTTP/1.0 keep-alive: sends the header */
    HTTP_MODE_KEEP_11 = 2,    /* HTTP/1.1 default: no header needed */
};

/* Returns the reason phrase of `status`, or "Unknown". */
const char *http_status_reason(int status);

/* Formats `resp` as bytes to send, into a new buffer whose length is
 * stored in `*len`. Returns NULL on allocation failure. */
char *http_response_format(const http_response_t *resp,
                           enum http_conn_mode mode, size_t *len);

/* Fills `resp` with a JSON error response {"error":code,"message":message}
 * plus the "readings" array when `readings` (borrowed) is not NULL.
 * `headers` (copied, may be NULL) adds header lines ending in CRLF.
 * Returns 0 or ING_ENOMEM. */
int http_response_error(http_response_t *resp, int status, const char *code,
                        const char *message, const char *headers,
                        const json_t *readings);

/* Fills `resp` with a JSON response that serializes `body` (borrowed).
 * Returns 0 or ING_ENOMEM. */
int http_response_json(http_response_t *resp, int status,
                       const json_t *body);

/* Frees the strings of `resp` and clears it. */
void http_response_clear(http_response_t *resp);

/* ---- Request headers and bodies (payload.c) ---- */

enum http_content_type {
    HTTP_CT_UNSUPPORTED = 0,
    HTTP_CT_JSON = 1,
    HTTP_CT_NDJSON = 2,
};

#define HTTP_SUPPORTED_TYPES                                                   \
    "application/json, application/x-ndjson or application/ndjson"

/* Parses a Content-Type value. A charset parameter must be utf-8; other
 * parameters are ignored. Returns an enum http_content_type. */
int http_content_type_parse(const char *value);

/* Finds the API key in an Authorization value ("Bearer KEY", scheme
 * case-insensitive). Returns 1 and points `key`/`len` into `value`, or 0. */
int http_bearer_key(const char *value, const char **key, size_t *len);

/* Finds the next NDJSON line at or after `*off` that is not blank, without
 * its line ending. Advances `*off` past it. Returns 1 if one was found. */
int http_ndjson_next(const char *buf, size_t len, size_t *off,
                     const char **line, size_t *line_len);

/* Splits "host:port" or "[v6]:port" into `host` and `port`. An empty host
 * or "*" means every address and is returned as "". Returns 0 or
 * ING_EINVAL. */
int http_listen_parse(const char *listen, char *host, size_t hostlen,
                      int *port);

/* ---- Connections (conn.c, listener.c) ---- */

typedef struct http_conn http_conn_t;
typedef struct http_request http_request_t;

/* One route of a listener. `check` runs when the headers are complete and
 * may reject the request with http_request_reject. `handle` runs when the
 * body is complete and responds now or later with http_conn_respond. */
typedef struct http_route {
    const char *path;
    const char *method;
    void (*check)(http_conn_t *c, http_request_t *r);
    void (*handle)(http_conn_t *c, http_request_t *r);
} http_route_t;

enum http_listener_kind {
    HTTP_LISTENER_API = 0,
    HTTP_LISTENER_ADMIN = 1,
};

enum http_conn_state {
    CONN_IDLE = 0,    /* waiting for the first byte of a request */
    CONN_HEADERS = 1, /* reading the request line and headers */
    CONN_BODY = 2,    /* reading the body */
    CONN_WAITING = 3, /* request complete, its response not queued */
    CONN_CLOSING = 4, /* last response queued, input dropped until EOF */
    CONN_STREAM = 5,  /* upgraded: bytes go to the stream handler */
};

#define HTTP_URL_MAX_STORED 2048
#define HTTP_FIELD_MAX 64
#define HTTP_VALUE_MAX 1024
#define HTTP_CTYPE_MAX 256
/* Longest credential kept from Authorization or X-API-Key. A header value
 * is at most HTTP_VALUE_MAX anyway, so JWTs over HTTP are limited to
 * that, below AUTH_CREDENTIAL_MAX. */
#define HTTP_KEY_MAX HTTP_VALUE_MAX
#define HTTP_IDEMPOTENCY_KEY_MAX 255
#define HTTP_WS_KEY_MAX 64
#define HTTP_WS_VERSION_MAX 16
#define HTTP_WS_PROTOCOLS_MAX 256

/* What the opening handshake of a WebSocket upgrade sent (upgrade.c). */
typedef struct http_ws_headers {
    int upgrade_websocket;  /* Upgrade contains the token "websocket" */
    int connection_upgrade; /* Connection contains the token "upgrade" */
    int has_host;
    int version_count;      /* Sec-WebSocket-Version headers seen */
    char version[HTTP_WS_VERSION_MAX + 1];
    int key_count;          /* Sec-WebSocket-Key headers seen */
    int key_overflow;
    char key[HTTP_WS_KEY_MAX + 1];
    int protocol_count;     /* Sec-WebSocket-Protocol headers seen */
    int protocols_overflow; /* the lists did not fit in `protocols` */
    char protocols[HTTP_WS_PROTOCOLS_MAX + 1]; /* every list, joined */
    const char *protocol;   /* the selected subprotocol (static), or NULL */
} http_ws_headers_t;

struct http_request {
    uint64_t start_ns; /* uv_hrtime() at the request's first byte */
    uint64_t header_bytes;
    char url[HTTP_URL_MAX_STORED + 1];
    size_t url_len;
    char field[HTTP_FIELD_MAX + 1];
    size_t field_len;
    int field_overflow;
    char value[HTTP_VALUE_MAX + 1];
    size_t value_len;
    int value_overflow;
    char content_type[HTTP_CTYPE_MAX + 1];
    int has_content_type;
    char key[HTTP_KEY_MAX + 1];
    size_t key_len;
    int key_overflow;  /* a key longer than any valid key was sent */
    int expect_continue;
    int expect_other;  /* an Expect value other than 100-continue */
    int key_conflict;  /* Authorization and X-API-Key differ */
    int transfer_coding_other; /* a transfer coding besides chunked */
    int keep_alive;    /* from llhttp at message complete */
    const http_route_t *route;
    char *body;
    size_t body_len;
    size_t body_cap;
    http_response_t reject; /* an early rejection, when reject.status != 0 */
    int reject_now;         /* send the rejection without the body */
    uint64_t body_seen;     /* body bytes received, kept or dropped */
    uint64_t chunk_ext_bytes; /* extension bytes of the current chunk */
    const char *reject_reason; /* ingestd_http_rejected_total label */
    auth_device_t dev;         /* the authenticated device (API) */
    int have_dev;
    int ctype;                 /* enum http_content_type (API) */
    pipeline_batch_t *batch;   /* submitted and pending (API) */
    size_t unparsable;         /* readings that failed to parse (API) */
    /* The Idempotency-Key header (API). A value over the 255 bytes that
     * the pipeline accepts, or a repeated header, makes it invalid. */
    char idempotency_key[HTTP_IDEMPOTENCY_KEY_MAX + 1];
    size_t idempotency_key_len;
    int idempotency_key_count; /* headers seen */
    int idempotency_key_invalid;
    http_ws_headers_t ws;      /* WebSocket handshake headers (API) */
};

struct http_listener {
    uv_loop_t *loop;
    uv_tcp_t tcp;
    enum http_listener_kind kind;
    const char *name; /* "api", "https" or "admin", for logs */
    tls_server_t *tls; /* set on the https listener */
    char address[128];
    http_limits_t limits;
    const http_route_t *routes;
    size_t route_count;
    const char *endpoints; /* listed in 404 responses */
    auth_t *auth;
    pipeline_loop_t *pl;
    /* The pipeline's limits (API), kept here because connections close
     * after `pl` is detached at shutdown, while the pipeline lives on. */
    limits_t *flow_limits;
    http_admin_hooks_t hooks;
    ws_ingest_config_t ws; /* settings of GET /v1/ws sessions (API) */
    ws_options_t mqtt_ws;  /* settings of GET /mqtt connections (API) */
    http_conn_t *conns; /* doubly linked list of open connections */
    size_t conn_count;  /* open connections, including turned-away ones */
    size_t served;      /* connections counted against max_connections */
    size_t refs;        /* listening handle, each connection, the owner */
    int listening;
    int draining;
    int closing;
};

struct http_conn {
    net_conn_t net; /* the socket, in plain text or TLS */
    uv_timer_t timer;
    llhttp_t parser;
    http_listener_t *listener;
    http_conn_t *prev;
    http_conn_t *next;
    uint64_t id;
    char peer[64];
    enum http_conn_state state;
    int handles;   /* libuv handles not closed yet */
    int holds;     /* pending pipeline completions that use this struct */
    int closed;    /* uv_close was called */
    int counted;   /* counts against max_connections */
    int turned_away; /* over max_connections: gets a 503 once ready */
    int reading;   /* plaintext input is wanted from c->net */
    int in_process;
    int write_wait; /* too much queued output, so parsing waits */
    int abort;      /* a callback stopped the parser to reject */
    char *in;       /* received bytes not parsed yet */
    size_t in_off;
    size_t in_len;
    size_t in_cap;
    uint64_t linger_bytes;
    http_request_t req;
    const struct http_stream_handler *stream; /* set in CONN_STREAM */
    void *stream_arg;
    int stream_reading; /* the stream handler wants input */
    int stream_closed;  /* the handler's on_close ran */
};

/* Sets up `c` once its connection is ready (after the TLS handshake) and
 * starts reading. Returns 0 or a negative libuv error. */
int http_conn_start(http_conn_t *c);

/* Connection events of c->net (conn_io.c). */
extern const net_conn_events_t http_conn_events;

/* Responds to the current request, taking ownership of `resp`'s strings, and
 * continues with the next pipelined request unless the connection must
 * close. Safe to call when the connection closed meanwhile. */
void http_conn_respond(http_conn_t *c, http_response_t *resp);

/* Responds with a JSON error. `headers` may be NULL. */
void http_conn_error(http_conn_t *c, int status, const char *code,
                     const char *message, const char *headers);

/* Sends `resp` at once on a connection that has not sent a request, for
 * turning away a connection over the limit, then closes it. */
void http_conn_turn_away(http_conn_t *c, http_response_t *resp);

enum http_reject_when {
    HTTP_REJECT_AFTER_BODY = 0, /* read and drop the body, keep-alive */
    HTTP_REJECT_NOW = 1,        /* respond before the body, then close */
    HTTP_REJECT_AFTER_BODY_CLOSE = 2, /* as AFTER_BODY, then close */
};

/* Records an early rejection of the current request, sent at the time
 * `when` names. `code` must be static. `reason` labels
 * ingestd_http_rejected_total, or is NULL. */
void http_request_reject(http_conn_t *c, int status, const char *code,
                         const char *message, const char *headers,
                         enum http_reject_when when, const char *reason);

/* Keeps the connection struct alive across an asynchronous step, even if
 * the connection closes meanwhile. Each hold needs one release. */
void http_conn_hold(http_conn_t *c);

/* Drops a hold. Returns 1 if the connection is still open, 0 if it
 * closed meanwhile (and the struct may be gone). */
int http_conn_release(http_conn_t *c);

/* Closes the connection without a response. */
void http_conn_close(http_conn_t *c);

/* ---- Upgraded connections (stream.c, upgrade.c) ---- */

/* Whoever takes over a connection after a 101 response. The connection
 * keeps owning the socket: it reads and hands over the bytes, writes what
 * the handler sends, and tells the handler when it closes. */
typedef struct http_stream_handler {
    void (*on_read)(void *arg, const char *data, size_t len);
    void (*on_written)(void *arg); /* a write completed */
    void (*on_drain)(void *arg);   /* the listener is draining */
    void (*on_close)(void *arg);   /* last call; the socket is closed */
} http_stream_handler_t;

/* Switches `c` to CONN_STREAM after the current request's 101 response was
 * queued. Bytes received after the request head go to `h->on_read` at
 * once. `h` must outlive the connection. */
void http_conn_switch_stream(http_conn_t *c, const http_stream_handler_t *h,
                             void *arg);

/* Returns the name of the first query parameter of `url` that carries a
 * key (api_key, key, token and the like), or NULL. Keys in URLs end up in
 * proxy and access logs, so such requests are rejected. */
const char *http_key_in_url(const char *url);

/* Collects the WebSocket handshake headers while llhttp reads them. */
void http_ws_use_header(http_request_t *r);

/* GET /v1/ws: checks the opening handshake and responds to it. */
void http_ws_check(http_conn_t *c, http_request_t *r);
void http_ws_handle(http_conn_t *c, http_request_t *r);

/* GET /mqtt: checks the opening handshake and the subprotocol ("mqtt" or
 * "mqttv3.1"), responds to it, and hands the connection to an MQTT
 * session of the loop's MQTT context. */
void http_mqtt_check(http_conn_t *c, http_request_t *r);
void http_mqtt_handle(http_conn_t *c, http_request_t *r);

/* Queued output past HIGH makes the connection stop parsing requests
 * until its writes drain below LOW, so that a client that sends without
 * reading cannot make the server buffer without end. */
#define HTTP_WRITE_QUEUE_HIGH (256 * 1024)
#define HTTP_WRITE_QUEUE_LOW (64 * 1024)

/* Input buffers larger than this are freed once parsed. */
#define HTTP_INPUT_KEEP (16 * 1024)

/* Internal steps of a connection, shared by conn.c and conn_io.c. */
void http_conn_init_parser(http_conn_t *c);
void http_conn_process(http_conn_t *c);
void http_conn_send_reject(http_conn_t *c);
void http_conn_set_state(http_conn_t *c, enum http_conn_state state);
void http_conn_update_reading(http_conn_t *c);
void http_conn_begin_close(http_conn_t *c);

/* Queues `len` bytes at `bytes` for sending. `data` (may be NULL) is freed
 * once written, also on failure. Returns 0 or -1. */
int http_conn_write(http_conn_t *c, char *data, const char *bytes,
                    size_t len);

/* Frees `c` once its handles closed and no hold remains (listener.c). */
void http_listener_conn_gone(http_conn_t *c);

/* Starts the protocol on `c` once c->net is ready, or turns it away
 * (listener.c). */
void http_listener_conn_ready(net_conn_t *n);

/* Releases a connection counted against the connection limits
 * (listener.c). */
void http_listener_conn_uncount(http_conn_t *c);

/* Values of http_conn_t.turned_away. */
#define HTTP_TURN_AWAY_FULL 1 /* over a connection maximum: 503 */
#define HTTP_TURN_AWAY_RATE 2 /* over the address's connection rate: 429 */

/* Logs a rejected request at warn, rate-limited. */
void http_log_reject(http_conn_t *c, int status, const char *code);

/* ---- TLS client certificates (cert_auth.c) ---- */

enum http_cert_result {
    HTTP_CERT_NONE = 0,     /* no certificate, or a credential was sent */
    HTTP_CERT_ACCEPTED = 1, /* r->dev is the certificate's device */
    HTTP_CERT_REJECTED = 2, /* a rejection of the request is recorded */
};

/* Authenticates a request without a credential header on a connection
 * with a verified client certificate as the certificate's device.
 * Returns an enum http_cert_result. */
int http_cert_check(http_conn_t *c, http_request_t *r);

/* After a credential authenticated r->dev, checks that it is the device
 * of the connection's client certificate, if there is one. Returns 1, or
 * 0 after recording a 403 rejection. */
int http_cert_matches(http_conn_t *c, http_request_t *r);

/* ---- Routes (api.c, admin.c) ---- */

extern const http_route_t http_api_routes[];
extern const size_t http_api_route_count;
extern const http_route_t http_admin_routes[];
extern const size_t http_admin_route_count;

/* ---- Metrics (http_metrics.c) ---- */

void http_metrics_request(enum http_listener_kind kind, int status,
                          double seconds);
void http_metrics_connection(enum http_listener_kind kind, int delta);
void http_metrics_bytes(enum http_listener_kind kind, uint64_t received,
                        uint64_t sent);
void http_metrics_rejected(const char *reason);

enum http_reading_result {
    HTTP_READING_ACCEPTED = 0,
    HTTP_READING_INVALID = 1,
    HTTP_READING_FORBIDDEN = 2,
    HTTP_READING_UNPARSABLE = 3,
};
void http_metrics_readings(enum http_reading_result result, uint64_t n);

#endif
