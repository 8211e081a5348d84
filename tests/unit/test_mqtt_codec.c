/* Unit tests for the MQTT codec: framing, decoding of every packet a
 * server receives, encoding of every packet it sends, packets captured
 * from mosquitto clients, and the fuzzing seed corpus. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "mqtt/codec.h"
#include "mqtt/codec_internal.h"

/* The fuzz target, run on the seed corpus by mqtt_fuzz_corpus_decodes. */
#include "../fuzz/fuzz_mqtt_codec.c"

#define BUF_SIZE 4096

/* Converts hex digits to bytes, skipping spaces. Returns the byte count. */
static size_t unhex(const char *hex, uint8_t *out, size_t cap)
{
    size_t n = 0;
    int high = -1;

    for (const char *p = hex; *p != '\0'; p++) {
        int digit = 0;

        if (*p == ' ' || *p == '\n')
            continue;
        if (*p >= '0' && *p <= '9')
            digit = *p - '0';
        else if (*p >= 'a' && *p <= 'f')
            digit = *p - 'a' + 10;
        else if (*p >= 'A' && *p <= 'F')
            digit = *p - 'A' + 10;
        else
            fail_msg("bad hex digit '%c' in %s", *p, hex);
        if (high < 0) {
            high = digit;
            continue;
        }
        assert_true(n < cap);
        out[n++] = (uint8_t)(high << 4 | digit);
        high = -1;
    }
    assert_int_equal(high, -1);
    return n;
}

/* Builds a packet from its first byte and its body in hex, adding the
 * remaining length. Returns the packet length. */
static size_t build(uint8_t *out, size_t cap, uint8_t first,
                    const char *body_hex)
{
    uint8_t body[BUF_SIZE];
    size_t body_len = unhex(body_hex, body, sizeof(body));
    uint8_t *p = out;

    assert_true(body_len + 5 <= cap);
    *p++ = first;
    p = mqtt_write_varint(p, (uint32_t)body_len);
    memcpy(p, body, body_len);
    return (size_t)(p - out) + body_len;
}

/* The packet a decode_packet() call decoded. Decoded structs point into
 * it, so it lives until the next call. */
static uint8_t packet_buf[BUF_SIZE];

/* Frames the built packet and decodes it. Returns the decoder's code. */
static int decode_packet(uint8_t first, const char *body_hex, int version,
                         mqtt_packet_t *out)
{
    size_t len = build(packet_buf, sizeof(packet_buf), first, body_hex);
    mqtt_frame_t frame;
    int n = mqtt_frame(packet_buf, len, 0, &frame);

    assert_int_equal(n, (int)len);
    return mqtt_decode(&frame, version, out);
}

/* Frames and decodes one whole packet given as hex. */
static int decode_hex(const char *hex, int version, mqtt_packet_t *out)
{
    size_t len = unhex(hex, packet_buf, sizeof(packet_buf));
    mqtt_frame_t frame;
    int n = mqtt_frame(packet_buf, len, 0, &frame);

    assert_int_equal(n, (int)len);
    return mqtt_decode(&frame, version, out);
}

static void assert_bytes(const mqtt_bytes_t *b, const char *expected)
{
    assert_non_null(b->data);
    assert_int_equal(b->len, strlen(expected));
    assert_memory_equal(b->data, expected, b->len);
}

static void assert_encoded(const uint8_t *buf, int len, const char *hex)
{
    uint8_t expected[BUF_SIZE];
    size_t n = unhex(hex, expected, sizeof(expected));

    assert_int_equal(len, (int)n);
    assert_memory_equal(buf, expected, n);
}

/* Framing. */

static void mqtt_frame_needs_more(void **state)
{
    const uint8_t pub[] = {0x30, 0x05, 0x00, 0x01, 't', 'h', 'i'};
    const uint8_t long_len[] = {0x30, 0x80, 0x80};
    mqtt_frame_t frame;

    for (size_t len = 0; len < sizeof(pub); len++)
        assert_int_equal(mqtt_frame(pub, len, 0, &frame), MQTT_NEED_MORE);
    assert_int_equal(mqtt_frame(pub, sizeof(pub), 0, &frame), 7);
    assert_int_equal(frame.type, MQTT_PUBLISH);
    assert_int_equal(frame.flags, 0);
    assert_int_equal(frame.header_len, 2);
    assert_int_equal(frame.body_len, 5);
    assert_ptr_equal(frame.body, pub + 2);
    assert_int_equal(mqtt_frame(long_len, sizeof(long_len), 0, &frame),
                     MQTT_NEED_MORE);
}

static void mqtt_frame_remaining_length_5_bytes(void **state)
{
    const uint8_t five[] = {0x30, 0xff, 0xff, 0xff, 0xff, 0x7f};
    mqtt_frame_t frame;

    /* The error shows as soon as the fourth length byte continues. */
    assert_int_equal(mqtt_frame(five, 5, 0, &frame),
                     MQTT_E_REMAINING_LENGTH);
    assert_int_equal(mqtt_frame(five, sizeof(five), 0, &frame),
                     MQTT_E_REMAINING_LENGTH);
    assert_int_equal(mqtt_error_reason(MQTT_E_REMAINING_LENGTH), 0x81);
}

static void mqtt_frame_maximum_remaining_length(void **state)
{
    const uint8_t max[] = {0x30, 0xff, 0xff, 0xff, 0x7f};
    mqtt_frame_t frame;

    assert_int_equal(mqtt_frame(max, sizeof(max), 0, &frame),
                     MQTT_NEED_MORE);
    assert_int_equal(mqtt_frame(max, sizeof(max), 1000, &frame),
                     MQTT_E_PACKET_TOO_LARGE);
    assert_int_equal(mqtt_error_reason(MQTT_E_PACKET_TOO_LARGE), 0x95);
}

static void mqtt_frame_non_minimal_length(void **state)
{
    const uint8_t ping[] = {0xc0, 0x80, 0x80, 0x00};
    mqtt_packet_t pkt;
    mqtt_frame_t frame;

    assert_int_equal(mqtt_frame(ping, sizeof(ping), 0, &frame), 4);
    assert_int_equal(frame.header_len, 4);
    assert_int_equal(frame.body_len, 0);
    assert_int_equal(mqtt_decode(&frame, MQTT_V311, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_PINGREQ);
}

static void mqtt_frame_size_limit_boundary(void **state)
{
    const uint8_t pub[] = {0x30, 0x05, 0x00, 0x01, 't', 'h', 'i'};
    mqtt_frame_t frame;

    assert_int_equal(mqtt_frame(pub, sizeof(pub), 7, &frame), 7);
    assert_int_equal(mqtt_frame(pub, sizeof(pub), 6, &frame),
                     MQTT_E_PACKET_TOO_LARGE);
    /* The limit applies before the body has arrived. */
    assert_int_equal(mqtt_frame(pub, 2, 6, &frame), MQTT_E_PACKET_TOO_LARGE);
}

static void mqtt_frame_reserved_type_zero(void **state)
{
    const uint8_t zero[] = {0x00, 0x00};
    mqtt_frame_t frame;

    assert_int_equal(mqtt_frame(zero, 1, 0, &frame),
                     MQTT_E_PACKET_TYPE_RESERVED);
    assert_int_equal(mqtt_frame(zero, 2, 0, &frame),
                     MQTT_E_PACKET_TYPE_RESERVED);
}

static void mqtt_frame_stream_of_packets(void **state)
{
    const uint8_t stream[] = {0xc0, 0x00, 0x40, 0x02, 0x00, 0x07, 0xe0, 0x00};
    const uint8_t types[] = {MQTT_PINGREQ, MQTT_PUBACK, MQTT_DISCONNECT};
    mqtt_frame_t frame;
    size_t pos = 0;

    for (size_t i = 0; i < 3; i++) {
        int n = mqtt_frame(stream + pos, sizeof(stream) - pos, 0, &frame);

        assert_true(n > 0);
        assert_int_equal(frame.type, types[i]);
        pos += (size_t)n;
    }
    assert_int_equal(pos, sizeof(stream));
}

/* UTF-8. */

static void mqtt_utf8_accepts_valid(void **state)
{
    static const char *valid[] = {
        "",         "61",       "7f",     "01",       "c280",
        "c29f",     "dfbf",     "e0a080", "ed9fbf",   "ee8080",
        "efbfbf",   "f0908080", "f48fbfbf", "e282ac", "f09f9880",
    };
    uint8_t s[16];

    for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++) {
        size_t n = unhex(valid[i], s, sizeof(s));

        if (mqtt_utf8_check(s, n) != 0)
            fail_msg("valid UTF-8 %s rejected", valid[i]);
    }
}

static void mqtt_utf8_rejects_invalid(void **state)
{
    static const char *invalid[] = {
        "c080",     "c1bf",     "e08080",   "e09fbf",   "eda080",
        "edbfbf",   "f0808080", "f08fbfbf", "f4908080", "f5808080",
        "ff",       "80",       "c2",       "e282",     "c241",
        "e228a1",   "f09028bc", "61c0",     "f0908080bf80",
    };
    uint8_t s[16];

    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++) {
        size_t n = unhex(invalid[i], s, sizeof(s));

        if (mqtt_utf8_check(s, n) != MQTT_E_UTF8)
            fail_msg("invalid UTF-8 %s accepted", invalid[i]);
    }
    assert_int_equal(mqtt_utf8_check((const uint8_t *)"a\0b", 3),
                     MQTT_E_UTF8_NUL);
}

/* CONNECT. */

