/* The NATS JetStream sink: publishes each record's envelope to a JetStream
 * stream through libnats (Debian 12: nats.c 3.4).
 *
 * A batch is published with js_PublishMsgAsync, and each message carries
 * the record's message_id as its Nats-Msg-Id, so the server drops a record
 * that is sent again within the stream's duplicate window. The library
 * calls ack_handler once per message with the PubAck or the error. The
 * deliver thread waits on a condition variable until every PubAck arrived,
 * the timeout passed or the connection was lost, and takes back the
 * messages still pending.
 *
 * With `stream` set, the sink creates that stream when it is missing, with
 * the subjects its topic template can produce. See docs/sinks.md.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <nats/nats.h>

#include "core/errors.h"
#include "core/log.h"
#include "core/metrics.h"
#include "sinks/sink.h"
#include "sinks/template.h"

/* NATS limits no subject length, but one this long is almost surely a
 * template mistake. */
#define SUBJECT_MAX 1024
#define CONTENT_TYPE_MAX 128
/* The stream's duplicate window: a record sent again within it is stored
 * once. It covers a retry after a lost PubAck and a restart after a crash,
 * and matches the JetStream default. */
#define DUPLICATE_WINDOW_NS (2 * 60 * INT64_C(1000000000))
/* Maximum wait for a lost connection to come back before a batch is
 * retried later, so that a stop during an outage does not wait for the
 * whole timeout. */
#define RECONNECT_WAIT_MS 5000
#define RECONNECT_DELAY_MS 250
#define CLOSE_WAIT_MS 5000

typedef struct nats_sink {
    sink_ctx_t *ctx;
    char *address;
    char *username;
    char *password;
    int tls;
    char *tls_ca_file;
    char *tls_cert_file;
    char *tls_key_file;
    char *stream;  /* NULL when the stream must exist */
    char *filter;  /* the stream's subject filter, from the template */
    sink_template_t *topic;
    uint64_t timeout_ms;
    int64_t max_pending;
    metrics_counter_t *duplicates;

    natsConnection *conn; /* NULL until the first deliver */
    jsCtx *js;
    bool stream_ready; /* the stream exists or was created */

    pthread_mutex_t lock;
    pthread_cond_t cv;
    /* Under lock: the connection state from libnats's callbacks, and the
     * batch in flight, whose messages map to record indexes. */
    bool connected;
    bool closing; /* nats_close started: disconnects are expected */
    bool closed;  /* the closed callback ran: no callback follows */
    bool lost;   /* the connection dropped during the batch */
    bool no_responders;
    sink_outcome_t *out;
    natsMsg **slot_msg; /* open addressing, keyed by message pointer */
    size_t *slot_index;
    size_t slot_count; /* a power of two, at least twice the batch */
    size_t pending;
} nats_sink_t;

/* ---- Subjects ---- */

/* Builds the stream's subject filter from the topic template: a token with
 * a placeholder becomes '*', and when the last token has one it becomes
 * '>', so a device id containing '.' still falls inside the stream. */
static char *subject_filter(const char *text)
{
    size_t len = strlen(text);
    char *filter = malloc(len + 2);
    const char *token = text;
    size_t used = 0;

    if (filter == NULL)
        return NULL;
    for (;;) {
        size_t n = strcspn(token, ".");
        bool last = token[n] == '\0';

        if (memchr(token, '{', n) != NULL) {
            filter[used++] = last ? '>' : '*';
        } else {
            memcpy(filter + used, token, n);
            used += n;
        }
        if (last)
            break;
        filter[used++] = '.';
        token += n + 1;
    }
    filter[used] = '\0';
    return filter;
}

/* Returns true when `subject` is made of tokens separated by '.', none
 * empty and without white space, and has no wildcard token ('*' or '>')
 * unless `wildcards` allows them, as in a stream's subject filter. */
static bool subject_is_valid(const char *subject, bool wildcards)
{
    const char *token = subject;

    for (;;) {
        size_t n = strcspn(token, ".");

        if (n == 0 || strcspn(token, " \t\r\n") < n)
            return false;
        if (!wildcards && n == 1 && (token[0] == '*' || token[0] == '>'))
            return false;
        if (token[n] == '\0')
            return true;
        token += n + 1;
    }
}

