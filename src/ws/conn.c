/* WebSocket connections: wslay's event API over a stream owned by the HTTP
 * module.
 *
 * Bytes from the socket are kept in `in` and handed to wslay by its recv
 * callback. Frames that wslay_event_send builds are collected in `out` and
 * written as one buffer. wslay checks the framing: unmasked client frames
 * and reserved bits get close 1002, invalid UTF-8 in a text message 1007,
 * and a message over max_message_size 1009. It also replies to pings and
 * echoes the peer's close frame. on_wslay_frame_start adds the limits that
 * wslay lacks: max_fragments frames per message, and a per-frame cost
 * toward max_message_size.
 *
 * NOTE: for a fragmented or oversized control frame, and for a close frame
 * with a one-byte payload, wslay 1.1.1 sends a close frame without a status
 * code where RFC 6455 expects 1002. The connection still ends.
 *
 * Callbacks into the application run only from entry points of the stream
 * owner and from the connection's timer, never from inside a call that the
 * application made. Work that an application call starts (resuming after a
 * pause, reporting a closed stream) is therefore run by the timer with a
 * zero delay.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <wslay/wslay.h>

#include "core/errors.h"
#include "core/log.h"
#include "ws/ws_internal.h"

/* After sending a close frame, wait this long for the peer's close frame
 * before closing the TCP connection anyway. */
#define CLOSE_WAIT_MS 3000

/* Queued output past HIGH stops reading until the writes drain below LOW,
 * so a client that sends without reading cannot make the server buffer
 * replies without end. */
#define WRITE_QUEUE_HIGH (256 * 1024)
#define WRITE_QUEUE_LOW (64 * 1024)

/* Input buffers larger than this are freed once consumed. */
#define INPUT_KEEP (16 * 1024)

/* Bytes that each continuation frame counts toward max_message_size on
 * top of its payload. wslay 1.1.1 keeps every frame of a message as its
 * own allocation plus a list entry until the message ends; the tester
 * measured about 90 bytes per one-byte fragment with glibc malloc, so
 * this is an estimate of that cost. */
#define FRAGMENT_OVERHEAD 96

struct ws_conn {
    ws_stream_t stream;
    char peer[64];
    ws_options_t opts;
    const ws_handler_t *handler;
    void *arg;
    wslay_event_context_ptr ctx;
    uv_timer_t timer;

    char *in; /* received bytes not yet handed to wslay */
    size_t in_off;
    size_t in_len;
    size_t in_cap;
    char *out; /* frames built by one wslay_event_send call */
    size_t out_len;
    size_t out_cap;

    uint64_t last_rx_ms;   /* loop time of the last bytes received */
    uint64_t last_ping_ms; /* loop time of our last ping */
    uint64_t close_deadline_ms;
    uint64_t app_deadline_ms; /* 0: no application timeout */

    unsigned paused : 1;         /* the application stopped input */
    unsigned write_wait : 1;     /* too much output queued */
    unsigned reading : 1;        /* the last set_reading request */
    unsigned closing : 1;        /* we queued or deferred a close frame */
    unsigned stream_closing : 1; /* ops->close was called */
    unsigned stream_closed : 1;  /* the owner reported the close */
    unsigned in_recv : 1;        /* inside wslay_event_recv */
    unsigned kick : 1;           /* the timer must run pending work */
    unsigned finished : 1;       /* on_close ran, the timer is closing */
    unsigned close_pending : 1;  /* close frame deferred past recv */

    uint64_t msg_frames; /* frames of the data message being received */
    uint64_t msg_cost;   /* its payload plus FRAGMENT_OVERHEAD per frame */

    uint16_t close_code; /* of the deferred close frame */
    char close_reason[WS_CLOSE_REASON_MAX + 1];
};

static uint64_t now_ms(const ws_conn_t *ws)
{
    return uv_now(ws->stream.loop);
}

static int stream_usable(const ws_conn_t *ws)
{
    return !ws->stream_closing && !ws->stream_closed;
}