/* The CONNECT that mosquitto_pub -V mqttv311 -i dev-1 sends, built by hand
 * from the 3.1.1 spec: "MQTT", level 4, clean session, keep alive 60. */
static const char v311_connect_hex[] =
    "10 11 0004 4d515454 04 02 003c 0005 6465762d31";

static void mqtt_connect_v311_byte_exact(void **state)
{
    mqtt_packet_t pkt;
    mqtt_connect_t *c = &pkt.u.connect;

    assert_int_equal(decode_hex(v311_connect_hex, 0, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_CONNECT);
    assert_int_equal(c->version, MQTT_V311);
    assert_true(c->clean_start);
    assert_false(c->will);
    assert_int_equal(c->keep_alive, 60);
    assert_bytes(&c->client_id, "dev-1");
    assert_null(c->username.data);
    assert_null(c->password.data);
    assert_null(c->will_topic.data);
    assert_int_equal(c->props.present, 0);
    assert_int_equal(c->props.receive_maximum, 65535);
    assert_int_equal(c->props.request_problem_info, 1);
}

static void mqtt_connect_v5_properties(void **state)
{
    mqtt_packet_t pkt;
    mqtt_connect_t *c = &pkt.u.connect;
    mqtt_props_t *p = &c->props;

    /* Captured from mosquitto_pub -V mqttv5 with -D connect properties. */
    assert_int_equal(
        decode_hex("104400044d51545405c2003c20110000003c2100142700010000220008"
                   "1701190126000266770005312e322e3300056465762d3100056465762d"
                   "310009696b5f736563726574",
                   0, &pkt),
        0);
    assert_int_equal(c->version, MQTT_V5);
    assert_bytes(&c->username, "dev-1");
    assert_bytes(&c->password, "ik_secret");
    assert_true(mqtt_props_has(p, MQTT_PROP_SESSION_EXPIRY));
    assert_int_equal(p->session_expiry, 60);
    assert_int_equal(p->receive_maximum, 20);
    assert_int_equal(p->maximum_packet_size, 65536);
    assert_int_equal(p->topic_alias_maximum, 8);
    assert_int_equal(p->request_problem_info, 1);
    assert_int_equal(p->request_response_info, 1);
    assert_int_equal(p->user_property_count, 1);
    assert_int_equal(p->user_property_total, 1);
    assert_bytes(&p->user_properties[0].name, "fw");
    assert_bytes(&p->user_properties[0].value, "1.2.3");
}

static void mqtt_connect_v5_will_properties(void **state)
{
    mqtt_packet_t pkt;
    mqtt_connect_t *c = &pkt.u.connect;

    assert_int_equal(
        decode_hex("105600044d515454052e003c0321001400056465762d3121180000000a"
                   "03000a746578742f706c61696e260006726561736f6e00046c6f737400"
                   "14646576696365732f6465762d312f73746174757300076f66666c696e"
                   "65",
                   0, &pkt),
        0);
    assert_true(c->will);
    assert_int_equal(c->will_qos, 1);
    assert_true(c->will_retain);
    assert_int_equal(c->props.receive_maximum, 20);
    assert_int_equal(c->will_props.will_delay, 10);
    assert_bytes(&c->will_props.content_type, "text/plain");
    assert_int_equal(c->will_props.user_property_count, 1);
    assert_bytes(&c->will_props.user_properties[0].name, "reason");
    assert_bytes(&c->will_props.user_properties[0].value, "lost");
    assert_bytes(&c->will_topic, "devices/dev-1/status");
    assert_bytes(&c->will_payload, "offline");
}

static void mqtt_connect_mqisdp_level_3(void **state)
{
    mqtt_packet_t pkt;
    int rc = decode_packet(0x10, "0006 4d5149736470 03 02 003c 0001 63", 0,
                           &pkt);

    assert_int_equal(rc, MQTT_E_PROTOCOL_LEVEL);
    assert_int_equal(pkt.u.connect.version, 3);
    assert_int_equal(mqtt_error_connack_v311(rc), 0x01);
    assert_int_equal(mqtt_error_reason(rc), 0x84);
}

static void mqtt_connect_level_6(void **state)
{
    mqtt_packet_t pkt;
    int rc = decode_packet(0x10, "0004 4d515454 06 02 003c 0001 63", 0, &pkt);

    assert_int_equal(rc, MQTT_E_PROTOCOL_LEVEL);
    assert_int_equal(pkt.u.connect.version, 6);
}

static void mqtt_connect_unknown_protocol_name(void **state)
{
    mqtt_packet_t pkt;
    int rc = decode_packet(0x10, "0004 4d515458 04 02 003c 0001 63", 0, &pkt);

    assert_int_equal(rc, MQTT_E_PROTOCOL_NAME);
    assert_int_equal(pkt.u.connect.version, 0);
    assert_int_equal(mqtt_error_connack_v311(rc), -1);
}

static void mqtt_connect_empty_client_id(void **state)
{
    mqtt_packet_t pkt;
    int rc;

    rc = decode_packet(0x10, "0004 4d515454 04 02 003c 0000", 0, &pkt);
    assert_int_equal(rc, 0);
    assert_non_null(pkt.u.connect.client_id.data);
    assert_int_equal(pkt.u.connect.client_id.len, 0);

    rc = decode_packet(0x10, "0004 4d515454 04 00 003c 0000", 0, &pkt);
    assert_int_equal(rc, MQTT_E_CLIENT_ID_EMPTY);
    assert_int_equal(mqtt_error_connack_v311(rc), 0x02);
    assert_int_equal(mqtt_error_reason(rc), 0x85);

    /* MQTT 5.0 lets the server assign an identifier. */
    rc = decode_packet(0x10, "0004 4d515454 05 00 003c 00 0000", 0, &pkt);
    assert_int_equal(rc, 0);
}

static void mqtt_connect_password_without_username(void **state)
{
    mqtt_packet_t pkt;

    assert_int_equal(
        decode_packet(0x10, "0004 4d515454 04 42 003c 0001 63 0002 7077", 0,
                      &pkt),
        MQTT_E_PASSWORD_WITHOUT_USERNAME);
    assert_int_equal(
        decode_packet(0x10, "0004 4d515454 05 42 003c 00 0001 63 0002 7077",
                      0, &pkt),
        0);
    assert_null(pkt.u.connect.username.data);
    assert_bytes(&pkt.u.connect.password, "pw");
}

struct bad_case {
    const char *name;
    uint8_t first;
    const char *body;
    int version;
    int expected;
};

static void run_cases(const struct bad_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        mqtt_packet_t pkt;
        int rc = decode_packet(cases[i].first, cases[i].body,
                               cases[i].version, &pkt);

        if (rc != cases[i].expected)
            fail_msg("case %s: got %d (%s), expected %d (%s)", cases[i].name,
                     rc, mqtt_strerror(rc), cases[i].expected,
                     mqtt_strerror(cases[i].expected));
    }
}

#define V3 MQTT_V311
#define V5 MQTT_V5
#define MQTT4 "0004 4d515454 04"
#define MQTT5 "0004 4d515454 05"