/* Returns true when `filter` (with '*' and '>' wildcards) matches the
 * valid subject `subject`. */
static bool subject_matches(const char *filter, const char *subject)
{
    for (;;) {
        size_t fn = strcspn(filter, ".");
        size_t sn = strcspn(subject, ".");

        if (fn == 1 && filter[0] == '>')
            return true;
        if (!(fn == 1 && filter[0] == '*') &&
            (fn != sn || memcmp(filter, subject, fn) != 0))
            return false;
        if (filter[fn] == '\0' || subject[sn] == '\0')
            return filter[fn] == '\0' && subject[sn] == '\0';
        filter += fn + 1;
        subject += sn + 1;
    }
}

/* ---- Batch bookkeeping, under lock ---- */

static size_t slot_of(const nats_sink_t *s, const natsMsg *msg)
{
    uintptr_t h = (uintptr_t)msg;

    h ^= h >> 17;
    h *= UINT64_C(0x9E3779B97F4A7C15);
    return (size_t)(h >> 20) & (s->slot_count - 1);
}

static void slot_put(nats_sink_t *s, natsMsg *msg, size_t index)
{
    size_t i = slot_of(s, msg);

    while (s->slot_msg[i] != NULL)
        i = (i + 1) & (s->slot_count - 1);
    s->slot_msg[i] = msg;
    s->slot_index[i] = index;
}

/* Removes `msg` and stores its record index in `*index`. Returns false
 * when `msg` is not in the table. */
static bool slot_take(nats_sink_t *s, natsMsg *msg, size_t *index)
{
    size_t i = slot_of(s, msg);

    while (s->slot_msg[i] != msg) {
        if (s->slot_msg[i] == NULL)
            return false;
        i = (i + 1) & (s->slot_count - 1);
    }
    *index = s->slot_index[i];
    s->slot_msg[i] = NULL;
    /* Reinserts the rest of the cluster, so lookups stop at no gap. */
    for (i = (i + 1) & (s->slot_count - 1); s->slot_msg[i] != NULL;
         i = (i + 1) & (s->slot_count - 1)) {
        natsMsg *moved = s->slot_msg[i];
        size_t moved_index = s->slot_index[i];

        s->slot_msg[i] = NULL;
        slot_put(s, moved, moved_index);
    }
    return true;
}

static int ensure_slots(nats_sink_t *s, size_t n)
{
    size_t count = 16;

    while (count < 2 * n)
        count *= 2;
    if (count <= s->slot_count)
        return 0;
    free(s->slot_msg);
    free(s->slot_index);
    s->slot_msg = calloc(count, sizeof(*s->slot_msg));
    s->slot_index = calloc(count, sizeof(*s->slot_index));
    s->slot_count = count;
    if (s->slot_msg == NULL || s->slot_index == NULL) {
        s->slot_count = 0;
        return ING_ENOMEM;
    }
    return 0;
}

/* Maps a PubAck error to an outcome. A message over the stream's maximum
 * size is rejected for good. Everything else is about the stream or the
 * server (no stream captures the subject yet, storage full, leader
 * election), so the record is retried. */
static void settle_error(nats_sink_t *s, const jsPubAckErr *pae,
                         sink_outcome_t *out)
{
    const char *text = pae->ErrText != NULL ? pae->ErrText
                                            : natsStatus_GetText(pae->Err);

    if (pae->ErrCode == JSStreamMessageExceedsMaximumErr) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "nats: message size exceeds the stream's maximum (%s)",
                 text);
        return;
    }
    out->status = SINK_RECORD_RETRY;
    if (pae->Err == NATS_NO_RESPONDERS || pae->ErrCode == JSStreamNotFoundErr) {
        s->no_responders = true;
        snprintf(out->reason, sizeof(out->reason),
                 "nats: no stream captures the subject (%s)", text);
        return;
    }
    snprintf(out->reason, sizeof(out->reason), "nats: %s (error %d)", text,
             (int)pae->ErrCode);
}

