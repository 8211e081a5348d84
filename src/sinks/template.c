/* Destination templates, compiled once into a list of literal and
 * placeholder parts, and the envelope fields they expand from.
 */
#include "sinks/template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/errors.h"

enum part_kind {
    PART_LITERAL,
    PART_DEVICE_ID,
    PART_DEVICE_TYPE,
    PART_PROTOCOL,
};

typedef struct template_part {
    enum part_kind kind;
    size_t start; /* PART_LITERAL: offset and length in the text */
    size_t len;
} template_part_t;

struct sink_template {
    char *text;
    template_part_t *parts;
    size_t count;
};

static const struct {
    const char *name;
    enum part_kind kind;
} placeholders[] = {
    {"{device_id}", PART_DEVICE_ID},
    {"{device_type}", PART_DEVICE_TYPE},
    {"{protocol}", PART_PROTOCOL},
};

#define PLACEHOLDER_COUNT (sizeof(placeholders) / sizeof(placeholders[0]))

/* Matches the placeholder at the start of `p`. Returns its index, or -1. */
static int match_placeholder(const char *p)
{
    for (size_t i = 0; i < PLACEHOLDER_COUNT; i++) {
        size_t len = strlen(placeholders[i].name);

        if (strncmp(p, placeholders[i].name, len) == 0)
            return (int)i;
    }
    return -1;
}

/* Describes why the brace at text[at] is invalid. */
static void describe_bad_brace(const char *text, size_t at, char *err,
                               size_t errlen)
{
    const char *p = text + at;
    const char *close = strchr(p, '}');
    size_t shown;

    if (*p == '}') {
        snprintf(err, errlen,
                 "'}' without '{' at offset %zu; braces may appear only in "
                 "{device_id}, {device_type} or {protocol}",
                 at);
        return;
    }
    if (close == NULL) {
        snprintf(err, errlen, "'{' at offset %zu has no closing '}'", at);
        return;
    }
    shown = (size_t)(close - p) + 1;
    snprintf(err, errlen,
             "unknown placeholder %.*s; use {device_id}, {device_type} or "
             "{protocol}",
             (int)(shown > 64 ? 64 : shown), p);
}

int sink_template_compile(const char *text, sink_template_t **out, char *err,
                          size_t errlen)
{
    sink_template_t *t = calloc(1, sizeof(*t));
    size_t len = strlen(text);
    size_t i = 0;

    /* Each part ends at a brace or the end, so a template of `len` bytes
     * has at most len + 1 parts. */
    if (t == NULL)
        goto nomem;
    t->text = strdup(text);
    t->parts = calloc(len + 1, sizeof(*t->parts));
    if (t->text == NULL || t->parts == NULL)
        goto nomem;
    while (i < len) {
        template_part_t *part = &t->parts[t->count];
        int found;

        if (text[i] != '{' && text[i] != '}') {
            size_t n = strcspn(text + i, "{}");

            part->kind = PART_LITERAL;
            part->start = i;
            part->len = n;
            t->count++;
            i += n;
            continue;
        }
        found = text[i] == '{' ? match_placeholder(text + i) : -1;
        if (found < 0) {
            describe_bad_brace(text, i, err, errlen);
            sink_template_free(t);
            return ING_EINVAL;
        }
        part->kind = placeholders[found].kind;
        t->count++;
        i += strlen(placeholders[found].name);
    }
    *out = t;
    return 0;

nomem:
    sink_template_free(t);
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
}

static const char *field_of(const sink_envelope_t *env, enum part_kind kind)
{
    switch (kind) {
    case PART_DEVICE_ID:
        return env->device_id;
    case PART_DEVICE_TYPE:
        return env->device_type;
    case PART_PROTOCOL:
        return env->protocol;
    case PART_LITERAL:
        break;
    }
    return "";
}

int sink_template_expand(const sink_template_t *t, const sink_envelope_t *env,
                         char *buf, size_t size)
{
    size_t used = 0;

    for (size_t i = 0; i < t->count; i++) {
        const template_part_t *part = &t->parts[i];
        const char *src;
        size_t n;

        if (part->kind == PART_LITERAL) {
            src = t->text + part->start;
            n = part->len;
        } else {
            src = field_of(env, part->kind);
            n = strlen(src);
            if (n == 0)
                return ING_EINVAL;
        }
        if (n >= size - used)
            return ING_ETOOBIG;
        memcpy(buf + used, src, n);
        used += n;
    }
    if (size == 0)
        return ING_ETOOBIG;
    buf[used] = '\0';
    return (int)used;
}

int sink_template_is_constant(const sink_template_t *t)
{
    for (size_t i = 0; i < t->count; i++) {
        if (t->parts[i].kind != PART_LITERAL)
            return 0;
    }
    return 1;
}

const char *sink_template_text(const sink_template_t *t)
{
    return t->text;
}

void sink_template_free(sink_template_t *t)
{
    if (t == NULL)
        return;
    free(t->parts);
    free(t->text);
    free(t);
}

/* Copies the string member `key` of `obj` into `dst`. A missing member
 * leaves "", and a value that is not a string or does not fit fails. */
static int copy_member(json_t *obj, const char *key, char *dst, size_t size)
{
    json_t *value = json_object_get(obj, key);
    size_t len;

    dst[0] = '\0';
    if (value == NULL)
        return 0;
    if (!json_is_string(value))
        return ING_EINVAL;
    len = json_string_length(value);
    if (len >= size || strlen(json_string_value(value)) != len)
        return ING_EINVAL;
    memcpy(dst, json_string_value(value), len + 1);
    return 0;
}

int sink_envelope_parse(const void *data, size_t len, sink_envelope_t *out)
{
    json_t *root = json_loadb(data, len, 0, NULL);
    int rc = ING_EINVAL;

    memset(out, 0, sizeof(*out));
    if (root == NULL || !json_is_object(root))
        goto done;
    if (copy_member(root, "message_id", out->message_id,
                    sizeof(out->message_id)) < 0 ||
        copy_member(root, "device_id", out->device_id,
                    sizeof(out->device_id)) < 0 ||
        copy_member(root, "device_type", out->device_type,
                    sizeof(out->device_type)) < 0 ||
        copy_member(root, "protocol", out->protocol, sizeof(out->protocol)) <
            0 ||
        copy_member(root, "received_at", out->received_at,
                    sizeof(out->received_at)) < 0)
        goto done;
    rc = 0;

done:
    json_decref(root);
    return rc;
}