static const struct bad_case connect_cases[] = {
    {"level 3 named MQTT", 0x10, "0004 4d515454 03 02 003c 0001 63", 0,
     MQTT_E_PROTOCOL_LEVEL},
    {"header flags", 0x11, MQTT4 "02 003c 0001 63", 0, MQTT_E_HEADER_FLAGS},
    {"reserved flag", 0x10, MQTT4 "03 003c 0001 63", 0,
     MQTT_E_CONNECT_RESERVED},
    {"will QoS 3", 0x10, MQTT4 "1e 003c 0001 63 0001 74 0000", 0,
     MQTT_E_WILL_QOS},
    {"will QoS without will", 0x10, MQTT4 "0a 003c 0001 63", 0,
     MQTT_E_WILL_FLAGS},
    {"will retain without will", 0x10, MQTT4 "22 003c 0001 63", 0,
     MQTT_E_WILL_FLAGS},
    {"trailing byte", 0x10, MQTT4 "02 003c 0001 63 00", 0,
     MQTT_E_TRAILING_BYTES},
    {"no keep alive", 0x10, MQTT4 "02 00", 0, MQTT_E_TRUNCATED},
    {"no flags", 0x10, MQTT4, 0, MQTT_E_TRUNCATED},
    {"short protocol name", 0x10, "0004 4d51", 0, MQTT_E_TRUNCATED},
    {"client id overruns", 0x10, MQTT4 "02 003c 0005 6465", 0,
     MQTT_E_TRUNCATED},
    {"client id overlong", 0x10, MQTT4 "02 003c 0002 c080", 0, MQTT_E_UTF8},
    {"client id surrogate", 0x10, MQTT4 "02 003c 0003 eda080", 0,
     MQTT_E_UTF8},
    {"client id NUL", 0x10, MQTT4 "02 003c 0001 00", 0, MQTT_E_UTF8_NUL},
    {"will topic empty", 0x10, MQTT4 "06 003c 0001 63 0000 0000", 0,
     MQTT_E_WILL_TOPIC},
    {"will topic wildcard", 0x10, MQTT4 "06 003c 0001 63 0001 23 0000", 0,
     MQTT_E_WILL_TOPIC},
    {"will payload missing", 0x10, MQTT4 "06 003c 0001 63 0001 74", 0,
     MQTT_E_TRUNCATED},
    {"username missing", 0x10, MQTT4 "82 003c 0001 63", 0, MQTT_E_TRUNCATED},
    {"username bad UTF-8", 0x10, MQTT4 "82 003c 0001 63 0001 ff", 0,
     MQTT_E_UTF8},
    {"password overruns", 0x10, MQTT4 "c2 003c 0001 63 0001 75 0009 7077", 0,
     MQTT_E_TRUNCATED},
    {"v5 no property length", 0x10, MQTT5 "02 003c", 0, MQTT_E_TRUNCATED},
    {"receive maximum 0", 0x10, MQTT5 "02 003c 03 210000 0001 63", 0,
     MQTT_E_RECEIVE_MAXIMUM_ZERO},
    {"maximum packet size 0", 0x10, MQTT5 "02 003c 05 2700000000 0001 63", 0,
     MQTT_E_MAXIMUM_PACKET_SIZE_ZERO},
    {"duplicate session expiry", 0x10,
     MQTT5 "02 003c 0a 1100000001 1100000002 0001 63", 0,
     MQTT_E_PROPERTY_DUPLICATE},
    {"unknown property", 0x10, MQTT5 "02 003c 02 7f00 0001 63", 0,
     MQTT_E_PROPERTY_UNKNOWN},
    {"unassigned property 0x04", 0x10, MQTT5 "02 003c 02 0400 0001 63", 0,
     MQTT_E_PROPERTY_UNKNOWN},
    {"topic alias in CONNECT", 0x10, MQTT5 "02 003c 03 230001 0001 63", 0,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"property length overruns", 0x10, MQTT5 "02 003c 10 1100", 0,
     MQTT_E_PROPERTY_LENGTH},
    {"property value overruns list", 0x10,
     MQTT5 "02 003c 02 1100 00000001 0001 63", 0, MQTT_E_PROPERTY_LENGTH},
    {"property string overruns list", 0x10,
     MQTT5 "02 003c 03 150005 0001 63", 0, MQTT_E_PROPERTY_LENGTH},
    {"property length 5 bytes", 0x10, MQTT5 "02 003c ffffffff7f 0001 63", 0,
     MQTT_E_VARINT},
    {"auth data without method", 0x10, MQTT5 "02 003c 04 160001aa 0001 63",
     0, MQTT_E_AUTH_DATA_WITHOUT_METHOD},
    {"request problem info 2", 0x10, MQTT5 "02 003c 02 1702 0001 63", 0,
     MQTT_E_PROPERTY_VALUE},
    {"request response info 2", 0x10, MQTT5 "02 003c 02 1902 0001 63", 0,
     MQTT_E_PROPERTY_VALUE},
    {"user property bad UTF-8", 0x10,
     MQTT5 "02 003c 06 260001ff0000 0001 63", 0, MQTT_E_UTF8},
    {"user property value missing", 0x10,
     MQTT5 "02 003c 04 26000161 0001 63", 0, MQTT_E_PROPERTY_LENGTH},
    {"receive maximum in will", 0x10,
     MQTT5 "06 003c 00 0001 63 03 210001 0001 74 0000", 0,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"will delay in CONNECT", 0x10, MQTT5 "02 003c 05 1800000001 0001 63", 0,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"will payload format 2", 0x10,
     MQTT5 "06 003c 00 0001 63 02 0102 0001 74 0000", 0,
     MQTT_E_PROPERTY_VALUE},
};

static void mqtt_connect_rejects_malformed(void **state)
{
    run_cases(connect_cases, sizeof(connect_cases) / sizeof(connect_cases[0]));
}

/* Feeds every prefix of a valid CONNECT as a whole body, each in its own
 * heap block so AddressSanitizer would catch a read past it. */
static void mqtt_connect_every_truncation_fails(void **state)
{
    uint8_t full[BUF_SIZE];
    size_t len = unhex(
        "104400044d51545405c2003c20110000003c2100142700010000220008"
        "1701190126000266770005312e322e3300056465762d3100056465762d"
        "310009696b5f736563726574",
        full, sizeof(full));

    for (size_t cut = 0; cut < len - 2; cut++) {
        uint8_t *body = malloc(cut > 0 ? cut : 1);
        mqtt_frame_t frame = {MQTT_CONNECT, 0, 2, cut, body};
        mqtt_connect_t c;

        assert_non_null(body);
        memcpy(body, full + 2, cut);
        if (mqtt_decode_connect(&frame, &c) >= 0)
            fail_msg("CONNECT cut to %zu body bytes decoded", cut);
        free(body);
    }
}

/* PUBLISH. */

