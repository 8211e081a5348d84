/* Socket input and output of one connection: reads, writes, timers and the
 * closing sequence.
 *
 * The last response on a connection is followed by a lingering close: the
 * write side is shut down and input is read and dropped for a short time.
 * Closing at once with unread input would make the kernel send a reset,
 * and a client still sending its body would lose the response.
 */
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "http/http_internal.h"

#define LINGER_MS 2000
#define LINGER_MAX_BYTES (1024 * 1024)

typedef struct write_req {
    uv_write_t req;
    char *data; /* owned, or NULL for static bytes */
} write_req_t;

static void on_handle_closed(uv_handle_t *h)
{
    http_conn_t *c = h->data;

    if (--c->handles == 0 && c->holds == 0)
        http_listener_conn_gone(c);
}

void http_conn_close(http_conn_t *c)
{
    http_listener_t *l = c->listener;

    if (c->closed)
        return;
    c->closed = 1;
    c->reading = 0;
    if (c->stream != NULL && !c->stream_closed) {
        c->stream_closed = 1;
        c->stream->on_close(c->stream_arg);
    }
    l->conn_count--;
    if (c->counted)
        l->served--;
    http_metrics_connection(l->kind, -1);
    log_debug("connection closed", "conn=%llu listener=%s peer=%s",
              (unsigned long long)c->id, l->name, c->peer);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
}

void http_conn_hold(http_conn_t *c)
{
    c->holds++;
}

int http_conn_release(http_conn_t *c)
{
    c->holds--;
    if (!c->closed)
        return 1;
    if (c->handles == 0 && c->holds == 0)
        http_listener_conn_gone(c);
    return 0;
}

static void on_timer(uv_timer_t *t)
{
    http_conn_t *c = t->data;

    switch (c->state) {
    case CONN_HEADERS:
        http_request_reject(c, 408, "request_timeout",
                            "the request headers did not arrive in time; "
                            "send the whole request without pausing",
                            NULL, HTTP_REJECT_NOW, "timeout");
        http_conn_send_reject(c);
        break;
    case CONN_BODY:
        http_request_reject(c, 408, "request_timeout",
                            "the request body did not arrive in time; send "
                            "the whole body without pausing",
                            NULL, HTTP_REJECT_NOW, "timeout");
        http_conn_send_reject(c);
        break;
    default:
        /* Idle keep-alive connections, clients that do not read their
         * responses and lingering closes end without a word. */
        log_debug("connection timed out", "conn=%llu peer=%s state=%d",
                  (unsigned long long)c->id, c->peer, (int)c->state);
        http_conn_close(c);
        break;
    }
}

static void arm(http_conn_t *c, uint64_t ms)
{
    if (ms == 0)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, on_timer, ms, 0);
}

void http_conn_set_state(http_conn_t *c, enum http_conn_state state)
{
    const http_limits_t *lim = &c->listener->limits;

    c->state = state;
    switch (state) {
    case CONN_IDLE:
        arm(c, lim->idle_timeout_ms);
        break;
    case CONN_HEADERS:
        arm(c, lim->header_timeout_ms);
        break;
    case CONN_BODY:
        arm(c, lim->body_timeout_ms);
        break;
    case CONN_WAITING:
    case CONN_STREAM:
        /* The stream handler keeps its own timers. */
        uv_timer_stop(&c->timer);
        break;
    case CONN_CLOSING:
        arm(c, LINGER_MS);
        break;
    }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    http_conn_t *c = h->data;

    /* One buffer per loop is enough because on_read copies what it keeps
     * before libuv reads again. */
    buf->base = c->listener->read_buf;
    buf->len = sizeof(c->listener->read_buf);
}

/* Appends received bytes to the connection's input buffer. */
static int keep_input(http_conn_t *c, const char *data, size_t len)
{
    if (c->in_off > 0) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    if (c->in_len + len > c->in_cap) {
        size_t cap = c->in_len + len;
        char *p = realloc(c->in, cap);
        if (p == NULL)
            return -1;
        c->in = p;
        c->in_cap = cap;
    }
    memcpy(c->in + c->in_len, data, len);
    c->in_len += len;
    return 0;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    http_conn_t *c = s->data;

    if (nread == 0)
        return;
    if (nread < 0) {
        if (nread != UV_EOF && c->state != CONN_CLOSING)
            log_debug("connection read failed", "conn=%llu peer=%s error=%s",
                      (unsigned long long)c->id, c->peer,
                      uv_strerror((int)nread));
        http_conn_close(c);
        return;
    }
    http_metrics_bytes(c->listener->kind, (uint64_t)nread, 0);
    if (c->state == CONN_CLOSING) {
        c->linger_bytes += (uint64_t)nread;
        if (c->linger_bytes > LINGER_MAX_BYTES)
            http_conn_close(c);
        return;
    }
    if (c->state == CONN_STREAM) {
        c->stream->on_read(c->stream_arg, buf->base, (size_t)nread);
        return;
    }
    if (keep_input(c, buf->base, (size_t)nread) != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_process(c);
}

void http_conn_update_reading(http_conn_t *c)
{
    int want;

    if (c->closed)
        return;
    if (c->state == CONN_STREAM)
        want = c->stream_reading;
    else
        want = c->state == CONN_CLOSING ||
               (c->state != CONN_WAITING && !c->write_wait);
    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
            c->reading = 1;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

static void on_write(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    http_conn_t *c = req->handle->data;

    free(w->data);
    free(w);
    if (c->closed)
        return;
    if (status < 0) {
        log_debug("connection write failed", "conn=%llu peer=%s error=%s",
                  (unsigned long long)c->id, c->peer, uv_strerror(status));
        http_conn_close(c);
        return;
    }
    if (c->state == CONN_STREAM) {
        c->stream->on_written(c->stream_arg);
        return;
    }
    if (c->write_wait &&
        uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) <=
            HTTP_WRITE_QUEUE_LOW) {
        c->write_wait = 0;
        http_conn_process(c);
    }
}

int http_conn_write(http_conn_t *c, char *data, const char *bytes,
                    size_t len)
{
    write_req_t *w = malloc(sizeof(*w));
    uv_buf_t buf = uv_buf_init((char *)bytes, (unsigned int)len);
    int rc;

    if (w == NULL) {
        free(data);
        return -1;
    }
    w->data = data;
    rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc != 0) {
        free(data);
        free(w);
        return -1;
    }
    http_metrics_bytes(c->listener->kind, 0, len);
    return 0;
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    http_conn_t *c = req->handle->data;

    if (status < 0)
        http_conn_close(c);
}

void http_conn_begin_close(http_conn_t *c)
{
    if (c->closed || c->state == CONN_CLOSING)
        return;
    http_conn_set_state(c, CONN_CLOSING);
    c->in_off = c->in_len = 0;
    if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_update_reading(c);
}

int http_conn_start(http_conn_t *c)
{
    c->tcp.data = c;
    c->timer.data = c;
    http_conn_init_parser(c);
    http_conn_set_state(c, CONN_IDLE);
    http_conn_update_reading(c);
    return c->reading ? 0 : -1;
}
