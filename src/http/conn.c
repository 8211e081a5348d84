/* Request assembly from llhttp callbacks, routing, and responses.
 *
 * Requests on one connection are handled strictly in order. The parser
 * pauses at the end of each request, reading stops, and the request goes to
 * its route. Once the response is queued the parser resumes on the bytes
 * that were already received, so pipelined requests need no extra reads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/log.h"
#include "http/http_internal.h"

static const char continue_line[] = "HTTP/1.1 100 Continue\r\n\r\n";

static http_conn_t *conn_of(llhttp_t *p)
{
    return p->data;
}

void http_log_reject(http_conn_t *c, int status, const char *code)
{
    const http_request_t *r = &c->req;

    log_write_limited("http_reject", 20, LOG_LEVEL_WARN, "request rejected",
                      "conn=%llu listener=%s peer=%s device=%s status=%d "
                      "error=%s",
                      (unsigned long long)c->id, c->listener->name, c->peer,
                      r->have_dev ? r->dev.id : "-", status, code);
}

void http_request_reject(http_conn_t *c, int status, const char *code,
                         const char *message, const char *headers,
                         enum http_reject_when when, const char *reason)
{
    http_request_t *r = &c->req;

    http_response_clear(&r->reject);
    if (http_response_error(&r->reject, status, code, message, headers,
                            NULL) != 0) {
        /* Without memory for the response, closing is all that is left. */
        http_response_clear(&r->reject);
        r->reject.status = 500;
        r->reject.close = 1;
    }
    r->reject.close = when != HTTP_REJECT_AFTER_BODY;
    r->reject_now = when == HTTP_REJECT_NOW;
    r->reject_reason = reason;
}

/* Counts URL and header bytes against max_header_bytes. Returns 0, or
 * HPE_USER after recording a 431 rejection. */
static int count_header_bytes(http_conn_t *c, size_t len)
{
    http_request_t *r = &c->req;

    r->header_bytes += len;
    if (r->header_bytes <= c->listener->limits.max_header_bytes)
        return 0;
    http_request_reject(c, 431, "headers_too_large",
                        "the request line and headers are over the size "
                        "limit; send shorter headers",
                        NULL, HTTP_REJECT_NOW, "headers_too_large");
    c->abort = 1;
    return HPE_USER;
}

static void append(char *dst, size_t *dst_len, size_t cap, int *overflow,
                   const char *at, size_t len)
{
    if (*dst_len + len > cap) {
        *overflow = 1;
        return;
    }
    memcpy(dst + *dst_len, at, len);
    *dst_len += len;
    dst[*dst_len] = '\0';
}

static int on_message_begin(llhttp_t *p)
{
    http_conn_t *c = conn_of(p);

    c->req.start_ns = uv_hrtime();
    http_conn_set_state(c, CONN_HEADERS);
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    http_conn_t *c = conn_of(p);
    int overflow = 0;

    if (count_header_bytes(c, len) != 0)
        return HPE_USER;
    append(c->req.url, &c->req.url_len, HTTP_URL_MAX_STORED, &overflow, at,
           len);
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    http_conn_t *c = conn_of(p);
    http_request_t *r = &c->req;

    if (count_header_bytes(c, len) != 0)
        return HPE_USER;
    append(r->field, &r->field_len, HTTP_FIELD_MAX, &r->field_overflow, at,
           len);
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    http_conn_t *c = conn_of(p);
    http_request_t *r = &c->req;

    if (count_header_bytes(c, len) != 0)
        return HPE_USER;
    append(r->value, &r->value_len, HTTP_VALUE_MAX, &r->value_overflow, at,
           len);
    return 0;
}

static void set_key(http_request_t *r, const char *key, size_t len)
{
    /* Two different credentials leave it unclear who sends, so the
     * request is rejected instead of letting one header win. */
    if (r->key_len > 0 &&
        (len != r->key_len || memcmp(r->key, key, len) != 0))
        r->key_conflict = 1;
    if (len > HTTP_KEY_MAX) {
        r->key_overflow = 1;
        return;
    }
    memcpy(r->key, key, len);
    r->key[len] = '\0';
    r->key_len = len;
}

