/* One MQTT connection over any transport: framing, dispatch, replies in
 * order, keep alive, flow control, drain and teardown.
 *
 * Input is handled packet by packet from a buffer. Handling stops while a
 * message waits for the full spool, and for a 3.1.1 client while it has
 * mqtt.receive_maximum messages in flight. Reading the transport stops
 * too, so TCP pushes back on the client. Every answer goes through one
 * queue, so PUBACKs leave in the order their PUBLISH packets arrived even
 * when the spool completes batches out of order.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/errors.h"
#include "core/log.h"
#include "mqtt/session.h"

/* Room for small packets that the session encodes itself. */
#define SMALL_PACKET 512

static atomic_uint_fast64_t next_session_id = 1;

static void process_input(mqtt_session_t *s);

static void on_timer_closed(uv_handle_t *h)
{
    mqtt_session_unref(h->data);
}

void mqtt_session_unref(mqtt_session_t *s)
{
    mqtt_listener_t *l = s->listener;

    if (--s->refs > 0)
        return;
    for (size_t i = 0; i < s->alias_count; i++)
        free(s->aliases[i]);
    free(s->aliases);
    free(s->in);
    free(s);
    mqtt_listener_unref(l);
}

static void unlink_session(mqtt_session_t *s)
{
    mqtt_listener_t *l = s->listener;

    if (s->prev != NULL)
        s->prev->next = s->next;
    else if (l->sessions == s)
        l->sessions = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
    l->session_count--;
}

/* Milliseconds until the session's JWT expires, UINT64_MAX without one. */
static uint64_t ms_to_expiry(const mqtt_session_t *s)
{
    int64_t left;

    if (s->auth_expires_at == 0)
        return UINT64_MAX;
    left = s->auth_expires_at - (int64_t)time(NULL);
    return left > 0 ? (uint64_t)left * 1000 : 0;
}

static void on_keepalive(uv_timer_t *t);

/* Starts the timer for the earlier of `keepalive_left_ms` (UINT64_MAX for
 * none) and the JWT's expiry. */
static void arm_timer(mqtt_session_t *s, uint64_t keepalive_left_ms)
{
    uint64_t ms = ms_to_expiry(s);

    if (keepalive_left_ms < ms)
        ms = keepalive_left_ms;
    if (ms != UINT64_MAX)
        uv_timer_start(&s->timer, on_keepalive, ms, 0);
}

static void on_keepalive(uv_timer_t *t)
{
    mqtt_session_t *s = t->data;
    uint64_t now = uv_now(s->listener->loop);

    if (s->phase == MQTT_PHASE_CONNECT) {
        log_write_limited("mqtt_connect_timeout", 5, LOG_LEVEL_INFO,
                          "mqtt connection closed: no CONNECT in time",
                          "conn=%llu peer=%s", (unsigned long long)s->id,
                          s->peer);
        mqtt_metrics_malformed("connect_timeout");
        mqtt_session_close(s);
        return;
    }
    if (s->phase != MQTT_PHASE_ACTIVE)
        return;
    if (s->auth_expires_at != 0 && ms_to_expiry(s) == 0) {
        /* 5.0 has a reason code for a connection that may not last
         * longer. A 3.1.1 client sees the connection close. */
        log_write_limited("mqtt_token_expired", 5, LOG_LEVEL_INFO,
                          "mqtt session ended: its token expired",
                          "conn=%llu client=%s device=%s peer=%s",
                          (unsigned long long)s->id, s->client_id,
                          s->device.id, s->peer);
        mqtt_session_fail(s, MQTT_RC_MAXIMUM_CONNECT_TIME, "token expired");
        return;
    }
    if (s->keepalive_ms == 0) {
        arm_timer(s, UINT64_MAX);
        return;
    }
    if (now - s->last_rx_ms < s->keepalive_ms) {
        arm_timer(s, s->keepalive_ms - (now - s->last_rx_ms));
        return;
    }
    log_write_limited("mqtt_keepalive", 5, LOG_LEVEL_INFO,
                      "mqtt keep alive timed out",
                      "conn=%llu client=%s device=%s peer=%s",
                      (unsigned long long)s->id, s->client_id, s->device.id,
                      s->peer);
    mqtt_metrics_malformed("keepalive_timeout");
    mqtt_session_fail(s, MQTT_RC_KEEP_ALIVE_TIMEOUT, NULL);
}

