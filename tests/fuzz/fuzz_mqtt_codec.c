/* libFuzzer target for the MQTT codec.
 *
 * Treats the input as bytes a client sent to the server, frames it packet
 * by packet and decodes every frame as MQTT 3.1.1 and as MQTT 5.0. Each
 * frame is copied into its own heap block, so AddressSanitizer catches a
 * read past the frame and not only past the input. Decoded packets the
 * server could echo (PUBLISH, acknowledgements, AUTH) are encoded again and
 * decoded once more, and the two results must agree.
 *
 * The unit test test_mqtt_codec includes this file and runs the seed
 * corpus through LLVMFuzzerTestOneInput(), so these checks also run in
 * builds without clang.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mqtt/codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(bool ok, const char *description)
{
    if (!ok) {
        fprintf(stderr, "fuzz_mqtt_codec: check failed: %s\n",
                description);
        abort();
    }
}

static bool bytes_equal(const mqtt_bytes_t *a, const mqtt_bytes_t *b)
{
    if ((a->data == NULL) != (b->data == NULL) || a->len != b->len)
        return false;
    return a->len == 0 || memcmp(a->data, b->data, a->len) == 0;
}

/* Frames a packet that an encoder just wrote. */
static void frame_encoded(const uint8_t *buf, int len, mqtt_frame_t *frame)
{
    check(len > 0, "encoder accepted a decoded packet");
    check(mqtt_frame(buf, (size_t)len, 0, frame) == len,
          "encoded packet frames to its own length");
}

static void compare_props(const mqtt_props_t *a, const mqtt_props_t *b)
{
    check(a->present == b->present, "same properties after re-encoding");
    check(b->user_property_count == a->user_property_count,
          "same user property count after re-encoding");
    for (size_t i = 0; i < a->user_property_count; i++) {
        check(bytes_equal(&a->user_properties[i].name,
                          &b->user_properties[i].name) &&
                  bytes_equal(&a->user_properties[i].value,
                              &b->user_properties[i].value),
              "same user property after re-encoding");
    }
}

static void reencode_publish(const mqtt_publish_t *in, int version)
{
    static uint8_t buf[1 << 17];
    mqtt_publish_t out;
    mqtt_frame_t frame;
    int needed = mqtt_encode_publish(NULL, 0, version, in, 0);
    int len;

    if (needed > (int)sizeof(buf))
        return;
    len = mqtt_encode_publish(buf, sizeof(buf), version, in, 0);
    check(len == needed, "encoder reports the length it writes");
    frame_encoded(buf, len, &frame);
    check(mqtt_decode_publish(&frame, version, &out) == 0,
          "re-encoded PUBLISH decodes");
    check(out.qos == in->qos && out.dup == in->dup &&
              out.retain == in->retain && out.packet_id == in->packet_id,
          "same PUBLISH header after re-encoding");
    check(bytes_equal(&out.topic, &in->topic), "same topic");
    check(bytes_equal(&out.payload, &in->payload), "same payload");
    compare_props(&in->props, &out.props);
    check(bytes_equal(&out.props.content_type, &in->props.content_type),
          "same content type");
    check(bytes_equal(&out.props.correlation_data,
                      &in->props.correlation_data),
          "same correlation data");
    check(out.props.topic_alias == in->props.topic_alias &&
              out.props.message_expiry == in->props.message_expiry,
          "same numeric PUBLISH properties");
}

static void reencode_ack(const mqtt_ack_t *in, int version)
{
    static uint8_t buf[1 << 17];
    mqtt_packet_t out;
    mqtt_frame_t frame;
    int len = mqtt_encode_ack(buf, sizeof(buf), version, in, 0);

    if (len > (int)sizeof(buf))
        return;
    frame_encoded(buf, len, &frame);
    check(mqtt_decode(&frame, version, &out) == 0, "re-encoded ack decodes");
    check(out.u.ack.type == in->type && out.u.ack.packet_id == in->packet_id,
          "same ack type and packet id");
    if (version == MQTT_V5) {
        check(out.u.ack.reason_code == in->reason_code, "same reason code");
        compare_props(&in->props, &out.u.ack.props);
    }
}

