/* The MQTT sink: republishes each record's envelope to an external MQTT
 * broker with MQTT 5, through libmosquitto (Debian 12: mosquitto 2.0).
 *
 * libmosquitto's network thread (mosquitto_loop_start) connects, sends
 * keepalives and reconnects, so the connected gauge follows the broker
 * also while no batch is in flight. deliver() publishes a batch and waits
 * on a condition variable until on_publish reported every message. At
 * QoS 1 the report is the broker's PUBACK. At QoS 0 it only means that the
 * message was written to the socket, so QoS 0 can lose records.
 *
 * The session starts clean. A batch that ends with messages not
 * acknowledged (timeout, lost connection) replaces the client, so those
 * messages leave libmosquitto's queue instead of being resent later with
 * a packet id that a new batch may also use. See docs/sinks.md.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include "core/errors.h"
#include "core/log.h"
#include "sinks/sink.h"
#include "sinks/template.h"

/* MQTT limits a topic to 65535 bytes, but one this long is almost surely a
 * template mistake. */
#define TOPIC_MAX 1024
#define KEEPALIVE_S 60
#define RECONNECT_DELAY_MIN_S 1
#define RECONNECT_DELAY_MAX_S 10
/* Maximum wait for the connection before a batch is retried later, so a
 * stop during an outage does not wait for the whole timeout. */
#define CONNECT_WAIT_MS 5000
/* Packet ids are 16 bits and libmosquitto counts them up, wrapping after
 * 65535, so at most this many messages are in flight at once. */
#define CHUNK_MAX 32768
#define MID_COUNT 65536

typedef struct mqtt_sink {
    sink_ctx_t *ctx;
    char *host;
    int port;
    char *client_id;
    char *username;
    char *password;
    int tls;
    char *tls_ca_file;
    char *tls_cert_file;
    char *tls_key_file;
    int qos;
    uint64_t timeout_ms;
    sink_template_t *topic;
    struct mosquitto *mosq; /* NULL until the first deliver */

    pthread_mutex_t lock;
    pthread_cond_t cv;
    /* Under lock: state reported by libmosquitto's callbacks. */
    bool connected;
    bool ever_connected; /* this client had a CONNACK with success */
    bool closing; /* mqtt_close started: a disconnect is expected */
    bool lost;    /* the connection dropped or a publish failed */
    int connect_reason; /* the last CONNACK reason code, for logs */
    /* Per packet id: the record index waiting for it (-1 for none), and a
     * report that arrived before deliver recorded the index. */
    int32_t *index_of;
    int16_t *early_reason; /* -1 for no early report */
    sink_outcome_t *out;
    size_t pending;
} mqtt_sink_t;

static pthread_once_t lib_once = PTHREAD_ONCE_INIT;

static void init_library(void)
{
    mosquitto_lib_init();
}

/* ---- Outcomes ---- */

/* Maps a PUBACK reason code to an outcome. Codes below 0x80 are success,
 * including 0x10 (no matching subscribers). A topic the broker calls
 * invalid or a packet over its maximum size cannot succeed when sent
 * again. Other failures, such as 0x87 not authorized (an ACL that may be
 * fixed) or 0x97 quota exceeded, are retried. */
static void settle(sink_outcome_t *out, int reason)
{
    if (reason < 0x80) {
        out->status = SINK_RECORD_OK;
        return;
    }
    snprintf(out->reason, sizeof(out->reason), "mqtt: PUBACK 0x%02x %s",
             reason, mosquitto_reason_string(reason));
    if (reason == MQTT_RC_TOPIC_NAME_INVALID ||
        reason == MQTT_RC_PACKET_TOO_LARGE ||
        reason == MQTT_RC_PAYLOAD_FORMAT_INVALID)
        out->status = SINK_RECORD_REJECTED;
    else
        out->status = SINK_RECORD_RETRY;
}

/* ---- Callbacks, on libmosquitto's network thread ---- */

static void on_connect(struct mosquitto *mosq, void *obj, int reason,
                       int flags, const mosquitto_property *props)
{
    mqtt_sink_t *s = obj;

    pthread_mutex_lock(&s->lock);
    s->connected = reason == 0;
    s->ever_connected = s->ever_connected || reason == 0;
    s->connect_reason = reason;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
    if (reason != 0) {
        log_write_limited("sink_mqtt_connack", 5, LOG_LEVEL_WARN,
                          "mqtt broker refused the connection", "sink=%s "
                          "reason=0x%02x error=\"%s\"",
                          sink_log_name(s->ctx), reason,
                          mosquitto_reason_string(reason));
        return;
    }
    sink_set_connected(s->ctx, true);
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc,
                          const mosquitto_property *props)
{
    mqtt_sink_t *s = obj;
    bool report;

    pthread_mutex_lock(&s->lock);
    report = s->connected && !s->closing;
    s->connected = false;
    if (s->out != NULL)
        s->lost = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->lock);
    if (report)
        sink_set_connected(s->ctx, false);
}