static void close_stream(ws_conn_t *ws)
{
    if (!stream_usable(ws))
        return;
    ws->stream_closing = 1;
    ws->reading = 0;
    ws->stream.ops->close(ws->stream.ctx);
}

/* ---- wslay callbacks ---- */

static ssize_t on_wslay_recv(wslay_event_context_ptr ctx, uint8_t *buf,
                             size_t len, int flags, void *user_data)
{
    ws_conn_t *ws = user_data;
    size_t avail = ws->in_len - ws->in_off;

    (void)flags;
    if (avail == 0 || (ws->paused && !ws->closing)) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (len > avail)
        len = avail;
    memcpy(buf, ws->in + ws->in_off, len);
    ws->in_off += len;
    return (ssize_t)len;
}

/* Limits the frames of one data message: a message of many small or
 * empty fragments costs wslay memory per frame and never has to end. */
static void on_wslay_frame_start(
    wslay_event_context_ptr ctx,
    const struct wslay_event_on_frame_recv_start_arg *arg, void *user_data)
{
    ws_conn_t *ws = user_data;
    const char *reason = NULL;

    if (arg->opcode >= WSLAY_CONNECTION_CLOSE)
        return; /* control frames may come between fragments */
    if (arg->opcode != WSLAY_CONTINUATION_FRAME) {
        ws->msg_frames = 0;
        ws->msg_cost = 0;
    } else {
        ws->msg_cost += FRAGMENT_OVERHEAD;
    }
    ws->msg_frames++;
    ws->msg_cost += arg->payload_length;
    if (ws->opts.max_fragments != 0 &&
        ws->msg_frames > ws->opts.max_fragments)
        reason = "too many fragments";
    else if (ws->msg_cost > ws->opts.max_message_size)
        reason = "message too big";
    if (reason == NULL)
        return;
    log_debug("websocket message over its limits",
              "conn=%llu peer=%s frames=%llu cost=%llu",
              (unsigned long long)ws->stream.conn_id, ws->peer,
              (unsigned long long)ws->msg_frames,
              (unsigned long long)ws->msg_cost);
    /* Nothing after this frame is read, so wslay stores no more of the
     * message, and the close frame goes out once recv returns. */
    wslay_event_shutdown_read(ctx);
    ws_conn_close(ws, WS_CLOSE_MESSAGE_TOO_BIG, reason);
}

static ssize_t on_wslay_send(wslay_event_context_ptr ctx, const uint8_t *data,
                             size_t len, int flags, void *user_data)
{
    ws_conn_t *ws = user_data;

    (void)flags;
    if (ws->out_len + len > ws->out_cap) {
        size_t cap = ws->out_cap ? ws->out_cap * 2 : 1024;
        while (cap < ws->out_len + len)
            cap *= 2;
        char *p = realloc(ws->out, cap);
        if (p == NULL) {
            wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
            return -1;
        }
        ws->out = p;
        ws->out_cap = cap;
    }
    memcpy(ws->out + ws->out_len, data, len);
    ws->out_len += len;
    return (ssize_t)len;
}

static void on_wslay_message(wslay_event_context_ptr ctx,
                             const struct wslay_event_on_msg_recv_arg *arg,
                             void *user_data)
{
    ws_conn_t *ws = user_data;
    const ws_handler_t *h = ws->handler;

    (void)ctx;
    /* Once we started closing, data messages are dropped: the
     * application has given its last reply. */
    switch (arg->opcode) {
    case WSLAY_TEXT_FRAME:
        if (!ws->closing && h->on_text != NULL)
            h->on_text(ws, (const char *)arg->msg, arg->msg_length, ws->arg);
        break;
    case WSLAY_BINARY_FRAME:
        if (ws->closing)
            break;
        if (h->on_binary != NULL)
            h->on_binary(ws, arg->msg, arg->msg_length, ws->arg);
        else
            ws_conn_close(ws, WS_CLOSE_UNSUPPORTED_DATA,
                          "binary messages are not supported");
        break;
    case WSLAY_CONNECTION_CLOSE:
        log_debug("websocket close received", "conn=%llu peer=%s code=%u",
                  (unsigned long long)ws->stream.conn_id, ws->peer,
                  (unsigned)arg->status_code);
        break;
    default:
        /* wslay replies to pings itself; pongs only count as traffic. */
        break;
    }
}