void mqtt_session_arm_keepalive(mqtt_session_t *s)
{
    uv_timer_stop(&s->timer);
    arm_timer(s, s->keepalive_ms > 0 ? s->keepalive_ms : UINT64_MAX);
}

/* Runs after a held message's wait, or on the loop turn after input was
 * left unhandled (s->yielded). */
static void on_retry(uv_timer_t *t)
{
    mqtt_session_t *s = t->data;

    s->yielded = 0;
    mqtt_session_retry_held(s);
    if (s->held == NULL)
        mqtt_session_update(s);
}

void mqtt_session_arm_retry(mqtt_session_t *s)
{
    uv_timer_start(&s->retry_timer, on_retry, MQTT_FULL_RETRY_MS, 0);
}

void mqtt_session_arm_retry_in(mqtt_session_t *s, uint64_t ms)
{
    uv_timer_start(&s->retry_timer, on_retry, ms, 0);
}

mqtt_session_t *mqtt_session_open(mqtt_listener_t *l,
                                  const mqtt_transport_t *t)
{
    mqtt_session_t *s;

    if (l->draining || l->closing)
        return NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->listener = l;
    s->id = atomic_fetch_add(&next_session_id, 1);
    s->transport = *t;
    snprintf(s->peer, sizeof(s->peer), "%s", t->peer ? t->peer : "?");
    s->transport.peer = s->peer;
    s->transport_open = 1;
    s->refs = 3; /* the transport and two timers */
    uv_timer_init(l->loop, &s->timer);
    uv_timer_init(l->loop, &s->retry_timer);
    s->timer.data = s;
    s->retry_timer.data = s;
    s->next = l->sessions;
    if (l->sessions != NULL)
        l->sessions->prev = s;
    l->sessions = s;
    l->session_count++;
    mqtt_listener_ref(l);
    mqtt_metrics_connection(t->kind, 1);
    uv_timer_start(&s->timer, on_keepalive, l->cfg->mqtt.connect_timeout_ms,
                   0);
    log_debug("mqtt connection opened", "conn=%llu transport=%s peer=%s",
              (unsigned long long)s->id, t->kind ? t->kind : "?", s->peer);
    return s;
}

void mqtt_session_send(mqtt_session_t *s, uint8_t *bytes, size_t len)
{
    if (!s->transport_open || s->phase == MQTT_PHASE_CLOSING) {
        free(bytes);
        return;
    }
    mqtt_metrics_packet(1, bytes[0] >> 4);
    mqtt_metrics_bytes(0, len);
    if (s->transport.ops->write(s->transport.ctx, bytes, len) != 0)
        mqtt_session_close(s);
}

/* Encodes a DISCONNECT with `reason` for a 5.0 client and queues it. */
static void send_disconnect(mqtt_session_t *s, uint8_t reason,
                            const char *why)
{
    mqtt_disconnect_t d = {.reason_code = reason};
    uint8_t *buf;
    int n;

    if (s->version != MQTT_V5)
        return;
    if (why != NULL) {
        d.props.reason_string.data = (const uint8_t *)why;
        d.props.reason_string.len = strlen(why);
        mqtt_props_set(&d.props, MQTT_PROP_REASON_STRING);
    }
    buf = malloc(SMALL_PACKET);
    if (buf == NULL)
        return;
    n = mqtt_encode_disconnect(buf, SMALL_PACKET, MQTT_V5, &d,
                               s->client_max_packet);
    if (n <= 0 || n > SMALL_PACKET) {
        free(buf);
        return;
    }
    mqtt_session_send(s, buf, (size_t)n);
}

