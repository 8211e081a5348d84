/* HTTP/1.1 listeners: the device API and the admin endpoints.
 *
 * Each worker thread runs its own libuv loop with its own listening socket
 * bound with SO_REUSEPORT to the same address, so the kernel spreads
 * connections across workers. Requests are framed by llhttp. One
 * connection handles its requests strictly in order (pipelining): the next
 * request is parsed only after the previous answer was queued.
 */
#ifndef INGESTD_HTTP_HTTP_H
#define INGESTD_HTTP_HTTP_H

#include <stddef.h>

#include <uv.h>

#include "auth/auth.h"
#include "core/config.h"
#include "net/tls.h"
#include "pipeline/pipeline.h"

typedef struct http_listener http_listener_t;

/* Starts the device API (POST /v1/data, GET /v1/ws for WebSocket clients
 * and GET /mqtt for MQTT over WebSocket) on `loop`, listening on
 * cfg->http.listen. Returns 0, or a negative ing_error with a message
 * such as "listen 127.0.0.1:8080: address already in use" in `err`. */
int http_api_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                   pipeline_loop_t *pl, http_listener_t **out, char *err,
                   size_t errlen);

/* Starts the same device API over TLS on cfg->https.listen, with the
 * contexts of `tls` (shared by every loop, must outlive the listener). A
 * TLS handshake must finish within http.header_timeout. Returns as
 * http_api_start does. */
int http_https_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                     pipeline_loop_t *pl, tls_server_t *tls,
                     http_listener_t **out, char *err, size_t errlen);

/* Hooks the admin listener calls to answer /readyz. `not_ready` returns
 * NULL when ready, or a short static reason such as "spool full".
 * `describe_sinks`, when set, writes a JSON object with each sink's state
 * into `buf` and returns its length; /readyz shows it as "sinks". */
typedef struct http_admin_hooks {
    const char *(*not_ready)(void *arg);
    size_t (*describe_sinks)(void *arg, char *buf, size_t size);
    void *arg;
} http_admin_hooks_t;

/* Starts the admin listener (GET /metrics, /healthz, /readyz) on `loop`. */
int http_admin_start(uv_loop_t *loop, const char *listen,
                     const http_admin_hooks_t *hooks, http_listener_t **out,
                     char *err, size_t errlen);

/* Stops accepting connections. Requests already read are answered; after
 * that each connection is closed. Idle keep-alive connections are closed at
 * once. Call on the listener's loop thread. */
void http_listener_drain(http_listener_t *l);

/* Number of open connections. */
size_t http_listener_connections(http_listener_t *l);

/* Closes the listener and every connection, and frees it once libuv has
 * closed every handle (run the loop afterwards). */
void http_listener_close(http_listener_t *l);

#endif