/* ---- Driving wslay ---- */

/* Writes what wslay has queued. Returns 0, or -1 after closing the
 * stream. */
static int flush(ws_conn_t *ws)
{
    int rc;

    if (!stream_usable(ws))
        return -1;
    rc = wslay_event_send(ws->ctx);
    if (ws->out_len > 0) {
        char *data = ws->out;
        size_t len = ws->out_len;

        ws->out = NULL;
        ws->out_len = ws->out_cap = 0;
        ws_metrics_bytes(0, len);
        if (ws->stream.ops->write(ws->stream.ctx, data, len) != 0)
            rc = -1;
    }
    if (rc != 0) {
        log_debug("websocket write failed", "conn=%llu peer=%s",
                  (unsigned long long)ws->stream.conn_id, ws->peer);
        close_stream(ws);
        return -1;
    }
    if (stream_usable(ws) &&
        ws->stream.ops->write_queue_size(ws->stream.ctx) > WRITE_QUEUE_HIGH)
        ws->write_wait = 1;
    return 0;
}

/* Closes the stream once both sides sent their close frame, or once
 * wslay stopped reading after a protocol error and sent its close frame. */
static void check_done(ws_conn_t *ws)
{
    if (!stream_usable(ws))
        return;
    if (!wslay_event_want_read(ws->ctx) && !wslay_event_want_write(ws->ctx))
        close_stream(ws);
}

static void update_reading(ws_conn_t *ws)
{
    int want;

    if (!stream_usable(ws))
        return;
    want = (!ws->paused || ws->closing) && !ws->write_wait &&
           wslay_event_get_read_enabled(ws->ctx);
    if (want != (int)ws->reading) {
        ws->reading = want;
        ws->stream.ops->set_reading(ws->stream.ctx, want);
    }
}

static void compact_input(ws_conn_t *ws)
{
    if (ws->in_off < ws->in_len)
        return;
    ws->in_off = ws->in_len = 0;
    if (ws->in_cap > INPUT_KEEP) {
        free(ws->in);
        ws->in = NULL;
        ws->in_cap = 0;
    }
}

static void queue_close(ws_conn_t *ws, uint16_t code, const char *reason);

/* Hands buffered input to wslay, which calls the application for each
 * complete message, then sends what that produced. */
static void run_input(ws_conn_t *ws)
{
    int rc = 0;

    if (!stream_usable(ws) || ws->in_recv)
        return;
    if ((!ws->paused || ws->closing) && ws->in_off < ws->in_len &&
        wslay_event_get_read_enabled(ws->ctx)) {
        ws->in_recv = 1;
        rc = wslay_event_recv(ws->ctx);
        ws->in_recv = 0;
    }
    compact_input(ws);
    if (!stream_usable(ws))
        return;
    if (flush(ws) != 0)
        return;
    if (ws->close_pending) {
        /* The messages the application queued are sent by now, so the
         * close frame goes out after them. */
        ws->close_pending = 0;
        queue_close(ws, ws->close_code, ws->close_reason);
        if (!stream_usable(ws) || flush(ws) != 0)
            return;
    }
    if (rc != 0) {
        /* wslay queued a close frame when it could; nothing more can be
         * read, so the connection ends after that frame. */
        log_debug("websocket input failed", "conn=%llu peer=%s error=%d",
                  (unsigned long long)ws->stream.conn_id, ws->peer, rc);
        close_stream(ws);
        return;
    }
    check_done(ws);
    update_reading(ws);
}

