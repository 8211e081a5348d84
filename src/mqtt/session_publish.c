/* PUBLISH from a device: topic checks, validation, the durable submit and
 * the acknowledgement that follows it.
 *
 * QoS 1 gets PUBACK and QoS 2 gets PUBREC only after the pipeline reported
 * the message durable. A QoS 2 packet id then stays in the session state
 * until PUBREL, so a retransmitted PUBLISH is acknowledged again without
 * being stored twice. When flow control turns a message away (spool past
 * its high mark, device over its rate or daily quota), 5.0 QoS 1 and 2
 * messages get 0x97 (Quota exceeded). Every other message is held, so
 * reading stops and the submit is retried until the pipeline accepts it.
 *
 * A stored QoS 1 packet id is remembered as well, so that a PUBLISH resent
 * with DUP after a lost PUBACK is acknowledged without being stored again.
 * An MQTT 5 user property named idempotency.mqtt_user_property is the
 * message's idempotency key (see pipeline_batch_set_idempotency_key).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/errors.h"
#include "core/log.h"
#include "mqtt/session.h"
#include "pipeline/rawjson.h"

#define ACK_CAP 1024
#define REASON_MAX 256

enum topic_check {
    TOPIC_OWN = 0,          /* a template with this device's id */
    TOPIC_OTHER_DEVICE = 1, /* a template with another id */
    TOPIC_UNKNOWN = 2,      /* no template matches */
};

/* Matches `topic` against template `tmpl`, whose {device_id} level matches
 * one non-empty level. Copies that level into `dev` on a match. */
static int match_template(const char *tmpl, const char *topic, char *dev,
                          size_t devcap)
{
    static const char placeholder[] = "{device_id}";
    const size_t plen = sizeof(placeholder) - 1;

    while (*tmpl != '\0') {
        if (strncmp(tmpl, placeholder, plen) == 0) {
            size_t n = strcspn(topic, "/");
            if (n == 0 || n >= devcap)
                return 0;
            memcpy(dev, topic, n);
            dev[n] = '\0';
            topic += n;
            tmpl += plen;
            continue;
        }
        if (*tmpl != *topic)
            return 0;
        tmpl++;
        topic++;
    }
    return *topic == '\0';
}

static enum topic_check check_topic(const mqtt_session_t *s,
                                    const char *topic)
{
    const mqtt_listener_t *l = s->listener;
    char dev[AUTH_DEVICE_ID_MAX + 1];
    enum topic_check result = TOPIC_UNKNOWN;

    for (size_t i = 0; i < l->topic_count; i++) {
        if (!match_template(l->topics[i], topic, dev, sizeof(dev)))
            continue;
        if (strcmp(dev, s->device.id) == 0)
            return TOPIC_OWN;
        result = TOPIC_OTHER_DEVICE;
    }
    return result;
}

/* Encodes PUBACK (QoS 1) or PUBREC (QoS 2) into the reply. */
static void encode_reply(mqtt_session_t *s, mqtt_reply_t *r, uint8_t reason,
                         const char *why)
{
    mqtt_ack_t ack = {0};
    int n;

    r->ready = 1;
    if (r->qos == 0)
        return;
    ack.type = r->qos == 1 ? MQTT_PUBACK : MQTT_PUBREC;
    ack.packet_id = r->packet_id;
    if (s->version == MQTT_V5) {
        ack.reason_code = reason;
        if (why != NULL) {
            ack.props.reason_string.data = (const uint8_t *)why;
            ack.props.reason_string.len = strlen(why);
            mqtt_props_set(&ack.props, MQTT_PROP_REASON_STRING);
        }
    }
    r->bytes = malloc(ACK_CAP);
    if (r->bytes == NULL)
        return;
    n = mqtt_encode_ack(r->bytes, ACK_CAP, s->version, &ack,
                        s->client_max_packet);
    if (n <= 0 || n > ACK_CAP) {
        free(r->bytes);
        r->bytes = NULL;
        r->close_after = 1;
        return;
    }
    r->len = (size_t)n;
}