/* Called by libnats, on its own thread, once per published message with
 * its PubAck (`pa`) or error (`pae`). A PubAck with Duplicate set means the
 * stream already stored that Nats-Msg-Id, which is delivery too. */
static void ack_handler(jsCtx *js, natsMsg *msg, jsPubAck *pa,
                        jsPubAckErr *pae, void *closure)
{
    nats_sink_t *s = closure;
    size_t index;

    pthread_mutex_lock(&s->lock);
    if (s->out != NULL && slot_take(s, msg, &index)) {
        if (pa != NULL) {
            s->out[index].status = SINK_RECORD_OK;
            if (pa->Duplicate)
                metrics_counter_add(s->duplicates, 1);
        } else if (pae != NULL) {
            settle_error(s, pae, &s->out[index]);
        }
        if (--s->pending == 0)
            pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->lock);
    natsMsg_Destroy(msg);
}

/* ---- Connection ---- */

static void set_connected(nats_sink_t *s, bool connected)
{
    bool closing;

    pthread_mutex_lock(&s->lock);
    s->connected = connected;
    if (!connected && s->out != NULL)
        s->lost = true;
    closing = s->closing;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
    if (!closing)
        sink_set_connected(s->ctx, connected);
}

static void on_connected(natsConnection *nc, void *closure)
{
    set_connected(closure, true);
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    set_connected(closure, false);
}

/* The last callback libnats runs for a connection, on its callback
 * thread. nats_close waits for it before freeing the sink. */
static void on_closed(natsConnection *nc, void *closure)
{
    nats_sink_t *s = closure;

    pthread_mutex_lock(&s->lock);
    s->connected = false;
    s->closed = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
}

static void on_async_error(natsConnection *nc, natsSubscription *sub,
                           natsStatus err, void *closure)
{
    nats_sink_t *s = closure;

    log_write_limited("sink_nats_async_error", 5, LOG_LEVEL_WARN,
                      "nats connection reported an error", "sink=%s error=%s",
                      sink_log_name(s->ctx), natsStatus_GetText(err));
}

static void log_nats_error(nats_sink_t *s, const char *msg, natsStatus st)
{
    char ebuf[256];
    const char *text = nats_GetLastError(NULL);

    log_write_limited("sink_nats_error", 5, LOG_LEVEL_WARN, msg,
                      "sink=%s address=%s error=%s", sink_log_name(s->ctx),
                      s->address,
                      log_quote(ebuf, sizeof(ebuf),
                                text != NULL && text[0] != '\0'
                                    ? text
                                    : natsStatus_GetText(st)));
}

static int64_t capped_timeout(const nats_sink_t *s)
{
    return s->timeout_ms < RECONNECT_WAIT_MS ? (int64_t)s->timeout_ms
                                             : RECONNECT_WAIT_MS;
}

static natsStatus build_options(nats_sink_t *s, natsOptions **out)
{
    natsOptions *opts = NULL;
    natsStatus st = natsOptions_Create(&opts);

    if (st == NATS_OK)
        st = natsOptions_SetURL(opts, s->address);
    if (st == NATS_OK && s->username != NULL)
        st = natsOptions_SetUserInfo(opts, s->username, s->password);
    if (st == NATS_OK && (s->tls || strncmp(s->address, "tls://", 6) == 0))
        st = natsOptions_SetSecure(opts, true);
    if (st == NATS_OK && s->tls_ca_file != NULL)
        st = natsOptions_LoadCATrustedCertificates(opts, s->tls_ca_file);
    if (st == NATS_OK && s->tls_cert_file != NULL)
        st = natsOptions_LoadCertificatesChain(opts, s->tls_cert_file,
                                               s->tls_key_file);
    if (st == NATS_OK)
        st = natsOptions_SetTimeout(opts, capped_timeout(s));
    /* Reconnects forever in the background, also while no batch is in
     * flight, so the connected gauge follows the server. */
    if (st == NATS_OK)
        st = natsOptions_SetMaxReconnect(opts, -1);
    if (st == NATS_OK)
        st = natsOptions_SetReconnectWait(opts, RECONNECT_DELAY_MS);
    if (st == NATS_OK)
        st = natsOptions_SetRetryOnFailedConnect(opts, true, on_connected, s);
    if (st == NATS_OK)
        st = natsOptions_SetDisconnectedCB(opts, on_disconnected, s);
    if (st == NATS_OK)
        st = natsOptions_SetReconnectedCB(opts, on_connected, s);
    if (st == NATS_OK)
        st = natsOptions_SetClosedCB(opts, on_closed, s);
    if (st == NATS_OK)
        st = natsOptions_SetErrorHandler(opts, on_async_error, s);
    if (st != NATS_OK) {
        natsOptions_Destroy(opts);
        return st;
    }
    *out = opts;
    return NATS_OK;
}

