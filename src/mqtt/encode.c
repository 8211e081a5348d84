/* Encoding of the packets an MQTT server sends. Every encoder measures the
 * packet first, then writes it in one pass, so nothing is written when it
 * does not fit. */
#include <string.h>

#include "core/errors.h"
#include "mqtt/codec.h"
#include "mqtt/codec_internal.h"

/* Reason codes a server may send, per packet (MQTT 5.0 sections 3.2.2.2,
 * 3.4.2.1, 3.6.2.1, 3.9.3, 3.11.3, 3.14.2.1 and 3.15.2.1). */
static const uint8_t connack_codes[] = {
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8a, 0x8c, 0x90, 0x95, 0x97, 0x99, 0x9a, 0x9b, 0x9c, 0x9d, 0x9f};
static const uint8_t puback_codes[] = {0x00, 0x10, 0x80, 0x83, 0x87,
                                       0x90, 0x91, 0x97, 0x99};
static const uint8_t pubrel_codes[] = {0x00, 0x92};
static const uint8_t suback_codes[] = {0x00, 0x01, 0x02, 0x80, 0x83, 0x87,
                                       0x8f, 0x91, 0x97, 0x9e, 0xa1, 0xa2};
static const uint8_t suback_v311_codes[] = {0x00, 0x01, 0x02, 0x80};
static const uint8_t unsuback_codes[] = {0x00, 0x11, 0x80, 0x83,
                                         0x87, 0x8f, 0x91};
static const uint8_t disconnect_codes[] = {
    0x00, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8b, 0x8d, 0x8e,
    0x8f, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a,
    0x9b, 0x9c, 0x9d, 0x9e, 0x9f, 0xa0, 0xa1, 0xa2};
static const uint8_t auth_codes[] = {0x00, 0x18, 0x19};

/* The parts of a packet as measured before writing. */
struct layout {
    uint8_t first_byte;
    size_t fixed_len;      /* variable header bytes before the properties */
    bool has_props;        /* whether the packet type carries properties */
    bool omit_empty_props; /* an empty list may go with its length byte */
    bool has_code;         /* a reason code follows the fixed part */
    bool omit_code;        /* the code may go when no property is sent */
    unsigned drop;         /* MQTT_DROP_* flags in effect */
    size_t props_len;      /* property list length without its prefix */
    size_t tail_len;       /* payload or reason code list after properties */
    bool write_props;      /* outputs of measure(): what gets written */
    bool write_code;
    size_t body_len;       /* remaining length */
    size_t total_len;      /* the whole packet */
};

static bool code_in(uint8_t code, const uint8_t *list, size_t n)
{
    return memchr(list, code, n) != NULL;
}

static bool codes_in(const uint8_t *codes, size_t count, const uint8_t *list,
                     size_t n)
{
    for (size_t i = 0; i < count; i++) {
        if (!code_in(codes[i], list, n))
            return false;
    }
    return true;
}

/* Fills the lengths of `l` for the drop flags in l->drop. Returns false
 * when the body exceeds what a remaining length can express. */
static bool measure(struct layout *l, const mqtt_props_t *props)
{
    /* Bounding the parts first keeps the sums below from wrapping. */
    if (l->fixed_len > MQTT_VARINT_MAX || l->tail_len > MQTT_VARINT_MAX)
        return false;
    l->props_len = l->has_props ? mqtt_props_size(props, l->drop) : 0;
    l->write_props =
        l->has_props && !(l->props_len == 0 && l->omit_empty_props);
    l->write_code = l->has_code && !(l->omit_code && !l->write_props);
    l->body_len = l->fixed_len + (l->write_code ? 1 : 0) + l->tail_len;
    if (l->write_props)
        l->body_len += mqtt_varint_size((uint32_t)l->props_len) + l->props_len;
    if (l->props_len > MQTT_VARINT_MAX || l->body_len > MQTT_VARINT_MAX)
        return false;
    l->total_len = 1 + mqtt_varint_size((uint32_t)l->body_len) + l->body_len;
    return true;
}