/* Keeps the few header values that the routes read. */
static void use_header(http_request_t *r)
{
    const char *key;
    size_t len;

    if (strcasecmp(r->field, "content-type") == 0) {
        /* A value too long to keep is no supported type either. */
        r->has_content_type = !r->value_overflow &&
                              r->value_len < sizeof(r->content_type);
        if (r->has_content_type)
            memcpy(r->content_type, r->value, r->value_len + 1);
    } else if (strcasecmp(r->field, "authorization") == 0) {
        if (r->value_overflow)
            r->key_overflow = 1;
        else if (http_bearer_key(r->value, &key, &len))
            set_key(r, key, len);
    } else if (strcasecmp(r->field, "x-api-key") == 0) {
        if (r->value_overflow)
            r->key_overflow = 1;
        else
            set_key(r, r->value, r->value_len);
    } else if (strcasecmp(r->field, "idempotency-key") == 0) {
        r->idempotency_key_count++;
        r->idempotency_key_invalid = r->value_overflow ||
                                     r->value_len > HTTP_IDEMPOTENCY_KEY_MAX;
        if (!r->idempotency_key_invalid) {
            memcpy(r->idempotency_key, r->value, r->value_len + 1);
            r->idempotency_key_len = r->value_len;
        }
    } else if (strcasecmp(r->field, "expect") == 0) {
        r->expect_continue = strcasecmp(r->value, "100-continue") == 0;
        r->expect_other = !r->expect_continue;
    } else if (strcasecmp(r->field, "transfer-encoding") == 0) {
        /* llhttp 8.1 frames a body by the final "chunked" and ignores
         * codings before it, such as gzip, which the body would need. */
        r->transfer_coding_other |=
            strcasecmp(r->value, "chunked") != 0;
    } else {
        http_ws_use_header(r);
    }
}

static int on_header_value_complete(llhttp_t *p)
{
    http_request_t *r = &conn_of(p)->req;

    if (!r->field_overflow)
        use_header(r);
    r->field_len = r->value_len = 0;
    r->field[0] = r->value[0] = '\0';
    r->field_overflow = r->value_overflow = 0;
    return 0;
}

/* Returns the path of a request target: origin form as it is, or the
 * part after the authority of absolute form ("http://host/v1/data"),
 * which RFC 9112 section 3.2.2 requires servers to accept. */
static const char *target_path(const char *url)
{
    const char *p;

    if (strncasecmp(url, "http://", 7) != 0 &&
        strncasecmp(url, "https://", 8) != 0)
        return url;
    p = strstr(url, "//") + 2;
    p += strcspn(p, "/?#");
    return *p == '/' ? p : "/";
}

static const http_route_t *find_route(const http_listener_t *l,
                                      const http_request_t *r)
{
    const char *path = target_path(r->url);
    size_t path_len = strcspn(path, "?#");

    for (size_t i = 0; i < l->route_count; i++) {
        const char *route = l->routes[i].path;
        if (strlen(route) == path_len && memcmp(route, path, path_len) == 0)
            return &l->routes[i];
    }
    return NULL;
}

/* Checks what every route needs of the request line and headers. Returns
 * 1, or 0 after recording a rejection. The connection closes after each,
 * because the body's framing or the request's end is in doubt. */