/* Creates the connection, which then connects and reconnects on libnats's
 * threads. Returns 0, or ING_EIO when the options are invalid (such as an
 * unreadable certificate file). */
static int create_connection(nats_sink_t *s)
{
    natsOptions *opts = NULL;
    jsOptions jo;
    natsStatus st = build_options(s, &opts);

    if (st != NATS_OK) {
        log_nats_error(s, "setting the nats connection options failed", st);
        return ING_EIO;
    }
    st = natsConnection_Connect(&s->conn, opts);
    natsOptions_Destroy(opts);
    if (st == NATS_OK) {
        set_connected(s, true);
    } else if (st != NATS_NOT_YET_CONNECTED) {
        log_nats_error(s, "connecting to nats failed", st);
        s->conn = NULL;
        return ING_EIO;
    }
    jsOptions_Init(&jo);
    jo.Wait = capped_timeout(s);
    jo.PublishAsync.MaxPending = s->max_pending;
    jo.PublishAsync.AckHandler = ack_handler;
    jo.PublishAsync.AckHandlerClosure = s;
    st = natsConnection_JetStream(&s->js, s->conn, &jo);
    if (st != NATS_OK) {
        log_nats_error(s, "creating the jetstream context failed", st);
        natsConnection_Destroy(s->conn);
        s->conn = NULL;
        s->js = NULL;
        return ING_EIO;
    }
    return 0;
}

static void deadline_after(struct timespec *deadline, uint64_t ms)
{
    clock_gettime(CLOCK_REALTIME, deadline);
    deadline->tv_sec += (time_t)(ms / 1000);
    deadline->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline->tv_nsec >= 1000000000L) {
        deadline->tv_sec++;
        deadline->tv_nsec -= 1000000000L;
    }
}

/* Waits, bounded, for the connection to be up. Returns true when it is. */
static bool wait_connected(nats_sink_t *s)
{
    struct timespec deadline;
    bool up;

    deadline_after(&deadline, (uint64_t)capped_timeout(s));
    pthread_mutex_lock(&s->lock);
    while (!s->connected) {
        if (pthread_cond_timedwait(&s->cv, &s->lock, &deadline) != 0)
            break;
    }
    up = s->connected;
    pthread_mutex_unlock(&s->lock);
    return up;
}

/* Creates the configured stream when it is missing: file storage, the
 * template's subjects and a duplicate window. Failing is logged and not
 * fatal, because another stream may capture the subjects. */
static void ensure_stream(nats_sink_t *s)
{
    jsStreamInfo *si = NULL;
    jsStreamConfig sc;
    jsErrCode jerr = 0;
    const char *subjects[1] = {s->filter};
    natsStatus st;

    st = js_GetStreamInfo(&si, s->js, s->stream, NULL, &jerr);
    if (st == NATS_OK) {
        jsStreamInfo_Destroy(si);
        s->stream_ready = true;
        return;
    }
    if (st != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr) {
        log_nats_error(s, "reading the nats stream info failed", st);
        return;
    }
    jsStreamConfig_Init(&sc);
    sc.Name = s->stream;
    sc.Subjects = subjects;
    sc.SubjectsLen = 1;
    sc.Storage = js_FileStorage;
    sc.Duplicates = DUPLICATE_WINDOW_NS;
    st = js_AddStream(&si, s->js, &sc, NULL, &jerr);
    if (st != NATS_OK) {
        log_nats_error(s, "creating the nats stream failed", st);
        return;
    }
    jsStreamInfo_Destroy(si);
    s->stream_ready = true;
    log_info("created the nats stream", "sink=%s stream=%s subjects=%s",
             sink_log_name(s->ctx), s->stream, s->filter);
}