/* Measures the packet, dropping the Reason String and then the User
 * Properties while it exceeds `max_packet`, if `droppable`. Returns 0 or
 * MQTT_E_PACKET_TOO_LARGE. */
static int plan(struct layout *l, const mqtt_props_t *props, size_t max_packet,
                bool droppable)
{
    static const unsigned steps[] = {
        0, MQTT_DROP_REASON_STRING,
        MQTT_DROP_REASON_STRING | MQTT_DROP_USER_PROPERTIES};
    size_t nsteps = droppable ? 3 : 1;

    for (size_t i = 0; i < nsteps; i++) {
        l->drop = steps[i];
        if (!measure(l, props))
            return MQTT_E_PACKET_TOO_LARGE;
        if (max_packet == 0 || l->total_len <= max_packet)
            return 0;
    }
    return MQTT_E_PACKET_TOO_LARGE;
}

/* Writes the fixed header and returns the position of the variable
 * header. */
static uint8_t *write_header(uint8_t *out, const struct layout *l)
{
    *out++ = l->first_byte;
    return mqtt_write_varint(out, (uint32_t)l->body_len);
}

static uint8_t *write_props(uint8_t *out, const struct layout *l,
                            const mqtt_props_t *props)
{
    if (!l->write_props)
        return out;
    out = mqtt_write_varint(out, (uint32_t)l->props_len);
    return mqtt_props_write(out, props, l->drop);
}

/* The packet length as the encoders return it: INT_MAX is above the
 * largest MQTT packet (268,435,460 bytes), so the cast is exact. */
static int result(const struct layout *l)
{
    return (int)l->total_len;
}

static bool version_valid(int version)
{
    return version == MQTT_V311 || version == MQTT_V5;
}

int mqtt_encode_connack(uint8_t *buf, size_t cap, int version,
                        const mqtt_connack_t *connack, size_t max_packet)
{
    struct layout l = {.first_byte = MQTT_CONNACK << 4, .fixed_len = 2};
    uint8_t *out;
    int rc;

    if (!version_valid(version))
        return ING_EINVAL;
    /* A refused connection never has a session (MQTT-3.2.2-6). */
    if (connack->session_present && connack->reason_code != 0)
        return ING_EINVAL;
    if (version == MQTT_V311) {
        if (connack->reason_code > 0x05)
            return ING_EINVAL;
    } else {
        if (!code_in(connack->reason_code, connack_codes,
                     sizeof(connack_codes)))
            return ING_EINVAL;
        if (mqtt_props_validate(&connack->props, MQTT_KIND(MQTT_CONNACK)))
            return ING_EINVAL;
        l.has_props = true;
    }
    rc = plan(&l, &connack->props, max_packet, true);
    if (rc != 0)
        return rc;
    if (l.total_len > cap)
        return result(&l);

    out = write_header(buf, &l);
    *out++ = connack->session_present ? 1 : 0;
    *out++ = connack->reason_code;
    write_props(out, &l, &connack->props);
    return result(&l);
}

int mqtt_encode_publish(uint8_t *buf, size_t cap, int version,
                        const mqtt_publish_t *publish, size_t max_packet)
{
    struct layout l = {0};
    bool alias;
    uint8_t *out;
    int rc;

    if (!version_valid(version) || publish->qos > 2 || publish->topic.len >
        UINT16_MAX || (publish->dup && publish->qos == 0) ||
        (publish->qos > 0 && publish->packet_id == 0))
        return ING_EINVAL;
    alias = version == MQTT_V5 &&
            mqtt_props_has(&publish->props, MQTT_PROP_TOPIC_ALIAS);
    if (publish->topic.len == 0 && !alias)
        return ING_EINVAL;
    if (version == MQTT_V5 &&
        mqtt_props_validate(&publish->props, MQTT_KIND(MQTT_PUBLISH)) != 0)
        return ING_EINVAL;

    l.first_byte = (uint8_t)(MQTT_PUBLISH << 4 | (publish->dup ? 0x08 : 0) |
                             publish->qos << 1 | (publish->retain ? 1 : 0));
    l.fixed_len = 2 + publish->topic.len + (publish->qos > 0 ? 2 : 0);
    l.has_props = version == MQTT_V5;
    l.tail_len = publish->payload.len;
    /* The properties of a PUBLISH belong to the message, so none is
     * dropped. */
    rc = plan(&l, &publish->props, max_packet, false);
    if (rc != 0)
        return rc;
    if (l.total_len > cap)
        return result(&l);

    out = write_header(buf, &l);
    out = mqtt_write_binary(out, &publish->topic);
    if (publish->qos > 0)
        out = mqtt_write_u16(out, publish->packet_id);
    out = write_props(out, &l, &publish->props);
    if (publish->payload.len > 0)
        memcpy(out, publish->payload.data, publish->payload.len);
    return result(&l);
}

