/* The Kafka sink: produces each record's envelope to a Kafka topic through
 * librdkafka's idempotent producer (enable.idempotence=true, acks=all).
 *
 * The message key is the device id, so one device's readings go to one
 * partition in spool order. Headers carry message_id, device_type,
 * content_type and protocol, so consumers can route without parsing the
 * value. The topic is the sink's template expanded per record.
 *
 * A poller thread serves librdkafka's callbacks (delivery reports, errors,
 * statistics) for the producer's whole life, so the connection gauge
 * follows the brokers also while no batch is in flight. deliver() produces
 * a batch, then waits on a condition variable until every delivery report
 * arrived. See docs/sinks.md for the settings and the error mapping.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <librdkafka/rdkafka.h>

#include "core/errors.h"
#include "core/log.h"
#include "sinks/sink.h"
#include "sinks/template.h"

#define DEFAULT_TOPIC "telemetry.{device_type}"
#define DEFAULT_ADDRESS "127.0.0.1:9092"
/* Kafka limits topic names to 249 characters. */
#define TOPIC_MAX 250
#define CONTENT_TYPE_MAX 128
/* How often librdkafka reports broker states to on_stats. */
#define STATS_INTERVAL_MS "1000"
/* Time granted past message.timeout.ms for the last delivery reports.
 * librdkafka checks its queues for timed-out messages about once a second,
 * so their reports may come that much late. sinks_stop waits for deliver
 * to return, so this also adds to the time a stop can take. */
#define REPORT_GRACE_MS 2000
/* Wait between produce attempts while librdkafka's queue is full. */
#define QUEUE_FULL_WAIT_MS 10
#define POLL_INTERVAL_MS 100

typedef struct kafka_sink {
    char *name;
    sink_ctx_t *ctx;
    sink_template_t *topic;
    uint64_t timeout_ms;
    char max_message[32]; /* message.max.bytes as configured */

    /* The validated configuration, copied for each producer, so that a
     * producer can be replaced after a fatal error. */
    rd_kafka_conf_t *conf;
    rd_kafka_t *rk;
    pthread_t poller;
    int poller_started;
    atomic_bool stop_poller;
    atomic_bool fatal; /* the producer raised a fatal error */

    /* The batch in flight, shared with on_delivery under `lock`. */
    pthread_mutex_t lock;
    pthread_cond_t reported; /* signalled when outstanding reaches 0 */
    sink_outcome_t *out;
    const spool_record_t *recs;
    size_t n;
    size_t outstanding; /* produced records whose report has not arrived */
    size_t acked;
} kafka_sink_t;

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void set_outcome(sink_outcome_t *out, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_outcome(sink_outcome_t *out, int status, const char *fmt, ...)
{
    va_list ap;

    out->status = status;
    va_start(ap, fmt);
    vsnprintf(out->reason, sizeof(out->reason), fmt, ap);
    va_end(ap);
}

/* Returns 1 for the errors that sending the same message again cannot fix:
 * the message, its size or its topic is invalid, or the topic is not ours
 * to write. Every other error (timeouts, lost connections, leader changes,
 * unknown topics that may yet be created) is worth a retry. */
static int is_permanent(rd_kafka_resp_err_t err)
{
    switch (err) {
    case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_INVALID_MSG:
    case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
    case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
    case RD_KAFKA_RESP_ERR_INVALID_RECORD:
        return 1;
    default:
        return 0;
    }
}

/* Sets the outcome of one record from a produce or delivery error. */
static void map_error(const kafka_sink_t *k, sink_outcome_t *out,
                      rd_kafka_resp_err_t err, size_t len)
{
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        set_outcome(out, SINK_RECORD_OK, "%s", "");
        return;
    }
    if (err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE) {
        set_outcome(out, SINK_RECORD_REJECTED,
                    "message too large (%zu bytes; producer "
                    "message.max.bytes %s, or the broker's or topic's "
                    "limit): %s",
                    len, k->max_message, rd_kafka_err2str(err));
        return;
    }
    set_outcome(out,
                is_permanent(err) ? SINK_RECORD_REJECTED : SINK_RECORD_RETRY,
                "%s: %s", rd_kafka_err2name(err), rd_kafka_err2str(err));
}

