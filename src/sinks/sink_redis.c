/* The Redis sink: adds each record to a stream (XADD) or publishes it to a
 * channel (PUBLISH), through hiredis.
 *
 * A batch is pipelined: every command is written first, then every reply
 * is read, in order. A stream entry is acknowledged by its reply (the new
 * entry id). PUBLISH is fire and forget: Redis acknowledges that it
 * received the message, not that a subscriber got it, and a subscriber that
 * is not connected at that moment misses it.
 *
 * Debian 12's hiredis (0.14) has no TLS, so config_load rejects tls: true
 * for this sink.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "core/errors.h"
#include "core/log.h"
#include "sinks/sink.h"
#include "sinks/template.h"

/* Maximum length of the key or channel a template expands to. Redis allows
 * far longer keys, but one this long is almost surely a template mistake. */
#define KEY_MAX 1024

typedef struct redis_sink {
    sink_ctx_t *ctx;
    char *host;
    int port;
    char *username; /* NULL for none */
    char *password; /* NULL for none */
    enum config_redis_mode mode;
    char maxlen[24]; /* "" when the stream is not trimmed */
    sink_template_t *topic;
    struct timeval timeout;
    redisContext *conn; /* NULL while disconnected */
    unsigned char *sent; /* per record of the batch: a reply is due */
    size_t sent_cap;
} redis_sink_t;

static void redis_close(void *state)
{
    redis_sink_t *r = state;

    if (r == NULL)
        return;
    if (r->conn != NULL)
        redisFree(r->conn);
    if (r->password != NULL)
        explicit_bzero(r->password, strlen(r->password));
    free(r->password);
    free(r->username);
    free(r->host);
    free(r->sent);
    sink_template_free(r->topic);
    free(r);
}

/* Splits "host:port" or "[v6]:port", which config_load checked. */
static int split_address(const char *address, redis_sink_t *r)
{
    const char *colon = strrchr(address, ':');
    const char *host = address;
    size_t host_len;

    if (colon == NULL)
        return ING_EINVAL;
    host_len = (size_t)(colon - address);
    if (host_len >= 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host++;
        host_len -= 2;
    }
    r->host = strndup(host, host_len);
    r->port = atoi(colon + 1);
    if (r->host == NULL)
        return ING_ENOMEM;
    return r->port > 0 && r->port <= 65535 ? 0 : ING_EINVAL;
}

static int redis_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                      char *err, size_t errlen)
{
    redis_sink_t *r = calloc(1, sizeof(*r));
    int rc;

    if (r == NULL)
        goto nomem;
    r->ctx = ctx;
    r->mode = cfg->mode;
    r->timeout.tv_sec = (time_t)(cfg->timeout_ms / 1000);
    r->timeout.tv_usec = (suseconds_t)(cfg->timeout_ms % 1000) * 1000;
    if (cfg->maxlen > 0)
        snprintf(r->maxlen, sizeof(r->maxlen), "%" PRIu64, cfg->maxlen);
    if (cfg->tls) {
        snprintf(err, errlen, "sink %s: the redis sink does not support TLS",
                 cfg->name);
        redis_close(r);
        return ING_ECONFIG;
    }
    rc = split_address(cfg->address ? cfg->address : "", r);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        snprintf(err, errlen, "sink %s: invalid address \"%s\"", cfg->name,
                 cfg->address ? cfg->address : "");
        redis_close(r);
        return ING_ECONFIG;
    }
    rc = sink_template_compile(cfg->topic ? cfg->topic : "", &r->topic, err,
                               errlen);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        /* config_load checks templates, so only a caller that built the
         * config by hand gets here. */
        redis_close(r);
        return ING_ECONFIG;
    }
    if ((cfg->username && !(r->username = strdup(cfg->username))) ||
        (cfg->password && !(r->password = strdup(cfg->password))))
        goto nomem;
    /* Connecting waits for the first batch: an unreachable Redis must not
     * stop ingestd from starting. */
    *state = r;
    return 0;

nomem:
    redis_close(r);
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
}

static void disconnect(redis_sink_t *r)
{
    if (r->conn != NULL)
        redisFree(r->conn);
    r->conn = NULL;
    sink_set_connected(r->ctx, false);
}

/* Logs a connection failure, with the context's error when it has one. */
static void log_connection_error(redis_sink_t *r, const char *msg,
                                 const char *detail)
{
    char ebuf[256];

    log_write_limited("sink_redis_connection", 5, LOG_LEVEL_WARN, msg,
                      "sink=%s host=%s port=%d error=%s",
                      sink_log_name(r->ctx), r->host, r->port,
                      log_quote(ebuf, sizeof(ebuf), detail));
}

static int authenticate(redis_sink_t *r)
{
    const char *argv[3] = {"AUTH"};
    size_t lens[3] = {4};
    int argc = 1;
    redisReply *reply;
    int rc = 0;

    if (r->username != NULL) {
        argv[argc] = r->username;
        lens[argc++] = strlen(r->username);
    }
    argv[argc] = r->password;
    lens[argc++] = strlen(r->password);
    reply = redisCommandArgv(r->conn, argc, argv, lens);
    if (reply == NULL) {
        log_connection_error(r, "redis AUTH failed", r->conn->errstr);
        return ING_EIO;
    }
    /* The reply names the failure (such as WRONGPASS) and never contains
     * the password. */
    if (reply->type == REDIS_REPLY_ERROR) {
        log_connection_error(r, "redis rejected AUTH; check username and "
                                "password",
                             reply->str);
        rc = ING_EIO;
    }
    freeReplyObject(reply);
    return rc;
}