static const char *qos_result_reason(uint8_t reason)
{
    switch (reason) {
    case MQTT_RC_NOT_AUTHORIZED:
        return "not_authorized";
    case MQTT_RC_TOPIC_NAME_INVALID:
        return "topic_invalid";
    case MQTT_RC_PAYLOAD_FORMAT_INVALID:
        return "invalid";
    case MQTT_RC_QUOTA_EXCEEDED:
        return "quota_exceeded";
    default:
        return "failed";
    }
}

/* Rejects a message that may not be stored. 5.0 QoS 1 and 2 get the
 * reason code in PUBACK or PUBREC. A 5.0 QoS 0 message, which has no
 * acknowledgement, gets DISCONNECT with the same code when `fatal` is
 * set and is dropped otherwise. A 3.1.1 client, which cannot be told, is
 * closed when `fatal` is set, and otherwise acknowledged. */
static int reject_message(mqtt_session_t *s, const mqtt_publish_t *p,
                          uint8_t reason, const char *why, int fatal)
{
    mqtt_reply_t *r;

    mqtt_metrics_message(p->qos, qos_result_reason(reason));
    log_write_limited("mqtt_publish_rejected", 10, LOG_LEVEL_INFO,
                      "mqtt message rejected",
                      "conn=%llu client=%s device=%s peer=%s qos=%u "
                      "code=0x%02x reason=\"%s\"",
                      (unsigned long long)s->id, s->client_id, s->device.id,
                      s->peer, p->qos, reason, why ? why : "");
    if (s->version == MQTT_V5 && p->qos == 0) {
        if (fatal) {
            mqtt_session_fail(s, reason, why);
            return -1;
        }
        return 0;
    }
    if (s->version != MQTT_V5 && fatal) {
        /* Earlier acknowledgements still go out first. */
        r = mqtt_session_push_reply(s);
        if (r == NULL) {
            mqtt_session_close(s);
            return -1;
        }
        r->ready = 1;
        r->close_after = 1;
        mqtt_session_flush_replies(s);
        return -1;
    }
    if (p->qos == 0)
        return 0;
    r = mqtt_session_push_reply(s);
    if (r == NULL) {
        mqtt_session_close(s);
        return -1;
    }
    r->qos = p->qos;
    r->packet_id = p->packet_id;
    encode_reply(s, r, s->version == MQTT_V5 ? reason : 0, why);
    mqtt_session_flush_replies(s);
    return s->phase == MQTT_PHASE_CLOSING ? -1 : 0;
}

/* Builds the "mqtt" envelope field: topic, QoS, client id and the user
 * properties of a 5.0 message. */
static json_t *envelope_metadata(const mqtt_session_t *s,
                                 const mqtt_publish_t *p, const char *topic)
{
    json_t *meta = json_pack("{s:s, s:i, s:s}", "topic", topic, "qos",
                             (int)p->qos, "client_id", s->client_id);
    json_t *props;

    if (meta == NULL || p->props.user_property_count == 0)
        return meta;
    props = json_array();
    for (size_t i = 0; props != NULL && i < p->props.user_property_count;
         i++) {
        const mqtt_user_property_t *u = &p->props.user_properties[i];
        json_array_append_new(
            props, json_pack("[s#, s#]", (const char *)u->name.data,
                             u->name.len, (const char *)u->value.data,
                             u->value.len));
    }
    if (props != NULL)
        json_object_set_new(meta, "user_properties", props);
    return meta;
}

/* Publishes the rejection on devices/{id}/errors for subscribed
 * sessions. */
