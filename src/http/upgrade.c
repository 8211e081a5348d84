/* GET /v1/ws and GET /mqtt: the WebSocket opening handshake (RFC 6455
 * section 4.2) and the handover of the connection to the ws module.
 *
 * A valid handshake gets a 101 response and the connection becomes a byte
 * stream under a ws connection. The API key is checked here when the
 * request sends one. Without one the upgrade succeeds and the client
 * authenticates with its first message, because a browser's WebSocket API
 * cannot set request headers. A key in the URL is rejected, because URLs
 * end up in proxy and access logs.
 *
 * GET /mqtt carries MQTT and needs the subprotocol "mqtt" (or "mqttv3.1");
 * its clients authenticate with the CONNECT packet, so a key in a header
 * is not checked there.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/errors.h"
#include "core/log.h"
#include "http/http_internal.h"

/* Query parameter names that would put a key in the URL. */
static const char *const key_params[] = {"key", "api_key", "apikey",
                                         "access_token", "token"};

static int is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

/* Returns 1 if the comma-separated `value` contains `token`, compared
 * without case when `ignore_case` is set. */
static int has_token(const char *value, const char *token, int ignore_case)
{
    size_t token_len = strlen(token);
    const char *p = value;

    while (*p != '\0') {
        size_t n;
        while (is_ows(*p) || *p == ',')
            p++;
        n = strcspn(p, ",");
        while (n > 0 && is_ows(p[n - 1]))
            n--;
        if (n == token_len && (ignore_case ? strncasecmp(p, token, n)
                                           : strncmp(p, token, n)) == 0)
            return 1;
        p += strcspn(p, ",");
    }
    return 0;
}

/* Copies `value` without surrounding white space into `dst` of `cap`
 * bytes. Returns 0, or -1 when it does not fit. */
static int copy_trimmed(char *dst, size_t cap, const char *value)
{
    size_t n;

    while (is_ows(*value))
        value++;
    n = strlen(value);
    while (n > 0 && is_ows(value[n - 1]))
        n--;
    if (n >= cap)
        return -1;
    memcpy(dst, value, n);
    dst[n] = '\0';
    return 0;
}

/* Appends a Sec-WebSocket-Protocol list to the ones seen before, since
 * a client may send the header more than once. */
static void add_protocols(http_ws_headers_t *w, const char *value)
{
    size_t used = strlen(w->protocols);
    int n;

    w->protocol_count++;
    n = snprintf(w->protocols + used, sizeof(w->protocols) - used, "%s%s",
                 used > 0 ? "," : "", value);
    if (n < 0 || (size_t)n >= sizeof(w->protocols) - used)
        w->protocols_overflow = 1;
}

void http_ws_use_header(http_request_t *r)
{
    http_ws_headers_t *w = &r->ws;

    if (strcasecmp(r->field, "host") == 0) {
        w->has_host = 1;
        return;
    }
    if (strcasecmp(r->field, "sec-websocket-protocol") == 0) {
        add_protocols(w, r->value_overflow ? "" : r->value);
        w->protocols_overflow |= r->value_overflow;
        return;
    }
    if (r->value_overflow)
        return;
    if (strcasecmp(r->field, "upgrade") == 0) {
        w->upgrade_websocket |= has_token(r->value, "websocket", 1);
    } else if (strcasecmp(r->field, "connection") == 0) {
        w->connection_upgrade |= has_token(r->value, "upgrade", 1);
    } else if (strcasecmp(r->field, "sec-websocket-version") == 0) {
        w->version_count++;
        if (copy_trimmed(w->version, sizeof(w->version), r->value) != 0)
            snprintf(w->version, sizeof(w->version), "(too long)");
    } else if (strcasecmp(r->field, "sec-websocket-key") == 0) {
        w->key_count++;
        if (copy_trimmed(w->key, sizeof(w->key), r->value) != 0)
            w->key_overflow = 1;
    }
}

const char *http_key_in_url(const char *url)
{
    const char *q = strchr(url, '?');

    if (q == NULL)
        return NULL;
    q++;
    while (*q != '\0' && *q != '#') {
        size_t n = strcspn(q, "=&#");
        for (size_t i = 0; i < sizeof(key_params) / sizeof(key_params[0]);
             i++) {
            if (strlen(key_params[i]) == n &&
                strncasecmp(q, key_params[i], n) == 0)
                return key_params[i];
        }
        q += strcspn(q, "&#");
        if (*q == '&')
            q++;
    }
    return NULL;
}