void mqtt_session_close(mqtt_session_t *s)
{
    mqtt_reply_t *r;

    if (s->phase == MQTT_PHASE_CLOSING)
        return;
    s->phase = MQTT_PHASE_CLOSING;
    /* Detaching now, not when the transport is gone, means no other
     * thread posts mail for this session after its listener closed. */
    mqtt_table_detach(s);
    uv_timer_stop(&s->timer);
    uv_timer_stop(&s->retry_timer);
    if (s->held != NULL) {
        /* The held message was never submitted; its reply is dropped
         * with the connection, so the client sends it again. */
        for (r = s->replies_head; r != NULL; r = r->next) {
            if (r == s->held) {
                pipeline_batch_free(r->batch);
                r->batch = NULL;
            }
        }
        s->held = NULL;
    }
    if (s->transport_open)
        s->transport.ops->close(s->transport.ctx);
}

void mqtt_session_fail(mqtt_session_t *s, uint8_t reason, const char *why)
{
    if (s->phase == MQTT_PHASE_CLOSING)
        return;
    send_disconnect(s, reason, why);
    mqtt_session_close(s);
}

void mqtt_session_transport_closed(mqtt_session_t *s)
{
    mqtt_reply_t *r, *next;

    if (!s->transport_open)
        return;
    if (s->phase != MQTT_PHASE_CLOSING) {
        s->phase = MQTT_PHASE_CLOSING;
        mqtt_table_detach(s);
    }
    s->transport_open = 0;
    unlink_session(s);
    mqtt_metrics_connection(s->transport.kind, -1);
    log_debug("mqtt connection closed", "conn=%llu client=%s device=%s "
              "peer=%s",
              (unsigned long long)s->id, s->client_id, s->device.id,
              s->peer);
    /* Replies whose batch is still in the pipeline are freed by its
     * completion; the rest go now. */
    for (r = s->replies_head; r != NULL; r = next) {
        next = r->next;
        r->next = NULL;
        if (r->batch != NULL && r != s->held && !r->ready)
            continue;
        if (r == s->held) {
            pipeline_batch_free(r->batch);
            r->batch = NULL;
        }
        mqtt_reply_free(r);
    }
    s->replies_head = s->replies_tail = NULL;
    s->held = NULL;
    uv_close((uv_handle_t *)&s->timer, on_timer_closed);
    uv_close((uv_handle_t *)&s->retry_timer, on_timer_closed);
    mqtt_session_unref(s);
}

mqtt_reply_t *mqtt_session_push_reply(mqtt_session_t *s)
{
    mqtt_reply_t *r = calloc(1, sizeof(*r));

    if (r == NULL)
        return NULL;
    if (s->replies_tail != NULL)
        s->replies_tail->next = r;
    else
        s->replies_head = r;
    s->replies_tail = r;
    return r;
}

void mqtt_reply_free(mqtt_reply_t *r)
{
    /* A QoS 1 or 2 reply keeps its state alive until here (see
     * mqtt_state_ref in session_publish.c). */
    if (r->state != NULL)
        mqtt_state_unref(r->state);
    free(r->bytes);
    free(r);
}

/* Finishes the drain once nothing is owed to the client any more. */
static void check_drained(mqtt_session_t *s)
{
    if (!s->draining || s->phase == MQTT_PHASE_CLOSING)
        return;
    if (s->replies_head != NULL)
        return;
    if (s->version == MQTT_V5)
        send_disconnect(s, MQTT_RC_SERVER_SHUTTING_DOWN, NULL);
    mqtt_session_close(s);
}

void mqtt_session_flush_replies(mqtt_session_t *s)
{
    while (s->replies_head != NULL && s->replies_head->ready) {
        mqtt_reply_t *r = s->replies_head;
        int close_after = r->close_after;
        uint8_t disconnect = r->disconnect;

        s->replies_head = r->next;
        if (s->replies_head == NULL)
            s->replies_tail = NULL;
        if (r->bytes != NULL) {
            mqtt_session_send(s, r->bytes, r->len);
            r->bytes = NULL;
        }
        mqtt_reply_free(r);
        if (disconnect >= 0x80) {
            mqtt_session_fail(s, disconnect, NULL);
            return;
        }
        if (close_after) {
            mqtt_session_close(s);
            return;
        }
    }
    check_drained(s);
}

/* Decides whether the transport should be read: not while a message
 * waits for the spool, not at the in-flight limit, and not while
 * draining. */