static int connect_redis(redis_sink_t *r)
{
    r->conn = redisConnectWithTimeout(r->host, r->port, r->timeout);
    if (r->conn == NULL) {
        log_connection_error(r, "connecting to redis failed", "out of memory");
        return ING_ENOMEM;
    }
    if (r->conn->err) {
        log_connection_error(r, "connecting to redis failed",
                             r->conn->errstr);
        goto error;
    }
    /* Bounds each read and write of a command, so a Redis that stops
     * responding fails the batch instead of hanging the sink. */
    if (redisSetTimeout(r->conn, r->timeout) != REDIS_OK) {
        log_connection_error(r, "setting the redis timeout failed",
                             r->conn->errstr);
        goto error;
    }
    redisEnableKeepAlive(r->conn);
    if (r->password != NULL && authenticate(r) < 0)
        goto error;
    sink_set_connected(r->ctx, true);
    return 0;

error:
    redisFree(r->conn);
    r->conn = NULL;
    return ING_EIO;
}

/* Appends the command for `rec` to the output buffer, or sets its outcome
 * to REJECTED when it cannot be routed. Returns 0, or ING_ENOMEM. */
static int append_record(redis_sink_t *r, const spool_record_t *rec,
                         sink_outcome_t *out, int *sent)
{
    const char *argv[14];
    size_t lens[14];
    sink_envelope_t env;
    char key[KEY_MAX];
    int argc = 0;
    int len;

    *sent = 0;
    if (sink_envelope_parse(rec->data, rec->len, &env) < 0) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "the record is not a valid envelope");
        return 0;
    }
    len = sink_template_expand(r->topic, &env, key, sizeof(key));
    if (len < 0) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 len == ING_ETOOBIG
                     ? "the key from template \"%.80s\" is over 1023 bytes"
                     : "the template \"%.80s\" needs an envelope field "
                       "that is empty",
                 sink_template_text(r->topic));
        return 0;
    }
#define ARG(text, size)                                                        \
    do {                                                                       \
        argv[argc] = (text);                                                   \
        lens[argc++] = (size);                                                 \
    } while (0)
    if (r->mode == CONFIG_REDIS_PUBSUB) {
        ARG("PUBLISH", 7);
        ARG(key, (size_t)len);
        ARG(rec->data, rec->len);
    } else {
        ARG("XADD", 4);
        ARG(key, (size_t)len);
        if (r->maxlen[0] != '\0') {
            ARG("MAXLEN", 6);
            ARG("~", 1);
            ARG(r->maxlen, strlen(r->maxlen));
        }
        ARG("*", 1);
        ARG("message_id", 10);
        ARG(env.message_id, strlen(env.message_id));
        ARG("device_id", 9);
        ARG(env.device_id, strlen(env.device_id));
        ARG("device_type", 11);
        ARG(env.device_type, strlen(env.device_type));
        ARG("envelope", 8);
        ARG(rec->data, rec->len);
    }
#undef ARG
    /* hiredis copies the arguments into its output buffer. */
    if (redisAppendCommandArgv(r->conn, argc, argv, lens) != REDIS_OK)
        return ING_ENOMEM;
    *sent = 1;
    return 0;
}

/* Sets the outcome of one reply. Only WRONGTYPE (the key contains another
 * type) is a rejection for good. Other errors, such as OOM, LOADING,
 * READONLY, NOAUTH or NOPERM, are about the server or its configuration
 * rather than the record, so the record is retried: dead-lettering would
 * empty the spool into the dead-letter file until an operator fixed it. */
static void settle_reply(redis_sink_t *r, const redisReply *reply,
                         sink_outcome_t *out)
{
    char ebuf[256];

    if (reply->type != REDIS_REPLY_ERROR) {
        out->status = SINK_RECORD_OK;
        return;
    }
    snprintf(out->reason, sizeof(out->reason), "redis: %s", reply->str);
    if (strncmp(reply->str, "WRONGTYPE", 9) == 0) {
        out->status = SINK_RECORD_REJECTED;
        return;
    }
    out->status = SINK_RECORD_RETRY;
    log_write_limited("sink_redis_error_reply", 5, LOG_LEVEL_WARN,
                      "redis returned an error; retrying the record",
                      "sink=%s error=%s", sink_log_name(r->ctx),
                      log_quote(ebuf, sizeof(ebuf), reply->str));
}

static int redis_deliver(void *state, const spool_record_t *recs, size_t n,
                         sink_outcome_t *out)
{
    redis_sink_t *r = state;
    int rc;

    if (n > r->sent_cap) {
        unsigned char *sent = realloc(r->sent, n);

        if (sent == NULL)
            return ING_ENOMEM;
        r->sent = sent;
        r->sent_cap = n;
    }
    if (r->conn == NULL && (rc = connect_redis(r)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        int sent = 0;

        rc = append_record(r, &recs[i], &out[i], &sent);
        if (rc < 0) {
            /* The output buffer contains part of the batch, so a new
             * connection starts clean. */
            disconnect(r);
            return rc;
        }
        r->sent[i] = (unsigned char)sent;
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *reply = NULL;

        if (!r->sent[i])
            continue;
        /* The first call writes the whole pipeline, then each call reads
         * one reply. */
        if (redisGetReply(r->conn, (void **)&reply) != REDIS_OK ||
            reply == NULL) {
            log_connection_error(r, "redis connection failed during a batch",
                                 r->conn->errstr);
            disconnect(r);
            return ING_EIO;
        }
        settle_reply(r, reply, &out[i]);
        freeReplyObject(reply);
    }
    return 0;
}

const sink_ops_t sink_redis_ops = {
    .kind = "redis",
    .open = redis_open,
    .deliver = redis_deliver,
    .close = redis_close,
};