static void reject(http_conn_t *c, int status, const char *code,
                   const char *message, const char *headers)
{
    http_request_reject(c, status, code, message, headers,
                        HTTP_REJECT_AFTER_BODY_CLOSE, NULL);
}

/* Checks the headers that RFC 6455 section 4.2.1 requires. Returns 1 when
 * the handshake is valid. */
static int handshake_ok(http_conn_t *c, const http_request_t *r)
{
    llhttp_t *p = &c->parser;
    const http_ws_headers_t *w = &r->ws;
    char message[256];

    if (llhttp_get_http_major(p) < 1 ||
        (llhttp_get_http_major(p) == 1 && llhttp_get_http_minor(p) < 1)) {
        reject(c, 400, "bad_handshake",
               "a WebSocket upgrade needs HTTP/1.1 or later", NULL);
        return 0;
    }
    if ((p->flags & F_CHUNKED) ||
        ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0)) {
        reject(c, 400, "bad_handshake",
               "a WebSocket upgrade request must not have a body", NULL);
        return 0;
    }
    if (!w->upgrade_websocket) {
        reject(c, 400, "bad_handshake",
               "the Upgrade header is missing or does not contain "
               "\"websocket\"; send \"Upgrade: websocket\"",
               NULL);
        return 0;
    }
    if (!w->connection_upgrade) {
        reject(c, 400, "bad_handshake",
               "the Connection header is missing or does not contain "
               "\"Upgrade\"; send \"Connection: Upgrade\"",
               NULL);
        return 0;
    }
    if (!w->has_host) {
        reject(c, 400, "bad_handshake", "the Host header is missing", NULL);
        return 0;
    }
    if (w->version_count == 0) {
        reject(c, 400, "bad_handshake",
               "the Sec-WebSocket-Version header is missing; send "
               "\"Sec-WebSocket-Version: 13\"",
               "Sec-WebSocket-Version: 13\r\n");
        return 0;
    }
    if (w->version_count > 1 || strcmp(w->version, "13") != 0) {
        snprintf(message, sizeof(message),
                 "Sec-WebSocket-Version %s is not supported; this server "
                 "speaks version 13",
                 w->version_count > 1 ? "sent more than once" : w->version);
        reject(c, 426, "unsupported_version", message,
               "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n");
        return 0;
    }
    if (w->key_count == 0) {
        reject(c, 400, "bad_handshake",
               "the Sec-WebSocket-Key header is missing", NULL);
        return 0;
    }
    if (w->key_count > 1 || w->key_overflow ||
        !ws_handshake_key_valid(w->key)) {
        reject(c, 400, "bad_handshake",
               "the Sec-WebSocket-Key header is invalid: it must be sent "
               "once, as the base64 encoding of 16 random bytes",
               NULL);
        return 0;
    }
    return 1;
}

/* Checks a credential (API key or JWT) sent in a header, after the guard
 * of failed authentications. A request without one passes, and its client
 * authenticates with its first message. Returns 1 when the upgrade may go
 * on. */
static int key_ok(http_conn_t *c, http_request_t *r)
{
    enum auth_result res = AUTH_UNKNOWN_KEY;
    auth_t *auth = c->listener->auth;
    auth_failure_t why = {"malformed", "the credential is too long"};
    char headers[320];
    char message[224];
    uint64_t wait_s;

    if (r->key_len == 0 && !r->key_overflow)
        return 1;
    wait_s = auth_guard_check_peer(auth, c->peer);
    if (wait_s > 0) {
        snprintf(headers, sizeof(headers), "Retry-After: %llu\r\n",
                 (unsigned long long)wait_s);
        reject(c, 429, "too_many_auth_failures",
               "too many failed authentications from this address; retry "
               "after the Retry-After delay",
               headers);
        return 0;
    }
    if (!r->key_overflow)
        res = auth_check_credential(auth, r->key, r->key_len, NULL, &r->dev,
                                    NULL, NULL, &why);
    if (res == AUTH_UNKNOWN_KEY) {
        auth_guard_failed_peer(auth, c->peer);
        snprintf(headers, sizeof(headers),
                 "WWW-Authenticate: Bearer error=\"invalid_token\", "
                 "error_description=\"%s\"\r\n",
                 why.detail);
        snprintf(message, sizeof(message), "%s: %s", why.reason, why.detail);
        reject(c, 401, "invalid_credentials", message, headers);
        return 0;
    }
    r->have_dev = 1;
    if (res == AUTH_DISABLED) {
        reject(c, 403, "device_disabled",
               "this device is disabled; ask the operator to enable it", NULL);
        return 0;
    }
    return 1;
}