static void reencode_auth(const mqtt_auth_t *in)
{
    static uint8_t buf[1 << 17];
    mqtt_auth_t out;
    mqtt_frame_t frame;
    int len = mqtt_encode_auth(buf, sizeof(buf), MQTT_V5, in, 0);

    if (len > (int)sizeof(buf))
        return;
    frame_encoded(buf, len, &frame);
    check(mqtt_decode_auth(&frame, MQTT_V5, &out) == 0,
          "re-encoded AUTH decodes");
    check(out.reason_code == in->reason_code, "same AUTH reason code");
    compare_props(&in->props, &out.props);
    check(bytes_equal(&out.props.auth_data, &in->props.auth_data),
          "same authentication data");
}

static void walk_subscribe(const mqtt_packet_t *pkt)
{
    const mqtt_subscribe_t *sub = &pkt->u.subscribe;
    size_t offset = 0;
    size_t count = 0;

    if (pkt->type == MQTT_SUBSCRIBE) {
        mqtt_subscription_t entry;

        while (mqtt_subscribe_next(sub, &offset, &entry)) {
            check(entry.filter.len > 0 && entry.qos < 3 &&
                      entry.retain_handling < 3,
                  "decoded subscription is valid");
            count++;
        }
    } else {
        mqtt_bytes_t filter;

        while (mqtt_unsubscribe_next(sub, &offset, &filter))
            count++;
    }
    check(count == sub->count && offset == sub->list_len,
          "the list walk matches the decoded count");
}

static void exercise(const mqtt_frame_t *frame, int version)
{
    mqtt_packet_t pkt;
    int rc = mqtt_decode(frame, version, &pkt);

    if (rc != 0) {
        check(rc < 0 && mqtt_strerror(rc) != NULL, "errors are negative");
        check(mqtt_error_reason(rc) >= 0x80, "errors map to a failure code");
        return;
    }
    switch (pkt.type) {
    case MQTT_CONNECT:
        check((pkt.u.connect.will_topic.data != NULL) == pkt.u.connect.will,
              "a will topic exactly when the will flag is set");
        break;
    case MQTT_PUBLISH:
        reencode_publish(&pkt.u.publish, version);
        break;
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBREL:
    case MQTT_PUBCOMP:
        reencode_ack(&pkt.u.ack, version);
        break;
    case MQTT_SUBSCRIBE:
    case MQTT_UNSUBSCRIBE:
        walk_subscribe(&pkt);
        break;
    case MQTT_AUTH:
        reencode_auth(&pkt.u.auth);
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (int version = MQTT_V311; version <= MQTT_V5; version++) {
        size_t pos = 0;

        while (pos < size) {
            mqtt_frame_t frame;
            uint8_t *copy;
            int n = mqtt_frame(data + pos, size - pos, 0, &frame);

            if (n <= 0)
                break;
            /* Framing is incremental: one byte less is never enough, and
             * the size limit is inclusive. */
            check(mqtt_frame(data + pos, (size_t)n - 1, 0, &frame) ==
                      MQTT_NEED_MORE,
                  "a cut packet needs more bytes");
            check(mqtt_frame(data + pos, (size_t)n, (size_t)n - 1, &frame) ==
                      MQTT_E_PACKET_TOO_LARGE,
                  "a packet over the limit is too large");
            copy = malloc((size_t)n);
            check(copy != NULL, "malloc");
            memcpy(copy, data + pos, (size_t)n);
            check(mqtt_frame(copy, (size_t)n, (size_t)n, &frame) == n,
                  "a packet at the limit frames");
            exercise(&frame, version);
            free(copy);
            pos += (size_t)n;
        }
    }
    return 0;
}