static int want_reading(const mqtt_session_t *s)
{
    const config_t *cfg = s->listener->cfg;

    if (s->phase == MQTT_PHASE_CLOSING || s->draining || s->held != NULL ||
        s->yielded)
        return 0;
    return s->inflight < cfg->mqtt.receive_maximum;
}

void mqtt_session_update(mqtt_session_t *s)
{
    if (!s->transport_open)
        return;
    if (want_reading(s) && s->paused) {
        s->paused = 0;
        s->transport.ops->resume(s->transport.ctx);
    } else if (!want_reading(s) && !s->paused &&
               s->phase != MQTT_PHASE_CLOSING) {
        s->paused = 1;
        s->transport.ops->pause(s->transport.ctx);
    }
    process_input(s);
}

void mqtt_session_drain(mqtt_session_t *s)
{
    if (s->draining || s->phase == MQTT_PHASE_CLOSING)
        return;
    s->draining = 1;
    if (s->phase == MQTT_PHASE_CONNECT) {
        mqtt_session_close(s);
        return;
    }
    mqtt_session_update(s);
    check_drained(s);
}

/* Publishes a feedback message at QoS 0, if it fits the client's Maximum
 * Packet Size. */
static void deliver(mqtt_session_t *s, const mqtt_mail_t *mail)
{
    mqtt_publish_t p = {0};
    size_t cap = strlen(mail->topic) + mail->len + 16;
    uint8_t *buf;
    int n;

    if (s->phase != MQTT_PHASE_ACTIVE)
        return;
    p.topic.data = (const uint8_t *)mail->topic;
    p.topic.len = strlen(mail->topic);
    p.payload.data = mail->payload;
    p.payload.len = mail->len;
    if (s->version == MQTT_V5) {
        static const char ctype[] = "application/json";
        p.props.content_type.data = (const uint8_t *)ctype;
        p.props.content_type.len = sizeof(ctype) - 1;
        mqtt_props_set(&p.props, MQTT_PROP_CONTENT_TYPE);
        cap += sizeof(ctype) + 8;
    }
    buf = malloc(cap);
    if (buf == NULL)
        return;
    n = mqtt_encode_publish(buf, cap, s->version, &p, s->client_max_packet);
    if (n <= 0 || (size_t)n > cap) {
        log_write_limited("mqtt_feedback_dropped", 5, LOG_LEVEL_INFO,
                          "mqtt feedback not sent: over the client's "
                          "maximum packet size",
                          "conn=%llu client=%s device=%s",
                          (unsigned long long)s->id, s->client_id,
                          s->device.id);
        free(buf);
        return;
    }
    mqtt_session_send(s, buf, (size_t)n);
}

void mqtt_session_mail(mqtt_session_t *s, mqtt_mail_t *mail)
{
    if (mail->kind == MQTT_MAIL_TAKEOVER) {
        log_info("mqtt session taken over by a new connection",
                 "conn=%llu client=%s device=%s peer=%s",
                 (unsigned long long)s->id, s->client_id, s->device.id,
                 s->peer);
        mqtt_session_fail(s, MQTT_RC_SESSION_TAKEN_OVER, NULL);
        return;
    }
    deliver(s, mail);
}

/* Queues a ready reply holding `bytes`, keeping the order of replies. */
static void reply_now(mqtt_session_t *s, uint8_t *bytes, int n)
{
    mqtt_reply_t *r;

    if (n <= 0 || n > SMALL_PACKET) {
        free(bytes);
        return;
    }
    r = mqtt_session_push_reply(s);
    if (r == NULL) {
        free(bytes);
        mqtt_session_close(s);
        return;
    }
    r->bytes = bytes;
    r->len = (size_t)n;
    r->ready = 1;
    mqtt_session_flush_replies(s);
}

static void on_pingreq(mqtt_session_t *s)
{
    uint8_t *buf = malloc(SMALL_PACKET);

    if (buf != NULL)
        reply_now(s, buf, mqtt_encode_pingresp(buf, SMALL_PACKET));
}

