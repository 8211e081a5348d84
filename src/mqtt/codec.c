/* Framing and decoding of the packets an MQTT server receives. Section
 * numbers in comments refer to the MQTT 5.0 OASIS standard. MQTT 3.1.1 has
 * the same layout without reason codes and properties. */
#include <string.h>

#include "core/errors.h"
#include "mqtt/codec.h"
#include "mqtt/codec_internal.h"

/* Reason codes a client may send, per packet (section 3.4.2.1 and on). */
static const uint8_t puback_codes[] = {0x00, 0x10, 0x80, 0x83, 0x87,
                                       0x90, 0x91, 0x97, 0x99};
static const uint8_t pubrel_codes[] = {0x00, 0x92};
static const uint8_t disconnect_codes[] = {0x00, 0x04, 0x80, 0x81, 0x82,
                                           0x83, 0x90, 0x93, 0x94, 0x95,
                                           0x96, 0x97, 0x98, 0x99};
static const uint8_t auth_codes[] = {0x00, 0x18, 0x19};

static bool code_in(uint8_t code, const uint8_t *list, size_t n)
{
    return memchr(list, code, n) != NULL;
}

int mqtt_frame(const uint8_t *buf, size_t len, size_t max_packet,
               mqtt_frame_t *out)
{
    size_t remaining = 0;
    size_t header_len = 0;

    if (len < 1)
        return MQTT_NEED_MORE;
    if ((buf[0] >> 4) == 0)
        return MQTT_E_PACKET_TYPE_RESERVED;

    /* The remaining length is a variable byte integer of at most 4 bytes
     * (section 1.5.5). A fourth byte with its continuation bit set is an
     * error even before a fifth byte arrives. */
    for (size_t i = 0; i < 4; i++) {
        if (len < i + 2)
            return MQTT_NEED_MORE;
        remaining |= (size_t)(buf[i + 1] & 0x7f) << (7 * i);
        if ((buf[i + 1] & 0x80) == 0) {
            header_len = i + 2;
            break;
        }
    }
    if (header_len == 0)
        return MQTT_E_REMAINING_LENGTH;
    if (max_packet > 0 && header_len + remaining > max_packet)
        return MQTT_E_PACKET_TOO_LARGE;
    if (len - header_len < remaining)
        return MQTT_NEED_MORE;

    out->type = buf[0] >> 4;
    out->flags = buf[0] & 0x0f;
    out->header_len = header_len;
    out->body_len = remaining;
    out->body = buf + header_len;
    return (int)(header_len + remaining);
}

static void reader_init(mqtt_reader_t *r, const mqtt_frame_t *frame)
{
    r->data = frame->body;
    r->len = frame->body_len;
    r->pos = 0;
}

static bool version_valid(int version)
{
    return version == MQTT_V311 || version == MQTT_V5;
}

/* Reads the CONNECT flags byte and checks the rules between its bits
 * (section 3.1.2.3). Returns the user name and password flags through
 * `username` and `password`. */
static int read_connect_flags(mqtt_reader_t *r, mqtt_connect_t *out,
                              bool *username, bool *password)
{
    uint8_t flags;

    if (mqtt_read_u8(r, &flags) != 0)
        return MQTT_E_TRUNCATED;
    if (flags & 0x01)
        return MQTT_E_CONNECT_RESERVED;
    out->clean_start = flags & 0x02;
    out->will = flags & 0x04;
    out->will_qos = (flags >> 3) & 0x03;
    out->will_retain = flags & 0x20;
    *password = flags & 0x40;
    *username = flags & 0x80;
    if (!out->will && (out->will_qos != 0 || out->will_retain))
        return MQTT_E_WILL_FLAGS;
    if (out->will_qos == 3)
        return MQTT_E_WILL_QOS;
    if (out->version == MQTT_V311 && *password && !*username)
        return MQTT_E_PASSWORD_WITHOUT_USERNAME;
    return 0;
}

/* Reads the protocol name and level. Only "MQTT" with level 4 or 5 is
 * accepted. The MQTT 3.1 name "MQIsdp" gives an unsupported level, so the
 * server can send CONNACK 0x01 as 3.1.1 requires. */