/* ---- Open and close ---- */

/* Closes the connection and waits for its closed callback, because
 * libnats runs callbacks on its own thread after natsConnection_Destroy
 * returns. Returns false when the callback did not come in time. */
static bool close_connection(nats_sink_t *s)
{
    struct timespec deadline;
    bool closed;

    if (s->js != NULL)
        jsCtx_Destroy(s->js);
    s->js = NULL;
    if (s->conn == NULL)
        return true;
    pthread_mutex_lock(&s->lock);
    s->closing = true;
    pthread_mutex_unlock(&s->lock);
    natsConnection_Close(s->conn);
    deadline_after(&deadline, CLOSE_WAIT_MS);
    pthread_mutex_lock(&s->lock);
    while (!s->closed) {
        if (pthread_cond_timedwait(&s->cv, &s->lock, &deadline) != 0)
            break;
    }
    closed = s->closed;
    pthread_mutex_unlock(&s->lock);
    natsConnection_Destroy(s->conn);
    s->conn = NULL;
    return closed;
}

static void nats_close(void *state)
{
    nats_sink_t *s = state;

    if (s == NULL)
        return;
    if (!close_connection(s)) {
        /* NOTE: a callback may still reach the sink, so its memory is
         * left allocated instead of risking a use after free. */
        log_warn("nats connection did not close in time; leaking its state",
                 "sink=%s", sink_log_name(s->ctx));
        return;
    }
    if (s->password != NULL)
        explicit_bzero(s->password, strlen(s->password));
    free(s->password);
    free(s->username);
    free(s->address);
    free(s->tls_ca_file);
    free(s->tls_cert_file);
    free(s->tls_key_file);
    free(s->stream);
    free(s->filter);
    free(s->slot_msg);
    free(s->slot_index);
    sink_template_free(s->topic);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* Copies `src` into `*dst` unless it is NULL. Returns false when out of
 * memory. */
static bool copy_string(char **dst, const char *src)
{
    if (src == NULL)
        return true;
    *dst = strdup(src);
    return *dst != NULL;
}

static int nats_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                     char *err, size_t errlen)
{
    nats_sink_t *s = calloc(1, sizeof(*s));
    char labels[160];
    int rc;

    if (s == NULL)
        goto nomem;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->ctx = ctx;
    s->tls = cfg->tls;
    s->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
    s->max_pending = cfg->batch_records > 0 ? (int64_t)cfg->batch_records
                                            : 512;
    if (!copy_string(&s->address, cfg->address ? cfg->address
                                               : "nats://127.0.0.1:4222") ||
        !copy_string(&s->username, cfg->username) ||
        !copy_string(&s->password, cfg->password) ||
        !copy_string(&s->tls_ca_file, cfg->tls_ca_file) ||
        !copy_string(&s->tls_cert_file, cfg->tls_cert_file) ||
        !copy_string(&s->tls_key_file, cfg->tls_key_file))
        goto nomem;
    if (cfg->stream != NULL && cfg->stream[0] != '\0' &&
        !copy_string(&s->stream, cfg->stream))
        goto nomem;
    rc = sink_template_compile(cfg->topic ? cfg->topic
                                          : "telemetry.{device_type}."
                                            "{device_id}",
                               &s->topic, err, errlen);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        nats_close(s);
        return ING_ECONFIG;
    }
    s->filter = subject_filter(sink_template_text(s->topic));
    if (s->filter == NULL)
        goto nomem;
    if (!subject_is_valid(s->filter, true)) {
        snprintf(err, errlen,
                 "sink %s: topic \"%s\" is not a NATS subject; separate "
                 "tokens with single dots",
                 cfg->name, sink_template_text(s->topic));
        nats_close(s);
        return ING_ECONFIG;
    }
    snprintf(labels, sizeof(labels), "sink=\"%s\"", cfg->name);
    s->duplicates = metrics_counter(
        "ingestd_sink_nats_duplicates_total",
        "Records JetStream acknowledged as duplicates of a stored "
        "Nats-Msg-Id",
        labels);
    /* Connecting waits for the first batch, and an unreachable server
     * must not stop ingestd from starting. */
    *state = s;
    return 0;

