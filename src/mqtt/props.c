/* MQTT 5.0 properties: decoding a property list into mqtt_props_t and
 * encoding one back. The table below follows the property table of the
 * MQTT 5.0 spec (section 2.2.2.2): value type and the packets that may
 * carry each property. */
#include <string.h>

#include "core/errors.h"
#include "mqtt/codec.h"
#include "mqtt/codec_internal.h"

enum value_type {
    T_NONE = 0, /* unassigned identifier */
    T_BYTE,
    T_U16,
    T_U32,
    T_VARINT,
    T_STRING,
    T_BINARY,
    T_PAIR,
};

#define K(type) MQTT_KIND(MQTT_##type)
#define WILL MQTT_KIND_WILL
#define ACKS (K(PUBACK) | K(PUBREC) | K(PUBREL) | K(PUBCOMP))
#define ID_LIMIT 0x2b /* one past the highest assigned identifier */

struct prop_info {
    uint8_t type;
    uint16_t kinds; /* MQTT_KIND bits of the packets that may carry it */
};

static const struct prop_info table[ID_LIMIT] = {
    [MQTT_PROP_PAYLOAD_FORMAT] = {T_BYTE, K(PUBLISH) | WILL},
    [MQTT_PROP_MESSAGE_EXPIRY] = {T_U32, K(PUBLISH) | WILL},
    [MQTT_PROP_CONTENT_TYPE] = {T_STRING, K(PUBLISH) | WILL},
    [MQTT_PROP_RESPONSE_TOPIC] = {T_STRING, K(PUBLISH) | WILL},
    [MQTT_PROP_CORRELATION_DATA] = {T_BINARY, K(PUBLISH) | WILL},
    [MQTT_PROP_SUBSCRIPTION_ID] = {T_VARINT, K(PUBLISH) | K(SUBSCRIBE)},
    [MQTT_PROP_SESSION_EXPIRY] = {T_U32,
                                  K(CONNECT) | K(CONNACK) | K(DISCONNECT)},
    [MQTT_PROP_ASSIGNED_CLIENT_ID] = {T_STRING, K(CONNACK)},
    [MQTT_PROP_SERVER_KEEP_ALIVE] = {T_U16, K(CONNACK)},
    [MQTT_PROP_AUTH_METHOD] = {T_STRING, K(CONNECT) | K(CONNACK) | K(AUTH)},
    [MQTT_PROP_AUTH_DATA] = {T_BINARY, K(CONNECT) | K(CONNACK) | K(AUTH)},
    [MQTT_PROP_REQUEST_PROBLEM_INFO] = {T_BYTE, K(CONNECT)},
    [MQTT_PROP_WILL_DELAY] = {T_U32, WILL},
    [MQTT_PROP_REQUEST_RESPONSE_INFO] = {T_BYTE, K(CONNECT)},
    [MQTT_PROP_RESPONSE_INFO] = {T_STRING, K(CONNACK)},
    [MQTT_PROP_SERVER_REFERENCE] = {T_STRING, K(CONNACK) | K(DISCONNECT)},
    [MQTT_PROP_REASON_STRING] = {T_STRING, K(CONNACK) | ACKS | K(SUBACK) |
                                               K(UNSUBACK) | K(DISCONNECT) |
                                               K(AUTH)},
    [MQTT_PROP_RECEIVE_MAXIMUM] = {T_U16, K(CONNECT) | K(CONNACK)},
    [MQTT_PROP_TOPIC_ALIAS_MAXIMUM] = {T_U16, K(CONNECT) | K(CONNACK)},
    [MQTT_PROP_TOPIC_ALIAS] = {T_U16, K(PUBLISH)},
    [MQTT_PROP_MAXIMUM_QOS] = {T_BYTE, K(CONNACK)},
    [MQTT_PROP_RETAIN_AVAILABLE] = {T_BYTE, K(CONNACK)},
    [MQTT_PROP_USER_PROPERTY] = {T_PAIR, 0xffff},
    [MQTT_PROP_MAXIMUM_PACKET_SIZE] = {T_U32, K(CONNECT) | K(CONNACK)},
    [MQTT_PROP_WILDCARD_SUB_AVAILABLE] = {T_BYTE, K(CONNACK)},
    [MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE] = {T_BYTE, K(CONNACK)},
    [MQTT_PROP_SHARED_SUB_AVAILABLE] = {T_BYTE, K(CONNACK)},
};

/* One property value of any type. */
struct value {
    uint32_t number;
    mqtt_bytes_t bytes;
};