static int read_protocol(mqtt_reader_t *r, mqtt_connect_t *out)
{
    mqtt_bytes_t name;
    uint8_t level;
    bool mqtt;

    if (mqtt_read_binary(r, &name) != 0 || mqtt_read_u8(r, &level) != 0)
        return MQTT_E_TRUNCATED;
    mqtt = name.len == 4 && memcmp(name.data, "MQTT", 4) == 0;
    if (!mqtt && !(name.len == 6 && memcmp(name.data, "MQIsdp", 6) == 0))
        return MQTT_E_PROTOCOL_NAME;
    out->version = level;
    if (!mqtt || (level != MQTT_V311 && level != MQTT_V5))
        return MQTT_E_PROTOCOL_LEVEL;
    return 0;
}

static int read_will(mqtt_reader_t *r, mqtt_connect_t *out)
{
    int rc;

    if (out->version == MQTT_V5) {
        rc = mqtt_props_decode(r, MQTT_KIND_WILL, &out->will_props);
        if (rc != 0)
            return rc;
    }
    rc = mqtt_read_string(r, &out->will_topic);
    if (rc != 0)
        return rc;
    if (out->will_topic.len == 0 || mqtt_has_wildcard(&out->will_topic))
        return MQTT_E_WILL_TOPIC;
    return mqtt_read_binary(r, &out->will_payload);
}

int mqtt_decode_connect(const mqtt_frame_t *frame, mqtt_connect_t *out)
{
    mqtt_reader_t r;
    bool username;
    bool password;
    int rc;

    memset(out, 0, sizeof(*out));
    if (frame->type != MQTT_CONNECT || frame->flags != 0)
        return MQTT_E_HEADER_FLAGS;
    reader_init(&r, frame);
    rc = read_protocol(&r, out);
    if (rc != 0)
        return rc;
    rc = read_connect_flags(&r, out, &username, &password);
    if (rc != 0)
        return rc;
    if (mqtt_read_u16(&r, &out->keep_alive) != 0)
        return MQTT_E_TRUNCATED;
    if (out->version == MQTT_V5) {
        rc = mqtt_props_decode(&r, MQTT_KIND(MQTT_CONNECT), &out->props);
        if (rc != 0)
            return rc;
    }
    /* Defaults from section 3.1.2.11 for properties that were left out. */
    if (!mqtt_props_has(&out->props, MQTT_PROP_RECEIVE_MAXIMUM))
        out->props.receive_maximum = UINT16_MAX;
    if (!mqtt_props_has(&out->props, MQTT_PROP_REQUEST_PROBLEM_INFO))
        out->props.request_problem_info = 1;

    rc = mqtt_read_string(&r, &out->client_id);
    if (rc != 0)
        return rc;
    /* MQTT 3.1.1 requires CONNACK 0x02 here (MQTT-3.1.3-8). MQTT 5.0 lets
     * the server assign an identifier instead. */
    if (out->client_id.len == 0 && !out->clean_start &&
        out->version == MQTT_V311)
        return MQTT_E_CLIENT_ID_EMPTY;
    if (out->will) {
        rc = read_will(&r, out);
        if (rc != 0)
            return rc;
    }
    if (username) {
        rc = mqtt_read_string(&r, &out->username);
        if (rc != 0)
            return rc;
    }
    if (password) {
        rc = mqtt_read_binary(&r, &out->password);
        if (rc != 0)
            return rc;
    }
    return mqtt_reader_left(&r) == 0 ? 0 : MQTT_E_TRAILING_BYTES;
}

int mqtt_decode_publish(const mqtt_frame_t *frame, int version,
                        mqtt_publish_t *out)
{
    mqtt_reader_t r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!version_valid(version))
        return ING_EINVAL;
    if (frame->type != MQTT_PUBLISH)
        return MQTT_E_HEADER_FLAGS;
    out->dup = frame->flags & 0x08;
    out->qos = (frame->flags >> 1) & 0x03;
    out->retain = frame->flags & 0x01;
    if (out->qos == 3)
        return MQTT_E_PUBLISH_QOS;
    if (out->dup && out->qos == 0)
        return MQTT_E_PUBLISH_DUP;

    reader_init(&r, frame);
    rc = mqtt_read_string(&r, &out->topic);
    if (rc != 0)
        return rc;
    if (mqtt_has_wildcard(&out->topic))
        return MQTT_E_TOPIC_WILDCARD;
    if (out->qos > 0) {
        if (mqtt_read_u16(&r, &out->packet_id) != 0)
            return MQTT_E_TRUNCATED;
        if (out->packet_id == 0)
            return MQTT_E_PACKET_ID_ZERO;
    }
    if (version == MQTT_V5) {
        rc = mqtt_props_decode(&r, MQTT_KIND(MQTT_PUBLISH), &out->props);
        if (rc != 0)
            return rc;
    }
    if (out->topic.len == 0 &&
        !mqtt_props_has(&out->props, MQTT_PROP_TOPIC_ALIAS))
        return MQTT_E_TOPIC_EMPTY;
    out->payload.data = r.data + r.pos;
    out->payload.len = mqtt_reader_left(&r);
    return 0;
}