void mqtt_session_on_pubrel(mqtt_session_t *s, const mqtt_ack_t *a)
{
    mqtt_ack_t comp = {.type = MQTT_PUBCOMP, .packet_id = a->packet_id};
    uint8_t *buf;

    if (s->state == NULL || !mqtt_state_qos2_remove(s->state, a->packet_id))
        comp.reason_code = MQTT_RC_PACKET_ID_NOT_FOUND;
    buf = malloc(SMALL_PACKET);
    if (buf == NULL)
        return;
    /* 3.1.1 has no reason codes: PUBCOMP acknowledges any PUBREL. */
    if (s->version != MQTT_V5)
        comp.reason_code = 0;
    reply_now(s, buf,
              mqtt_encode_ack(buf, SMALL_PACKET, s->version, &comp,
                              s->client_max_packet));
}

static void on_disconnect(mqtt_session_t *s, const mqtt_disconnect_t *d)
{
    if (s->version == MQTT_V5 &&
        mqtt_props_has(&d->props, MQTT_PROP_SESSION_EXPIRY)) {
        uint32_t expiry = d->props.session_expiry;
        if (s->session_expiry == 0 && expiry != 0) {
            mqtt_metrics_malformed("session_expiry_in_disconnect");
            mqtt_session_fail(s, MQTT_RC_PROTOCOL_ERROR,
                              "session expiry was 0 in CONNECT");
            return;
        }
        if (expiry > s->listener->cfg->mqtt.max_session_expiry_s)
            expiry = (uint32_t)s->listener->cfg->mqtt.max_session_expiry_s;
        if (s->state != NULL)
            mqtt_table_set_expiry(s->state, expiry);
    }
    log_debug("mqtt client disconnected", "conn=%llu client=%s reason=0x%02x",
              (unsigned long long)s->id, s->client_id, d->reason_code);
    mqtt_session_close(s);
}

static const char *packet_name(uint8_t type)
{
    static const char *const names[16] = {
        "reserved", "connect", "connack", "publish", "puback", "pubrec",
        "pubrel", "pubcomp", "subscribe", "suback", "unsubscribe",
        "unsuback", "pingreq", "pingresp", "disconnect", "auth"};
    return names[type & 15];
}

/* Handles a malformed packet or protocol violation: counted, logged and
 * answered with DISCONNECT in 5.0; 3.1.1 just closes. */
static void protocol_failure(mqtt_session_t *s, int code, uint8_t type)
{
    mqtt_metrics_malformed(mqtt_metrics_error_label(code));
    log_write_limited("mqtt_malformed", 10, LOG_LEVEL_INFO,
                      "mqtt packet rejected",
                      "conn=%llu client=%s device=%s peer=%s packet=%s "
                      "error=\"%s\"",
                      (unsigned long long)s->id, s->client_id, s->device.id,
                      s->peer, packet_name(type), mqtt_strerror(code));
    mqtt_session_fail(s, mqtt_error_reason(code), mqtt_strerror(code));
}

/* Dispatches one framed packet of an active session. Returns -1 when the
 * session is closing or input handling must stop. */
static int handle_packet(mqtt_session_t *s, const mqtt_frame_t *frame)
{
    mqtt_packet_t pkt;
    int rc;

    if (frame->type == MQTT_CONNECT) {
        protocol_failure(s, MQTT_E_SECOND_CONNECT, frame->type);
        return -1;
    }
    rc = mqtt_decode(frame, s->version, &pkt);
    if (rc != 0) {
        protocol_failure(s, rc, frame->type);
        return -1;
    }
    switch (pkt.type) {
    case MQTT_PUBLISH:
        return mqtt_session_on_publish(s, &pkt.u.publish);
    case MQTT_PUBREL:
        mqtt_session_on_pubrel(s, &pkt.u.ack);
        break;
    case MQTT_SUBSCRIBE:
        mqtt_session_on_subscribe(s, &pkt.u.subscribe);
        break;
    case MQTT_UNSUBSCRIBE:
        mqtt_session_on_unsubscribe(s, &pkt.u.subscribe);
        break;
    case MQTT_PINGREQ:
        on_pingreq(s);
        break;
    case MQTT_DISCONNECT:
        on_disconnect(s, &pkt.u.disconnect);
        return -1;
    default:
        /* We publish at QoS 0 only, so PUBACK, PUBREC and PUBCOMP from
         * the client acknowledge nothing we sent, and AUTH needs an
         * authentication method this server does not offer. */
        mqtt_metrics_malformed("unexpected_packet");
        log_write_limited("mqtt_malformed", 10, LOG_LEVEL_INFO,
                          "mqtt packet rejected",
                          "conn=%llu client=%s peer=%s packet=%s "
                          "error=\"unexpected packet\"",
                          (unsigned long long)s->id, s->client_id, s->peer,
                          packet_name(pkt.type));
        mqtt_session_fail(s, MQTT_RC_PROTOCOL_ERROR, "unexpected packet");
        return -1;
    }
    return s->phase == MQTT_PHASE_CLOSING ? -1 : 0;
}