/* Returns a pointer to the string or binary field of property `id`. */
static mqtt_bytes_t *bytes_field(mqtt_props_t *p, int id)
{
    switch (id) {
    case MQTT_PROP_CONTENT_TYPE:
        return &p->content_type;
    case MQTT_PROP_RESPONSE_TOPIC:
        return &p->response_topic;
    case MQTT_PROP_CORRELATION_DATA:
        return &p->correlation_data;
    case MQTT_PROP_ASSIGNED_CLIENT_ID:
        return &p->assigned_client_id;
    case MQTT_PROP_AUTH_METHOD:
        return &p->auth_method;
    case MQTT_PROP_AUTH_DATA:
        return &p->auth_data;
    case MQTT_PROP_RESPONSE_INFO:
        return &p->response_info;
    case MQTT_PROP_SERVER_REFERENCE:
        return &p->server_reference;
    case MQTT_PROP_REASON_STRING:
        return &p->reason_string;
    }
    return NULL;
}

static const mqtt_bytes_t *get_bytes(const mqtt_props_t *p, int id)
{
    return bytes_field((mqtt_props_t *)p, id);
}

/* Returns the numeric field of property `id` widened to 32 bits. */
static uint32_t get_number(const mqtt_props_t *p, int id)
{
    switch (id) {
    case MQTT_PROP_PAYLOAD_FORMAT:
        return p->payload_format;
    case MQTT_PROP_MESSAGE_EXPIRY:
        return p->message_expiry;
    case MQTT_PROP_SUBSCRIPTION_ID:
        return p->subscription_id;
    case MQTT_PROP_SESSION_EXPIRY:
        return p->session_expiry;
    case MQTT_PROP_SERVER_KEEP_ALIVE:
        return p->server_keep_alive;
    case MQTT_PROP_REQUEST_PROBLEM_INFO:
        return p->request_problem_info;
    case MQTT_PROP_WILL_DELAY:
        return p->will_delay;
    case MQTT_PROP_REQUEST_RESPONSE_INFO:
        return p->request_response_info;
    case MQTT_PROP_RECEIVE_MAXIMUM:
        return p->receive_maximum;
    case MQTT_PROP_TOPIC_ALIAS_MAXIMUM:
        return p->topic_alias_maximum;
    case MQTT_PROP_TOPIC_ALIAS:
        return p->topic_alias;
    case MQTT_PROP_MAXIMUM_QOS:
        return p->maximum_qos;
    case MQTT_PROP_RETAIN_AVAILABLE:
        return p->retain_available;
    case MQTT_PROP_MAXIMUM_PACKET_SIZE:
        return p->maximum_packet_size;
    case MQTT_PROP_WILDCARD_SUB_AVAILABLE:
        return p->wildcard_sub_available;
    case MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE:
        return p->subscription_id_available;
    case MQTT_PROP_SHARED_SUB_AVAILABLE:
        return p->shared_sub_available;
    }
    return 0;
}

/* Stores a decoded number. The table's type bounds it, so the casts keep
 * every bit. */
static void set_number(mqtt_props_t *p, int id, uint32_t n)
{
    switch (id) {
    case MQTT_PROP_PAYLOAD_FORMAT:
        p->payload_format = (uint8_t)n;
        break;
    case MQTT_PROP_MESSAGE_EXPIRY:
        p->message_expiry = n;
        break;
    case MQTT_PROP_SUBSCRIPTION_ID:
        p->subscription_id = n;
        break;
    case MQTT_PROP_SESSION_EXPIRY:
        p->session_expiry = n;
        break;
    case MQTT_PROP_REQUEST_PROBLEM_INFO:
        p->request_problem_info = (uint8_t)n;
        break;
    case MQTT_PROP_WILL_DELAY:
        p->will_delay = n;
        break;
    case MQTT_PROP_REQUEST_RESPONSE_INFO:
        p->request_response_info = (uint8_t)n;
        break;
    case MQTT_PROP_RECEIVE_MAXIMUM:
        p->receive_maximum = (uint16_t)n;
        break;
    case MQTT_PROP_TOPIC_ALIAS_MAXIMUM:
        p->topic_alias_maximum = (uint16_t)n;
        break;
    case MQTT_PROP_TOPIC_ALIAS:
        p->topic_alias = (uint16_t)n;
        break;
    case MQTT_PROP_MAXIMUM_PACKET_SIZE:
        p->maximum_packet_size = n;
        break;
    case MQTT_PROP_SERVER_KEEP_ALIVE:
        p->server_keep_alive = (uint16_t)n;
        break;
    case MQTT_PROP_MAXIMUM_QOS:
        p->maximum_qos = (uint8_t)n;
        break;
    case MQTT_PROP_RETAIN_AVAILABLE:
        p->retain_available = (uint8_t)n;
        break;
    case MQTT_PROP_WILDCARD_SUB_AVAILABLE:
        p->wildcard_sub_available = (uint8_t)n;
        break;
    case MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE:
        p->subscription_id_available = (uint8_t)n;
        break;
    case MQTT_PROP_SHARED_SUB_AVAILABLE:
        p->shared_sub_available = (uint8_t)n;
        break;
    }
}