/* Reads the optional reason code and properties that close a 5.0 PUBACK,
 * PUBREC, PUBREL, PUBCOMP, DISCONNECT or AUTH. A shorter packet means
 * reason code 0x00 and no properties (section 3.4.2.1). */
static int read_reason_tail(mqtt_reader_t *r, uint8_t type,
                            uint8_t *reason_code, mqtt_props_t *props)
{
    int rc;

    memset(props, 0, sizeof(*props));
    *reason_code = 0;
    if (mqtt_reader_left(r) == 0)
        return 0;
    (void)mqtt_read_u8(r, reason_code);
    if (mqtt_reader_left(r) == 0)
        return 0;
    rc = mqtt_props_decode(r, MQTT_KIND(type), props);
    if (rc != 0)
        return rc;
    return mqtt_reader_left(r) == 0 ? 0 : MQTT_E_TRAILING_BYTES;
}

int mqtt_decode_ack(const mqtt_frame_t *frame, int version, mqtt_ack_t *out)
{
    mqtt_reader_t r;
    uint8_t flags;
    bool pubrel_family;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!version_valid(version))
        return ING_EINVAL;
    if (frame->type < MQTT_PUBACK || frame->type > MQTT_PUBCOMP)
        return MQTT_E_HEADER_FLAGS;
    out->type = frame->type;
    flags = frame->type == MQTT_PUBREL ? 0x02 : 0x00;
    if (frame->flags != flags)
        return MQTT_E_HEADER_FLAGS;

    reader_init(&r, frame);
    if (mqtt_read_u16(&r, &out->packet_id) != 0)
        return MQTT_E_TRUNCATED;
    if (out->packet_id == 0)
        return MQTT_E_PACKET_ID_ZERO;
    if (version == MQTT_V311)
        return mqtt_reader_left(&r) == 0 ? 0 : MQTT_E_TRAILING_BYTES;
    rc = read_reason_tail(&r, frame->type, &out->reason_code, &out->props);
    if (rc != 0)
        return rc;
    pubrel_family = frame->type == MQTT_PUBREL || frame->type == MQTT_PUBCOMP;
    if (pubrel_family
            ? !code_in(out->reason_code, pubrel_codes, sizeof(pubrel_codes))
            : !code_in(out->reason_code, puback_codes, sizeof(puback_codes)))
        return MQTT_E_REASON_CODE;
    return 0;
}

/* Checks the wildcard rules of section 4.7.1: '#' is a whole level and the
 * last one, '+' is a whole level. */
static int check_filter_wildcards(const uint8_t *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        bool level_start = i == 0 || s[i - 1] == '/';
        bool level_end = i + 1 == len || s[i + 1] == '/';

        if (s[i] == '#' && (!level_start || i + 1 != len))
            return MQTT_E_FILTER_WILDCARD;
        if (s[i] == '+' && (!level_start || !level_end))
            return MQTT_E_FILTER_WILDCARD;
    }
    return 0;
}

/* Validates a topic filter. In 5.0, "$share/{name}/{filter}" is a shared
 * subscription whose name is non-empty without '+' or '#' and whose filter
 * is non-empty (section 4.8.2). Sets `shared` for the caller. */