static void mqtt_publish_v311_qos1(void **state)
{
    mqtt_packet_t pkt;
    mqtt_publish_t *p = &pkt.u.publish;

    assert_int_equal(decode_hex("32 09 0003 612f62 000a 6869", V3, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_PUBLISH);
    assert_int_equal(p->qos, 1);
    assert_false(p->dup);
    assert_false(p->retain);
    assert_bytes(&p->topic, "a/b");
    assert_int_equal(p->packet_id, 10);
    assert_bytes(&p->payload, "hi");
}

static void mqtt_publish_flags(void **state)
{
    mqtt_packet_t pkt;
    mqtt_publish_t *p = &pkt.u.publish;

    assert_int_equal(decode_packet(0x3d, "0001 74 0001", V3, &pkt), 0);
    assert_true(p->dup);
    assert_int_equal(p->qos, 2);
    assert_true(p->retain);
    assert_int_equal(decode_packet(0x30, "0001 74", V3, &pkt), 0);
    assert_non_null(p->payload.data);
    assert_int_equal(p->payload.len, 0);
}

static void mqtt_publish_v5_properties(void **state)
{
    mqtt_packet_t pkt;
    mqtt_props_t *p = &pkt.u.publish.props;

    /* Captured from mosquitto_pub -V mqttv5 -q 1 with -D publish. */
    assert_int_equal(
        decode_hex("3280010012646576696365732f6465762d312f64617461000155030010"
                   "6170706c69636174696f6e2f6a736f6e260004756e6974000763656c73"
                   "6975732600047369746500036c6162020000012c010108001364657669"
                   "6365732f6465762d312f7265706c790900067265712d34327b2274656d"
                   "7065726174757265223a32312e357d",
                   V5, &pkt),
        0);
    assert_bytes(&pkt.u.publish.topic, "devices/dev-1/data");
    assert_int_equal(pkt.u.publish.packet_id, 1);
    assert_bytes(&p->content_type, "application/json");
    assert_int_equal(p->user_property_count, 2);
    assert_bytes(&p->user_properties[0].name, "unit");
    assert_bytes(&p->user_properties[0].value, "celsius");
    assert_bytes(&p->user_properties[1].name, "site");
    assert_bytes(&p->user_properties[1].value, "lab");
    assert_int_equal(p->message_expiry, 300);
    assert_int_equal(p->payload_format, 1);
    assert_bytes(&p->response_topic, "devices/dev-1/reply");
    assert_bytes(&p->correlation_data, "req-42");
    assert_bytes(&pkt.u.publish.payload, "{\"temperature\":21.5}");
}

static void mqtt_publish_many_user_properties(void **state)
{
    char body[BUF_SIZE];
    size_t n = 0;
    mqtt_packet_t pkt;
    mqtt_props_t *p = &pkt.u.publish.props;

    /* 33 properties "k" = "<i>" of 7 bytes each: 231 bytes of list. */
    n += (size_t)sprintf(body + n, "0001 74 e701");
    for (int i = 0; i < 33; i++)
        n += (size_t)sprintf(body + n, " 26 0001 6b 0001 %02x", 0x40 + i);
    sprintf(body + n, " 6869");
    assert_int_equal(decode_packet(0x30, body, V5, &pkt), 0);
    assert_int_equal(p->user_property_count, MQTT_MAX_USER_PROPERTIES);
    assert_int_equal(p->user_property_total, 33);
    assert_bytes(&p->user_properties[0].value, "@");
    assert_bytes(&p->user_properties[31].value, "_");
    assert_bytes(&pkt.u.publish.payload, "hi");
}

static void mqtt_publish_empty_topic_with_alias(void **state)
{
    mqtt_packet_t pkt;

    assert_int_equal(decode_packet(0x30, "0000 03 230005 6869", V5, &pkt), 0);
    assert_int_equal(pkt.u.publish.topic.len, 0);
    assert_int_equal(pkt.u.publish.props.topic_alias, 5);
}

static const struct bad_case publish_cases[] = {
    {"QoS 3", 0x36, "0001 74 0001", V3, MQTT_E_PUBLISH_QOS},
    {"DUP with QoS 0", 0x38, "0001 74", V3, MQTT_E_PUBLISH_DUP},
    {"topic with +", 0x30, "0003 612f2b", V3, MQTT_E_TOPIC_WILDCARD},
    {"topic with #", 0x30, "0003 612f23", V5, MQTT_E_TOPIC_WILDCARD},
    {"packet id 0", 0x32, "0001 74 0000", V3, MQTT_E_PACKET_ID_ZERO},
    {"packet id cut", 0x34, "0001 74 00", V3, MQTT_E_TRUNCATED},
    {"empty topic 3.1.1", 0x30, "0000 6869", V3, MQTT_E_TOPIC_EMPTY},
    {"empty topic no alias", 0x30, "0000 00 6869", V5, MQTT_E_TOPIC_EMPTY},
    {"topic alias 0", 0x30, "0001 74 03 230000", V5, MQTT_E_TOPIC_ALIAS_ZERO},
    {"duplicate topic alias", 0x30, "0001 74 06 230001 230002", V5,
     MQTT_E_PROPERTY_DUPLICATE},
    {"subscription id", 0x30, "0001 74 02 0b01", V5,
     MQTT_E_SUBSCRIPTION_ID_FROM_CLIENT},
    {"duplicate content type", 0x30, "0001 74 08 03000161 03000162", V5,
     MQTT_E_PROPERTY_DUPLICATE},
    {"payload format 2", 0x30, "0001 74 02 0102", V5, MQTT_E_PROPERTY_VALUE},
    {"response topic wildcard", 0x30, "0001 74 04 08000123", V5,
     MQTT_E_RESPONSE_TOPIC},
    {"response topic empty", 0x30, "0001 74 03 080000", V5,
     MQTT_E_RESPONSE_TOPIC},
    {"session expiry", 0x30, "0001 74 05 1100000001", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"reason string", 0x30, "0001 74 03 1f0000", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"topic overruns", 0x30, "0005 74", V3, MQTT_E_TRUNCATED},
    {"topic length cut", 0x30, "00", V3, MQTT_E_TRUNCATED},
    {"property list overruns", 0x30, "0001 74 05 0100", V5,
     MQTT_E_PROPERTY_LENGTH},
    {"no property length", 0x30, "0001 74", V5, MQTT_E_TRUNCATED},
    {"correlation data overruns", 0x30, "0001 74 04 09000561", V5,
     MQTT_E_PROPERTY_LENGTH},
    {"message expiry cut", 0x30, "0001 74 03 020000", V5,
     MQTT_E_PROPERTY_LENGTH},
    {"topic overlong UTF-8", 0x30, "0002 c1bf", V3, MQTT_E_UTF8},
    {"topic surrogate", 0x30, "0003 edb080", V5, MQTT_E_UTF8},
    {"topic NUL", 0x30, "0003 610062", V3, MQTT_E_UTF8_NUL},
    {"content type bad UTF-8", 0x30, "0001 74 04 030001ff", V5, MQTT_E_UTF8},
};

static void mqtt_publish_rejects_malformed(void **state)
{
    run_cases(publish_cases, sizeof(publish_cases) / sizeof(publish_cases[0]));
    assert_int_equal(mqtt_error_reason(MQTT_E_TOPIC_WILDCARD), 0x90);
    assert_int_equal(mqtt_error_reason(MQTT_E_TOPIC_ALIAS_ZERO), 0x94);
    assert_string_equal(mqtt_strerror(MQTT_E_TOPIC_WILDCARD),
                        "PUBLISH topic name contains a wildcard");
}

/* PUBACK, PUBREC, PUBREL and PUBCOMP. */

static void mqtt_ack_forms(void **state)
{
    mqtt_packet_t pkt;
    mqtt_ack_t *a = &pkt.u.ack;

    assert_int_equal(decode_packet(0x40, "000a", V3, &pkt), 0);
    assert_int_equal(a->type, MQTT_PUBACK);
    assert_int_equal(a->packet_id, 10);
    assert_int_equal(decode_packet(0x62, "000a", V3, &pkt), 0);
    assert_int_equal(a->type, MQTT_PUBREL);
    assert_int_equal(decode_packet(0x50, "000a", V5, &pkt), 0);
    assert_int_equal(a->reason_code, 0);
    assert_int_equal(decode_packet(0x40, "000a 10", V5, &pkt), 0);
    assert_int_equal(a->reason_code, 0x10);
    assert_int_equal(decode_packet(0x70, "000a 92 05 1f00026e6f", V5, &pkt),
                     0);
    assert_int_equal(a->type, MQTT_PUBCOMP);
    assert_int_equal(a->reason_code, 0x92);
    assert_bytes(&a->props.reason_string, "no");
}

static const struct bad_case ack_cases[] = {
    {"PUBREL flags 0", 0x60, "0001", V3, MQTT_E_HEADER_FLAGS},
    {"PUBREL flags 3", 0x63, "0001", V5, MQTT_E_HEADER_FLAGS},
    {"PUBACK flags 2", 0x42, "0001", V3, MQTT_E_HEADER_FLAGS},
    {"PUBREC flags 1", 0x51, "0001", V5, MQTT_E_HEADER_FLAGS},
    {"PUBCOMP flags 8", 0x78, "0001", V3, MQTT_E_HEADER_FLAGS},
    {"3.1.1 trailing byte", 0x40, "000100", V3, MQTT_E_TRAILING_BYTES},
    {"packet id cut", 0x40, "00", V3, MQTT_E_TRUNCATED},
    {"empty", 0x50, "", V5, MQTT_E_TRUNCATED},
    {"packet id 0", 0x40, "0000", V5, MQTT_E_PACKET_ID_ZERO},
    {"PUBACK code 0x01", 0x40, "0001 01", V5, MQTT_E_REASON_CODE},
    {"PUBREL code 0x10", 0x62, "0001 10", V5, MQTT_E_REASON_CODE},
    {"PUBCOMP code 0x80", 0x70, "0001 80", V5, MQTT_E_REASON_CODE},
    {"payload format in PUBACK", 0x40, "0001 00 02 0101", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"property list overruns", 0x40, "0001 00 05 1f00", V5,
     MQTT_E_PROPERTY_LENGTH},
    {"trailing after properties", 0x40, "0001 00 00 00", V5,
     MQTT_E_TRAILING_BYTES},
    {"duplicate reason string", 0x40, "0001 80 06 1f0000 1f0000", V5,
     MQTT_E_PROPERTY_DUPLICATE},
};

static void mqtt_ack_rejects_malformed(void **state)
{
    run_cases(ack_cases, sizeof(ack_cases) / sizeof(ack_cases[0]));
}

/* SUBSCRIBE and UNSUBSCRIBE. */

static void mqtt_subscribe_v311_captured(void **state)
{
    static const char *filters[] = {"devices/dev-1/config", "fleet/+/cmd",
                                    "fleet/#"};
    mqtt_packet_t pkt;
    mqtt_subscription_t sub;
    size_t offset = 0;
    size_t i = 0;

    assert_int_equal(
        decode_hex("823100010014646576696365732f6465762d312f636f6e666967020"
                   "00b666c6565742f2b2f636d64020007666c6565742f2302",
                   V3, &pkt),
        0);
    assert_int_equal(pkt.type, MQTT_SUBSCRIBE);
    assert_int_equal(pkt.u.subscribe.packet_id, 1);
    assert_int_equal(pkt.u.subscribe.count, 3);
    while (mqtt_subscribe_next(&pkt.u.subscribe, &offset, &sub)) {
        assert_true(i < 3);
        assert_bytes(&sub.filter, filters[i]);
        assert_int_equal(sub.qos, 2);
        assert_false(sub.no_local);
        i++;
    }
    assert_int_equal(i, 3);
}

static void mqtt_subscribe_v5_options(void **state)
{
    mqtt_packet_t pkt;
    mqtt_subscribe_t *s = &pkt.u.subscribe;
    mqtt_subscription_t sub;
    size_t offset = 0;

    /* Subscription id 7, user property k=v, "a/b" with QoS 1, No Local,
     * Retain As Published and Retain Handling 2, then a shared filter. */
    assert_int_equal(
        decode_packet(0x82,
                      "0005 09 0b07 2600016b000176 0003 612f62 2d"
                      " 000a 2473686172652f672f61 00",
                      V5, &pkt),
        0);
    assert_int_equal(s->packet_id, 5);
    assert_int_equal(s->props.subscription_id, 7);
    assert_int_equal(s->props.user_property_count, 1);
    assert_int_equal(s->count, 2);
    assert_true(mqtt_subscribe_next(s, &offset, &sub));
    assert_bytes(&sub.filter, "a/b");
    assert_int_equal(sub.qos, 1);
    assert_true(sub.no_local);
    assert_true(sub.retain_as_published);
    assert_int_equal(sub.retain_handling, 2);
    assert_true(mqtt_subscribe_next(s, &offset, &sub));
    assert_bytes(&sub.filter, "$share/g/a");
    assert_false(mqtt_subscribe_next(s, &offset, &sub));
}

/* Returns the body of a one-filter SUBSCRIBE in hex. */
static const char *subscribe_body(const char *filter, int version,
                                  uint8_t options)
{
    static char body[512];
    size_t n;

    n = (size_t)sprintf(body, "0001 %s %04zx ", version == V5 ? "00" : "",
                        strlen(filter));
    for (const char *p = filter; *p != '\0'; p++)
        n += (size_t)sprintf(body + n, "%02x", (unsigned char)*p);
    sprintf(body + n, " %02x", options);
    return body;
}

static void mqtt_subscribe_filter_wildcards(void **state)
{
    static const char *valid[] = {"#",     "+",   "/+",    "+/+",   "a/+/b",
                                  "a/#",   "/",   "//",    "+/#",   "$SYS/#",
                                  "a/b/c", "/#",  "+/+/#", "a//b",  "\xc3\xa9"};
    static const char *invalid[] = {"a/#/b", "a#",  "#a",  "a/b#", "+a",
                                    "a+",    "a/+b", "##", "#/",   "a/#/"};
    mqtt_packet_t pkt;

    for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++) {
        for (int v = V3; v <= V5; v++) {
            int rc = decode_packet(0x82, subscribe_body(valid[i], v, 1), v,
                                   &pkt);

            if (rc != 0)
                fail_msg("filter %s rejected: %s", valid[i],
                         mqtt_strerror(rc));
        }
    }
    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++) {
        for (int v = V3; v <= V5; v++) {
            int rc = decode_packet(0x82, subscribe_body(invalid[i], v, 1), v,
                                   &pkt);

            if (rc != MQTT_E_FILTER_WILDCARD)
                fail_msg("filter %s: got %s", invalid[i], mqtt_strerror(rc));
        }
    }
    assert_int_equal(mqtt_error_reason(MQTT_E_FILTER_WILDCARD), 0x8f);
}