/* Runs on the poller thread for each delivery report. The per-message
 * opaque is the record's index in the batch. */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *msg,
                        void *opaque)
{
    kafka_sink_t *k = opaque;
    size_t i = (size_t)(uintptr_t)msg->_private;

    pthread_mutex_lock(&k->lock);
    if (k->out != NULL && i < k->n && k->outstanding > 0) {
        map_error(k, &k->out[i], msg->err, msg->len);
        if (msg->err == RD_KAFKA_RESP_ERR_NO_ERROR)
            k->acked++;
        if (--k->outstanding == 0)
            pthread_cond_broadcast(&k->reported);
    }
    pthread_mutex_unlock(&k->lock);
}

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    kafka_sink_t *k = opaque;
    char rbuf[256];

    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
        sink_set_connected(k->ctx, false);
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        atomic_store(&k->fatal, true);
        pthread_mutex_lock(&k->lock);
        pthread_cond_broadcast(&k->reported);
        pthread_mutex_unlock(&k->lock);
    }
    log_write_limited("sink_kafka_error", 5, LOG_LEVEL_WARN,
                      "kafka client error", "sink=%s error=%s reason=%s",
                      k->name, rd_kafka_err2name(err),
                      log_quote(rbuf, sizeof(rbuf), reason));
}

/* Sets the connection gauge from librdkafka's statistics: the sink counts
 * as connected while at least one broker connection is up. */
static int on_stats(rd_kafka_t *rk, char *json, size_t json_len, void *opaque)
{
    kafka_sink_t *k = opaque;
    json_t *root = json_loadb(json, json_len, 0, NULL);
    json_t *brokers = json_object_get(root, "brokers");
    json_t *broker;
    const char *key;
    bool up = false;

    json_object_foreach(brokers, key, broker)
    {
        const char *state = json_string_value(json_object_get(broker, "state"));
        if (state != NULL && strcmp(state, "UP") == 0)
            up = true;
    }
    if (root != NULL)
        sink_set_connected(k->ctx, up);
    json_decref(root);
    return 0; /* librdkafka frees `json` */
}

/* Routes librdkafka's log lines (syslog levels) into ingestd's log. */
static void on_log(const rd_kafka_t *rk, int level, const char *facility,
                   const char *message)
{
    kafka_sink_t *k = rd_kafka_opaque(rk);
    char mbuf[512];
    int ours = LOG_LEVEL_DEBUG;

    /* Connection failures (facility FAIL) also reach on_error, which
     * logs them once. */
    if (strcmp(facility, "FAIL") == 0)
        ours = LOG_LEVEL_DEBUG;
    else if (level <= 3)
        ours = LOG_LEVEL_ERROR;
    else if (level == 4)
        ours = LOG_LEVEL_WARN;
    else if (level <= 6)
        ours = LOG_LEVEL_INFO;
    if (ours < log_threshold)
        return;
    log_write_limited("sink_kafka_log", 10, ours, "kafka client log",
                      "sink=%s facility=%s message=%s",
                      k != NULL ? k->name : "?", facility,
                      log_quote(mbuf, sizeof(mbuf), message));
}

static void *poll_loop(void *arg)
{
    kafka_sink_t *k = arg;

    while (!atomic_load(&k->stop_poller))
        rd_kafka_poll(k->rk, POLL_INTERVAL_MS);
    return NULL;
}

/* Stops the poller and destroys the producer. Messages still queued are
 * purged without delivery reports reaching the batch: the runner sends
 * them again from its committed cursor. */
static void destroy_producer(kafka_sink_t *k)
{
    if (k->poller_started) {
        atomic_store(&k->stop_poller, true);
        pthread_join(k->poller, NULL);
        k->poller_started = 0;
    }
    if (k->rk != NULL) {
        rd_kafka_purge(k->rk, RD_KAFKA_PURGE_F_QUEUE |
                                  RD_KAFKA_PURGE_F_INFLIGHT |
                                  RD_KAFKA_PURGE_F_NON_BLOCKING);
        rd_kafka_destroy(k->rk);
        k->rk = NULL;
    }
}