/* Shared by PUBACK, PUBREC, PUBREL, PUBCOMP, DISCONNECT and AUTH, which end
 * with a reason code and properties that may be left out when the code is
 * 0x00 and no property is sent. `fixed_len` counts the packet id.
 * `omit_props_len` allows leaving out an empty property list after a
 * non-zero code, which the spec allows for acknowledgements and DISCONNECT
 * but does not state for AUTH. */
static int encode_reason_packet(uint8_t *buf, size_t cap, uint8_t first_byte,
                                size_t fixed_len, uint16_t packet_id,
                                uint8_t reason_code, bool omit_props_len,
                                const mqtt_props_t *props, size_t max_packet)
{
    struct layout l = {.first_byte = first_byte, .fixed_len = fixed_len};
    uint8_t *out;
    int rc;

    /* Without properties the property length byte can go, and with code
     * 0x00 the reason code too. */
    l.has_props = true;
    l.omit_empty_props = reason_code == 0 || omit_props_len;
    l.has_code = true;
    l.omit_code = reason_code == 0;
    rc = plan(&l, props, max_packet, true);
    if (rc != 0)
        return rc;
    if (l.total_len > cap)
        return result(&l);

    out = write_header(buf, &l);
    if (fixed_len == 2)
        out = mqtt_write_u16(out, packet_id);
    if (l.write_code)
        *out++ = reason_code;
    write_props(out, &l, props);
    return result(&l);
}

int mqtt_encode_ack(uint8_t *buf, size_t cap, int version,
                    const mqtt_ack_t *ack, size_t max_packet)
{
    uint8_t first_byte;
    bool pubrel_family;
    struct layout l;
    uint8_t *out;

    if (!version_valid(version) || ack->type < MQTT_PUBACK ||
        ack->type > MQTT_PUBCOMP || ack->packet_id == 0)
        return ING_EINVAL;
    first_byte = (uint8_t)(ack->type << 4);
    if (ack->type == MQTT_PUBREL)
        first_byte |= 0x02;
    if (version == MQTT_V311) {
        l = (struct layout){.first_byte = first_byte, .fixed_len = 2};
        (void)measure(&l, &ack->props);
        if (l.total_len > cap)
            return result(&l);
        out = write_header(buf, &l);
        mqtt_write_u16(out, ack->packet_id);
        return result(&l);
    }
    pubrel_family = ack->type == MQTT_PUBREL || ack->type == MQTT_PUBCOMP;
    if (pubrel_family
            ? !code_in(ack->reason_code, pubrel_codes, sizeof(pubrel_codes))
            : !code_in(ack->reason_code, puback_codes, sizeof(puback_codes)))
        return ING_EINVAL;
    if (mqtt_props_validate(&ack->props, MQTT_KIND(ack->type)) != 0)
        return ING_EINVAL;
    return encode_reason_packet(buf, cap, first_byte, 2, ack->packet_id,
                                ack->reason_code, true, &ack->props,
                                max_packet);
}

/* Shared by SUBACK and UNSUBACK: packet id, properties in 5.0, then one
 * code per filter. */