static int check_filter(const mqtt_bytes_t *filter, int version, bool *shared)
{
    static const char prefix[] = "$share/";
    const size_t prefix_len = sizeof(prefix) - 1;
    const uint8_t *name;
    const uint8_t *slash;
    size_t rest;
    int rc;

    *shared = false;
    if (filter->len == 0)
        return MQTT_E_FILTER_EMPTY;
    rc = check_filter_wildcards(filter->data, filter->len);
    if (rc != 0 || version != MQTT_V5 || filter->len < prefix_len ||
        memcmp(filter->data, prefix, prefix_len) != 0)
        return rc;

    *shared = true;
    name = filter->data + prefix_len;
    rest = filter->len - prefix_len;
    slash = memchr(name, '/', rest);
    if (slash == NULL || slash == name)
        return MQTT_E_SHARED_FILTER;
    if (memchr(name, '+', (size_t)(slash - name)) != NULL ||
        memchr(name, '#', (size_t)(slash - name)) != NULL)
        return MQTT_E_SHARED_FILTER;
    if ((size_t)(slash - name) + 1 == rest)
        return MQTT_E_SHARED_FILTER;
    return 0;
}

/* Checks one subscription options byte (section 3.8.3.1). MQTT 3.1.1 only
 * has the QoS bits. */
static int check_options(uint8_t options, int version, bool shared)
{
    uint8_t reserved = version == MQTT_V5 ? 0xc0 : 0xfc;

    if (options & reserved)
        return MQTT_E_SUBSCRIBE_RESERVED;
    if ((options & 0x03) == 3)
        return MQTT_E_SUBSCRIBE_QOS;
    if (((options >> 4) & 0x03) == 3)
        return MQTT_E_RETAIN_HANDLING;
    if (shared && (options & 0x04))
        return MQTT_E_SHARED_NO_LOCAL;
    return 0;
}

/* Reads the common head of SUBSCRIBE and UNSUBSCRIBE: packet id and, in
 * 5.0, properties. The rest of the body is the list. */
static int read_sub_head(const mqtt_frame_t *frame, int version,
                         mqtt_reader_t *r, mqtt_subscribe_t *out)
{
    int rc;

    memset(out, 0, sizeof(*out));
    if (!version_valid(version))
        return ING_EINVAL;
    if (frame->flags != 0x02)
        return MQTT_E_HEADER_FLAGS;
    reader_init(r, frame);
    if (mqtt_read_u16(r, &out->packet_id) != 0)
        return MQTT_E_TRUNCATED;
    if (out->packet_id == 0)
        return MQTT_E_PACKET_ID_ZERO;
    if (version == MQTT_V5) {
        rc = mqtt_props_decode(r, MQTT_KIND(frame->type), &out->props);
        if (rc != 0)
            return rc;
    }
    out->list = r->data + r->pos;
    out->list_len = mqtt_reader_left(r);
    return 0;
}

int mqtt_decode_subscribe(const mqtt_frame_t *frame, int version,
                          mqtt_subscribe_t *out)
{
    mqtt_reader_t r;
    int rc;

    if (frame->type != MQTT_SUBSCRIBE)
        return MQTT_E_HEADER_FLAGS;
    rc = read_sub_head(frame, version, &r, out);
    if (rc != 0)
        return rc;
    while (mqtt_reader_left(&r) > 0) {
        mqtt_bytes_t filter;
        uint8_t options;
        bool shared;

        rc = mqtt_read_string(&r, &filter);
        if (rc != 0)
            return rc;
        if (mqtt_read_u8(&r, &options) != 0)
            return MQTT_E_TRUNCATED;
        rc = check_filter(&filter, version, &shared);
        if (rc == 0)
            rc = check_options(options, version, shared);
        if (rc != 0)
            return rc;
        out->count++;
    }
    return out->count > 0 ? 0 : MQTT_E_SUBSCRIBE_EMPTY;
}

int mqtt_decode_unsubscribe(const mqtt_frame_t *frame, int version,
                            mqtt_subscribe_t *out)
{
    mqtt_reader_t r;
    int rc;

    if (frame->type != MQTT_UNSUBSCRIBE)
        return MQTT_E_HEADER_FLAGS;
    rc = read_sub_head(frame, version, &r, out);
    if (rc != 0)
        return rc;
    while (mqtt_reader_left(&r) > 0) {
        mqtt_bytes_t filter;
        bool shared;

        rc = mqtt_read_string(&r, &filter);
        if (rc == 0)
            rc = check_filter(&filter, version, &shared);
        if (rc != 0)
            return rc;
        out->count++;
    }
    return out->count > 0 ? 0 : MQTT_E_UNSUBSCRIBE_EMPTY;
}

