/* The telemetry protocol of GET /v1/ws: authentication, one pipeline batch
 * per data message, and replies in message order.
 *
 * Each data message gets one reply: an ack once its readings are durable,
 * or an error. A connection may have several messages in flight. Their
 * replies wait in a queue and go out in the order the messages arrived.
 * With MAX_IN_FLIGHT messages unanswered the connection stops reading its
 * socket, so a client that sends faster than the spool accepts is slowed
 * down by TCP and never has a message dropped. Messages that wslay had
 * already buffered when reading stopped are parked as text and started in
 * order once replies went out.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/errors.h"
#include "core/log.h"
#include "ws/ws_internal.h"

#define MAX_IN_FLIGHT 16

enum msg_state {
    MSG_PARKED = 0,  /* received, not parsed yet */
    MSG_PENDING = 1, /* submitted to the pipeline */
    MSG_DONE = 2,    /* its reply is ready */
};

typedef struct session session_t;

typedef struct msg {
    struct msg *next;
    session_t *session;
    enum msg_state state;
    char *text; /* MSG_PARKED: a copy of the message */
    size_t len;
    json_t *id;              /* correlation id, or NULL */
    pipeline_batch_t *batch; /* MSG_PENDING */
    char *reply;             /* MSG_DONE: serialized, or NULL */
    int fatal;               /* MSG_DONE: close with 1011 after it */
    int orphan;              /* the connection closed while pending */
} msg_t;

struct session {
    ws_conn_t *ws; /* NULL once the connection closed */
    ws_ingest_config_t cfg;
    auth_device_t dev;
    char *cred;         /* API key or JWT, checked again per message */
    tls_peer_t cert;    /* the TLS client certificate's device */
    int has_cert;       /* authenticated by `cert`, checked per message */
    int64_t expires_at; /* a JWT's exp (Unix seconds), or 0 */
    int authenticated;
    int draining;
    int closing; /* we sent a close frame: input is ignored */
    msg_t *head;
    msg_t *tail;
    size_t queued;  /* messages without a reply yet, parked ones included */
    size_t parked;  /* of those, not parsed yet */
    size_t pending; /* batch completions outstanding, also after close */
    uint64_t conn_id;
    char peer[64];
    int limit_paused;   /* reading paused until the session timer fires */
    int device_counted; /* counted in limits.max_connections_per_device */
    int over_device_limit; /* to close with 1008 when the timer fires */
    pipeline_t *pipeline;  /* outlives cfg.pl, which shutdown detaches */
};

static const char *device_of(const session_t *s)
{
    return s->authenticated ? s->dev.id : "-";
}

static void log_reject(const session_t *s, const char *error)
{
    log_write_limited(
        "ws_reject", 20, LOG_LEVEL_WARN, "websocket message rejected",
        "conn=%llu peer=%s device=%s error=%s", (unsigned long long)s->conn_id,
        s->peer, device_of(s), error);
}

/* Returns the error code of a reply for the log. */
static const char *error_code(const json_t *reply)
{
    const char *code = json_string_value(json_object_get(reply, "error"));

    return code ? code : "out_of_memory";
}

static void msg_free(msg_t *m)
{
    free(m->text);
    free(m->reply);
    json_decref(m->id);
    pipeline_batch_free(m->batch);
    free(m);
}

static msg_t *msg_append(session_t *s)
{
    msg_t *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->session = s;
    if (s->tail != NULL)
        s->tail->next = m;
    else
        s->head = m;
    s->tail = m;
    s->queued++;
    return m;
}

/* Stores `reply` (taken) as the message's reply. */
static void msg_done(msg_t *m, json_t *reply, int fatal)
{
    m->state = MSG_DONE;
    m->reply = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
    m->len = m->reply ? strlen(m->reply) : 0;
    m->fatal = fatal || m->reply == NULL;
    json_decref(reply);
}

static void session_maybe_free(session_t *s)
{
    if (s->ws == NULL && s->pending == 0) {
        if (s->cred != NULL) {
            explicit_bzero(s->cred, strlen(s->cred));
            free(s->cred);
        }
        free(s);
    }
}

static void on_batch_done(pipeline_batch_t *b, int status, void *arg);
static void arm_expiry(session_t *s);

/* Stops reading for `wait_ms` after flow control turned a message away,
 * so that the client waits instead of sending more. The session timer
 * ends the pause, unless the JWT expires first. */