/* Creates a producer from a copy of k->conf and starts its poller. */
static int create_producer(kafka_sink_t *k, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_dup(k->conf);
    char errstr[512];
    int rc;

    if (conf == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    k->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (k->rk == NULL) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "sink %s: creating the Kafka producer failed: %s",
                 k->name, errstr);
        return ING_ECONFIG;
    }
    atomic_store(&k->fatal, false);
    atomic_store(&k->stop_poller, false);
    rc = pthread_create(&k->poller, NULL, poll_loop, k);
    if (rc != 0) {
        rd_kafka_destroy(k->rk);
        k->rk = NULL;
        snprintf(err, errlen, "sink %s: starting the poller thread failed: %s",
                 k->name, strerror(rc));
        return ING_ENOMEM;
    }
    k->poller_started = 1;
    return 0;
}

/* Sets one librdkafka property, or writes the key and librdkafka's reason
 * into `err`. The value is not written, because it may be a password. */
static int set_property(kafka_sink_t *k, const char *key, const char *value,
                        char *err, size_t errlen)
{
    char errstr[512];

    if (rd_kafka_conf_set(k->conf, key, value, errstr, sizeof(errstr)) ==
        RD_KAFKA_CONF_OK)
        return 0;
    snprintf(err, errlen, "sink %s: invalid Kafka property %s: %s", k->name,
             key, errstr);
    return ING_ECONFIG;
}

/* Cuts spaces and tabs off both ends of `s`, in place. */
static char *trim(char *s)
{
    char *end;

    while (*s == ' ' || *s == '\t')
        s++;
    end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t'))
        *--end = '\0';
    return s;
}

/* Applies kafka_properties, a list such as "k=v,k=v" with spaces around
 * keys and values ignored. An item without '=' continues the previous
 * value, so list values such as "debug=broker,topic" pass through. */
static int apply_properties(kafka_sink_t *k, const char *text, char *err,
                            size_t errlen)
{
    size_t len = strlen(text);
    char *items = strdup(text);
    char *value = calloc(1, len + 1);
    char *key = NULL;
    char *save = NULL;
    int rc = 0;

    if (items == NULL || value == NULL) {
        snprintf(err, errlen, "out of memory");
        rc = ING_ENOMEM;
        goto done;
    }
    for (char *item = strtok_r(items, ",", &save); item != NULL && rc == 0;
         item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');

        if (eq == NULL) {
            item = trim(item);
            if (*item == '\0')
                continue;
            if (key == NULL) {
                snprintf(err, errlen,
                         "sink %s: kafka_properties entry \"%s\" is missing "
                         "'=': use key=value,key=value",
                         k->name, item);
                rc = ING_ECONFIG;
                break;
            }
            strcat(strcat(value, ","), item);
            continue;
        }
        if (key != NULL)
            rc = set_property(k, key, value, err, errlen);
        *eq = '\0';
        key = trim(item);
        strcpy(value, trim(eq + 1));
    }
    if (rc == 0 && key != NULL)
        rc = set_property(k, key, value, err, errlen);

done:
    free(value);
    free(items);
    return rc;
}

static const char *compression_name(enum config_compression c)
{
    switch (c) {
    case CONFIG_COMPRESSION_GZIP:
        return "gzip";
    case CONFIG_COMPRESSION_SNAPPY:
        return "snappy";
    case CONFIG_COMPRESSION_LZ4:
        return "lz4";
    case CONFIG_COMPRESSION_ZSTD:
        return "zstd";
    default:
        return "none";
    }
}

/* Maps tls, tls_*_file, username and password to librdkafka's security
 * settings: SSL with tls, SASL (PLAIN unless kafka_properties sets
 * sasl.mechanism) with a username, SASL_SSL with both. */
static int apply_security(kafka_sink_t *k, const config_sink_t *cfg, char *err,
                          size_t errlen)
{
    const char *protocol = "plaintext";
    int rc = 0;

    if (cfg->tls && cfg->username != NULL)
        protocol = "sasl_ssl";
    else if (cfg->tls)
        protocol = "ssl";
    else if (cfg->username != NULL)
        protocol = "sasl_plaintext";
    rc = set_property(k, "security.protocol", protocol, err, errlen);
    if (rc == 0 && cfg->tls_ca_file != NULL && cfg->tls_ca_file[0] != '\0')
        rc = set_property(k, "ssl.ca.location", cfg->tls_ca_file, err, errlen);
    if (rc == 0 && cfg->tls_cert_file != NULL && cfg->tls_cert_file[0] != '\0')
        rc = set_property(k, "ssl.certificate.location", cfg->tls_cert_file,
                          err, errlen);
    if (rc == 0 && cfg->tls_key_file != NULL && cfg->tls_key_file[0] != '\0')
        rc = set_property(k, "ssl.key.location", cfg->tls_key_file, err,
                          errlen);
    if (rc == 0 && cfg->username != NULL) {
        rc = set_property(k, "sasl.mechanism", "PLAIN", err, errlen);
        if (rc == 0)
            rc = set_property(k, "sasl.username", cfg->username, err, errlen);
        if (rc == 0 && cfg->password != NULL)
            rc = set_property(k, "sasl.password", cfg->password, err, errlen);
    }
    return rc;
}

