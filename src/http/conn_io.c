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

/* Counts one of the two handles (the timer and c->net) as closed. */
static void handle_closed(http_conn_t *c)
{
    if (--c->handles == 0 && c->holds == 0)
        http_listener_conn_gone(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    handle_closed(h->data);
}

static void on_net_closed(net_conn_t *n)
{
    handle_closed(n->data);
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
        http_listener_conn_uncount(c);
    http_metrics_connection(l->kind, -1);
    log_debug("connection closed", "conn=%llu listener=%s peer=%s",
              (unsigned long long)c->id, l->name, c->peer);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
    net_conn_close(&c->net);
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

/* Takes plaintext from c->net, which reuses its buffer after this
 * returns, so whatever is kept is copied. */
static void on_net_read(net_conn_t *n, ssize_t nread, const char *data)
{
    http_conn_t *c = n->data;

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
        c->stream->on_read(c->stream_arg, data, (size_t)nread);
        return;
    }
    if (keep_input(c, data, (size_t)nread) != 0) {
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
    if (want != c->reading) {
        c->reading = want;
        net_conn_set_reading(&c->net, want);
    }
}

static void on_net_written(net_conn_t *n, int status)
{
    http_conn_t *c = n->data;

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
        net_conn_write_queue_size(&c->net) <= HTTP_WRITE_QUEUE_LOW) {
        c->write_wait = 0;
        http_conn_process(c);
    }
}

int http_conn_write(http_conn_t *c, char *data, const char *bytes,
                    size_t len)
{
    if (net_conn_write(&c->net, data, bytes, len) != 0)
        return -1;
    http_metrics_bytes(c->listener->kind, 0, len);
    return 0;
}

static void on_shutdown(net_conn_t *n, int status)
{
    http_conn_t *c = n->data;

    if (status < 0)
        http_conn_close(c);
}

void http_conn_begin_close(http_conn_t *c)
{
    if (c->closed || c->state == CONN_CLOSING)
        return;
    http_conn_set_state(c, CONN_CLOSING);
    c->in_off = c->in_len = 0;
    if (net_conn_shutdown(&c->net, on_shutdown) != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_update_reading(c);
}

int http_conn_start(http_conn_t *c)
{
    http_conn_init_parser(c);
    http_conn_set_state(c, CONN_IDLE);
    http_conn_update_reading(c);
    return c->reading ? 0 : -1;
}

const net_conn_events_t http_conn_events = {
    .on_ready = http_listener_conn_ready,
    .on_read = on_net_read,
    .on_written = on_net_written,
    .on_closed = on_net_closed,
};