static int read_value(mqtt_reader_t *r, int type, struct value *v)
{
    uint8_t u8;
    uint16_t u16;
    int rc = 0;

    switch (type) {
    case T_BYTE:
        rc = mqtt_read_u8(r, &u8);
        v->number = u8;
        break;
    case T_U16:
        rc = mqtt_read_u16(r, &u16);
        v->number = u16;
        break;
    case T_U32:
        rc = mqtt_read_u32(r, &v->number);
        break;
    case T_VARINT:
        rc = mqtt_read_varint(r, &v->number);
        break;
    case T_STRING:
        rc = mqtt_read_string(r, &v->bytes);
        break;
    case T_BINARY:
        rc = mqtt_read_binary(r, &v->bytes);
        break;
    }
    return rc;
}

/* Applies the value rules of the spec that go beyond the data type. Every
 * byte property is a flag or a QoS limit that only takes 0 or 1. */
static int check_value(int id, const struct value *v)
{
    if (table[id].type == T_BYTE && v->number > 1)
        return MQTT_E_PROPERTY_VALUE;
    switch (id) {
    case MQTT_PROP_RECEIVE_MAXIMUM:
        return v->number == 0 ? MQTT_E_RECEIVE_MAXIMUM_ZERO : 0;
    case MQTT_PROP_MAXIMUM_PACKET_SIZE:
        return v->number == 0 ? MQTT_E_MAXIMUM_PACKET_SIZE_ZERO : 0;
    case MQTT_PROP_TOPIC_ALIAS:
        return v->number == 0 ? MQTT_E_TOPIC_ALIAS_ZERO : 0;
    case MQTT_PROP_SUBSCRIPTION_ID:
        return v->number == 0 ? MQTT_E_SUBSCRIPTION_ID_ZERO : 0;
    case MQTT_PROP_RESPONSE_TOPIC:
        if (v->bytes.len == 0 || mqtt_has_wildcard(&v->bytes))
            return MQTT_E_RESPONSE_TOPIC;
        return 0;
    }
    return 0;
}

static int decode_user_property(mqtt_reader_t *r, mqtt_props_t *p)
{
    mqtt_user_property_t pair;
    int rc;

    rc = mqtt_read_string(r, &pair.name);
    if (rc == 0)
        rc = mqtt_read_string(r, &pair.value);
    if (rc != 0)
        return rc;
    if (p->user_property_count < MQTT_MAX_USER_PROPERTIES)
        p->user_properties[p->user_property_count++] = pair;
    p->user_property_total++;
    return 0;
}

static int decode_property(mqtt_reader_t *r, unsigned kind, mqtt_props_t *p)
{
    struct value v = {0};
    uint32_t id;
    int rc;

    rc = mqtt_read_varint(r, &id);
    if (rc != 0)
        return rc;
    if (id >= ID_LIMIT || table[id].type == T_NONE)
        return MQTT_E_PROPERTY_UNKNOWN;
    if ((table[id].kinds & kind) == 0)
        return MQTT_E_PROPERTY_NOT_ALLOWED;
    if (id == MQTT_PROP_USER_PROPERTY)
        return decode_user_property(r, p);
    if (mqtt_props_has(p, (int)id))
        return MQTT_E_PROPERTY_DUPLICATE;
    /* Only a server sends Subscription Identifiers in PUBLISH. */
    if (id == MQTT_PROP_SUBSCRIPTION_ID && kind == K(PUBLISH))
        return MQTT_E_SUBSCRIPTION_ID_FROM_CLIENT;
    rc = read_value(r, table[id].type, &v);
    if (rc == 0)
        rc = check_value((int)id, &v);
    if (rc != 0)
        return rc;
    if (table[id].type == T_STRING || table[id].type == T_BINARY)
        *bytes_field(p, (int)id) = v.bytes;
    else
        set_number(p, (int)id, v.number);
    mqtt_props_set(p, (int)id);
    return 0;
}

