/* MQTT data representations: UTF-8 strings, binary data and variable byte
 * integers, as both specs define them in their section 1.5. */
#include <string.h>

#include "mqtt/codec.h"
#include "mqtt/codec_internal.h"

static bool is_continuation(uint8_t byte)
{
    return (byte & 0xc0) == 0x80;
}

int mqtt_utf8_check(const uint8_t *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint8_t c = s[i];
        uint8_t low = 0x80;
        uint8_t high = 0xbf;
        size_t tail;

        if (c == 0)
            return MQTT_E_UTF8_NUL;
        if (c < 0x80) {
            i++;
            continue;
        }
        /* C0 and C1 only start overlong two-byte forms, and F5..FF would
         * encode code points above U+10FFFF. */
        if (c < 0xc2 || c > 0xf4)
            return MQTT_E_UTF8;
        if (c < 0xe0) {
            tail = 1;
        } else if (c < 0xf0) {
            tail = 2;
            if (c == 0xe0)
                low = 0xa0; /* E0 80..9F would be overlong. */
            else if (c == 0xed)
                high = 0x9f; /* ED A0..BF encodes U+D800..U+DFFF. */
        } else {
            tail = 3;
            if (c == 0xf0)
                low = 0x90; /* F0 80..8F would be overlong. */
            else if (c == 0xf4)
                high = 0x8f; /* F4 90.. is above U+10FFFF. */
        }
        if (len - i <= tail)
            return MQTT_E_UTF8;
        if (s[i + 1] < low || s[i + 1] > high)
            return MQTT_E_UTF8;
        for (size_t k = 2; k <= tail; k++) {
            if (!is_continuation(s[i + k]))
                return MQTT_E_UTF8;
        }
        i += tail + 1;
    }
    return 0;
}

int mqtt_read_varint(mqtt_reader_t *r, uint32_t *out)
{
    uint32_t value = 0;

    for (int i = 0; i < 4; i++) {
        uint8_t byte;

        if (mqtt_read_u8(r, &byte) != 0)
            return MQTT_E_TRUNCATED;
        value |= (uint32_t)(byte & 0x7f) << (7 * i);
        if ((byte & 0x80) == 0) {
            *out = value;
            return 0;
        }
    }
    return MQTT_E_VARINT;
}

int mqtt_read_binary(mqtt_reader_t *r, mqtt_bytes_t *out)
{
    uint16_t len;

    if (mqtt_read_u16(r, &len) != 0 || mqtt_reader_left(r) < len)
        return MQTT_E_TRUNCATED;
    out->data = r->data + r->pos;
    out->len = len;
    r->pos += len;
    return 0;
}

int mqtt_read_string(mqtt_reader_t *r, mqtt_bytes_t *out)
{
    int rc = mqtt_read_binary(r, out);

    if (rc != 0)
        return rc;
    return mqtt_utf8_check(out->data, out->len);
}

bool mqtt_has_wildcard(const mqtt_bytes_t *topic)
{
    if (topic->len == 0)
        return false;
    return memchr(topic->data, '+', topic->len) != NULL ||
           memchr(topic->data, '#', topic->len) != NULL;
}

size_t mqtt_varint_size(uint32_t value)
{
    if (value < 128)
        return 1;
    if (value < 16384)
        return 2;
    if (value < 2097152)
        return 3;
    return 4;
}

uint8_t *mqtt_write_varint(uint8_t *out, uint32_t value)
{
    do {
        uint8_t byte = value & 0x7f;

        value >>= 7;
        if (value > 0)
            byte |= 0x80;
        *out++ = byte;
    } while (value > 0);
    return out;
}

uint8_t *mqtt_write_binary(uint8_t *out, const mqtt_bytes_t *value)
{
    out = mqtt_write_u16(out, (uint16_t)value->len);
    if (value->len > 0)
        memcpy(out, value->data, value->len);
    return out + value->len;
}
