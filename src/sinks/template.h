/* Destination templates: a sink's topic, key, subject or routing key
 * written with placeholders, such as "telemetry.{device_type}", expanded
 * per record from the record's envelope.
 *
 * The placeholders are {device_id}, {device_type} and {protocol}. Every
 * other character is literal, and '{' and '}' may appear only as part of a
 * placeholder. config_load checks templates with the same rules, so a sink
 * never sees an invalid one.
 */
#ifndef INGESTD_SINKS_TEMPLATE_H
#define INGESTD_SINKS_TEMPLATE_H

#include <stddef.h>

typedef struct sink_template sink_template_t;

/* The envelope fields that sinks need to route and label a record. Each is
 * "" when the envelope lacks it. */
typedef struct sink_envelope {
    char message_id[64];
    char device_id[129]; /* device ids are 1 to 128 bytes */
    char device_type[65];
    char protocol[16];
    char received_at[40]; /* RFC 3339 UTC, such as 2024-05-01T12:00:00.123Z */
} sink_envelope_t;

/* Compiles `text`. Returns 0 and stores a new template in `*out`, or
 * ING_EINVAL with the reason (such as "unknown placeholder {device}; use
 * {device_id}, {device_type} or {protocol}") in `err`, or ING_ENOMEM. */
int sink_template_compile(const char *text, sink_template_t **out, char *err,
                          size_t errlen);

/* Expands `t` for `env` into `buf`, NUL-terminated. Returns the length
 * without the NUL; ING_EINVAL when a placeholder's field is empty in
 * `env` (the record cannot be routed); ING_ETOOBIG when `size` is too
 * small. */
int sink_template_expand(const sink_template_t *t, const sink_envelope_t *env,
                         char *buf, size_t size);

/* Returns 1 when `t` has no placeholder, so every record goes to one
 * destination. */
int sink_template_is_constant(const sink_template_t *t);

/* Returns the template's text as written. */
const char *sink_template_text(const sink_template_t *t);

void sink_template_free(sink_template_t *t);

/* Reads the envelope fields of a spooled record (a JSON object). Returns 0,
 * or ING_EINVAL when the record is not a JSON object or a field is too
 * long for sink_envelope_t. Fields that are missing stay "". */
int sink_envelope_parse(const void *data, size_t len, sink_envelope_t *out);

#endif