/* Builds k->conf from the sink's settings. kafka_properties come last, so
 * they override every setting made here. */
static int build_conf(kafka_sink_t *k, const config_sink_t *cfg, char *err,
                      size_t errlen)
{
    char value[32];
    char client_id[160];
    size_t size = sizeof(k->max_message);
    const char *address = cfg->address != NULL && cfg->address[0] != '\0'
                              ? cfg->address
                              : DEFAULT_ADDRESS;
    int rc;

    k->conf = rd_kafka_conf_new();
    if (k->conf == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    rd_kafka_conf_set_opaque(k->conf, k);
    rd_kafka_conf_set_dr_msg_cb(k->conf, on_delivery);
    rd_kafka_conf_set_error_cb(k->conf, on_error);
    rd_kafka_conf_set_stats_cb(k->conf, on_stats);
    rd_kafka_conf_set_log_cb(k->conf, on_log);

    snprintf(client_id, sizeof(client_id), "ingestd-%s", k->name);
    rc = set_property(k, "bootstrap.servers", address, err, errlen);
    if (rc == 0)
        rc = set_property(k, "client.id", client_id, err, errlen);
    if (rc == 0)
        rc = set_property(k, "enable.idempotence", "true", err, errlen);
    if (rc == 0)
        rc = set_property(k, "acks", "all", err, errlen);
    /* The Java client's partitioner, so that a device's readings land in
     * the same partition as those other Kafka producers send for it. */
    if (rc == 0)
        rc = set_property(k, "partitioner", "murmur2_random", err, errlen);
    if (rc == 0)
        rc = set_property(k, "compression.type",
                          compression_name(cfg->compression), err, errlen);
    snprintf(value, sizeof(value), "%" PRIu64, cfg->linger_ms);
    if (rc == 0)
        rc = set_property(k, "linger.ms", value, err, errlen);
    snprintf(value, sizeof(value), "%" PRIu64, k->timeout_ms);
    if (rc == 0)
        rc = set_property(k, "message.timeout.ms", value, err, errlen);
    if (rc == 0)
        rc = set_property(k, "statistics.interval.ms", STATS_INTERVAL_MS, err,
                          errlen);
    if (rc == 0)
        rc = apply_security(k, cfg, err, errlen);
    if (rc == 0 && cfg->kafka_properties != NULL)
        rc = apply_properties(k, cfg->kafka_properties, err, errlen);
    if (rc == 0 && rd_kafka_conf_get(k->conf, "message.max.bytes",
                                     k->max_message, &size) != RD_KAFKA_CONF_OK)
        snprintf(k->max_message, sizeof(k->max_message), "?");
    return rc;
}

static void kafka_close(void *state)
{
    kafka_sink_t *k = state;

    if (k == NULL)
        return;
    destroy_producer(k);
    if (k->conf != NULL)
        rd_kafka_conf_destroy(k->conf);
    sink_template_free(k->topic);
    pthread_cond_destroy(&k->reported);
    pthread_mutex_destroy(&k->lock);
    free(k->name);
    free(k);
}

static int kafka_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                      char *err, size_t errlen)
{
    const char *topic = cfg->topic != NULL && cfg->topic[0] != '\0'
                            ? cfg->topic
                            : DEFAULT_TOPIC;
    char terr[200];
    kafka_sink_t *k;
    int rc;

    k = calloc(1, sizeof(*k));
    if (k == NULL || (k->name = strdup(cfg->name)) == NULL) {
        free(k);
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    pthread_mutex_init(&k->lock, NULL);
    pthread_cond_init(&k->reported, NULL);
    k->ctx = ctx;
    k->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
    rc = sink_template_compile(topic, &k->topic, terr, sizeof(terr));
    if (rc < 0) {
        snprintf(err, errlen, "sink %s: invalid topic \"%s\": %s", cfg->name,
                 topic, terr);
        goto error;
    }
    rc = build_conf(k, cfg, err, errlen);
    if (rc < 0)
        goto error;
    /* rd_kafka_new checks the settings together but does not wait for a
     * broker, so an unreachable cluster does not fail the start. */
    rc = create_producer(k, err, errlen);
    if (rc < 0)
        goto error;
    log_info("kafka producer started",
             "sink=%s bootstrap=%s topic=%s compression=%s linger_ms=%" PRIu64,
             k->name, cfg->address != NULL ? cfg->address : DEFAULT_ADDRESS,
             topic, compression_name(cfg->compression), cfg->linger_ms);
    *state = k;
    return 0;

error:
    kafka_close(k);
    return rc;
}

/* Reads the envelope's content_type, which sink_envelope_t lacks. */
static void read_content_type(const spool_record_t *rec, char *buf,
                              size_t size)
{
    json_t *root = json_loadb(rec->data, rec->len, 0, NULL);
    const char *value = json_string_value(json_object_get(root, "content_type"));

    snprintf(buf, size, "%s", value != NULL ? value : "");
    json_decref(root);
}

/* Produces record `i`, waiting while librdkafka's queue is full until
 * `deadline`. Returns 1 when the record is queued and its delivery report
 * will set out[i], 0 when out[i] is already set, or -1 when the deadline
 * passed with the queue still full. */
static int produce_one(kafka_sink_t *k, const spool_record_t *rec, size_t i,
                       sink_outcome_t *out, uint64_t deadline)
{
    sink_envelope_t env;
    char topic[TOPIC_MAX];
    char content_type[CONTENT_TYPE_MAX];
    rd_kafka_resp_err_t err;
    int rc;

    if (sink_envelope_parse(rec->data, rec->len, &env) < 0) {
        set_outcome(out, SINK_RECORD_REJECTED,
                    "record is not a JSON envelope with string fields");
        return 0;
    }
    rc = sink_template_expand(k->topic, &env, topic, sizeof(topic));
    if (rc < 0) {
        set_outcome(out, SINK_RECORD_REJECTED,
                    rc == ING_ETOOBIG
                        ? "topic from template %s is longer than 249 bytes"
                        : "topic template %s needs a field the record lacks",
                    sink_template_text(k->topic));
        return 0;
    }
    read_content_type(rec, content_type, sizeof(content_type));

    pthread_mutex_lock(&k->lock);
    k->outstanding++;
    pthread_mutex_unlock(&k->lock);
    for (;;) {
        err = rd_kafka_producev(
            k->rk, RD_KAFKA_V_TOPIC(topic),
            RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_KEY(env.device_id, strlen(env.device_id)),
            RD_KAFKA_V_VALUE((void *)rec->data, rec->len),
            RD_KAFKA_V_HEADER("message_id", env.message_id, -1),
            RD_KAFKA_V_HEADER("device_type", env.device_type, -1),
            RD_KAFKA_V_HEADER("content_type", content_type, -1),
            RD_KAFKA_V_HEADER("protocol", env.protocol, -1),
            RD_KAFKA_V_OPAQUE((void *)(uintptr_t)i), RD_KAFKA_V_END);
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL || now_ms() >= deadline ||
            atomic_load(&k->fatal))
            break;
        /* The poller thread drains the queue as reports arrive. */
        nanosleep(&(struct timespec){0, QUEUE_FULL_WAIT_MS * 1000000L}, NULL);
    }
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
        return 1;

    pthread_mutex_lock(&k->lock);
    k->outstanding--;
    pthread_mutex_unlock(&k->lock);
    map_error(k, out, err, rec->len);
    if (out->status == SINK_RECORD_REJECTED)
        log_write_limited("sink_kafka_reject", 5, LOG_LEVEL_WARN,
                          "kafka rejected a record",
                          "sink=%s message_id=%s device_id=%s error=%s",
                          k->name, env.message_id, env.device_id,
                          rd_kafka_err2name(err));
    return err == RD_KAFKA_RESP_ERR__QUEUE_FULL ? -1 : 0;
}