static void mqtt_subscribe_shared_filters(void **state)
{
    static const char *invalid[] = {"$share//a", "$share/g", "$share/g/",
                                    "$share/+/a", "$share/#"};
    mqtt_packet_t pkt;
    int rc;

    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++) {
        rc = decode_packet(0x82, subscribe_body(invalid[i], V5, 0), V5, &pkt);
        if (rc != MQTT_E_SHARED_FILTER)
            fail_msg("shared filter %s: got %s", invalid[i],
                     mqtt_strerror(rc));
    }
    /* In 3.1.1 "$share" has no meaning, so these are plain filters. */
    rc = decode_packet(0x82, subscribe_body("$share/g", V3, 0), V3, &pkt);
    assert_int_equal(rc, 0);
    rc = decode_packet(0x82, subscribe_body("$share/g/#", V5, 2), V5, &pkt);
    assert_int_equal(rc, 0);
    rc = decode_packet(0x82, subscribe_body("$share/g/a", V5, 4), V5, &pkt);
    assert_int_equal(rc, MQTT_E_SHARED_NO_LOCAL);
    rc = decode_packet(0x82, subscribe_body("$shared/a", V5, 4), V5, &pkt);
    assert_int_equal(rc, 0);
}

static const struct bad_case subscribe_cases[] = {
    {"flags 0", 0x80, "0001 0001 74 00", V3, MQTT_E_HEADER_FLAGS},
    {"flags 3", 0x83, "0001 00 0001 74 00", V5, MQTT_E_HEADER_FLAGS},
    {"no filter 3.1.1", 0x82, "0001", V3, MQTT_E_SUBSCRIBE_EMPTY},
    {"no filter 5.0", 0x82, "0001 00", V5, MQTT_E_SUBSCRIBE_EMPTY},
    {"empty body", 0x82, "", V3, MQTT_E_TRUNCATED},
    {"packet id 0", 0x82, "0000 0001 74 00", V3, MQTT_E_PACKET_ID_ZERO},
    {"QoS 3", 0x82, "0001 0001 74 03", V3, MQTT_E_SUBSCRIBE_QOS},
    {"QoS 3 in 5.0", 0x82, "0001 00 0001 74 03", V5, MQTT_E_SUBSCRIBE_QOS},
    {"3.1.1 No Local bit", 0x82, "0001 0001 74 04", V3,
     MQTT_E_SUBSCRIBE_RESERVED},
    {"3.1.1 bit 7", 0x82, "0001 0001 74 80", V3, MQTT_E_SUBSCRIBE_RESERVED},
    {"5.0 bit 6", 0x82, "0001 00 0001 74 40", V5, MQTT_E_SUBSCRIBE_RESERVED},
    {"5.0 bit 7", 0x82, "0001 00 0001 74 81", V5, MQTT_E_SUBSCRIBE_RESERVED},
    {"retain handling 3", 0x82, "0001 00 0001 74 30", V5,
     MQTT_E_RETAIN_HANDLING},
    {"options missing", 0x82, "0001 0001 74", V3, MQTT_E_TRUNCATED},
    {"second options missing", 0x82, "0001 0001 74 00 0001 75", V3,
     MQTT_E_TRUNCATED},
    {"filter overruns", 0x82, "0001 0009 74 00", V3, MQTT_E_TRUNCATED},
    {"empty filter", 0x82, "0001 0000 00", V3, MQTT_E_FILTER_EMPTY},
    {"filter bad UTF-8", 0x82, "0001 0001 80 00", V3, MQTT_E_UTF8},
    {"subscription id 0", 0x82, "0001 02 0b00 0001 74 00", V5,
     MQTT_E_SUBSCRIPTION_ID_ZERO},
    {"duplicate subscription id", 0x82, "0001 04 0b01 0b02 0001 74 00", V5,
     MQTT_E_PROPERTY_DUPLICATE},
    {"subscription id 5 bytes", 0x82, "0001 05 0bffffffff 0001 74 00", V5,
     MQTT_E_VARINT},
    {"topic alias in SUBSCRIBE", 0x82, "0001 03 230001 0001 74 00", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
};

static void mqtt_subscribe_rejects_malformed(void **state)
{
    run_cases(subscribe_cases,
              sizeof(subscribe_cases) / sizeof(subscribe_cases[0]));
}

static void mqtt_unsubscribe_decodes_filters(void **state)
{
    mqtt_packet_t pkt;
    mqtt_bytes_t filter;
    size_t offset = 0;

    assert_int_equal(
        decode_hex("a2130002072600016b0001760007666c6565742f23", V5, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_UNSUBSCRIBE);
    assert_int_equal(pkt.u.subscribe.packet_id, 2);
    assert_int_equal(pkt.u.subscribe.count, 1);
    assert_int_equal(pkt.u.subscribe.props.user_property_count, 1);
    assert_true(mqtt_unsubscribe_next(&pkt.u.subscribe, &offset, &filter));
    assert_bytes(&filter, "fleet/#");
    assert_false(mqtt_unsubscribe_next(&pkt.u.subscribe, &offset, &filter));

    assert_int_equal(decode_packet(0xa2, "0003 0001 61 0001 62", V3, &pkt), 0);
    assert_int_equal(pkt.u.subscribe.count, 2);
}

static const struct bad_case unsubscribe_cases[] = {
    {"flags 0", 0xa0, "0001 0001 74", V3, MQTT_E_HEADER_FLAGS},
    {"no filter", 0xa2, "0001", V3, MQTT_E_UNSUBSCRIBE_EMPTY},
    {"no filter 5.0", 0xa2, "0001 00", V5, MQTT_E_UNSUBSCRIBE_EMPTY},
    {"packet id 0", 0xa2, "0000 0001 74", V3, MQTT_E_PACKET_ID_ZERO},
    {"bad wildcard", 0xa2, "0001 0003 612362", V3, MQTT_E_FILTER_WILDCARD},
    {"empty filter", 0xa2, "0001 0000", V3, MQTT_E_FILTER_EMPTY},
    {"filter overruns", 0xa2, "0001 0005 61", V3, MQTT_E_TRUNCATED},
    {"subscription id", 0xa2, "0001 02 0b01 0001 74", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
};

static void mqtt_unsubscribe_rejects_malformed(void **state)
{
    run_cases(unsubscribe_cases,
              sizeof(unsubscribe_cases) / sizeof(unsubscribe_cases[0]));
}

/* PINGREQ, DISCONNECT, AUTH and packets only servers send. */

static void mqtt_disconnect_and_auth_forms(void **state)
{
    mqtt_packet_t pkt;

    assert_int_equal(decode_packet(0xc0, "", V3, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_PINGREQ);
    assert_int_equal(decode_packet(0xe0, "", V3, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_DISCONNECT);
    assert_int_equal(decode_packet(0xe0, "04", V5, &pkt), 0);
    assert_int_equal(pkt.u.disconnect.reason_code, 0x04);
    assert_int_equal(decode_packet(0xe0, "00 05 1100000078", V5, &pkt), 0);
    assert_int_equal(pkt.u.disconnect.props.session_expiry, 120);
    assert_int_equal(decode_packet(0xf0, "", V5, &pkt), 0);
    assert_int_equal(pkt.type, MQTT_AUTH);
    assert_int_equal(pkt.u.auth.reason_code, 0);
    assert_int_equal(
        decode_packet(0xf0, "18 0c 150005534352414d 160001aa", V5, &pkt), 0);
    assert_int_equal(pkt.u.auth.reason_code, 0x18);
    assert_bytes(&pkt.u.auth.props.auth_method, "SCRAM");
    assert_int_equal(pkt.u.auth.props.auth_data.len, 1);
}

static const struct bad_case misc_cases[] = {
    {"PINGREQ with body", 0xc0, "00", V3, MQTT_E_TRAILING_BYTES},
    {"PINGREQ flags", 0xc1, "", V5, MQTT_E_HEADER_FLAGS},
    {"3.1.1 DISCONNECT with body", 0xe0, "00", V3, MQTT_E_TRAILING_BYTES},
    {"DISCONNECT flags", 0xe2, "", V3, MQTT_E_HEADER_FLAGS},
    {"DISCONNECT server code", 0xe0, "8d", V5, MQTT_E_REASON_CODE},
    {"DISCONNECT receive maximum", 0xe0, "00 03 210001", V5,
     MQTT_E_PROPERTY_NOT_ALLOWED},
    {"DISCONNECT trailing", 0xe0, "04 00 00", V5, MQTT_E_TRAILING_BYTES},
    {"AUTH in 3.1.1", 0xf0, "", V3, MQTT_E_AUTH_IN_V311},
    {"AUTH flags", 0xf1, "", V5, MQTT_E_HEADER_FLAGS},
    {"AUTH code 0x01", 0xf0, "01", V5, MQTT_E_REASON_CODE},
    {"AUTH data without method", 0xf0, "18 04 160001aa", V5,
     MQTT_E_AUTH_DATA_WITHOUT_METHOD},
    {"CONNACK", 0x20, "0000", V3, MQTT_E_SERVER_PACKET},
    {"SUBACK", 0x90, "000100", V5, MQTT_E_SERVER_PACKET},
    {"UNSUBACK", 0xb0, "0001", V3, MQTT_E_SERVER_PACKET},
    {"PINGRESP", 0xd0, "", V5, MQTT_E_SERVER_PACKET},
};

static void mqtt_misc_rejects_malformed(void **state)
{
    mqtt_packet_t pkt;

    run_cases(misc_cases, sizeof(misc_cases) / sizeof(misc_cases[0]));
    assert_int_equal(decode_packet(0xc0, "", 3, &pkt), ING_EINVAL);
    /* CONNECT carries its own version, so the argument is ignored. */
    assert_int_equal(decode_hex(v311_connect_hex, 3, &pkt), 0);
}

static void mqtt_errors_have_reason_and_text(void **state)
{
    for (int code = -101; code >= -161; code--) {
        const char *text = mqtt_strerror(code);
        uint8_t reason = mqtt_error_reason(code);

        if (strcmp(text, "unknown error") == 0)
            continue; /* a gap in the enum numbering */
        if (reason < 0x81 || reason > 0x95)
            fail_msg("error %d (%s) maps to reason 0x%02x", code, text,
                     reason);
    }
    assert_int_equal(mqtt_error_reason(MQTT_E_TRUNCATED), 0x81);
    assert_int_equal(mqtt_error_reason(MQTT_E_PROPERTY_DUPLICATE), 0x82);
    assert_int_equal(mqtt_error_reason(MQTT_E_PROTOCOL_LEVEL), 0x84);
    assert_int_equal(mqtt_error_reason(ING_ENOMEM), 0x80);
    assert_string_equal(mqtt_strerror(ING_ENOMEM), ing_strerror(ING_ENOMEM));
    assert_int_equal(mqtt_error_connack_v311(MQTT_E_TRUNCATED), -1);
}

/* Encoders. */

static void mqtt_encode_connack_v311(void **state)
{
    mqtt_connack_t c = {0};
    uint8_t buf[16];

    assert_encoded(buf, mqtt_encode_connack(buf, sizeof(buf), V3, &c, 0),
                   "20 02 00 00");
    c.session_present = true;
    assert_encoded(buf, mqtt_encode_connack(buf, sizeof(buf), V3, &c, 0),
                   "20 02 01 00");
    c.session_present = false;
    c.reason_code = 0x05;
    assert_encoded(buf, mqtt_encode_connack(buf, sizeof(buf), V3, &c, 0),
                   "20 02 00 05");
    c.reason_code = 0x06;
    assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), V3, &c, 0),
                     ING_EINVAL);
    c.reason_code = 0x01;
    c.session_present = true;
    assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), V3, &c, 0),
                     ING_EINVAL);
}