static void publish_feedback(mqtt_session_t *s, const mqtt_publish_t *p,
                             const char *topic, json_t *errors)
{
    json_t *msg = json_pack("{s:s, s:s, s:o, s:O}", "error",
                            "validation_failed", "topic", topic, "packet_id",
                            p->qos ? json_integer(p->packet_id) : json_null(),
                            "readings", errors);
    char *text;

    if (msg == NULL)
        return;
    text = json_dumps(msg, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(msg);
    if (text == NULL)
        return;
    mqtt_feedback_publish(s->device.id, text, strlen(text));
    free(text);
}

/* Writes "pointer: reason" of the first error into `why`. */
static void first_error(json_t *errors, char *why, size_t size)
{
    json_t *e = json_array_get(json_object_get(json_array_get(errors, 0),
                                               "errors"),
                               0);
    const char *pointer = json_string_value(json_object_get(e, "pointer"));
    const char *reason = json_string_value(json_object_get(e, "reason"));

    snprintf(why, size, "%s: %s", pointer && pointer[0] ? pointer : "/",
             reason ? reason : "invalid");
}

static void on_done(pipeline_batch_t *b, int status, void *arg);

/* Holds a message that flow control turned away with `rc` and pauses
 * reading until the retry: MQTT_FULL_RETRY_MS for a congested spool, the
 * time until the device's tokens suffice for a rate limit or quota. */
static void hold_message(mqtt_session_t *s, mqtt_reply_t *r, int rc)
{
    uint64_t wait_ms = pipeline_batch_retry_after_ms(r->batch);

    /* A rate-limited client is held again and again, which is its
     * normal pace, so only the spool's congestion is a warning. */
    if (s->held == NULL)
        log_write_limited("mqtt_hold", 5,
                          rc == ING_EFULL ? LOG_LEVEL_WARN : LOG_LEVEL_DEBUG,
                          "holding an mqtt message and pausing the "
                          "connection",
                          "conn=%llu client=%s device=%s error=\"%s\" "
                          "retry_ms=%llu",
                          (unsigned long long)s->id, s->client_id,
                          s->device.id, ing_strerror(rc),
                          (unsigned long long)(rc == ING_EFULL
                                                   ? MQTT_FULL_RETRY_MS
                                                   : wait_ms));
    s->held = r;
    if (rc == ING_EFULL)
        mqtt_session_arm_retry(s);
    else
        mqtt_session_arm_retry_in(s, wait_ms < MQTT_LIMIT_RETRY_MAX_MS
                                         ? wait_ms
                                         : MQTT_LIMIT_RETRY_MAX_MS);
    mqtt_session_update(s);
}

/* Returns the 5.0 reason code and reason string of a submit failure. */
static uint8_t failure_reason(int rc, const char **why)
{
    switch (rc) {
    case ING_EFULL:
        *why = "spool full; retry later";
        return MQTT_RC_QUOTA_EXCEEDED;
    case ING_ERATE:
        /* 0x96 (Message rate too high) is valid in DISCONNECT only; MQTT
         * 5.0 section 3.4.2.1 allows 0x97 in PUBACK and PUBREC, so the
         * reason string distinguishes a rate limit from the quota. */
        *why = "rate_limited: the device sends faster than its limit; "
               "retry later";
        return MQTT_RC_QUOTA_EXCEEDED;
    case ING_EQUOTA:
        *why = "quota_exceeded: the device's daily quota is used up until "
               "midnight UTC";
        return MQTT_RC_QUOTA_EXCEEDED;
    case ING_ETOOBIG:
        *why = ing_strerror(rc);
        return MQTT_RC_IMPLEMENTATION_SPECIFIC;
    default:
        *why = ing_strerror(rc);
        return MQTT_RC_UNSPECIFIED;
    }
}

/* Handles a submit that the pipeline did not take. Returns 0 to go on
 * with the next packet, or -1. */
static int submit_failed(mqtt_session_t *s, mqtt_reply_t *r, int rc)
{
    const char *why;
    uint8_t reason = failure_reason(rc, &why);

    if ((rc == ING_EFULL || rc == ING_ERATE || rc == ING_EQUOTA) &&
        !(s->version == MQTT_V5 && r->qos > 0)) {
        hold_message(s, r, rc);
        return -1;
    }
    if (s->held == r)
        s->held = NULL;
    pipeline_batch_free(r->batch);
    r->batch = NULL;
    if (r->qos > 0)
        s->inflight--;
    mqtt_metrics_message(r->qos, rc == ING_ERATE ? "rate_limited"
                                                 : qos_result_reason(reason));
    if (s->version == MQTT_V5 && r->qos > 0) {
        encode_reply(s, r, reason, why);
    } else {
        r->ready = 1;
        r->close_after = r->qos > 0 || s->version != MQTT_V5;
    }
    mqtt_session_flush_replies(s);
    mqtt_session_update(s);
    return s->phase == MQTT_PHASE_CLOSING ? -1 : 0;
}

static int submit(mqtt_session_t *s, mqtt_reply_t *r)
{
    int rc = pipeline_batch_submit(r->batch, on_done, r);

    if (rc != 0)
        return submit_failed(s, r, rc);
    if (s->held == r)
        s->held = NULL;
    s->refs++;
    return 0;
}

void mqtt_session_retry_held(mqtt_session_t *s)
{
    mqtt_reply_t *r = s->held;

    if (r == NULL || s->phase == MQTT_PHASE_CLOSING)
        return;
    if (submit(s, r) == 0) {
        log_debug("pipeline accepted the held mqtt message",
                  "conn=%llu client=%s", (unsigned long long)s->id,
                  s->client_id);
        mqtt_session_update(s);
    }
}

static void on_done(pipeline_batch_t *b, int status, void *arg)
{
    mqtt_reply_t *r = arg;
    mqtt_session_t *s = r->session;
    size_t readings = pipeline_batch_accepted(b);

    pipeline_batch_free(b);
    r->batch = NULL;
    if (r->qos > 0 && s->inflight > 0)
        s->inflight--;
    if (status == 0) {
        mqtt_metrics_readings("accepted", readings);
        mqtt_metrics_message(r->qos, "accepted");
        if (r->qos == 2 && mqtt_state_qos2_add(r->state, r->packet_id) != 0)
            status = ING_ENOMEM;
        if (r->qos == 1 && r->state != NULL &&
            mqtt_state_qos1_add(r->state, r->packet_id,
                                s->listener->cfg->mqtt.receive_maximum) != 0)
            status = ING_ENOMEM;
    } else {
        mqtt_metrics_message(r->qos, "failed");
        log_write_limited("mqtt_store_failed", 5, LOG_LEVEL_ERROR,
                          "mqtt message not stored",
                          "conn=%llu client=%s device=%s error=\"%s\"",
                          (unsigned long long)s->id, s->client_id,
                          s->device.id, ing_strerror(status));
    }
    if (!s->transport_open) {
        /* The connection is gone; the client sends the message again
         * unless it was stored. */
        mqtt_reply_free(r);
    } else if (status == 0) {
        encode_reply(s, r, MQTT_RC_SUCCESS, NULL);
        mqtt_session_flush_replies(s);
        mqtt_session_update(s);
    } else if (s->version == MQTT_V5 && r->qos > 0) {
        encode_reply(s, r,
                     status == ING_EFULL ? MQTT_RC_QUOTA_EXCEEDED
                                         : MQTT_RC_UNSPECIFIED,
                     ing_strerror(status));
        mqtt_session_flush_replies(s);
        mqtt_session_update(s);
    } else {
        r->ready = 1;
        r->close_after = 1;
        mqtt_session_flush_replies(s);
    }
    mqtt_session_unref(s);
}

/* Resolves a 5.0 topic alias into `*topic`. Returns 0 or -1 after failing
 * the session. */
static int resolve_alias(mqtt_session_t *s, const mqtt_publish_t *p,
                         char **topic)
{
    uint64_t max = s->listener->cfg->mqtt.topic_alias_maximum;
    uint16_t alias;

    if (s->version != MQTT_V5 ||
        !mqtt_props_has(&p->props, MQTT_PROP_TOPIC_ALIAS))
        return 0;
    alias = p->props.topic_alias;
    if (alias == 0 || alias > max) {
        mqtt_metrics_malformed("topic_alias_invalid");
        mqtt_session_fail(s, MQTT_RC_TOPIC_ALIAS_INVALID,
                          "topic alias out of range");
        return -1;
    }
    if (s->aliases == NULL) {
        s->aliases = calloc(max + 1, sizeof(*s->aliases));
        if (s->aliases == NULL) {
            mqtt_session_close(s);
            return -1;
        }
        s->alias_count = max + 1;
    }
    if (p->topic.len > 0) {
        free(s->aliases[alias]);
        s->aliases[alias] = strdup(*topic);
        if (s->aliases[alias] == NULL) {
            mqtt_session_close(s);
            return -1;
        }
        return 0;
    }
    if (s->aliases[alias] == NULL) {
        mqtt_metrics_malformed("topic_alias_unknown");
        mqtt_session_fail(s, MQTT_RC_PROTOCOL_ERROR,
                          "topic alias used before it was set");
        return -1;
    }
    free(*topic);
    *topic = strdup(s->aliases[alias]);
    if (*topic == NULL) {
        mqtt_session_close(s);
        return -1;
    }
    return 0;
}

/* Answers a retransmitted QoS 1 or 2 PUBLISH whose packet id is already
 * stored: PUBACK or PUBREC again, in order, without storing. */
static int answer_duplicate(mqtt_session_t *s, const mqtt_publish_t *p)
{
    mqtt_reply_t *r = mqtt_session_push_reply(s);

    if (r == NULL) {
        mqtt_session_close(s);
        return -1;
    }
    r->qos = p->qos;
    r->packet_id = p->packet_id;
    encode_reply(s, r, MQTT_RC_SUCCESS, NULL);
    mqtt_metrics_message(p->qos, "duplicate");
    mqtt_session_flush_replies(s);
    return s->phase == MQTT_PHASE_CLOSING ? -1 : 0;
}

/* Parses the payload into `*out`: one reading or an array of them.
 * Writes the reason into `why` on failure. */
static int parse_payload(const mqtt_session_t *s, const mqtt_publish_t *p,
                         json_t **out, char *why, size_t size)
{
    json_error_t jerr;
    json_t *doc;
    size_t max = s->listener->cfg->http.max_readings_per_request;

    doc = json_loadb((const char *)p->payload.data, p->payload.len,
                     JSON_REJECT_DUPLICATES, &jerr);
    if (doc == NULL) {
        snprintf(why, size, "payload is not valid JSON: %s at byte %d",
                 jerr.text, jerr.position);
        return -1;
    }
    if (!json_is_object(doc) && !json_is_array(doc)) {
        snprintf(why, size, "payload must be a JSON object or array");
        goto error;
    }
    if (json_is_array(doc) && json_array_size(doc) == 0) {
        snprintf(why, size, "payload is an empty array");
        goto error;
    }
    if (json_is_array(doc) && json_array_size(doc) > max) {
        snprintf(why, size, "payload has %zu readings, more than %zu",
                 json_array_size(doc), max);
        goto error;
    }
    *out = doc;
    return 0;
error:
    json_decref(doc);
    return -1;
}

/* Hands the 5.0 user property named idempotency.mqtt_user_property to
 * the batch as its idempotency key. Returns 0 (also without one), or the
 * error of pipeline_batch_set_idempotency_key. */
static int set_idempotency_key(const mqtt_session_t *s,
                               const mqtt_publish_t *p, pipeline_batch_t *b)
{
    const char *name = s->listener->cfg->idempotency.mqtt_user_property;
    size_t len;

    if (name == NULL || s->version != MQTT_V5)
        return 0;
    len = strlen(name);
    for (size_t i = 0; i < p->props.user_property_count; i++) {
        const mqtt_user_property_t *u = &p->props.user_properties[i];
        if (u->name.len == len && memcmp(u->name.data, name, len) == 0)
            return pipeline_batch_set_idempotency_key(
                b, (const char *)u->value.data, u->value.len);
    }
    return 0;
}

/* Adds the readings of `doc` with their texts from the payload, so that
 * each is stored as the device sent it. Returns 0, ING_ENOMEM, or
 * ING_EINVAL when the payload's text cannot be split, which cannot happen
 * for a payload that jansson accepted. */
static int add_readings(pipeline_batch_t *b, const mqtt_publish_t *p,
                        const json_t *doc)
{
    const char *text = (const char *)p->payload.data;
    size_t n = json_array_size(doc), found = 0;
    rawjson_span_t *spans;
    int rc = 0;

    if (!json_is_array(doc))
        return pipeline_batch_add_raw(b, doc, text, p->payload.len) < 0
                   ? ING_ENOMEM
                   : 0;
    spans = malloc(n * sizeof(*spans));
    if (spans == NULL)
        return ING_ENOMEM;
    if (rawjson_array_elements(text, p->payload.len, spans, n, &found) != 0 ||
        found != n) {
        free(spans);
        return ING_EINVAL;
    }
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (pipeline_batch_add_raw(b, json_array_get(doc, i),
                                   text + spans[i].off, spans[i].len) < 0)
            rc = ING_ENOMEM;
    }
    free(spans);
    return rc;
}