int mqtt_props_decode(mqtt_reader_t *r, unsigned kind, mqtt_props_t *out)
{
    mqtt_reader_t list;
    uint32_t len;
    int rc;

    memset(out, 0, sizeof(*out));
    rc = mqtt_read_varint(r, &len);
    if (rc != 0)
        return rc;
    if (len > mqtt_reader_left(r))
        return MQTT_E_PROPERTY_LENGTH;
    list.data = r->data + r->pos;
    list.len = len;
    list.pos = 0;
    r->pos += len;

    while (mqtt_reader_left(&list) > 0) {
        rc = decode_property(&list, kind, out);
        if (rc == MQTT_E_TRUNCATED)
            return MQTT_E_PROPERTY_LENGTH;
        if (rc != 0)
            return rc;
    }
    if (mqtt_props_has(out, MQTT_PROP_AUTH_DATA) &&
        !mqtt_props_has(out, MQTT_PROP_AUTH_METHOD))
        return MQTT_E_AUTH_DATA_WITHOUT_METHOD;
    return 0;
}

/* Applies the decoder's value rules to a number the server is about to
 * send, plus the variable byte integer range. */
static int check_number(int id, uint32_t n)
{
    struct value v = {.number = n};

    if (table[id].type == T_VARINT && n > MQTT_VARINT_MAX)
        return ING_EINVAL;
    return check_value(id, &v);
}

int mqtt_props_validate(const mqtt_props_t *props, unsigned kind)
{
    /* Bit 0 and bits past the table name no property. */
    if ((props->present & 1u) != 0 || (props->present >> ID_LIMIT) != 0)
        return ING_EINVAL;
    for (int id = 1; id < ID_LIMIT; id++) {
        if (id == MQTT_PROP_USER_PROPERTY || !mqtt_props_has(props, id))
            continue;
        if (table[id].type == T_NONE || (table[id].kinds & kind) == 0)
            return ING_EINVAL;
        if (table[id].type == T_STRING || table[id].type == T_BINARY) {
            if (get_bytes(props, id)->len > UINT16_MAX)
                return ING_EINVAL;
        } else if (check_number(id, get_number(props, id)) != 0) {
            return ING_EINVAL;
        }
    }
    if (props->user_property_count > MQTT_MAX_USER_PROPERTIES)
        return ING_EINVAL;
    for (size_t i = 0; i < props->user_property_count; i++) {
        if (props->user_properties[i].name.len > UINT16_MAX ||
            props->user_properties[i].value.len > UINT16_MAX)
            return ING_EINVAL;
    }
    return 0;
}

static bool dropped(int id, unsigned drop)
{
    return id == MQTT_PROP_REASON_STRING && (drop & MQTT_DROP_REASON_STRING);
}

size_t mqtt_props_size(const mqtt_props_t *props, unsigned drop)
{
    size_t size = 0;

    for (int id = 1; id < ID_LIMIT; id++) {
        if (id == MQTT_PROP_USER_PROPERTY || !mqtt_props_has(props, id) ||
            dropped(id, drop))
            continue;
        size += 1; /* every assigned identifier fits in one byte */
        switch (table[id].type) {
        case T_BYTE:
            size += 1;
            break;
        case T_U16:
            size += 2;
            break;
        case T_U32:
            size += 4;
            break;
        case T_VARINT:
            size += mqtt_varint_size(get_number(props, id));
            break;
        case T_STRING:
        case T_BINARY:
            size += 2 + get_bytes(props, id)->len;
            break;
        }
    }
    if ((drop & MQTT_DROP_USER_PROPERTIES) == 0) {
        for (size_t i = 0; i < props->user_property_count; i++) {
            size += 5 + props->user_properties[i].name.len +
                    props->user_properties[i].value.len;
        }
    }
    return size;
}

uint8_t *mqtt_props_write(uint8_t *out, const mqtt_props_t *props,
                          unsigned drop)
{
    for (int id = 1; id < ID_LIMIT; id++) {
        uint32_t n;

        if (id == MQTT_PROP_USER_PROPERTY || !mqtt_props_has(props, id) ||
            dropped(id, drop))
            continue;
        *out++ = (uint8_t)id;
        n = get_number(props, id);
        switch (table[id].type) {
        case T_BYTE:
            *out++ = (uint8_t)n;
            break;
        case T_U16:
            out = mqtt_write_u16(out, (uint16_t)n);
            break;
        case T_U32:
            out = mqtt_write_u32(out, n);
            break;
        case T_VARINT:
            out = mqtt_write_varint(out, n);
            break;
        case T_STRING:
        case T_BINARY:
            out = mqtt_write_binary(out, get_bytes(props, id));
            break;
        }
    }
    if ((drop & MQTT_DROP_USER_PROPERTIES) == 0) {
        for (size_t i = 0; i < props->user_property_count; i++) {
            *out++ = MQTT_PROP_USER_PROPERTY;
            out = mqtt_write_binary(out, &props->user_properties[i].name);
            out = mqtt_write_binary(out, &props->user_properties[i].value);
        }
    }
    return out;
}
