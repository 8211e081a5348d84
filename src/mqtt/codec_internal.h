/* Helpers shared by the decoder, the property code and the encoder of the
 * MQTT codec. Not part of the module interface.
 */
#ifndef INGESTD_MQTT_CODEC_INTERNAL_H
#define INGESTD_MQTT_CODEC_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "mqtt/codec.h"

/* Property list kinds: bit `type` for each packet type, and bit 0 for the
 * will properties inside CONNECT, which have their own allowed set. */
#define MQTT_KIND(type) (1u << (type))
#define MQTT_KIND_WILL 1u

/* Optional properties an encoder may leave out to fit the client's Maximum
 * Packet Size. */
#define MQTT_DROP_REASON_STRING 1u
#define MQTT_DROP_USER_PROPERTIES 2u

/* A bounds-checked cursor over one packet body or property list. */
typedef struct mqtt_reader {
    const uint8_t *data;
    size_t len;
    size_t pos;
} mqtt_reader_t;

static inline size_t mqtt_reader_left(const mqtt_reader_t *r)
{
    return r->len - r->pos;
}

static inline int mqtt_read_u8(mqtt_reader_t *r, uint8_t *out)
{
    if (mqtt_reader_left(r) < 1)
        return MQTT_E_TRUNCATED;
    *out = r->data[r->pos++];
    return 0;
}

static inline int mqtt_read_u16(mqtt_reader_t *r, uint16_t *out)
{
    if (mqtt_reader_left(r) < 2)
        return MQTT_E_TRUNCATED;
    *out = (uint16_t)(r->data[r->pos] << 8 | r->data[r->pos + 1]);
    r->pos += 2;
    return 0;
}

static inline int mqtt_read_u32(mqtt_reader_t *r, uint32_t *out)
{
    const uint8_t *p = r->data + r->pos;

    if (mqtt_reader_left(r) < 4)
        return MQTT_E_TRUNCATED;
    *out = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
    r->pos += 4;
    return 0;
}

/* Reads a variable byte integer of 1 to 4 bytes. Returns 0,
 * MQTT_E_TRUNCATED or MQTT_E_VARINT. */
int mqtt_read_varint(mqtt_reader_t *r, uint32_t *out);

/* Reads a two-byte length and that many bytes. Returns 0 or
 * MQTT_E_TRUNCATED. */
int mqtt_read_binary(mqtt_reader_t *r, mqtt_bytes_t *out);

/* Reads a UTF-8 string as mqtt_read_binary() does and validates it with
 * mqtt_utf8_check(). */
int mqtt_read_string(mqtt_reader_t *r, mqtt_bytes_t *out);

/* Returns true if the topic name or filter contains '+' or '#'. */
bool mqtt_has_wildcard(const mqtt_bytes_t *topic);

/* Reads the property length and property list of a packet of `kind`
 * (MQTT_KIND(type) or MQTT_KIND_WILL) into `out`, which it clears first.
 * Returns 0 or an MQTT_E* code. */
int mqtt_props_decode(mqtt_reader_t *r, unsigned kind, mqtt_props_t *out);

/* Checks that every property marked in `props` may be sent in a packet of
 * `kind` and that its strings fit. Returns 0 or ING_EINVAL. */
int mqtt_props_validate(const mqtt_props_t *props, unsigned kind);

/* Returns the length of the encoded property list without its length
 * prefix, leaving out what `drop` names. */
size_t mqtt_props_size(const mqtt_props_t *props, unsigned drop);

/* Writes the property list, as measured by mqtt_props_size(), without its
 * length prefix. Returns the byte after the last one written. */
uint8_t *mqtt_props_write(uint8_t *out, const mqtt_props_t *props,
                          unsigned drop);

/* Returns the number of bytes a variable byte integer takes, 1 to 4. */
size_t mqtt_varint_size(uint32_t value);

/* Writes `value` (at most MQTT_VARINT_MAX) as a variable byte integer and
 * returns the byte after it. */
uint8_t *mqtt_write_varint(uint8_t *out, uint32_t value);

static inline uint8_t *mqtt_write_u16(uint8_t *out, uint16_t value)
{
    out[0] = (uint8_t)(value >> 8);
    out[1] = (uint8_t)value;
    return out + 2;
}

static inline uint8_t *mqtt_write_u32(uint8_t *out, uint32_t value)
{
    out[0] = (uint8_t)(value >> 24);
    out[1] = (uint8_t)(value >> 16);
    out[2] = (uint8_t)(value >> 8);
    out[3] = (uint8_t)value;
    return out + 4;
}

/* Writes a two-byte length and the bytes. The caller checked len <= 65535. */
uint8_t *mqtt_write_binary(uint8_t *out, const mqtt_bytes_t *value);

#endif