static void on_publish(struct mosquitto *mosq, void *obj, int mid,
                       int reason, const mosquitto_property *props)
{
    mqtt_sink_t *s = obj;
    int32_t index;

    if (mid <= 0 || mid >= MID_COUNT)
        return;
    pthread_mutex_lock(&s->lock);
    index = s->index_of[mid];
    if (s->out != NULL && index >= 0) {
        s->index_of[mid] = -1;
        settle(&s->out[index], reason);
        if (--s->pending == 0)
            pthread_cond_broadcast(&s->cv);
    } else if (s->out != NULL) {
        /* mosquitto_publish_v5 has not returned the packet id yet. */
        s->early_reason[mid] = (int16_t)reason;
    }
    pthread_mutex_unlock(&s->lock);
}

/* ---- Client ---- */

static void log_mosquitto_error(mqtt_sink_t *s, const char *msg, int rc)
{
    log_write_limited("sink_mqtt_error", 5, LOG_LEVEL_WARN, msg,
                      "sink=%s host=%s port=%d error=\"%s\"",
                      sink_log_name(s->ctx), s->host, s->port,
                      rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                           : mosquitto_strerror(rc));
}

static void destroy_client(mqtt_sink_t *s)
{
    bool report;

    if (s->mosq == NULL)
        return;
    mosquitto_disconnect_v5(s->mosq, MQTT_RC_NORMAL_DISCONNECTION, NULL);
    mosquitto_loop_stop(s->mosq, false);
    mosquitto_destroy(s->mosq);
    s->mosq = NULL;
    pthread_mutex_lock(&s->lock);
    report = s->connected && !s->closing;
    s->connected = false;
    pthread_mutex_unlock(&s->lock);
    if (report)
        sink_set_connected(s->ctx, false);
}

/* Creates the client and starts its network thread, which connects and
 * keeps reconnecting. Returns 0, or ING_EIO when the settings are invalid
 * (such as an unreadable certificate). */