/* Returns 1 while buffered input may be handled. */
static int can_process(const mqtt_session_t *s)
{
    if (s->phase == MQTT_PHASE_CLOSING || s->held != NULL || s->yielded)
        return 0;
    /* 5.0 clients learn the limit from CONNACK, so a PUBLISH beyond it
     * is handled (and rejected with 0x93). 3.1.1 clients cannot know it
     * and simply wait. */
    if (s->version != MQTT_V5 &&
        s->inflight >= s->listener->cfg->mqtt.receive_maximum)
        return 0;
    return 1;
}

static void process_input(mqtt_session_t *s)
{
    const config_t *cfg = s->listener->cfg;
    mqtt_frame_t frame;
    int handled = 0;
    int n;

    if (s->processing)
        return;
    s->processing = 1;
    while (can_process(s) && s->in_off < s->in_len) {
        if (handled++ == MQTT_PACKETS_PER_TURN) {
            /* Reading pauses until the next turn handles the rest. */
            s->yielded = 1;
            mqtt_session_arm_retry_in(s, 0);
            break;
        }
        n = mqtt_frame(s->in + s->in_off, s->in_len - s->in_off,
                       cfg->mqtt.max_packet_size, &frame);
        if (n == MQTT_NEED_MORE)
            break;
        if (n < 0) {
            if (s->phase == MQTT_PHASE_CONNECT) {
                mqtt_metrics_malformed("bad_connect_frame");
                mqtt_session_close(s);
            } else {
                protocol_failure(s, n, s->in[s->in_off] >> 4);
            }
            break;
        }
        s->in_off += (size_t)n;
        mqtt_metrics_packet(0, frame.type);
        s->last_rx_ms = uv_now(s->listener->loop);
        if (s->phase == MQTT_PHASE_CONNECT) {
            if (mqtt_session_on_connect(s, &frame) != 0)
                break;
            continue;
        }
        if (handle_packet(s, &frame) != 0)
            break;
    }
    s->processing = 0;
    if (s->yielded && !s->paused && s->transport_open &&
        s->phase != MQTT_PHASE_CLOSING) {
        s->paused = 1;
        s->transport.ops->pause(s->transport.ctx);
    }
}

/* Makes room for `len` more bytes, moving unhandled bytes to the front. */
static int reserve_input(mqtt_session_t *s, size_t len)
{
    uint8_t *grown;
    size_t cap;

    if (s->in_off == s->in_len) {
        s->in_off = s->in_len = 0;
    } else if (s->in_off > 0 && s->in_len + len > s->in_cap) {
        memmove(s->in, s->in + s->in_off, s->in_len - s->in_off);
        s->in_len -= s->in_off;
        s->in_off = 0;
    }
    if (s->in_len + len <= s->in_cap)
        return 0;
    cap = s->in_cap ? s->in_cap : 4096;
    while (cap < s->in_len + len)
        cap *= 2;
    grown = realloc(s->in, cap);
    if (grown == NULL)
        return ING_ENOMEM;
    s->in = grown;
    s->in_cap = cap;
    return 0;
}

void mqtt_session_feed(mqtt_session_t *s, const uint8_t *data, size_t len)
{
    if (s->phase == MQTT_PHASE_CLOSING || len == 0)
        return;
    mqtt_metrics_bytes(len, 0);
    /* Packets already framed point into the buffer only while they are
     * handled, so moving the unhandled tail is safe here. */
    if (reserve_input(s, len) != 0) {
        mqtt_session_close(s);
        return;
    }
    memcpy(s->in + s->in_len, data, len);
    s->in_len += len;
    process_input(s);
}