static void pause_for(session_t *s, uint64_t wait_ms)
{
    int64_t left_s = s->expires_at - (int64_t)time(NULL);

    if (wait_ms == 0)
        wait_ms = 1;
    if (s->expires_at != 0 && left_s >= 0 &&
        (uint64_t)left_s * 1000 < wait_ms)
        wait_ms = left_s > 0 ? (uint64_t)left_s * 1000 : 1;
    s->limit_paused = 1;
    ws_conn_pause(s->ws, 1);
    ws_conn_set_timeout(s->ws, wait_ms);
}

/* Returns the error reply to a message over the device's rate limit
 * (ING_ERATE) or daily quota (ING_EQUOTA), with "retry_after" in whole
 * seconds, or NULL on allocation failure. */
static json_t *limited_reply(const json_t *id, int status, uint64_t wait_ms)
{
    json_t *reply =
        status == ING_ERATE
            ? ws_reply_error(id, "rate_limited",
                             "the device sends faster than its rate limit; "
                             "the readings were not stored, resend them "
                             "after retry_after seconds")
            : ws_reply_error(id, "quota_exceeded",
                             "the device used up its daily quota of "
                             "readings; the readings were not stored, "
                             "resend them after retry_after seconds "
                             "(midnight UTC)");

    if (reply != NULL &&
        json_object_set_new(reply, "retry_after",
                            json_integer((json_int_t)((wait_ms + 999) /
                                                      1000))) != 0) {
        json_decref(reply);
        return NULL;
    }
    return reply;
}

/* Parses and submits one message, or stores its error reply. */
static void msg_start(session_t *s, msg_t *m, const char *text, size_t len)
{
    ws_parsed_t p;
    json_t *reply;
    uint64_t wait_ms;
    int fatal = 0;
    int rc;

    m->state = MSG_PENDING;
    if (ws_message_parse(&s->cfg, &s->dev, text, len, &p) != 0) {
        msg_done(m, NULL, 1);
        return;
    }
    if (p.reply != NULL) {
        ws_metrics_message(p.result);
        log_reject(s, error_code(p.reply));
        msg_done(m, json_incref(p.reply), 0);
        ws_parsed_clear(&p);
        return;
    }
    m->id = p.id;
    m->batch = p.batch;
    rc = pipeline_batch_submit(m->batch, on_batch_done, m);
    if (rc == 0) {
        s->pending++;
        return;
    }
    wait_ms = pipeline_batch_retry_after_ms(m->batch);
    pipeline_batch_free(m->batch);
    m->batch = NULL;
    ws_metrics_message(WS_MESSAGE_ERROR);
    if (rc == ING_ERATE || rc == ING_EQUOTA) {
        reply = limited_reply(m->id, rc, wait_ms);
        fatal = reply == NULL;
        pause_for(s, wait_ms);
    } else {
        reply = ws_reply_failed(m->id, rc, s->cfg.retry_after_s, &fatal);
        if (rc == ING_EFULL)
            pause_for(s, s->cfg.retry_after_s * 1000);
    }
    log_reject(s, error_code(reply));
    msg_done(m, reply, fatal);
}

/* Starts the first parked message if a slot is free. Returns 1 if it
 * started one. */
static int start_parked(session_t *s)
{
    msg_t *m = s->head;

    if (s->parked == 0 || s->limit_paused ||
        s->queued - s->parked >= MAX_IN_FLIGHT)
        return 0;
    while (m->state != MSG_PARKED)
        m = m->next;
    s->parked--;
    msg_start(s, m, m->text, m->len);
    free(m->text);
    m->text = NULL;
    return 1;
}

static void close_session(session_t *s, uint16_t code, const char *reason)
{
    s->closing = 1;
    ws_conn_close(s->ws, code, reason);
}

/* Sends the replies at the head of the queue that are ready, starts parked
 * messages, and resumes reading when there is room again. */
static void send_ready(session_t *s)
{
    do {
        while (!s->closing && s->head != NULL && s->head->state == MSG_DONE) {
            msg_t *m = s->head;
            s->head = m->next;
            if (s->head == NULL)
                s->tail = NULL;
            s->queued--;
            if (m->reply != NULL)
                ws_conn_send_text(s->ws, m->reply, m->len);
            if (m->fatal)
                close_session(s, WS_CLOSE_INTERNAL_ERROR,
                              "internal error; reconnect and resend the "
                              "messages that got no ack");
            msg_free(m);
        }
    } while (!s->closing && start_parked(s));
    if (s->closing)
        return;
    if (s->draining) {
        if (s->queued == 0)
            close_session(s, WS_CLOSE_GOING_AWAY, "server shutting down");
        return;
    }
    if (s->queued < MAX_IN_FLIGHT && !s->limit_paused)
        ws_conn_pause(s->ws, 0);
}