static int encode_sub_reply(uint8_t *buf, size_t cap, int version,
                            uint8_t type, const mqtt_suback_t *reply,
                            size_t max_packet)
{
    struct layout l = {.first_byte = (uint8_t)(type << 4), .fixed_len = 2};
    bool with_codes = version == MQTT_V5 || type == MQTT_SUBACK;
    uint8_t *out;
    int rc;

    if (reply->packet_id == 0 || (with_codes && reply->count == 0))
        return ING_EINVAL;
    l.has_props = version == MQTT_V5;
    l.tail_len = with_codes ? reply->count : 0;
    rc = plan(&l, &reply->props, max_packet, true);
    if (rc != 0)
        return rc;
    if (l.total_len > cap)
        return result(&l);

    out = write_header(buf, &l);
    out = mqtt_write_u16(out, reply->packet_id);
    out = write_props(out, &l, &reply->props);
    if (with_codes)
        memcpy(out, reply->codes, reply->count);
    return result(&l);
}

int mqtt_encode_suback(uint8_t *buf, size_t cap, int version,
                       const mqtt_suback_t *suback, size_t max_packet)
{
    if (!version_valid(version))
        return ING_EINVAL;
    if (version == MQTT_V311) {
        if (!codes_in(suback->codes, suback->count, suback_v311_codes,
                      sizeof(suback_v311_codes)))
            return ING_EINVAL;
    } else {
        if (!codes_in(suback->codes, suback->count, suback_codes,
                      sizeof(suback_codes)))
            return ING_EINVAL;
        if (mqtt_props_validate(&suback->props, MQTT_KIND(MQTT_SUBACK)))
            return ING_EINVAL;
    }
    return encode_sub_reply(buf, cap, version, MQTT_SUBACK, suback,
                            max_packet);
}

int mqtt_encode_unsuback(uint8_t *buf, size_t cap, int version,
                         const mqtt_suback_t *unsuback, size_t max_packet)
{
    if (!version_valid(version))
        return ING_EINVAL;
    if (version == MQTT_V5) {
        if (!codes_in(unsuback->codes, unsuback->count, unsuback_codes,
                      sizeof(unsuback_codes)))
            return ING_EINVAL;
        if (mqtt_props_validate(&unsuback->props, MQTT_KIND(MQTT_UNSUBACK)))
            return ING_EINVAL;
    }
    return encode_sub_reply(buf, cap, version, MQTT_UNSUBACK, unsuback,
                            max_packet);
}

int mqtt_encode_pingresp(uint8_t *buf, size_t cap)
{
    if (cap < 2)
        return 2;
    buf[0] = MQTT_PINGRESP << 4;
    buf[1] = 0;
    return 2;
}

int mqtt_encode_disconnect(uint8_t *buf, size_t cap, int version,
                           const mqtt_disconnect_t *disconnect,
                           size_t max_packet)
{
    if (version != MQTT_V5)
        return ING_EINVAL;
    if (!code_in(disconnect->reason_code, disconnect_codes,
                 sizeof(disconnect_codes)))
        return ING_EINVAL;
    /* A server never sends a Session Expiry Interval in DISCONNECT
     * (MQTT-3.14.2-2). */
    if (mqtt_props_has(&disconnect->props, MQTT_PROP_SESSION_EXPIRY) ||
        mqtt_props_validate(&disconnect->props, MQTT_KIND(MQTT_DISCONNECT)))
        return ING_EINVAL;
    return encode_reason_packet(buf, cap, MQTT_DISCONNECT << 4, 0, 0,
                                disconnect->reason_code, true,
                                &disconnect->props, max_packet);
}

int mqtt_encode_auth(uint8_t *buf, size_t cap, int version,
                     const mqtt_auth_t *auth, size_t max_packet)
{
    if (version != MQTT_V5)
        return ING_EINVAL;
    if (!code_in(auth->reason_code, auth_codes, sizeof(auth_codes)) ||
        mqtt_props_validate(&auth->props, MQTT_KIND(MQTT_AUTH)) != 0)
        return ING_EINVAL;
    return encode_reason_packet(buf, cap, MQTT_AUTH << 4, 0, 0,
                                auth->reason_code, false, &auth->props,
                                max_packet);
}