static void mqtt_encode_connack_v5_byte_exact(void **state)
{
    mqtt_connack_t c = {.session_present = true};
    uint8_t buf[64];

    c.props.receive_maximum = 10;
    mqtt_props_set(&c.props, MQTT_PROP_RECEIVE_MAXIMUM);
    c.props.maximum_qos = 1;
    mqtt_props_set(&c.props, MQTT_PROP_MAXIMUM_QOS);
    c.props.retain_available = 0;
    mqtt_props_set(&c.props, MQTT_PROP_RETAIN_AVAILABLE);
    assert_encoded(buf, mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0),
                   "20 0a 01 00 07 21000a 2401 2500");

    c = (mqtt_connack_t){.reason_code = 0x84};
    assert_encoded(buf, mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0),
                   "20 03 00 84 00");
    c.reason_code = 0x01;
    assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0),
                     ING_EINVAL);
    c.reason_code = 0;
    c.props.topic_alias = 1;
    mqtt_props_set(&c.props, MQTT_PROP_TOPIC_ALIAS);
    assert_int_equal(mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0),
                     ING_EINVAL);
}

#define SET(props, id, field, value)                                         \
    do {                                                                     \
        (props)->field = (value);                                            \
        mqtt_props_set((props), (id));                                       \
    } while (0)

static mqtt_bytes_t str(const char *s)
{
    return (mqtt_bytes_t){(const uint8_t *)s, strlen(s)};
}

/* Fills every CONNACK property a server sends. */
static void full_connack(mqtt_connack_t *c)
{
    mqtt_props_t *p = &c->props;

    memset(c, 0, sizeof(*c));
    SET(p, MQTT_PROP_SESSION_EXPIRY, session_expiry, 3600);
    SET(p, MQTT_PROP_RECEIVE_MAXIMUM, receive_maximum, 100);
    SET(p, MQTT_PROP_MAXIMUM_QOS, maximum_qos, 1);
    SET(p, MQTT_PROP_RETAIN_AVAILABLE, retain_available, 0);
    SET(p, MQTT_PROP_MAXIMUM_PACKET_SIZE, maximum_packet_size, 1048576);
    SET(p, MQTT_PROP_ASSIGNED_CLIENT_ID, assigned_client_id, str("auto-1"));
    SET(p, MQTT_PROP_TOPIC_ALIAS_MAXIMUM, topic_alias_maximum, 16);
    SET(p, MQTT_PROP_REASON_STRING, reason_string, str("welcome, device"));
    SET(p, MQTT_PROP_WILDCARD_SUB_AVAILABLE, wildcard_sub_available, 0);
    SET(p, MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE, subscription_id_available,
        0);
    SET(p, MQTT_PROP_SHARED_SUB_AVAILABLE, shared_sub_available, 1);
    SET(p, MQTT_PROP_SERVER_KEEP_ALIVE, server_keep_alive, 30);
    p->user_properties[0].name = str("node");
    p->user_properties[0].value = str("ingestd-1");
    p->user_properties[1].name = str("region");
    p->user_properties[1].value = str("eu");
    p->user_property_count = 2;
}

/* Decodes the properties of an encoded CONNACK with the internal property
 * decoder, which knows CONNACK properties too. */
static void decode_connack_props(const uint8_t *buf, int len,
                                 mqtt_props_t *out)
{
    mqtt_frame_t frame;
    mqtt_reader_t r;

    assert_int_equal(mqtt_frame(buf, (size_t)len, 0, &frame), len);
    assert_int_equal(frame.type, MQTT_CONNACK);
    r.data = frame.body;
    r.len = frame.body_len;
    r.pos = 2;
    assert_int_equal(mqtt_props_decode(&r, MQTT_KIND(MQTT_CONNACK), out), 0);
    assert_int_equal(r.pos, r.len);
}

static void mqtt_encode_connack_all_properties(void **state)
{
    mqtt_connack_t c;
    mqtt_props_t p;
    uint8_t buf[256];
    int len;

    full_connack(&c);
    len = mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0);
    assert_true(len > 0 && len <= (int)sizeof(buf));
    decode_connack_props(buf, len, &p);
    assert_int_equal(p.present, c.props.present);
    assert_int_equal(p.session_expiry, 3600);
    assert_int_equal(p.receive_maximum, 100);
    assert_int_equal(p.maximum_qos, 1);
    assert_int_equal(p.retain_available, 0);
    assert_int_equal(p.maximum_packet_size, 1048576);
    assert_bytes(&p.assigned_client_id, "auto-1");
    assert_int_equal(p.topic_alias_maximum, 16);
    assert_bytes(&p.reason_string, "welcome, device");
    assert_int_equal(p.wildcard_sub_available, 0);
    assert_int_equal(p.subscription_id_available, 0);
    assert_int_equal(p.shared_sub_available, 1);
    assert_int_equal(p.server_keep_alive, 30);
    assert_int_equal(p.user_property_count, 2);
    assert_bytes(&p.user_properties[1].name, "region");
    assert_bytes(&p.user_properties[1].value, "eu");
}

static void mqtt_encode_drops_optional_properties(void **state)
{
    mqtt_connack_t c;
    mqtt_props_t p;
    uint8_t buf[256];
    int full;
    int no_reason;
    int bare;
    int len;

    full_connack(&c);
    full = mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0);
    /* Reason string "welcome, device": 1 + 2 + 15 bytes. User properties:
     * 1 + 2 + 4 + 2 + 9 and 1 + 2 + 6 + 2 + 2 bytes. */
    no_reason = full - 18;
    bare = no_reason - 18 - 13;

    len = mqtt_encode_connack(buf, sizeof(buf), V5, &c, (size_t)full);
    assert_int_equal(len, full);

    len = mqtt_encode_connack(buf, sizeof(buf), V5, &c, (size_t)full - 1);
    assert_int_equal(len, no_reason);
    decode_connack_props(buf, len, &p);
    assert_false(mqtt_props_has(&p, MQTT_PROP_REASON_STRING));
    assert_int_equal(p.user_property_count, 2);

    len = mqtt_encode_connack(buf, sizeof(buf), V5, &c, (size_t)no_reason - 1);
    assert_int_equal(len, bare);
    decode_connack_props(buf, len, &p);
    assert_int_equal(p.user_property_count, 0);
    assert_true(mqtt_props_has(&p, MQTT_PROP_ASSIGNED_CLIENT_ID));

    assert_int_equal(
        mqtt_encode_connack(buf, sizeof(buf), V5, &c, (size_t)bare - 1),
        MQTT_E_PACKET_TOO_LARGE);
}

static void mqtt_encode_reports_needed_length(void **state)
{
    mqtt_connack_t c;
    uint8_t buf[256];
    int full;

    full_connack(&c);
    full = mqtt_encode_connack(buf, sizeof(buf), V5, &c, 0);
    memset(buf, 0xaa, sizeof(buf));
    assert_int_equal(mqtt_encode_connack(buf, (size_t)full - 1, V5, &c, 0),
                     full);
    for (size_t i = 0; i < sizeof(buf); i++)
        assert_int_equal(buf[i], 0xaa);
    assert_int_equal(mqtt_encode_connack(NULL, 0, V5, &c, 0), full);
    assert_int_equal(mqtt_encode_pingresp(buf, 1), 2);
    assert_int_equal(buf[0], 0xaa);
    assert_encoded(buf, mqtt_encode_pingresp(buf, sizeof(buf)), "d0 00");
}