static void on_batch_done(pipeline_batch_t *b, int status, void *arg)
{
    msg_t *m = arg;
    session_t *s = m->session;
    json_t *reply;
    int fatal = 0;

    s->pending--;
    if (m->orphan) {
        /* The connection closed, so the reply is dropped. The client
         * resends every message that got no ack. */
        msg_free(m);
        session_maybe_free(s);
        return;
    }
    if (status == 0) {
        ws_metrics_readings(WS_READING_ACCEPTED, pipeline_batch_accepted(b));
        ws_metrics_message(WS_MESSAGE_ACK);
        reply = ws_reply_ack(m->id, b);
    } else {
        ws_metrics_message(WS_MESSAGE_ERROR);
        reply = ws_reply_failed(m->id, status, s->cfg.retry_after_s, &fatal);
        log_reject(s, error_code(reply));
    }
    pipeline_batch_free(b);
    m->batch = NULL;
    msg_done(m, reply, fatal);
    send_ready(s);
}

/* ---- Authentication by the first message ---- */

#define DEVICE_LIMIT_REASON "too many connections of this device"

/* Counts the authenticated session against
 * limits.max_connections_per_device. Returns 1, or 0 when the device has
 * as many sessions as allowed: then the connection closes with 1008, at
 * once or, while ws_ingest_open runs and nothing can be sent yet, when
 * the session timer fires. */
static int count_device(session_t *s, int opening)
{
    pipeline_t *p = s->pipeline;

    if (s->device_counted)
        return 1;
    if (pipeline_device_connect(p, &s->dev) != 0) {
        pipeline_count_rejected("ws", "device_connection_limit");
        if (opening) {
            s->over_device_limit = 1;
            ws_conn_set_timeout(s->ws, 1);
            return 0;
        }
        s->closing = 1;
        ws_conn_close(s->ws, WS_CLOSE_POLICY_VIOLATION, DEVICE_LIMIT_REASON);
        return 0;
    }
    s->device_counted = pipeline_config(p)->limits.max_connections_per_device >
                        0;
    return 1;
}

static void reject_auth(session_t *s, const char *reason)
{
    log_write_limited("ws_auth_reject", 20, LOG_LEVEL_WARN,
                      "websocket authentication failed",
                      "conn=%llu peer=%s reason=\"%s\"",
                      (unsigned long long)s->conn_id, s->peer, reason);
    close_session(s, WS_CLOSE_POLICY_VIOLATION, reason);
}

static void send_auth_ok(session_t *s)
{
    json_t *o =
        json_pack("{s:s,s:s}", "type", "auth_ok", "device_id", s->dev.id);
    char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;

    json_decref(o);
    if (text == NULL) {
        close_session(s, WS_CLOSE_INTERNAL_ERROR, "out of memory");
        return;
    }
    ws_conn_send_text(s->ws, text, strlen(text));
    free(text);
}

/* Arms the session timer to close the connection when its JWT expires. */
static void arm_expiry(session_t *s)
{
    int64_t left_s = s->expires_at - (int64_t)time(NULL);

    if (s->expires_at == 0)
        return;
    ws_conn_set_timeout(s->ws, left_s > 0 ? (uint64_t)left_s * 1000 : 1);
}

/* Checks the credential `cred` (an API key or a JWT, `len` bytes) and
 * stores it and its device. Returns 1, or 0 after closing the connection
 * with 1008. */
static int check_credential(session_t *s, const char *cred, size_t len)
{
    auth_device_t dev;
    auth_failure_t why = {"malformed", "the credential is too long"};
    enum auth_result res = AUTH_UNKNOWN_KEY;
    int64_t expires_at = 0;
    char reason[120];

    if (len <= AUTH_CREDENTIAL_MAX)
        res = auth_check_credential(s->cfg.auth, cred, len, NULL, &dev, NULL,
                                    &expires_at, &why);
    if (res == AUTH_UNKNOWN_KEY) {
        /* A credential that passed once and fails now was revoked or
         * expired, which is no guessing. */
        if (!s->authenticated)
            auth_guard_failed_peer(s->cfg.auth, s->peer);
        if (why.reason != NULL && strcmp(why.reason, "expired") == 0)
            snprintf(reason, sizeof(reason), "token expired");
        else
            snprintf(reason, sizeof(reason), "invalid credential: %s",
                     why.reason ? why.reason : "unknown_key");
        reject_auth(s, reason);
        return 0;
    }
    if (res == AUTH_DISABLED) {
        reject_auth(s, "this device is disabled; ask the operator to "
                       "enable it");
        return 0;
    }
    if (cred != s->cred) {
        char *copy = malloc(len + 1);

        if (copy == NULL) {
            close_session(s, WS_CLOSE_INTERNAL_ERROR, "out of memory");
            return 0;
        }
        memcpy(copy, cred, len);
        copy[len] = '\0';
        free(s->cred);
        s->cred = copy;
    }
    s->dev = dev;
    s->expires_at = expires_at;
    return 1;
}