nomem:
    nats_close(s);
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
}

/* ---- Deliver ---- */

/* Reads the envelope's content_type, which sink_envelope_t lacks. */
static void read_content_type(const spool_record_t *rec, char *buf,
                              size_t size)
{
    json_t *root = json_loadb(rec->data, rec->len, 0, NULL);
    const char *value =
        json_string_value(json_object_get(root, "content_type"));

    snprintf(buf, size, "%s", value != NULL ? value : "application/json");
    json_decref(root);
}

static void reject(sink_outcome_t *out, const char *fmt, const char *arg)
{
    out->status = SINK_RECORD_REJECTED;
    snprintf(out->reason, sizeof(out->reason), fmt, arg);
}

/* Builds the message for `rec` with its subject and headers, or rejects
 * the record when it cannot be routed. Returns 0 with `*msg` set or NULL
 * (rejected), or ING_ENOMEM. */
static int build_message(nats_sink_t *s, const spool_record_t *rec,
                         sink_envelope_t *env, sink_outcome_t *out,
                         natsMsg **msg)
{
    char subject[SUBJECT_MAX];
    char content_type[CONTENT_TYPE_MAX];
    natsStatus st;
    int len;

    *msg = NULL;
    if (sink_envelope_parse(rec->data, rec->len, env) < 0) {
        reject(out, "%s", "the record is not a valid envelope");
        return 0;
    }
    len = sink_template_expand(s->topic, env, subject, sizeof(subject));
    if (len < 0) {
        reject(out,
               len == ING_ETOOBIG
                   ? "the subject from template \"%.80s\" is over 1023 bytes"
                   : "the template \"%.80s\" needs an envelope field that "
                     "is empty",
               sink_template_text(s->topic));
        return 0;
    }
    if (!subject_is_valid(subject, false)) {
        reject(out, "\"%.120s\" is not a valid NATS subject", subject);
        return 0;
    }
    if (s->stream != NULL && !subject_matches(s->filter, subject)) {
        reject(out,
               "subject \"%.120s\" is outside the stream's subjects; a "
               "field has a '.'",
               subject);
        return 0;
    }
    read_content_type(rec, content_type, sizeof(content_type));
    st = natsMsg_Create(msg, subject, NULL, rec->data, (int)rec->len);
    if (st == NATS_OK)
        st = natsMsgHeader_Set(*msg, "device_id", env->device_id);
    if (st == NATS_OK)
        st = natsMsgHeader_Set(*msg, "device_type", env->device_type);
    if (st == NATS_OK)
        st = natsMsgHeader_Set(*msg, "content_type", content_type);
    if (st != NATS_OK) {
        natsMsg_Destroy(*msg);
        *msg = NULL;
        return ING_ENOMEM;
    }
    return 0;
}

/* Publishes record i. Returns 0, or ING_EIO when the connection cannot
 * take more messages, so the rest of the batch is retried. */