/* Encodes `in`, then frames and decodes the result as a client PUBLISH. */
static void publish_round_trip(int version, const mqtt_publish_t *in,
                               mqtt_publish_t *out, uint8_t *buf, size_t cap)
{
    mqtt_frame_t frame;
    int len = mqtt_encode_publish(buf, cap, version, in, 0);

    assert_true(len > 0 && len <= (int)cap);
    assert_int_equal(mqtt_frame(buf, (size_t)len, 0, &frame), len);
    assert_int_equal(mqtt_decode_publish(&frame, version, out), 0);
    assert_int_equal(out->qos, in->qos);
    assert_int_equal(out->dup, in->dup);
    assert_int_equal(out->retain, in->retain);
    assert_int_equal(out->packet_id, in->qos > 0 ? in->packet_id : 0);
    assert_int_equal(out->topic.len, in->topic.len);
    assert_memory_equal(out->topic.data, in->topic.data, in->topic.len);
    assert_int_equal(out->payload.len, in->payload.len);
    assert_memory_equal(out->payload.data, in->payload.data,
                        in->payload.len);
}

static void mqtt_encode_publish_round_trip(void **state)
{
    mqtt_publish_t in = {0};
    mqtt_publish_t out;
    uint8_t buf[512];

    in.topic = str("devices/dev-1/feedback");
    in.payload = str("{\"rate\":5}");
    for (int v = V3; v <= V5; v++) {
        for (uint8_t qos = 0; qos <= 2; qos++) {
            in.qos = qos;
            in.packet_id = qos > 0 ? 77 : 0;
            in.retain = qos == 1;
            in.dup = qos == 2;
            publish_round_trip(v, &in, &out, buf, sizeof(buf));
        }
    }

    in.qos = 1;
    in.dup = false;
    SET(&in.props, MQTT_PROP_CONTENT_TYPE, content_type,
        str("application/json"));
    SET(&in.props, MQTT_PROP_MESSAGE_EXPIRY, message_expiry, 60);
    in.props.user_properties[0].name = str("origin");
    in.props.user_properties[0].value = str("ingestd");
    in.props.user_property_count = 1;
    publish_round_trip(V5, &in, &out, buf, sizeof(buf));
    assert_int_equal(out.props.present, in.props.present);
    assert_bytes(&out.props.content_type, "application/json");
    assert_int_equal(out.props.message_expiry, 60);
    assert_int_equal(out.props.user_property_count, 1);
    assert_bytes(&out.props.user_properties[0].value, "ingestd");
}

static void mqtt_encode_publish_byte_exact(void **state)
{
    mqtt_publish_t p = {.qos = 1, .packet_id = 10};
    uint8_t buf[64];

    p.topic = str("a/b");
    p.payload = str("hi");
    assert_encoded(buf, mqtt_encode_publish(buf, sizeof(buf), V3, &p, 0),
                   "32 09 0003 612f62 000a 6869");
    assert_encoded(buf, mqtt_encode_publish(buf, sizeof(buf), V5, &p, 0),
                   "32 0a 0003 612f62 000a 00 6869");
}

static void mqtt_encode_publish_rejects_invalid(void **state)
{
    mqtt_publish_t p = {.qos = 1, .packet_id = 10};
    uint8_t buf[128];

    p.topic = str("a/b");
    p.payload = str("hi");
    p.props.user_properties[0].name = str("k");
    p.props.user_properties[0].value = str("v");
    p.props.user_property_count = 1;
    /* User properties of a PUBLISH are part of the message. */
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 18),
                     MQTT_E_PACKET_TOO_LARGE);
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 19), 19);
    p.qos = 3;
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 0),
                     ING_EINVAL);
    p.qos = 1;
    p.packet_id = 0;
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 0),
                     ING_EINVAL);
    p.qos = 0;
    p.dup = true;
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V3, &p, 0),
                     ING_EINVAL);
    p.dup = false;
    p.topic = str("");
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V3, &p, 0),
                     ING_EINVAL);
    SET(&p.props, MQTT_PROP_TOPIC_ALIAS, topic_alias, 3);
    assert_true(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 0) > 0);
    SET(&p.props, MQTT_PROP_ASSIGNED_CLIENT_ID, assigned_client_id, str("x"));
    assert_int_equal(mqtt_encode_publish(buf, sizeof(buf), V5, &p, 0),
                     ING_EINVAL);
}

static void mqtt_encode_ack_forms(void **state)
{
    mqtt_ack_t a = {.type = MQTT_PUBACK, .packet_id = 10};
    mqtt_packet_t pkt;
    mqtt_frame_t frame;
    uint8_t buf[64];
    int len;

    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V3, &a, 0),
                   "40 02 000a");
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                   "40 02 000a");
    a.type = MQTT_PUBREL;
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V3, &a, 0),
                   "62 02 000a");
    a.type = MQTT_PUBREC;
    a.reason_code = 0x10;
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                   "50 03 000a 10");

    a.type = MQTT_PUBACK;
    a.reason_code = 0x97;
    SET(&a.props, MQTT_PROP_REASON_STRING, reason_string, str("no"));
    len = mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0);
    assert_encoded(buf, len, "40 09 000a 97 05 1f00026e6f");
    assert_int_equal(mqtt_frame(buf, (size_t)len, 0, &frame), len);
    assert_int_equal(mqtt_decode(&frame, V5, &pkt), 0);
    assert_int_equal(pkt.u.ack.reason_code, 0x97);
    assert_bytes(&pkt.u.ack.props.reason_string, "no");
    /* Too large for the client: the reason string goes first. */
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V5, &a, 5),
                   "40 03 000a 97");
    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), V5, &a, 4),
                     MQTT_E_PACKET_TOO_LARGE);
    a.reason_code = 0;
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                   "40 09 000a 00 05 1f00026e6f");
    assert_encoded(buf, mqtt_encode_ack(buf, sizeof(buf), V5, &a, 8),
                   "40 02 000a");

    a.reason_code = 0x92;
    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                     ING_EINVAL);
    a.type = MQTT_PUBCOMP;
    assert_true(mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0) > 0);
    a.packet_id = 0;
    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                     ING_EINVAL);
    a.packet_id = 1;
    a.type = MQTT_SUBACK;
    assert_int_equal(mqtt_encode_ack(buf, sizeof(buf), V5, &a, 0),
                     ING_EINVAL);
}

static void mqtt_encode_suback_and_unsuback(void **state)
{
    const uint8_t granted[] = {0x00, 0x02};
    const uint8_t refused[] = {0x00, 0x8f};
    const uint8_t unsub[] = {0x00, 0x11};
    mqtt_suback_t s = {.packet_id = 1, .codes = granted, .count = 2};
    uint8_t buf[64];

    assert_encoded(buf, mqtt_encode_suback(buf, sizeof(buf), V3, &s, 0),
                   "90 04 0001 00 02");
    assert_encoded(buf, mqtt_encode_suback(buf, sizeof(buf), V5, &s, 0),
                   "90 05 0001 00 00 02");
    s.codes = refused;
    assert_int_equal(mqtt_encode_suback(buf, sizeof(buf), V3, &s, 0),
                     ING_EINVAL);
    assert_encoded(buf, mqtt_encode_suback(buf, sizeof(buf), V5, &s, 0),
                   "90 05 0001 00 00 8f");
    s.count = 0;
    assert_int_equal(mqtt_encode_suback(buf, sizeof(buf), V5, &s, 0),
                     ING_EINVAL);

    s = (mqtt_suback_t){.packet_id = 1, .codes = unsub, .count = 2};
    assert_encoded(buf, mqtt_encode_unsuback(buf, sizeof(buf), V3, &s, 0),
                   "b0 02 0001");
    assert_encoded(buf, mqtt_encode_unsuback(buf, sizeof(buf), V5, &s, 0),
                   "b0 05 0001 00 00 11");
    SET(&s.props, MQTT_PROP_REASON_STRING, reason_string, str("x"));
    assert_encoded(buf, mqtt_encode_unsuback(buf, sizeof(buf), V5, &s, 0),
                   "b0 09 0001 04 1f000178 00 11");
    assert_encoded(buf, mqtt_encode_unsuback(buf, sizeof(buf), V5, &s, 10),
                   "b0 05 0001 00 00 11");
}

static void mqtt_encode_disconnect_and_auth(void **state)
{
    mqtt_disconnect_t d = {0};
    mqtt_auth_t a = {.reason_code = 0x18};
    mqtt_packet_t pkt;
    mqtt_frame_t frame;
    uint8_t buf[64];
    int len;

    assert_encoded(buf, mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 0),
                   "e0 00");
    assert_int_equal(mqtt_encode_disconnect(buf, sizeof(buf), V3, &d, 0),
                     ING_EINVAL);
    d.reason_code = 0x8e;
    assert_encoded(buf, mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 0),
                   "e0 01 8e");
    SET(&d.props, MQTT_PROP_REASON_STRING, reason_string, str("bye"));
    assert_encoded(buf, mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 0),
                   "e0 08 8e 06 1f0003627965");
    assert_encoded(buf, mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 9),
                   "e0 01 8e");
    d.reason_code = 0x04;
    assert_int_equal(mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 0),
                     ING_EINVAL);
    d.reason_code = 0;
    SET(&d.props, MQTT_PROP_SESSION_EXPIRY, session_expiry, 1);
    assert_int_equal(mqtt_encode_disconnect(buf, sizeof(buf), V5, &d, 0),
                     ING_EINVAL);

    SET(&a.props, MQTT_PROP_AUTH_METHOD, auth_method, str("SCRAM"));
    len = mqtt_encode_auth(buf, sizeof(buf), V5, &a, 0);
    assert_encoded(buf, len, "f0 0a 18 08 150005534352414d");
    assert_int_equal(mqtt_frame(buf, (size_t)len, 0, &frame), len);
    assert_int_equal(mqtt_decode(&frame, V5, &pkt), 0);
    assert_bytes(&pkt.u.auth.props.auth_method, "SCRAM");
    a = (mqtt_auth_t){.reason_code = 0x19};
    assert_encoded(buf, mqtt_encode_auth(buf, sizeof(buf), V5, &a, 0),
                   "f0 02 19 00");
    assert_int_equal(mqtt_encode_auth(buf, sizeof(buf), V3, &a, 0),
                     ING_EINVAL);
}