/* Checks that the device of the connection's TLS client certificate is
 * still enabled and pinned to it. Returns 1, or 0 after closing the
 * connection with 1008. */
static int check_certificate(session_t *s)
{
    auth_failure_t why = {0};
    enum auth_result res;
    char reason[WS_CLOSE_REASON_MAX + 1];

    res = auth_check_certificate(s->cfg.auth, s->cert.device_id,
                                 s->cert.fingerprint, &s->dev, &why);
    if (res == AUTH_OK)
        return 1;
    snprintf(reason, sizeof(reason), "client certificate rejected: %s",
             why.reason != NULL ? why.reason : "unknown_device");
    reject_auth(s, reason);
    return 0;
}

/* Handles the first message of a connection whose upgrade request had no
 * credential: it must be {"type":"auth","key":"..."} with an API key or a
 * JWT. */
static void authenticate(session_t *s, const char *text, size_t len)
{
    json_t *root = NULL;
    const char *type;
    json_t *key;

    if (auth_guard_check_peer(s->cfg.auth, s->peer) > 0) {
        reject_auth(s, "too many failed authentications from this address; "
                       "retry later");
        return;
    }
    root = json_loadb(text, len, 0, NULL);
    type = json_string_value(json_object_get(root, "type"));
    key = json_object_get(root, "key");
    if (type == NULL || strcmp(type, "auth") != 0 || !json_is_string(key)) {
        auth_guard_failed_peer(s->cfg.auth, s->peer);
        reject_auth(s, "the first message must be "
                       "{\"type\":\"auth\",\"key\":\"...\"} unless the "
                       "upgrade request sent an API key header");
        goto done;
    }
    if (!check_credential(s, json_string_value(key), json_string_length(key)) ||
        !count_device(s, 0))
        goto done;
    s->authenticated = 1;
    ws_conn_set_timeout(s->ws, 0);
    arm_expiry(s);
    log_debug("websocket authenticated", "conn=%llu peer=%s device=%s",
              (unsigned long long)s->conn_id, s->peer, s->dev.id);
    send_auth_ok(s);
done:
    json_decref(root);
}

/* ---- Handler callbacks ---- */

/* Keeps a copy of a message received while MAX_IN_FLIGHT are unanswered.
 * Returns 0 or ING_ENOMEM. */
static int park(session_t *s, const char *text, size_t len)
{
    msg_t *m = msg_append(s);

    if (m == NULL)
        return ING_ENOMEM;
    m->text = malloc(len ? len : 1);
    if (m->text == NULL) {
        msg_done(m, NULL, 1);
        return ING_ENOMEM;
    }
    memcpy(m->text, text, len);
    m->len = len;
    m->state = MSG_PARKED;
    s->parked++;
    return 0;
}

static void on_text(ws_conn_t *ws, const char *text, size_t len, void *arg)
{
    session_t *s = arg;
    msg_t *m;

    if (s->closing)
        return;
    if (!s->authenticated) {
        authenticate(s, text, len);
        return;
    }
    if (s->cred != NULL ? !check_credential(s, s->cred, strlen(s->cred))
                        : !check_certificate(s))
        return;
    /* Messages start in arrival order, so a message waits when an
     * earlier one is parked. */
    if (s->parked > 0 || s->queued >= MAX_IN_FLIGHT || s->limit_paused) {
        park(s, text, len);
    } else if ((m = msg_append(s)) == NULL) {
        close_session(s, WS_CLOSE_INTERNAL_ERROR, "out of memory");
        return;
    } else {
        msg_start(s, m, text, len);
    }
    if (s->queued >= MAX_IN_FLIGHT)
        ws_conn_pause(ws, 1);
    send_ready(s);
}