static uint64_t earliest(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Returns the loop time from which the next ping is due: the last bytes
 * received or the last ping sent, whichever came later. */
static uint64_t ping_base(const ws_conn_t *ws)
{
    return ws->last_rx_ms > ws->last_ping_ms ? ws->last_rx_ms
                                             : ws->last_ping_ms;
}

static void on_timer(uv_timer_t *t);

/* Starts the timer for the nearest deadline, or at once for pending
 * work. */
static void rearm(ws_conn_t *ws)
{
    uint64_t now = now_ms(ws);
    uint64_t next = UINT64_MAX;

    if (ws->finished)
        return;
    if (ws->stream_closed || ws->kick) {
        uv_timer_start(&ws->timer, on_timer, 0, 0);
        return;
    }
    if (ws->stream_closing) {
        uv_timer_stop(&ws->timer);
        return;
    }
    if (ws->app_deadline_ms != 0)
        next = ws->app_deadline_ms;
    if (ws->closing) {
        next = earliest(next, ws->close_deadline_ms);
    } else if (!ws->paused && !ws->write_wait) {
        /* Idle time counts only while the server reads, because input
         * waiting in the kernel during a pause is not the client's fault. */
        if (ws->opts.idle_timeout_ms != 0)
            next = earliest(next, ws->last_rx_ms + ws->opts.idle_timeout_ms);
        if (ws->opts.ping_interval_ms != 0)
            next = earliest(next, ping_base(ws) + ws->opts.ping_interval_ms);
    }
    if (next == UINT64_MAX) {
        uv_timer_stop(&ws->timer);
        return;
    }
    uv_timer_start(&ws->timer, on_timer, next > now ? next - now : 0, 0);
}

static void on_timer_closed(uv_handle_t *h)
{
    ws_conn_t *ws = h->data;

    wslay_event_context_free(ws->ctx);
    free(ws->in);
    free(ws->out);
    free(ws);
}

/* Reports the end of the connection to the application and frees it. */
static void finish(ws_conn_t *ws)
{
    uint16_t code = WS_CLOSE_ABNORMAL;

    if (wslay_event_get_close_sent(ws->ctx))
        code = wslay_event_get_status_code_sent(ws->ctx);
    else if (wslay_event_get_close_received(ws->ctx))
        code = wslay_event_get_status_code_received(ws->ctx);
    ws->finished = 1;
    ws_metrics_close(code);
    ws_metrics_connection(-1);
    ws->handler->on_close(ws, code, ws->arg);
    uv_close((uv_handle_t *)&ws->timer, on_timer_closed);
}

/* Sends a ping, or closes the connection after idle_timeout of silence. */
static void check_liveness(ws_conn_t *ws, uint64_t now)
{
    struct wslay_event_msg ping = {WSLAY_PING, NULL, 0};

    if (ws->closing || ws->paused || ws->write_wait)
        return;
    if (ws->opts.idle_timeout_ms != 0 &&
        now >= ws->last_rx_ms + ws->opts.idle_timeout_ms) {
        log_debug("websocket idle timeout", "conn=%llu peer=%s idle_ms=%llu",
                  (unsigned long long)ws->stream.conn_id, ws->peer,
                  (unsigned long long)(now - ws->last_rx_ms));
        ws_conn_close(ws, WS_CLOSE_GOING_AWAY, "idle timeout");
        return;
    }
    if (ws->opts.ping_interval_ms != 0 &&
        now >= ping_base(ws) + ws->opts.ping_interval_ms) {
        ws->last_ping_ms = now;
        if (wslay_event_queue_msg(ws->ctx, &ping) == 0)
            flush(ws);
    }
}

static void on_timer(uv_timer_t *t)
{
    ws_conn_t *ws = t->data;
    uint64_t now = now_ms(ws);

    if (ws->stream_closed) {
        finish(ws);
        return;
    }
    ws->kick = 0;
    if (ws->app_deadline_ms != 0 && now >= ws->app_deadline_ms) {
        ws->app_deadline_ms = 0;
        if (ws->handler->on_timeout != NULL)
            ws->handler->on_timeout(ws, ws->arg);
    }
    if (ws->closing && stream_usable(ws) && now >= ws->close_deadline_ms) {
        log_debug("websocket close timed out", "conn=%llu peer=%s",
                  (unsigned long long)ws->stream.conn_id, ws->peer);
        close_stream(ws);
    }
    if (stream_usable(ws))
        check_liveness(ws, now);
    run_input(ws);
    rearm(ws);
}

/* ---- Entry points of the stream owner ---- */

ws_conn_t *ws_conn_open(const ws_stream_t *stream, const ws_options_t *opts,
                        const ws_handler_t *handler, void *arg)
{
    static const struct wslay_event_callbacks callbacks = {
        .recv_callback = on_wslay_recv,
        .send_callback = on_wslay_send,
        .on_msg_recv_callback = on_wslay_message,
        .on_frame_recv_start_callback = on_wslay_frame_start,
    };
    ws_conn_t *ws = calloc(1, sizeof(*ws));

    if (ws == NULL)
        return NULL;
    if (wslay_event_context_server_init(&ws->ctx, &callbacks, ws) != 0) {
        free(ws);
        return NULL;
    }
    wslay_event_config_set_max_recv_msg_length(ws->ctx, opts->max_message_size);
    ws->stream = *stream;
    snprintf(ws->peer, sizeof(ws->peer), "%s",
             stream->peer ? stream->peer : "?");
    ws->stream.peer = ws->peer;
    ws->opts = *opts;
    ws->handler = handler;
    ws->arg = arg;
    uv_timer_init(stream->loop, &ws->timer);
    ws->timer.data = ws;
    ws->last_rx_ms = now_ms(ws);
    ws->last_ping_ms = ws->last_rx_ms;
    ws_metrics_connection(1);
    update_reading(ws);
    rearm(ws);
    return ws;
}

void ws_conn_on_read(ws_conn_t *ws, const char *data, size_t len)
{
    if (!stream_usable(ws) || len == 0)
        return;
    ws_metrics_bytes(len, 0);
    ws->last_rx_ms = now_ms(ws);
    if (ws->in_off > 0) {
        memmove(ws->in, ws->in + ws->in_off, ws->in_len - ws->in_off);
        ws->in_len -= ws->in_off;
        ws->in_off = 0;
    }
    if (ws->in_len + len > ws->in_cap) {
        char *p = realloc(ws->in, ws->in_len + len);
        if (p == NULL) {
            log_error("websocket input buffer allocation failed",
                      "conn=%llu peer=%s bytes=%zu",
                      (unsigned long long)ws->stream.conn_id, ws->peer,
                      ws->in_len + len);
            close_stream(ws);
            rearm(ws);
            return;
        }
        ws->in = p;
        ws->in_cap = ws->in_len + len;
    }
    memcpy(ws->in + ws->in_len, data, len);
    ws->in_len += len;
    run_input(ws);
    rearm(ws);
}

void ws_conn_on_written(ws_conn_t *ws)
{
    if (!stream_usable(ws) || !ws->write_wait)
        return;
    if (ws->stream.ops->write_queue_size(ws->stream.ctx) > WRITE_QUEUE_LOW)
        return;
    ws->write_wait = 0;
    ws->last_rx_ms = now_ms(ws);
    run_input(ws);
    update_reading(ws);
    rearm(ws);
}

void ws_conn_on_drain(ws_conn_t *ws)
{
    if (!stream_usable(ws))
        return;
    if (ws->handler->on_drain != NULL)
        ws->handler->on_drain(ws, ws->arg);
    else
        ws_conn_close(ws, WS_CLOSE_GOING_AWAY, "server shutting down");
}

void ws_conn_on_stream_closed(ws_conn_t *ws)
{
    ws->stream_closed = 1;
    ws->reading = 0;
    /* The application hears of it from the timer, so that this can run
     * in the middle of one of its own calls. */
    rearm(ws);
}

/* ---- Functions for the application ---- */

static int send_message(ws_conn_t *ws, uint8_t opcode, const uint8_t *data,
                        size_t len)
{
    struct wslay_event_msg msg = {opcode, data, len};
    int rc;

    if (!stream_usable(ws) || ws->closing)
        return ING_ESHUTDOWN;
    rc = wslay_event_queue_msg(ws->ctx, &msg);
    if (rc == WSLAY_ERR_NOMEM)
        return ING_ENOMEM;
    if (rc != 0)
        return ING_ESHUTDOWN;
    /* Inside wslay_event_recv, run_input sends once it returns. */
    if (!ws->in_recv)
        flush(ws);
    return 0;
}

int ws_conn_send_text(ws_conn_t *ws, const char *data, size_t len)
{
    return send_message(ws, WSLAY_TEXT_FRAME, (const uint8_t *)data, len);
}

int ws_conn_send_binary(ws_conn_t *ws, const uint8_t *data, size_t len)
{
    return send_message(ws, WSLAY_BINARY_FRAME, data, len);
}

/* Returns the length of `reason` cut to the close frame's limit without
 * splitting a UTF-8 sequence. */
static size_t reason_length(const char *reason)
{
    size_t len = reason ? strlen(reason) : 0;

    if (len <= WS_CLOSE_REASON_MAX)
        return len;
    len = WS_CLOSE_REASON_MAX;
    while (len > 0 && ((unsigned char)reason[len] & 0xC0) == 0x80)
        len--;
    return len;
}

/* Queues the close frame in wslay. Returns with the stream closing if
 * wslay failed. */
static void queue_close(ws_conn_t *ws, uint16_t code, const char *reason)
{
    int rc;

    rc = wslay_event_queue_close(ws->ctx, code, (const uint8_t *)reason,
                                 reason_length(reason));
    if (rc != 0 && rc != WSLAY_ERR_NO_MORE_MSG) {
        close_stream(ws);
        return;
    }
    log_debug("websocket closing", "conn=%llu peer=%s code=%u",
              (unsigned long long)ws->stream.conn_id, ws->peer, (unsigned)code);
}

void ws_conn_close(ws_conn_t *ws, uint16_t code, const char *reason)
{
    size_t len;

    if (!stream_usable(ws) || ws->closing)
        return;
    ws->closing = 1;
    ws->close_deadline_ms = now_ms(ws) + CLOSE_WAIT_MS;
    if (ws->in_recv) {
        /* wslay sends queued control frames before queued data frames,
         * so a close frame queued now would overtake the messages that
         * the application queued during this recv. run_input queues it
         * once they are sent. */
        len = reason_length(reason);
        memcpy(ws->close_reason, reason ? reason : "", len);
        ws->close_reason[len] = '\0';
        ws->close_code = code;
        ws->close_pending = 1;
        rearm(ws);
        return;
    }
    queue_close(ws, code, reason);
    if (stream_usable(ws) && flush(ws) == 0) {
        check_done(ws);
        update_reading(ws);
    }
    rearm(ws);
}

void ws_conn_pause(ws_conn_t *ws, int paused)
{
    paused = paused != 0;
    if (!stream_usable(ws) || paused == (int)ws->paused)
        return;
    ws->paused = paused;
    if (paused) {
        if (!ws->in_recv)
            update_reading(ws);
        rearm(ws);
        return;
    }
    /* The pause did not count as idle time. Input waiting in `in` is
     * handed over by the timer, outside the application's call. */
    ws->last_rx_ms = now_ms(ws);
    ws->kick = 1;
    rearm(ws);
}

void ws_conn_set_timeout(ws_conn_t *ws, uint64_t ms)
{
    ws->app_deadline_ms = ms == 0 ? 0 : now_ms(ws) + ms;
    rearm(ws);
}

uint64_t ws_conn_id(const ws_conn_t *ws)
{
    return ws->stream.conn_id;
}

const char *ws_conn_peer(const ws_conn_t *ws)
{
    return ws->peer;
}