/* Rejects the upgrade with 503 while the listener drains. Returns 1 when
 * the upgrade may go on. */
static int not_draining(http_conn_t *c)
{
    http_listener_t *l = c->listener;
    char headers[64];

    if (!l->draining)
        return 1;
    snprintf(headers, sizeof(headers), "Retry-After: %llu\r\n",
             (unsigned long long)l->limits.retry_after_s);
    reject(c, 503, "shutting_down",
           "the server is shutting down; retry after the Retry-After delay",
           headers);
    return 0;
}

void http_ws_check(http_conn_t *c, http_request_t *r)
{
    const char *param = http_key_in_url(r->url);
    char message[320];
    int cert;

    if (param != NULL) {
        snprintf(message, sizeof(message),
                 "the query parameter \"%s\" looks like an API key, and "
                 "keys in URLs end up in proxy and access logs; send the "
                 "key in an \"Authorization: Bearer\" or \"X-API-Key\" "
                 "header, or as the first message "
                 "{\"type\":\"auth\",\"key\":\"...\"}",
                 param);
        reject(c, 400, "key_in_url", message, NULL);
        return;
    }
    if (!handshake_ok(c, r))
        return;
    cert = http_cert_check(c, r);
    if (cert == HTTP_CERT_REJECTED)
        return;
    if (cert == HTTP_CERT_NONE && (!key_ok(c, r) || !http_cert_matches(c, r)))
        return;
    not_draining(c);
}

/* Selects the MQTT subprotocol from what the client offered, preferring
 * "mqtt". Returns 1 when one was selected. */
static int mqtt_protocol_ok(http_conn_t *c, http_request_t *r)
{
    http_ws_headers_t *w = &r->ws;

    if (w->protocol_count == 0) {
        reject(c, 400, "unsupported_subprotocol",
               "the Sec-WebSocket-Protocol header is missing; MQTT over "
               "WebSocket needs \"Sec-WebSocket-Protocol: mqtt\"",
               NULL);
        return 0;
    }
    if (w->protocols_overflow) {
        reject(c, 400, "unsupported_subprotocol",
               "the Sec-WebSocket-Protocol list is too long; send "
               "\"Sec-WebSocket-Protocol: mqtt\"",
               NULL);
        return 0;
    }
    if (has_token(w->protocols, WS_MQTT_SUBPROTOCOL, 0))
        w->protocol = WS_MQTT_SUBPROTOCOL;
    else if (has_token(w->protocols, WS_MQTT_SUBPROTOCOL_V31, 0))
        w->protocol = WS_MQTT_SUBPROTOCOL_V31;
    if (w->protocol == NULL) {
        reject(c, 400, "unsupported_subprotocol",
               "Sec-WebSocket-Protocol offers no supported subprotocol; "
               "send \"mqtt\" for MQTT 3.1.1 and 5.0 (\"mqttv3.1\" is "
               "accepted for old clients)",
               NULL);
        return 0;
    }
    return 1;
}

void http_mqtt_check(http_conn_t *c, http_request_t *r)
{
    if (!handshake_ok(c, r) || !mqtt_protocol_ok(c, r) || !not_draining(c))
        return;
    if (!ws_mqtt_available(c->listener->loop)) {
        /* serve.c starts an MQTT context on every worker, also with
         * mqtt.listen off, so this happens only while a worker stops. */
        reject(c, 503, "mqtt_unavailable",
               "the MQTT server is not running on this worker; retry "
               "later",
               NULL);
    }
}

/* ---- The stream under a ws connection ---- */