static int create_client(mqtt_sink_t *s)
{
    int rc;

    pthread_mutex_lock(&s->lock);
    s->ever_connected = false;
    pthread_mutex_unlock(&s->lock);
    s->mosq = mosquitto_new(s->client_id, true, s);
    if (s->mosq == NULL) {
        log_mosquitto_error(s, "creating the mqtt client failed",
                            MOSQ_ERR_ERRNO);
        return ING_ENOMEM;
    }
    mosquitto_int_option(s->mosq, MOSQ_OPT_PROTOCOL_VERSION,
                         MQTT_PROTOCOL_V5);
    mosquitto_connect_v5_callback_set(s->mosq, on_connect);
    mosquitto_disconnect_v5_callback_set(s->mosq, on_disconnect);
    mosquitto_publish_v5_callback_set(s->mosq, on_publish);
    mosquitto_reconnect_delay_set(s->mosq, RECONNECT_DELAY_MIN_S,
                                  RECONNECT_DELAY_MAX_S, true);
    rc = mosquitto_username_pw_set(s->mosq, s->username, s->password);
    if (rc == MOSQ_ERR_SUCCESS && s->tls) {
        if (s->tls_ca_file == NULL)
            rc = mosquitto_int_option(s->mosq, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
        if (rc == MOSQ_ERR_SUCCESS)
            rc = mosquitto_tls_set(s->mosq, s->tls_ca_file,
                                   s->tls_ca_file ? NULL : "/etc/ssl/certs",
                                   s->tls_cert_file, s->tls_key_file, NULL);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        log_mosquitto_error(s, "setting up the mqtt client failed", rc);
        goto error;
    }
    /* A failed first connect is retried by the network thread. */
    rc = mosquitto_connect_async(s->mosq, s->host, s->port, KEEPALIVE_S);
    if (rc != MOSQ_ERR_SUCCESS)
        log_mosquitto_error(s, "connecting to the mqtt broker failed", rc);
    rc = mosquitto_loop_start(s->mosq);
    if (rc != MOSQ_ERR_SUCCESS) {
        log_mosquitto_error(s, "starting the mqtt network thread failed", rc);
        goto error;
    }
    return 0;

error:
    mosquitto_destroy(s->mosq);
    s->mosq = NULL;
    return ING_EIO;
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

static bool wait_connected(mqtt_sink_t *s)
{
    struct timespec deadline;
    bool up;

    deadline_after(&deadline, s->timeout_ms < CONNECT_WAIT_MS
                                  ? s->timeout_ms
                                  : CONNECT_WAIT_MS);
    pthread_mutex_lock(&s->lock);
    while (!s->connected) {
        if (pthread_cond_timedwait(&s->cv, &s->lock, &deadline) != 0)
            break;
    }
    up = s->connected;
    pthread_mutex_unlock(&s->lock);
    return up;
}

/* ---- Open and close ---- */

static void mqtt_close(void *state)
{
    mqtt_sink_t *s = state;

    if (s == NULL)
        return;
    pthread_mutex_lock(&s->lock);
    s->closing = true;
    pthread_mutex_unlock(&s->lock);
    destroy_client(s);
    if (s->password != NULL)
        explicit_bzero(s->password, strlen(s->password));
    free(s->password);
    free(s->username);
    free(s->client_id);
    free(s->host);
    free(s->tls_ca_file);
    free(s->tls_cert_file);
    free(s->tls_key_file);
    free(s->index_of);
    free(s->early_reason);
    sink_template_free(s->topic);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* Splits "host:port" or "[v6]:port", which config_load checked. */
static int split_address(const char *address, mqtt_sink_t *s)
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
    s->host = strndup(host, host_len);
    s->port = atoi(colon + 1);
    if (s->host == NULL)
        return ING_ENOMEM;
    return s->port > 0 && s->port <= 65535 ? 0 : ING_EINVAL;
}

static bool copy_string(char **dst, const char *src)
{
    if (src == NULL)
        return true;
    *dst = strdup(src);
    return *dst != NULL;
}

static int mqtt_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                     char *err, size_t errlen)
{
    mqtt_sink_t *s = calloc(1, sizeof(*s));
    const char *address = cfg->address ? cfg->address : "127.0.0.1:1883";
    int rc;

    if (s == NULL)
        goto nomem;
    pthread_once(&lib_once, init_library);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->ctx = ctx;
    s->qos = cfg->qos;
    s->tls = cfg->tls;
    s->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
    s->index_of = malloc(MID_COUNT * sizeof(*s->index_of));
    s->early_reason = malloc(MID_COUNT * sizeof(*s->early_reason));
    if (s->index_of == NULL || s->early_reason == NULL)
        goto nomem;
    for (size_t i = 0; i < MID_COUNT; i++) {
        s->index_of[i] = -1;
        s->early_reason[i] = -1;
    }
    rc = split_address(address, s);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        snprintf(err, errlen, "sink %s: invalid address \"%s\"", cfg->name,
                 address);
        mqtt_close(s);
        return ING_ECONFIG;
    }
    if (!copy_string(&s->client_id, cfg->client_id ? cfg->client_id
                                                   : cfg->name) ||
        !copy_string(&s->username, cfg->username) ||
        !copy_string(&s->password, cfg->password) ||
        !copy_string(&s->tls_ca_file, cfg->tls_ca_file) ||
        !copy_string(&s->tls_cert_file, cfg->tls_cert_file) ||
        !copy_string(&s->tls_key_file, cfg->tls_key_file))
        goto nomem;
    rc = sink_template_compile(cfg->topic ? cfg->topic
                                          : "telemetry/{device_type}/"
                                            "{device_id}",
                               &s->topic, err, errlen);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        mqtt_close(s);
        return ING_ECONFIG;
    }
    /* Connecting waits for the first batch, and an unreachable broker
     * must not stop ingestd from starting. */
    *state = s;
    return 0;

nomem:
    mqtt_close(s);
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
}

/* ---- Deliver ---- */

static void reject(sink_outcome_t *out, const char *fmt, const char *arg)
{
    out->status = SINK_RECORD_REJECTED;
    snprintf(out->reason, sizeof(out->reason), fmt, arg);
}

/* Maps a local publish error to an outcome. Returns true when the
 * connection is unusable, so the rest of the batch is retried. */
static bool publish_failed(mqtt_sink_t *s, int rc, sink_outcome_t *out)
{
    switch (rc) {
    case MOSQ_ERR_OVERSIZE_PACKET:
    case MOSQ_ERR_PAYLOAD_SIZE:
        reject(out, "mqtt: message too large: %s", mosquitto_strerror(rc));
        return false;
    case MOSQ_ERR_INVAL:
    case MOSQ_ERR_MALFORMED_UTF8:
        reject(out, "mqtt: invalid topic: %s", mosquitto_strerror(rc));
        return false;
    default:
        snprintf(out->reason, sizeof(out->reason),
                 "mqtt: publishing failed: %s", mosquitto_strerror(rc));
        pthread_mutex_lock(&s->lock);
        s->lost = true;
        pthread_mutex_unlock(&s->lock);
        log_mosquitto_error(s, "publishing to the mqtt broker failed; "
                               "retrying the batch",
                            rc);
        return true;
    }
}

/* Publishes record i of the chunk. Returns false when the rest of the
 * batch must be retried. */