/* Waits until every delivery report of the batch arrived, the producer
 * failed fatally, or `deadline` passed. Returns the reports still missing. */
static size_t wait_reports(kafka_sink_t *k, uint64_t deadline)
{
    struct timespec until;
    size_t missing;

    clock_gettime(CLOCK_REALTIME, &until);
    {
        uint64_t left = deadline > now_ms() ? deadline - now_ms() : 0;
        until.tv_sec += (time_t)(left / 1000);
        until.tv_nsec += (long)(left % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&k->lock);
    while (k->outstanding > 0 && !atomic_load(&k->fatal)) {
        if (pthread_cond_timedwait(&k->reported, &k->lock, &until) != 0)
            break;
    }
    missing = k->outstanding;
    k->out = NULL;
    k->recs = NULL;
    k->n = 0;
    k->outstanding = 0;
    pthread_mutex_unlock(&k->lock);
    return missing;
}

/* Replaces a producer that raised a fatal error (such as an idempotence
 * sequence that the broker no longer accepts) or left reports missing. */
static void replace_producer(kafka_sink_t *k, const char *why)
{
    char reason[512] = "";
    char rbuf[600];
    char err[256];

    if (k->rk != NULL)
        rd_kafka_fatal_error(k->rk, reason, sizeof(reason));
    log_warn("replacing the kafka producer", "sink=%s why=%s error=%s",
             k->name, why, log_quote(rbuf, sizeof(rbuf), reason));
    destroy_producer(k);
    if (create_producer(k, err, sizeof(err)) < 0)
        log_write_limited("sink_kafka_create", 5, LOG_LEVEL_ERROR,
                          "creating the kafka producer failed",
                          "sink=%s error=%s", k->name,
                          log_quote(rbuf, sizeof(rbuf), err));
}

static int kafka_deliver(void *state, const spool_record_t *recs, size_t n,
                         sink_outcome_t *out)
{
    kafka_sink_t *k = state;
    uint64_t deadline = now_ms() + k->timeout_ms;
    const char *first_error = "";
    char ebuf[256];
    size_t missing, acked;
    size_t retry = 0;

    for (size_t i = 0; i < n; i++)
        set_outcome(&out[i], SINK_RECORD_RETRY, "no delivery report");
    if (k->rk == NULL || atomic_load(&k->fatal))
        replace_producer(k, k->rk == NULL ? "no producer" : "fatal error");
    if (k->rk == NULL)
        return ING_EIO;

    pthread_mutex_lock(&k->lock);
    k->out = out;
    k->recs = recs;
    k->n = n;
    k->outstanding = 0;
    k->acked = 0;
    pthread_mutex_unlock(&k->lock);

    for (size_t i = 0; i < n && !atomic_load(&k->fatal); i++) {
        if (produce_one(k, &recs[i], i, &out[i], deadline) < 0)
            break; /* the rest stay RETRY */
    }
    /* The wait is on the condition variable, not in rd_kafka_flush: flush
     * skips linger.ms, but made bench/kafka.sh slower (17,953 against
     * 31,486 records/s), because its poll loop sleeps in 10 ms steps while
     * the poller thread takes the reports. */
    missing = wait_reports(k, deadline + REPORT_GRACE_MS);
    if (atomic_load(&k->fatal))
        replace_producer(k, "fatal error");
    else if (missing > 0)
        replace_producer(k, "delivery reports timed out");

    for (size_t i = 0; i < n; i++) {
        if (out[i].status != SINK_RECORD_RETRY)
            continue;
        if (retry++ == 0)
            first_error = out[i].reason;
    }
    pthread_mutex_lock(&k->lock);
    acked = k->acked;
    pthread_mutex_unlock(&k->lock);
    if (acked > 0)
        sink_set_connected(k->ctx, true);
    if (retry > 0)
        log_write_limited("sink_kafka_retry", 5, LOG_LEVEL_WARN,
                          "kafka batch not fully acknowledged",
                          "sink=%s records=%zu retry=%zu missing_reports=%zu "
                          "first_error=%s",
                          k->name, n, retry, missing,
                          log_quote(ebuf, sizeof(ebuf), first_error));
    /* A batch of which nothing arrived is a failure of the connection. */
    return retry == n && n > 0 ? ING_EIO : 0;
}

const sink_ops_t sink_kafka_ops = {
    .kind = "kafka",
    .open = kafka_open,
    .deliver = kafka_deliver,
    .close = kafka_close,
};