/* Packets captured from mosquitto clients and the fuzzing corpus. */

static char *source_path(const char *relative)
{
    const char *root = getenv("INGESTD_SOURCE_DIR");
    char *path;

    assert_non_null(root);
    path = malloc(strlen(root) + strlen(relative) + 2);
    assert_non_null(path);
    sprintf(path, "%s/%s", root, relative);
    return path;
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *data;
    long size;

    if (f == NULL)
        fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = malloc(size > 0 ? (size_t)size : 1);
    assert_non_null(data);
    assert_int_equal(fread(data, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    *len = (size_t)size;
    return data;
}

/* Returns the protocol level a capture file name starts with, or 0. */
static int capture_version(const char *name)
{
    if (strncmp(name, "mqtt_v311_", 10) == 0 || strncmp(name, "v311_", 5) == 0)
        return MQTT_V311;
    if (strncmp(name, "mqtt_v5_", 8) == 0 || strncmp(name, "v5_", 3) == 0)
        return MQTT_V5;
    return 0;
}

/* Decodes every packet of a stream, which must all be valid. Returns the
 * number of packets. */
static size_t decode_valid_stream(const uint8_t *data, size_t len,
                                  int version, const char *name)
{
    size_t pos = 0;
    size_t count = 0;

    while (pos < len) {
        mqtt_packet_t pkt;
        mqtt_frame_t frame;
        int n = mqtt_frame(data + pos, len - pos, 0, &frame);
        int rc;

        if (n <= 0)
            fail_msg("%s: packet %zu does not frame: %d", name, count, n);
        rc = mqtt_decode(&frame, version, &pkt);
        if (rc != 0)
            fail_msg("%s: packet %zu (type %d): %s", name, count, frame.type,
                     mqtt_strerror(rc));
        if (pkt.type == MQTT_CONNECT)
            assert_int_equal(pkt.u.connect.version, version);
        pos += (size_t)n;
        count++;
    }
    return count;
}

static void mqtt_decode_captured_packets(void **state)
{
    char *dir_path = source_path("tests/unit/data");
    DIR *dir = opendir(dir_path);
    struct dirent *entry;
    size_t files = 0;

    assert_non_null(dir);
    while ((entry = readdir(dir)) != NULL) {
        const char *name = entry->d_name;
        size_t name_len = strlen(name);
        int version = capture_version(name);
        char file[1024];
        char *text;
        size_t text_len;
        uint8_t *bytes;
        size_t n;

        if (version == 0 || name_len < 4 ||
            strcmp(name + name_len - 4, ".hex") != 0)
            continue;
        snprintf(file, sizeof(file), "%s/%s", dir_path, name);
        text = (char *)read_file(file, &text_len);
        text = realloc(text, text_len + 1);
        assert_non_null(text);
        text[text_len] = '\0';
        bytes = malloc(text_len / 2 + 1);
        assert_non_null(bytes);
        n = unhex(text, bytes, text_len / 2 + 1);
        /* Each capture has CONNECT, at least one more packet, and the
         * DISCONNECT that ends it. */
        assert_true(decode_valid_stream(bytes, n, version, name) >= 3);
        assert_int_equal(bytes[0], 0x10);
        free(bytes);
        free(text);
        files++;
    }
    closedir(dir);
    free(dir_path);
    assert_true(files >= 16);
}

/* The hand-built CONNECT matches what mosquitto_pub really sent. */
static void mqtt_connect_matches_capture(void **state)
{
    char *path = source_path("tests/unit/data/mqtt_v311_pub_qos0.hex");
    uint8_t expected[64];
    size_t expected_len = unhex(v311_connect_hex, expected, sizeof(expected));
    size_t len;
    uint8_t *text = read_file(path, &len);
    uint8_t line[64];
    char first[128] = "";

    for (size_t i = 0; i < len && i < sizeof(first) - 1; i++) {
        if (text[i] == '\n')
            break;
        first[i] = (char)text[i];
    }
    assert_int_equal(unhex(first, line, sizeof(line)), expected_len);
    assert_memory_equal(line, expected, expected_len);
    free(text);
    free(path);
}

/* Runs each seed through the fuzz target, so its checks also run in
 * builds without clang. Captured seeds must decode without error. */
static void mqtt_fuzz_corpus_decodes(void **state)
{
    char *dir_path = source_path("tests/fuzz/corpus/mqtt");
    DIR *dir = opendir(dir_path);
    struct dirent *entry;
    size_t files = 0;

    assert_non_null(dir);
    while ((entry = readdir(dir)) != NULL) {
        char file[1024];
        uint8_t *data;
        size_t len;
        int version;

        if (entry->d_name[0] == '.')
            continue;
        snprintf(file, sizeof(file), "%s/%s", dir_path, entry->d_name);
        data = read_file(file, &len);
        assert_int_equal(LLVMFuzzerTestOneInput(data, len), 0);
        version = capture_version(entry->d_name);
        if (version != 0)
            decode_valid_stream(data, len, version, entry->d_name);
        free(data);
        files++;
    }
    closedir(dir);
    free(dir_path);
    assert_true(files >= 16);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(mqtt_frame_needs_more),
        cmocka_unit_test(mqtt_frame_remaining_length_5_bytes),
        cmocka_unit_test(mqtt_frame_maximum_remaining_length),
        cmocka_unit_test(mqtt_frame_non_minimal_length),
        cmocka_unit_test(mqtt_frame_size_limit_boundary),
        cmocka_unit_test(mqtt_frame_reserved_type_zero),
        cmocka_unit_test(mqtt_frame_stream_of_packets),
        cmocka_unit_test(mqtt_utf8_accepts_valid),
        cmocka_unit_test(mqtt_utf8_rejects_invalid),
        cmocka_unit_test(mqtt_connect_v311_byte_exact),
        cmocka_unit_test(mqtt_connect_v5_properties),
        cmocka_unit_test(mqtt_connect_v5_will_properties),
        cmocka_unit_test(mqtt_connect_mqisdp_level_3),
        cmocka_unit_test(mqtt_connect_level_6),
        cmocka_unit_test(mqtt_connect_unknown_protocol_name),
        cmocka_unit_test(mqtt_connect_empty_client_id),
        cmocka_unit_test(mqtt_connect_password_without_username),
        cmocka_unit_test(mqtt_connect_rejects_malformed),
        cmocka_unit_test(mqtt_connect_every_truncation_fails),
        cmocka_unit_test(mqtt_publish_v311_qos1),
        cmocka_unit_test(mqtt_publish_flags),
        cmocka_unit_test(mqtt_publish_v5_properties),
        cmocka_unit_test(mqtt_publish_many_user_properties),
        cmocka_unit_test(mqtt_publish_empty_topic_with_alias),
        cmocka_unit_test(mqtt_publish_rejects_malformed),
        cmocka_unit_test(mqtt_ack_forms),
        cmocka_unit_test(mqtt_ack_rejects_malformed),
        cmocka_unit_test(mqtt_subscribe_v311_captured),
        cmocka_unit_test(mqtt_subscribe_v5_options),
        cmocka_unit_test(mqtt_subscribe_filter_wildcards),
        cmocka_unit_test(mqtt_subscribe_shared_filters),
        cmocka_unit_test(mqtt_subscribe_rejects_malformed),
        cmocka_unit_test(mqtt_unsubscribe_decodes_filters),
        cmocka_unit_test(mqtt_unsubscribe_rejects_malformed),
        cmocka_unit_test(mqtt_disconnect_and_auth_forms),
        cmocka_unit_test(mqtt_misc_rejects_malformed),
        cmocka_unit_test(mqtt_errors_have_reason_and_text),
        cmocka_unit_test(mqtt_encode_connack_v311),
        cmocka_unit_test(mqtt_encode_connack_v5_byte_exact),
        cmocka_unit_test(mqtt_encode_connack_all_properties),
        cmocka_unit_test(mqtt_encode_drops_optional_properties),
        cmocka_unit_test(mqtt_encode_reports_needed_length),
        cmocka_unit_test(mqtt_encode_publish_round_trip),
        cmocka_unit_test(mqtt_encode_publish_byte_exact),
        cmocka_unit_test(mqtt_encode_publish_rejects_invalid),
        cmocka_unit_test(mqtt_encode_ack_forms),
        cmocka_unit_test(mqtt_encode_suback_and_unsuback),
        cmocka_unit_test(mqtt_encode_disconnect_and_auth),
        cmocka_unit_test(mqtt_decode_captured_packets),
        cmocka_unit_test(mqtt_connect_matches_capture),
        cmocka_unit_test(mqtt_fuzz_corpus_decodes),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
