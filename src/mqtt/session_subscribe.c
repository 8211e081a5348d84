/* SUBSCRIBE and UNSUBSCRIBE for the feedback topics.
 *
 * ingestd is not a broker: a device may only subscribe inside its own
 * namespace, devices/{device_id}/..., where the server publishes
 * validation errors on devices/{device_id}/errors. Feedback is published
 * at QoS 0, so every subscription is granted QoS 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "core/log.h"
#include "mqtt/session.h"

int mqtt_topic_matches(const char *filter, const char *topic)
{
    while (*filter != '\0') {
        /* "a/#" also matches "a", its parent level. */
        if (filter[0] == '/' && filter[1] == '#' && *topic == '\0')
            return 1;
        if (filter[0] == '#')
            return 1;
        if (filter[0] == '+') {
            topic += strcspn(topic, "/");
            filter++;
            continue;
        }
        if (*filter != *topic)
            return 0;
        filter++;
        topic++;
    }
    return *topic == '\0';
}

/* Returns 1 if `filter` lies in devices/{own id}/ with something after
 * it. */
static int own_namespace(const mqtt_session_t *s, const char *filter)
{
    char prefix[AUTH_DEVICE_ID_MAX + 16];
    size_t n = (size_t)snprintf(prefix, sizeof(prefix), "devices/%s/",
                                s->device.id);

    return strncmp(filter, prefix, n) == 0 && filter[n] != '\0';
}

/* Sends a packet encoded into `buf` as a ready reply. */
static void reply(mqtt_session_t *s, uint8_t *buf, int n, size_t cap)
{
    mqtt_reply_t *r;

    if (n <= 0 || (size_t)n > cap) {
        free(buf);
        mqtt_session_close(s);
        return;
    }
    r = mqtt_session_push_reply(s);
    if (r == NULL) {
        free(buf);
        mqtt_session_close(s);
        return;
    }
    r->bytes = buf;
    r->len = (size_t)n;
    r->ready = 1;
    mqtt_session_flush_replies(s);
}

static uint8_t subscribe_one(mqtt_session_t *s, const mqtt_subscription_t *e)
{
    char *filter = strndup((const char *)e->filter.data, e->filter.len);
    uint8_t code;
    int rc;

    if (filter == NULL)
        return MQTT_RC_UNSPECIFIED;
    if (strncmp(filter, "$share/", 7) == 0) {
        code = s->version == MQTT_V5 ? MQTT_RC_SHARED_SUB_NOT_SUPPORTED
                                     : 0x80;
    } else if (!own_namespace(s, filter) || s->state == NULL) {
        code = s->version == MQTT_V5 ? MQTT_RC_NOT_AUTHORIZED : 0x80;
    } else {
        rc = mqtt_state_subscribe(s->state, filter,
                                  s->listener->cfg->mqtt.max_subscriptions);
        if (rc == ING_EFULL)
            code = s->version == MQTT_V5 ? MQTT_RC_QUOTA_EXCEEDED : 0x80;
        else
            code = rc == 0 ? 0x00 : 0x80;
    }
    log_debug("mqtt subscribe", "conn=%llu client=%s device=%s filter=%s "
              "code=0x%02x",
              (unsigned long long)s->id, s->client_id, s->device.id, filter,
              code);
    free(filter);
    return code;
}

void mqtt_session_on_subscribe(mqtt_session_t *s, const mqtt_subscribe_t *sub)
{
    mqtt_suback_t ack = {.packet_id = sub->packet_id};
    mqtt_subscription_t e;
    uint8_t *codes = malloc(sub->count);
    size_t off = 0, i = 0, cap;
    uint8_t *buf;

    if (codes == NULL) {
        mqtt_session_close(s);
        return;
    }
    if (s->version == MQTT_V5 &&
        mqtt_props_has(&sub->props, MQTT_PROP_SUBSCRIPTION_ID)) {
        /* CONNACK said Subscription Identifiers Available 0. */
        free(codes);
        mqtt_metrics_malformed("subscription_id_not_supported");
        mqtt_session_fail(s, MQTT_RC_SUB_ID_NOT_SUPPORTED, NULL);
        return;
    }
    while (i < sub->count && mqtt_subscribe_next(sub, &off, &e))
        codes[i++] = subscribe_one(s, &e);
    ack.codes = codes;
    ack.count = i;
    cap = i + 64;
    buf = malloc(cap);
    if (buf == NULL) {
        free(codes);
        mqtt_session_close(s);
        return;
    }
    reply(s, buf,
          mqtt_encode_suback(buf, cap, s->version, &ack,
                             s->client_max_packet),
          cap);
    free(codes);
}

void mqtt_session_on_unsubscribe(mqtt_session_t *s,
                                 const mqtt_subscribe_t *unsub)
{
    mqtt_suback_t ack = {.packet_id = unsub->packet_id};
    mqtt_bytes_t f;
    uint8_t *codes = malloc(unsub->count);
    size_t off = 0, i = 0, cap;
    uint8_t *buf;

    if (codes == NULL) {
        mqtt_session_close(s);
        return;
    }
    while (i < unsub->count && mqtt_unsubscribe_next(unsub, &off, &f)) {
        char *filter = strndup((const char *)f.data, f.len);
        int found = filter != NULL && s->state != NULL &&
                    mqtt_state_unsubscribe(s->state, filter);
        codes[i++] = found ? MQTT_RC_SUCCESS : MQTT_RC_NO_SUBSCRIPTION_EXISTED;
        free(filter);
    }
    ack.codes = codes;
    ack.count = i;
    cap = i + 64;
    buf = malloc(cap);
    if (buf == NULL) {
        free(codes);
        mqtt_session_close(s);
        return;
    }
    reply(s, buf,
          mqtt_encode_unsuback(buf, cap, s->version, &ack,
                               s->client_max_packet),
          cap);
    free(codes);
}