static int head_ok(http_conn_t *c, llhttp_t *p)
{
    const http_request_t *r = &c->req;

    if (llhttp_get_http_major(p) == 0) {
        /* llhttp 8.1 reads a request line without a version as
         * HTTP/0.9, which has neither headers nor a body. */
        http_request_reject(c, 400, "bad_request",
                            "the request line has no HTTP version; send "
                            "\"POST /v1/data HTTP/1.1\"",
                            NULL, HTTP_REJECT_NOW, "bad_framing");
        return 0;
    }
    if (r->transfer_coding_other) {
        http_request_reject(c, 501, "unsupported_transfer_coding",
                            "Transfer-Encoding may only be \"chunked\"; "
                            "the server supports no other transfer coding "
                            "or content encoding",
                            NULL, HTTP_REJECT_NOW, "bad_framing");
        return 0;
    }
    if (r->expect_other) {
        http_request_reject(c, 417, "expectation_failed",
                            "the only Expect value supported is "
                            "\"100-continue\"; remove the Expect header",
                            NULL, HTTP_REJECT_NOW, NULL);
        return 0;
    }
    return 1;
}

/* Finds the route and lets it check the headers. */
static void check_request(http_conn_t *c, llhttp_t *p)
{
    http_listener_t *l = c->listener;
    http_request_t *r = &c->req;
    const char *method = llhttp_method_name(llhttp_get_method(p));
    char message[256];
    char headers[64];

    if (!head_ok(c, p))
        return;
    r->route = find_route(l, r);
    if (r->route == NULL) {
        snprintf(message, sizeof(message),
                 "no endpoint at this path; this listener serves %s",
                 l->endpoints);
        http_request_reject(c, 404, "not_found", message, NULL,
                            HTTP_REJECT_AFTER_BODY, NULL);
        return;
    }
    if (strcmp(method, r->route->method) != 0) {
        snprintf(message, sizeof(message), "%s does not accept %s; use %s",
                 r->route->path, method, r->route->method);
        snprintf(headers, sizeof(headers), "Allow: %s\r\n",
                 r->route->method);
        http_request_reject(c, 405, "method_not_allowed", message, headers,
                            HTTP_REJECT_AFTER_BODY, NULL);
        return;
    }
    r->route->check(c, r);
}

static int has_body(const llhttp_t *p)
{
    return (p->flags & F_CHUNKED) ||
           ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
}

static int on_headers_complete(llhttp_t *p)
{
    http_conn_t *c = conn_of(p);
    http_request_t *r = &c->req;
    int body = has_body(p);

    check_request(c, p);
    if (r->reject.status != 0 && r->expect_continue && body)
        r->reject_now = 1;
    if (r->reject_now) {
        /* The parser stops here, so nothing after this request can be
         * read and the connection must close. */
        r->reject.close = 1;
        c->abort = 1;
        return -1;
    }
    if (!body)
        return 0;
    http_conn_set_state(c, CONN_BODY);
    if (r->expect_continue && r->reject.status == 0 &&
        llhttp_get_http_minor(p) >= 1)
        http_conn_write(c, NULL, continue_line, sizeof(continue_line) - 1);
    return 0;
}