/* Validates and submits the message. `topic` is NUL-terminated. */
static int store_message(mqtt_session_t *s, const mqtt_publish_t *p,
                         const char *topic)
{
    char why[REASON_MAX];
    char ctype[256] = "application/json";
    pipeline_batch_t *b;
    mqtt_reply_t *r;
    json_t *doc = NULL, *errors;
    size_t invalid, forbidden;
    int rc;

    if (parse_payload(s, p, &doc, why, sizeof(why)) != 0) {
        mqtt_metrics_readings("unparsable", 1);
        errors = json_pack("[{s:i, s:[{s:s, s:s}]}]", "index", 0, "errors",
                           "pointer", "", "reason", why);
        if (errors != NULL) {
            publish_feedback(s, p, topic, errors);
            json_decref(errors);
        }
        return reject_message(s, p, MQTT_RC_PAYLOAD_FORMAT_INVALID, why, 0);
    }
    if (mqtt_props_has(&p->props, MQTT_PROP_CONTENT_TYPE) &&
        p->props.content_type.len < sizeof(ctype)) {
        memcpy(ctype, p->props.content_type.data, p->props.content_type.len);
        ctype[p->props.content_type.len] = '\0';
    }
    b = pipeline_batch_new(s->listener->pl, &s->device, "mqtt", ctype);
    if (b == NULL ||
        pipeline_batch_set_metadata(b, "mqtt",
                                    envelope_metadata(s, p, topic)) != 0)
        goto oom;
    rc = set_idempotency_key(s, p, b);
    if (rc == ING_ENOMEM)
        goto oom;
    if (rc != 0) {
        json_decref(doc);
        pipeline_batch_free(b);
        return reject_message(s, p, MQTT_RC_IMPLEMENTATION_SPECIFIC,
                              rc == ING_EBUSY
                                  ? "a message with this idempotency key is "
                                    "still being stored; resend it later"
                                  : "the idempotency key must be 1 to 255 "
                                    "bytes without control characters",
                              0);
    }
    if (add_readings(b, p, doc) != 0)
        goto oom;
    json_decref(doc);
    doc = NULL;
    invalid = pipeline_batch_invalid(b);
    forbidden = pipeline_batch_forbidden(b);
    if (invalid > 0 || forbidden > 0) {
        errors = pipeline_batch_errors(b);
        mqtt_metrics_readings("invalid", invalid);
        mqtt_metrics_readings("forbidden", forbidden);
        first_error(errors, why, sizeof(why));
        if (errors != NULL) {
            publish_feedback(s, p, topic, errors);
            json_decref(errors);
        }
        pipeline_batch_free(b);
        return reject_message(s, p,
                              forbidden > 0 ? MQTT_RC_NOT_AUTHORIZED
                                            : MQTT_RC_PAYLOAD_FORMAT_INVALID,
                              why, 0);
    }
    r = mqtt_session_push_reply(s);
    if (r == NULL) {
        pipeline_batch_free(b);
        goto oom_closed;
    }
    r->session = s;
    r->batch = b;
    r->qos = p->qos;
    r->packet_id = p->packet_id;
    /* Only 5.0 QoS 1 and 2 messages have an acknowledgement that can ask
     * for a retry, so every other message is held and submitted again
     * (hold_message). */
    if (!(s->version == MQTT_V5 && p->qos > 0))
        pipeline_batch_set_retrying(b);
    if (p->qos > 0 && s->state != NULL)
        r->state = mqtt_state_ref(s->state);
    if (p->qos > 0)
        s->inflight++;
    return submit(s, r);

oom:
    json_decref(doc);
    pipeline_batch_free(b);
oom_closed:
    log_error("mqtt message dropped: out of memory", "conn=%llu client=%s",
              (unsigned long long)s->id, s->client_id);
    mqtt_session_fail(s, MQTT_RC_UNSPECIFIED, NULL);
    return -1;
}