static void on_binary(ws_conn_t *ws, const uint8_t *data, size_t len, void *arg)
{
    session_t *s = arg;
    msg_t *m;

    (void)ws;
    (void)data;
    (void)len;
    if (s->closing)
        return;
    if (!s->authenticated) {
        reject_auth(s, "the first message must be a text message "
                       "{\"type\":\"auth\",\"key\":\"...\"}");
        return;
    }
    m = msg_append(s);
    if (m == NULL) {
        close_session(s, WS_CLOSE_INTERNAL_ERROR, "out of memory");
        return;
    }
    ws_metrics_message(WS_MESSAGE_INVALID);
    log_reject(s, "binary_not_supported");
    msg_done(m,
             ws_reply_error(NULL, "binary_not_supported",
                            "binary messages are not supported; send JSON "
                            "text"),
             0);
    send_ready(s);
}

static void on_drain(ws_conn_t *ws, void *arg)
{
    session_t *s = arg;

    if (s->closing)
        return;
    s->draining = 1;
    if (!s->authenticated) {
        close_session(s, WS_CLOSE_GOING_AWAY, "server shutting down");
        return;
    }
    /* Messages already received get their replies, but nothing more is
     * read. */
    ws_conn_pause(ws, 1);
    send_ready(s);
}

static void on_timeout(ws_conn_t *ws, void *arg)
{
    session_t *s = arg;

    (void)ws;
    if (s->closing)
        return;
    if (s->over_device_limit) {
        close_session(s, WS_CLOSE_POLICY_VIOLATION, DEVICE_LIMIT_REASON);
        return;
    }
    if (s->limit_paused &&
        (s->expires_at == 0 || (int64_t)time(NULL) < s->expires_at)) {
        s->limit_paused = 0;
        ws_conn_set_timeout(s->ws, 0);
        arm_expiry(s);
        send_ready(s);
        return;
    }
    if (!s->authenticated)
        reject_auth(s, "authentication timed out; send "
                       "{\"type\":\"auth\",\"key\":\"...\"} first");
    else if (s->expires_at != 0)
        reject_auth(s, "token expired");
}

static void on_close(ws_conn_t *ws, uint16_t code, void *arg)
{
    session_t *s = arg;
    msg_t *m = s->head;

    (void)ws;
    log_debug("websocket closed",
              "conn=%llu peer=%s device=%s code=%u "
              "unanswered=%zu",
              (unsigned long long)s->conn_id, s->peer, device_of(s),
              (unsigned)code, s->queued);
    while (m != NULL) {
        msg_t *next = m->next;
        if (m->state == MSG_PENDING)
            m->orphan = 1;
        else
            msg_free(m);
        m = next;
    }
    s->head = s->tail = NULL;
    s->ws = NULL;
    if (s->device_counted)
        pipeline_device_disconnect(s->pipeline, &s->dev);
    session_maybe_free(s);
}

static const ws_handler_t ingest_handler = {
    .on_text = on_text,
    .on_binary = on_binary,
    .on_drain = on_drain,
    .on_timeout = on_timeout,
    .on_close = on_close,
};

ws_conn_t *ws_ingest_open(const ws_stream_t *stream,
                          const ws_ingest_config_t *cfg, const char *key)
{
    session_t *s = calloc(1, sizeof(*s));

    if (s == NULL)
        return NULL;
    s->cfg = *cfg;
    s->pipeline = pipeline_loop_pipeline(cfg->pl);
    s->conn_id = stream->conn_id;
    snprintf(s->peer, sizeof(s->peer), "%s", stream->peer ? stream->peer : "?");
    s->ws = ws_conn_open(stream, &cfg->ws, &ingest_handler, s);
    if (s->ws == NULL) {
        free(s);
        return NULL;
    }
    /* The HTTP module checked a header key already, but the registry may
     * have changed since, and then the connection closes with 1008. */
    if (key != NULL) {
        s->authenticated = check_credential(s, key, strlen(key)) &&
                           count_device(s, 1);
        if (s->authenticated)
            arm_expiry(s);
    } else if (stream->cert != NULL) {
        /* A verified client certificate authenticates the connection, so
         * no auth message follows. */
        s->cert = *stream->cert;
        s->has_cert = 1;
        s->authenticated = check_certificate(s) && count_device(s, 1);
    } else {
        ws_conn_set_timeout(s->ws, cfg->auth_timeout_ms);
    }
    log_debug("websocket opened", "conn=%llu peer=%s device=%s auth=%s",
              (unsigned long long)s->conn_id, s->peer, device_of(s),
              key != NULL         ? "header"
              : s->has_cert       ? "certificate"
                                  : "first_message");
    return s->ws;
}