static int stream_write(void *ctx, char *data, size_t len)
{
    http_conn_t *c = ctx;

    if (c->closed || c->state != CONN_STREAM) {
        free(data);
        return -1;
    }
    return http_conn_write(c, data, data, len);
}

static size_t stream_write_queue_size(void *ctx)
{
    http_conn_t *c = ctx;

    return c->closed ? 0
                     : net_conn_write_queue_size(&c->net);
}

static void stream_set_reading(void *ctx, int on)
{
    http_conn_t *c = ctx;

    c->stream_reading = on;
    http_conn_update_reading(c);
}

static void stream_close(void *ctx)
{
    http_conn_begin_close(ctx);
}

static const ws_stream_ops_t ws_stream_ops = {
    .write = stream_write,
    .write_queue_size = stream_write_queue_size,
    .set_reading = stream_set_reading,
    .close = stream_close,
};

static void on_stream_read(void *arg, const char *data, size_t len)
{
    ws_conn_on_read(arg, data, len);
}

static void on_stream_written(void *arg)
{
    ws_conn_on_written(arg);
}

static void on_stream_drain(void *arg)
{
    ws_conn_on_drain(arg);
}

static void on_stream_close(void *arg)
{
    ws_conn_on_stream_closed(arg);
}

static const http_stream_handler_t ws_stream_handler = {
    .on_read = on_stream_read,
    .on_written = on_stream_written,
    .on_drain = on_stream_drain,
    .on_close = on_stream_close,
};

static ws_stream_t stream_of(http_conn_t *c)
{
    ws_stream_t stream = {
        .ops = &ws_stream_ops,
        .ctx = c,
        .loop = c->listener->loop,
        .conn_id = c->id,
        .peer = c->peer,
        .cert = net_conn_peer_cert(&c->net),
    };

    return stream;
}

/* Queues the 101 response, with Sec-WebSocket-Protocol when `protocol`
 * is not NULL. Returns 0, or -1 after responding with an error or closing
 * the connection. */
static int switch_protocols(http_conn_t *c, http_request_t *r,
                            const char *protocol)
{
    http_listener_t *l = c->listener;
    char accept[WS_ACCEPT_LEN + 1];
    char *response;
    int len;

    if (ws_handshake_accept(r->ws.key, accept) != 0) {
        http_conn_error(c, 500, "internal_error",
                        "computing Sec-WebSocket-Accept failed; retry", NULL);
        return -1;
    }
    response = malloc(320);
    if (response == NULL) {
        http_conn_close(c);
        return -1;
    }
    len = snprintf(response, 320,
                   "HTTP/1.1 101 Switching Protocols\r\n"
                   "Upgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Accept: %s\r\n"
                   "%s%s%s\r\n",
                   accept, protocol ? "Sec-WebSocket-Protocol: " : "",
                   protocol ? protocol : "", protocol ? "\r\n" : "");
    http_metrics_request(l->kind, 101,
                         (double)(uv_hrtime() - r->start_ns) / 1e9);
    if (http_conn_write(c, response, response, (size_t)len) != 0) {
        http_conn_close(c);
        return -1;
    }
    return 0;
}

void http_ws_handle(http_conn_t *c, http_request_t *r)
{
    ws_stream_t stream = stream_of(c);
    const char *key = r->key_len > 0 ? r->key : NULL;
    ws_conn_t *ws;

    if (switch_protocols(c, r, NULL) != 0)
        return;
    ws = ws_ingest_open(&stream, &c->listener->ws, key);
    if (ws == NULL) {
        log_error("websocket session allocation failed", "conn=%llu peer=%s",
                  (unsigned long long)c->id, c->peer);
        http_conn_close(c);
        return;
    }
    http_conn_switch_stream(c, &ws_stream_handler, ws);
}

void http_mqtt_handle(http_conn_t *c, http_request_t *r)
{
    ws_stream_t stream = stream_of(c);
    ws_conn_t *ws;

    if (switch_protocols(c, r, r->ws.protocol) != 0)
        return;
    ws = ws_mqtt_open(&stream, &c->listener->mqtt_ws);
    if (ws == NULL) {
        log_error("mqtt over websocket failed to start", "conn=%llu peer=%s",
                  (unsigned long long)c->id, c->peer);
        http_conn_close(c);
        return;
    }
    http_conn_switch_stream(c, &ws_stream_handler, ws);
}