bool mqtt_subscribe_next(const mqtt_subscribe_t *sub, size_t *offset,
                         mqtt_subscription_t *out)
{
    mqtt_reader_t r = {sub->list, sub->list_len, *offset};
    uint8_t options;

    memset(out, 0, sizeof(*out));
    if (mqtt_read_binary(&r, &out->filter) != 0 ||
        mqtt_read_u8(&r, &options) != 0)
        return false;
    out->qos = options & 0x03;
    out->no_local = options & 0x04;
    out->retain_as_published = options & 0x08;
    out->retain_handling = (options >> 4) & 0x03;
    *offset = r.pos;
    return true;
}

bool mqtt_unsubscribe_next(const mqtt_subscribe_t *unsub, size_t *offset,
                           mqtt_bytes_t *filter)
{
    mqtt_reader_t r = {unsub->list, unsub->list_len, *offset};

    if (mqtt_read_binary(&r, filter) != 0)
        return false;
    *offset = r.pos;
    return true;
}

int mqtt_decode_disconnect(const mqtt_frame_t *frame, int version,
                           mqtt_disconnect_t *out)
{
    mqtt_reader_t r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!version_valid(version))
        return ING_EINVAL;
    if (frame->type != MQTT_DISCONNECT || frame->flags != 0)
        return MQTT_E_HEADER_FLAGS;
    if (version == MQTT_V311)
        return frame->body_len == 0 ? 0 : MQTT_E_TRAILING_BYTES;
    reader_init(&r, frame);
    rc = read_reason_tail(&r, MQTT_DISCONNECT, &out->reason_code,
                          &out->props);
    if (rc != 0)
        return rc;
    if (!code_in(out->reason_code, disconnect_codes,
                 sizeof(disconnect_codes)))
        return MQTT_E_REASON_CODE;
    return 0;
}

int mqtt_decode_auth(const mqtt_frame_t *frame, int version,
                     mqtt_auth_t *out)
{
    mqtt_reader_t r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!version_valid(version))
        return ING_EINVAL;
    if (version == MQTT_V311)
        return MQTT_E_AUTH_IN_V311;
    if (frame->type != MQTT_AUTH || frame->flags != 0)
        return MQTT_E_HEADER_FLAGS;
    reader_init(&r, frame);
    rc = read_reason_tail(&r, MQTT_AUTH, &out->reason_code, &out->props);
    if (rc != 0)
        return rc;
    if (!code_in(out->reason_code, auth_codes, sizeof(auth_codes)))
        return MQTT_E_REASON_CODE;
    return 0;
}

int mqtt_decode(const mqtt_frame_t *frame, int version, mqtt_packet_t *out)
{
    out->type = frame->type;
    if (frame->type != MQTT_CONNECT && !version_valid(version))
        return ING_EINVAL;
    switch (frame->type) {
    case MQTT_CONNECT:
        return mqtt_decode_connect(frame, &out->u.connect);
    case MQTT_PUBLISH:
        return mqtt_decode_publish(frame, version, &out->u.publish);
    case MQTT_PUBACK:
    case MQTT_PUBREC:
    case MQTT_PUBREL:
    case MQTT_PUBCOMP:
        return mqtt_decode_ack(frame, version, &out->u.ack);
    case MQTT_SUBSCRIBE:
        return mqtt_decode_subscribe(frame, version, &out->u.subscribe);
    case MQTT_UNSUBSCRIBE:
        return mqtt_decode_unsubscribe(frame, version, &out->u.subscribe);
    case MQTT_PINGREQ:
        if (frame->flags != 0)
            return MQTT_E_HEADER_FLAGS;
        return frame->body_len == 0 ? 0 : MQTT_E_TRAILING_BYTES;
    case MQTT_DISCONNECT:
        return mqtt_decode_disconnect(frame, version, &out->u.disconnect);
    case MQTT_AUTH:
        return mqtt_decode_auth(frame, version, &out->u.auth);
    case MQTT_CONNACK:
    case MQTT_SUBACK:
    case MQTT_UNSUBACK:
    case MQTT_PINGRESP:
        return MQTT_E_SERVER_PACKET;
    }
    return MQTT_E_PACKET_TYPE_RESERVED;
}