static int keep_body(http_request_t *r, const char *at, size_t len)
{
    if (r->body_len + len + 1 > r->body_cap) {
        size_t cap = r->body_cap ? r->body_cap * 2 : 4096;
        while (cap < r->body_len + len + 1)
            cap *= 2;
        char *b = realloc(r->body, cap);
        if (b == NULL)
            return -1;
        r->body = b;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    r->body[r->body_len] = '\0';
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    http_conn_t *c = conn_of(p);
    http_request_t *r = &c->req;

    r->body_seen += len;
    if (r->body_seen > c->listener->limits.max_body_bytes) {
        http_request_reject(c, 413, "body_too_large",
                            "the request body is over the size limit; "
                            "send fewer readings per request",
                            NULL, HTTP_REJECT_NOW, "too_large");
        c->abort = 1;
        return HPE_USER;
    }
    if (r->reject.status != 0)
        return 0;
    if (keep_body(r, at, len) != 0) {
        http_request_reject(c, 500, "out_of_memory",
                            "the server ran out of memory; retry later",
                            NULL, HTTP_REJECT_NOW, NULL);
        c->abort = 1;
        return HPE_USER;
    }
    return 0;
}

/* Longest chunk extension accepted, name and value together. ingestd uses
 * no extension, but llhttp reads them without any limit. */
#define CHUNK_EXT_MAX 1024

/* Counts chunk extension bytes: each extension toward CHUNK_EXT_MAX and
 * all of them toward max_body_bytes, so that a client cannot send an
 * endless extension that never reaches on_body. */
static int on_chunk_extension(llhttp_t *p, const char *at, size_t len)
{
    http_conn_t *c = conn_of(p);
    http_request_t *r = &c->req;

    (void)at;
    r->chunk_ext_bytes += len;
    r->body_seen += len;
    if (r->chunk_ext_bytes > CHUNK_EXT_MAX) {
        http_request_reject(c, 400, "bad_request",
                            "a chunk extension is over 1 KiB; the server "
                            "uses no chunk extensions, so send chunks "
                            "without them",
                            NULL, HTTP_REJECT_NOW, "bad_framing");
        c->abort = 1;
        return HPE_USER;
    }
    if (r->body_seen > c->listener->limits.max_body_bytes) {
        http_request_reject(c, 413, "body_too_large",
                            "the request body is over the size limit; "
                            "send fewer readings per request",
                            NULL, HTTP_REJECT_NOW, "too_large");
        c->abort = 1;
        return HPE_USER;
    }
    return 0;
}

static int on_chunk_complete(llhttp_t *p)
{
    conn_of(p)->req.chunk_ext_bytes = 0;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    http_conn_t *c = conn_of(p);

    /* After an upgrade request the bytes that follow belong to another
     * protocol: either the route takes the connection over, or it ends
     * after the response. */
    c->req.keep_alive =
        llhttp_should_keep_alive(p) && !llhttp_get_upgrade(p);
    http_conn_set_state(c, CONN_WAITING);
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_chunk_extension_name = on_chunk_extension,
    .on_chunk_extension_value = on_chunk_extension,
    .on_chunk_complete = on_chunk_complete,
    .on_message_complete = on_message_complete,
};

void http_conn_init_parser(http_conn_t *c)
{
    llhttp_init(&c->parser, HTTP_REQUEST, &settings);
    c->parser.data = c;
}

static void request_reset(http_request_t *r)
{
    free(r->body);
    http_response_clear(&r->reject);
    memset(r, 0, sizeof(*r));
}

void http_conn_send_reject(http_conn_t *c)
{
    http_response_t resp = c->req.reject;

    memset(&c->req.reject, 0, sizeof(c->req.reject));
    if (c->req.reject_reason != NULL)
        http_metrics_rejected(c->req.reject_reason);
    http_conn_respond(c, &resp);
}

static void framing_error(http_conn_t *c, llhttp_errno_t err)
{
    char message[256];

    if (err == HPE_UNEXPECTED_CONTENT_LENGTH &&
        strstr(llhttp_get_error_reason(&c->parser), "Transfer-Encoding")) {
        http_request_reject(c, 400, "bad_request",
                            "the request has both Content-Length and "
                            "Transfer-Encoding; send only one of them",
                            NULL, HTTP_REJECT_NOW, "bad_framing");
    } else {
        snprintf(message, sizeof(message),
                 "invalid HTTP/1.1 request: %s (%s); fix the request "
                 "framing",
                 llhttp_get_error_reason(&c->parser), llhttp_errno_name(err));
        http_request_reject(c, 400, "bad_request", message, NULL,
                            HTTP_REJECT_NOW, "bad_framing");
    }
    log_debug("request framing invalid", "conn=%llu peer=%s error=%s",
              (unsigned long long)c->id, c->peer, llhttp_errno_name(err));
    http_conn_send_reject(c);
}

static void dispatch(http_conn_t *c)
{
    if (c->req.reject.status != 0) {
        http_conn_send_reject(c);
        return;
    }
    c->req.route->handle(c, &c->req);
}

/* Runs the parser over the buffered input once. */
static void parse_some(http_conn_t *c)
{
    const char *start = c->in + c->in_off;
    size_t len = c->in_len - c->in_off;
    llhttp_errno_t err = llhttp_execute(&c->parser, start, len);

    if (err == HPE_OK) {
        c->in_off = c->in_len;
        return;
    }
    if (err == HPE_PAUSED) {
        c->in_off += (size_t)(llhttp_get_error_pos(&c->parser) - start);
        dispatch(c);
        return;
    }
    c->in_off = c->in_len;
    if (c->abort)
        http_conn_send_reject(c);
    else
        framing_error(c, err);
}

void http_conn_process(http_conn_t *c)
{
    /* Responses given while parsing return here instead of recursing, so a
     * long pipeline does not grow the stack. */
    if (c->in_process)
        return;
    c->in_process = 1;
    while (!c->closed && c->state != CONN_CLOSING &&
           c->state != CONN_WAITING && c->state != CONN_STREAM &&
           !c->write_wait && c->in_off < c->in_len)
        parse_some(c);
    c->in_process = 0;
    if (c->in_off == c->in_len) {
        c->in_off = c->in_len = 0;
        /* Keep small buffers for the next read, but do not let each idle
         * keep-alive connection hold on to a large one. */
        if (c->in_cap > HTTP_INPUT_KEEP) {
            free(c->in);
            c->in = NULL;
            c->in_cap = 0;
        }
    }
    http_conn_update_reading(c);
}

static enum http_conn_mode response_mode(http_conn_t *c, int close)
{
    if (close)
        return HTTP_MODE_CLOSE;
    return llhttp_get_http_minor(&c->parser) == 0 ? HTTP_MODE_KEEP_10
                                                  : HTTP_MODE_KEEP_11;
}

void http_conn_respond(http_conn_t *c, http_response_t *resp)
{
    http_listener_t *l = c->listener;
    int close;
    size_t len;
    char *data;

    if (c->closed) {
        http_response_clear(resp);
        return;
    }
    close = resp->close || c->abort || !c->req.keep_alive || l->draining;
    data = http_response_format(resp, response_mode(c, close), &len);
    http_metrics_request(l->kind, resp->status,
                         (double)(uv_hrtime() - c->req.start_ns) / 1e9);
    if (resp->status >= 400 && resp->code != NULL)
        http_log_reject(c, resp->status, resp->code);
    http_response_clear(resp);
    request_reset(&c->req);
    c->abort = 0;
    if (data == NULL || http_conn_write(c, data, data, len) != 0) {
        http_conn_close(c);
        return;
    }
    if (close) {
        http_conn_begin_close(c);
        return;
    }
    llhttp_resume(&c->parser);
    http_conn_set_state(c, CONN_IDLE);
    if (net_conn_write_queue_size(&c->net) > HTTP_WRITE_QUEUE_HIGH)
        c->write_wait = 1;
    http_conn_process(c);
}

void http_conn_error(http_conn_t *c, int status, const char *code,
                     const char *message, const char *headers)
{
    http_response_t resp = {0};

    if (http_response_error(&resp, status, code, message, headers, NULL) !=
        0) {
        http_conn_close(c);
        return;
    }
    http_conn_respond(c, &resp);
}

void http_conn_turn_away(http_conn_t *c, http_response_t *resp)
{
    c->req.start_ns = uv_hrtime();
    resp->close = 1;
    resp->code = NULL; /* the listener logged it with its own limit */
    http_conn_respond(c, resp);
}

void http_conn_switch_stream(http_conn_t *c, const http_stream_handler_t *h,
                             void *arg)
{
    size_t left = c->in_len - c->in_off;

    request_reset(&c->req);
    c->stream = h;
    c->stream_arg = arg;
    http_conn_set_state(c, CONN_STREAM);
    http_conn_update_reading(c);
    /* A client may send its first frames right behind the request head;
     * they were read with it and belong to the stream. */
    c->in_off = c->in_len;
    if (left > 0)
        h->on_read(arg, c->in + c->in_len - left, left);
}