static int publish_record(nats_sink_t *s, const spool_record_t *rec,
                          size_t i, sink_outcome_t *out)
{
    sink_envelope_t env;
    jsPubOptions po;
    natsMsg *msg = NULL;
    natsMsg *sent;
    natsStatus st;
    size_t index;
    int rc = build_message(s, rec, &env, out, &msg);

    if (rc < 0 || msg == NULL)
        return rc;
    jsPubOptions_Init(&po);
    po.MsgId = env.message_id[0] != '\0' ? env.message_id : NULL;
    /* The message is in the table before the library can call
     * ack_handler with it. */
    sent = msg;
    pthread_mutex_lock(&s->lock);
    slot_put(s, sent, i);
    s->pending++;
    pthread_mutex_unlock(&s->lock);
    st = js_PublishMsgAsync(s->js, &msg, &po);
    if (st == NATS_OK)
        return 0;
    pthread_mutex_lock(&s->lock);
    slot_take(s, sent, &index);
    s->pending--;
    pthread_mutex_unlock(&s->lock);
    natsMsg_Destroy(msg);
    if (st == NATS_MAX_PAYLOAD) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "nats: message too large (%zu bytes of envelope > %" PRId64
                 " bytes max_payload of the server, headers included)",
                 rec->len, natsConnection_GetMaxPayload(s->conn));
        return 0;
    }
    snprintf(out->reason, sizeof(out->reason), "nats: publishing failed: %s",
             natsStatus_GetText(st));
    log_nats_error(s, "publishing to nats failed; retrying the batch", st);
    return ING_EIO;
}

/* Waits until every PubAck arrived, the deadline passed or the connection
 * dropped. Called with the lock held. */
static void wait_acks(nats_sink_t *s, const struct timespec *deadline)
{
    while (s->pending > 0 && !s->lost) {
        if (pthread_cond_timedwait(&s->cv, &s->lock, deadline) != 0)
            break;
    }
}

/* Takes back the messages that got no PubAck, so that a late PubAck is
 * dropped by the library instead of reaching the next batch. Their
 * records stay RETRY. */
static void abandon_pending(nats_sink_t *s)
{
    natsMsgList list = {0};

    if (js_PublishAsyncGetPendingList(&list, s->js) == NATS_OK)
        natsMsgList_Destroy(&list);
}

static int nats_deliver(void *state, const spool_record_t *recs, size_t n,
                        sink_outcome_t *out)
{
    nats_sink_t *s = state;
    struct timespec deadline;
    size_t unacked;
    int rc = 0;

    for (size_t i = 0; i < n; i++) {
        out[i].status = SINK_RECORD_RETRY;
        out[i].reason[0] = '\0';
    }
    if (ensure_slots(s, n) < 0)
        return ING_ENOMEM;
    if (s->conn == NULL && (rc = create_connection(s)) < 0)
        return rc;
    if (!wait_connected(s))
        return ING_EIO;
    if (s->stream != NULL && !s->stream_ready)
        ensure_stream(s);

    deadline_after(&deadline, s->timeout_ms);
    pthread_mutex_lock(&s->lock);
    s->out = out;
    s->lost = false;
    s->no_responders = false;
    s->pending = 0;
    memset(s->slot_msg, 0, s->slot_count * sizeof(*s->slot_msg));
    pthread_mutex_unlock(&s->lock);

    for (size_t i = 0; i < n && rc == 0; i++)
        rc = publish_record(s, &recs[i], i, &out[i]);

    /* The wait uses the sink's own condition variable rather than
     * js_PublishAsyncComplete, so that a lost connection ends it early. */
    pthread_mutex_lock(&s->lock);
    wait_acks(s, &deadline);
    unacked = s->pending;
    if (s->no_responders)
        s->stream_ready = false;
    pthread_mutex_unlock(&s->lock);
    if (unacked > 0)
        abandon_pending(s);

    /* ack_handler may still run for a message that left the pending list,
     * so the batch is detached under the lock before returning. */
    pthread_mutex_lock(&s->lock);
    s->out = NULL;
    s->pending = 0;
    pthread_mutex_unlock(&s->lock);
    if (unacked > 0)
        log_write_limited("sink_nats_unacked", 5, LOG_LEVEL_WARN,
                          "nats acknowledged only part of a batch; retrying "
                          "the rest",
                          "sink=%s records=%zu unacked=%zu timeout_ms=%" PRIu64,
                          sink_log_name(s->ctx), n, unacked, s->timeout_ms);
    /* After a failed publish the outcomes are set: the records before it
     * may be acknowledged, and the rest are RETRY. */
    return rc == ING_EIO ? 0 : rc;
}

const sink_ops_t sink_nats_ops = {
    .kind = "nats",
    .open = nats_open,
    .deliver = nats_deliver,
    .close = nats_close,
};