int mqtt_session_on_publish(mqtt_session_t *s, mqtt_publish_t *p)
{
    const config_t *cfg = s->listener->cfg;
    char *topic;
    int rc;

    if (s->version == MQTT_V5 && p->retain) {
        /* CONNACK sent Retain Available 0, and the 5.0 spec (3.3.1.3)
         * makes a retained PUBLISH then a DISCONNECT with 0x9A. */
        mqtt_metrics_malformed("retain_not_supported");
        mqtt_session_fail(s, MQTT_RC_RETAIN_NOT_SUPPORTED,
                          "retained messages are not supported");
        return -1;
    }
    if (s->version == MQTT_V5 && p->qos > 0 &&
        s->inflight >= cfg->mqtt.receive_maximum) {
        mqtt_metrics_malformed("receive_maximum_exceeded");
        mqtt_session_fail(s, MQTT_RC_RECEIVE_MAXIMUM_EXCEEDED, NULL);
        return -1;
    }
    topic = strndup((const char *)p->topic.data, p->topic.len);
    if (topic == NULL) {
        mqtt_session_close(s);
        return -1;
    }
    if (resolve_alias(s, p, &topic) != 0) {
        free(topic);
        return -1;
    }
    if (p->qos == 2 && s->state != NULL &&
        mqtt_state_qos2_has(s->state, p->packet_id)) {
        free(topic);
        return answer_duplicate(s, p);
    }
    if (p->qos == 1 && s->state != NULL) {
        if (p->dup && mqtt_state_qos1_has(s->state, p->packet_id)) {
            free(topic);
            return answer_duplicate(s, p);
        }
        if (!p->dup)
            mqtt_state_qos1_remove(s->state, p->packet_id);
    }
    switch (check_topic(s, topic)) {
    case TOPIC_OTHER_DEVICE:
        rc = reject_message(s, p, MQTT_RC_NOT_AUTHORIZED,
                            "topic belongs to another device", 1);
        break;
    case TOPIC_UNKNOWN:
        rc = reject_message(s, p, MQTT_RC_TOPIC_NAME_INVALID,
                            "topic matches no configured template", 1);
        break;
    default:
        rc = store_message(s, p, topic);
        break;
    }
    free(topic);
    return rc;
}