static bool publish_record(mqtt_sink_t *s, const spool_record_t *rec,
                           size_t i, sink_outcome_t *out)
{
    mosquitto_property *props = NULL;
    sink_envelope_t env;
    char topic[TOPIC_MAX];
    int mid = 0;
    int len;
    int rc;

    if (sink_envelope_parse(rec->data, rec->len, &env) < 0) {
        reject(out, "%s", "the record is not a valid envelope");
        return true;
    }
    len = sink_template_expand(s->topic, &env, topic, sizeof(topic));
    if (len < 0) {
        reject(out,
               len == ING_ETOOBIG
                   ? "the topic from template \"%.80s\" is over 1023 bytes"
                   : "the template \"%.80s\" needs an envelope field that "
                     "is empty",
               sink_template_text(s->topic));
        return true;
    }
    rc = mosquitto_property_add_string(&props, MQTT_PROP_CONTENT_TYPE,
                                       "application/json");
    if (rc == MOSQ_ERR_SUCCESS && env.message_id[0] != '\0')
        rc = mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY,
                                                "message_id", env.message_id);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_publish_v5(s->mosq, &mid, topic, (int)rec->len,
                                  rec->data, s->qos, false, props);
    mosquitto_property_free_all(&props);
    if (rc != MOSQ_ERR_SUCCESS)
        return !publish_failed(s, rc, out);
    pthread_mutex_lock(&s->lock);
    if (s->early_reason[mid] >= 0) {
        settle(out, s->early_reason[mid]);
        s->early_reason[mid] = -1;
    } else {
        s->index_of[mid] = (int32_t)i;
        s->pending++;
    }
    pthread_mutex_unlock(&s->lock);
    return true;
}

/* Publishes one chunk and waits for its reports until `deadline`.
 * Returns the number of messages left without a report. */
static size_t deliver_chunk(mqtt_sink_t *s, const spool_record_t *recs,
                            size_t n, sink_outcome_t *out,
                            const struct timespec *deadline)
{
    size_t unacked;

    pthread_mutex_lock(&s->lock);
    s->out = out;
    s->pending = 0;
    s->lost = !s->connected;
    pthread_mutex_unlock(&s->lock);
    for (size_t i = 0; i < n; i++) {
        if (!publish_record(s, &recs[i], i, &out[i]))
            break;
    }
    pthread_mutex_lock(&s->lock);
    while (s->pending > 0 && !s->lost) {
        if (pthread_cond_timedwait(&s->cv, &s->lock, deadline) != 0)
            break;
    }
    unacked = s->pending;
    s->out = NULL;
    s->pending = 0;
    for (size_t mid = 0; mid < MID_COUNT; mid++) {
        s->index_of[mid] = -1;
        s->early_reason[mid] = -1;
    }
    pthread_mutex_unlock(&s->lock);
    return unacked;
}

static int mqtt_deliver(void *state, const spool_record_t *recs, size_t n,
                        sink_outcome_t *out)
{
    mqtt_sink_t *s = state;
    struct timespec deadline;
    size_t unacked = 0;
    bool never_connected;
    bool lost = false;
    int rc;

    for (size_t i = 0; i < n; i++) {
        out[i].status = SINK_RECORD_RETRY;
        out[i].reason[0] = '\0';
    }
    pthread_mutex_lock(&s->lock);
    never_connected = !s->ever_connected;
    pthread_mutex_unlock(&s->lock);
    /* libmosquitto 2.0.11's network thread reconnects a client that was
     * connected, but was seen not to retry a first connect that failed,
     * so such a client is replaced for each batch. */
    if (s->mosq != NULL && never_connected)
        destroy_client(s);
    if (s->mosq == NULL && (rc = create_client(s)) < 0)
        return rc;
    if (!wait_connected(s))
        return ING_EIO;
    deadline_after(&deadline, s->timeout_ms);
    for (size_t start = 0; start < n; start += CHUNK_MAX) {
        size_t count = n - start < CHUNK_MAX ? n - start : CHUNK_MAX;

        unacked = deliver_chunk(s, recs + start, count, out + start,
                                &deadline);
        pthread_mutex_lock(&s->lock);
        lost = s->lost;
        pthread_mutex_unlock(&s->lock);
        if (unacked > 0 || lost)
            break;
    }
    if (unacked > 0 || lost) {
        log_write_limited("sink_mqtt_unacked", 5, LOG_LEVEL_WARN,
                          "mqtt broker acknowledged only part of a batch; "
                          "retrying the rest on a new connection",
                          "sink=%s records=%zu unacked=%zu lost=%d",
                          sink_log_name(s->ctx), n, unacked, (int)lost);
        destroy_client(s);
    }
    return 0;
}

const sink_ops_t sink_mqtt_ops = {
    .kind = "mqtt",
    .open = mqtt_open,
    .deliver = mqtt_deliver,
    .close = mqtt_close,
};
