#include "pipeline/rawjson.h"

#include <string.h>

#include <jansson.h>

#include "core/errors.h"

static int is_ws(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r';
}

static size_t skip_ws(const char *text, size_t len, size_t pos)
{
    while (pos < len && is_ws(text[pos]))
        pos++;
    return pos;
}

/* Scans the string that starts with the quote at `pos`. Stores the offset
 * after its closing quote in `*end`. Returns 0 or ING_EINVAL. */
static int scan_string(const char *text, size_t len, size_t pos, size_t *end)
{
    for (pos++; pos < len; pos++) {
        if (text[pos] == '\\') {
            pos++; /* the escaped byte cannot end the string */
        } else if (text[pos] == '"') {
            *end = pos + 1;
            return 0;
        }
    }
    return ING_EINVAL;
}

/* Scans the value that starts at `pos` (no whitespace before it) and
 * stores the offset after it in `*end`. Returns 0 or ING_EINVAL. */
static int scan_value(const char *text, size_t len, size_t pos, size_t *end)
{
    size_t depth = 0;
    int rc;

    if (pos >= len)
        return ING_EINVAL;
    if (text[pos] == '"')
        return scan_string(text, len, pos, end);
    if (text[pos] != '{' && text[pos] != '[') {
        /* A number, true, false or null ends at the next delimiter. */
        size_t start = pos;

        while (pos < len && !is_ws(text[pos]) && text[pos] != ',' &&
               text[pos] != ']' && text[pos] != '}' && text[pos] != ':')
            pos++;
        if (pos == start)
            return ING_EINVAL;
        *end = pos;
        return 0;
    }
    while (pos < len) {
        char ch = text[pos];

        if (ch == '"') {
            rc = scan_string(text, len, pos, &pos);
            if (rc != 0)
                return rc;
            continue;
        }
        if (ch == '{' || ch == '[') {
            depth++;
        } else if (ch == '}' || ch == ']') {
            if (depth == 0)
                return ING_EINVAL;
            if (--depth == 0) {
                *end = pos + 1;
                return 0;
            }
        }
        pos++;
    }
    return ING_EINVAL;
}

int rawjson_minify(const char *text, size_t len, char *out, size_t *out_len,
                   size_t max_depth)
{
    size_t depth = 0;
    size_t n = 0;
    size_t pos = 0;

    while (pos < len) {
        char ch = text[pos];
        size_t end;

        if (ch == '"') {
            if (scan_string(text, len, pos, &end) != 0)
                return ING_EINVAL;
            memcpy(out + n, text + pos, end - pos);
            n += end - pos;
            pos = end;
            continue;
        }
        pos++;
        if (is_ws(ch))
            continue;
        if (ch == '{' || ch == '[') {
            if (++depth > max_depth && max_depth != 0)
                return ING_ETOOBIG;
        } else if (ch == '}' || ch == ']') {
            if (depth == 0)
                return ING_EINVAL;
            depth--;
        }
        out[n++] = ch;
    }
    if (depth != 0)
        return ING_EINVAL;
    *out_len = n;
    return 0;
}

int rawjson_array_elements(const char *text, size_t len,
                           rawjson_span_t *spans, size_t cap, size_t *count)
{
    size_t pos = skip_ws(text, len, 0);
    size_t n = 0;
    size_t end;

    if (pos >= len || text[pos] != '[')
        return ING_EINVAL;
    pos = skip_ws(text, len, pos + 1);
    if (pos < len && text[pos] == ']')
        goto close;
    for (;;) {
        if (scan_value(text, len, pos, &end) != 0)
            return ING_EINVAL;
        if (n == cap)
            return ING_ETOOBIG;
        spans[n].off = pos;
        spans[n].len = end - pos;
        n++;
        pos = skip_ws(text, len, end);
        if (pos < len && text[pos] == ',') {
            pos = skip_ws(text, len, pos + 1);
            continue;
        }
        if (pos < len && text[pos] == ']')
            break;
        return ING_EINVAL;
    }
close:
    if (skip_ws(text, len, pos + 1) != len)
        return ING_EINVAL;
    *count = n;
    return 0;
}

/* Returns 1 when the string token `token` (quotes included) decodes to
 * `key`. */
static int key_equals(const char *token, size_t token_len, const char *key)
{
    size_t key_len = strlen(key);
    json_t *decoded;
    int equal;

    if (memchr(token, '\\', token_len) == NULL)
        return token_len == key_len + 2 &&
               memcmp(token + 1, key, key_len) == 0;
    /* Escapes such as \u0072 may spell the key, so jansson decodes it. */
    decoded = json_loadb(token, token_len, JSON_DECODE_ANY, NULL);
    equal = json_is_string(decoded) &&
            json_string_length(decoded) == key_len &&
            memcmp(json_string_value(decoded), key, key_len) == 0;
    json_decref(decoded);
    return equal;
}

int rawjson_object_member(const char *text, size_t len, const char *key,
                          rawjson_span_t *value)
{
    size_t pos = skip_ws(text, len, 0);
    size_t key_start, key_end, end;
    int found = 0;

    if (pos >= len || text[pos] != '{')
        return ING_EINVAL;
    pos = skip_ws(text, len, pos + 1);
    if (pos < len && text[pos] == '}')
        return 0;
    for (;;) {
        if (pos >= len || text[pos] != '"')
            return ING_EINVAL;
        key_start = pos;
        if (scan_string(text, len, pos, &key_end) != 0)
            return ING_EINVAL;
        pos = skip_ws(text, len, key_end);
        if (pos >= len || text[pos] != ':')
            return ING_EINVAL;
        pos = skip_ws(text, len, pos + 1);
        if (scan_value(text, len, pos, &end) != 0)
            return ING_EINVAL;
        if (key_equals(text + key_start, key_end - key_start, key)) {
            value->off = pos;
            value->len = end - pos;
            found = 1;
        }
        pos = skip_ws(text, len, end);
        if (pos < len && text[pos] == ',') {
            pos = skip_ws(text, len, pos + 1);
            continue;
        }
        if (pos < len && text[pos] == '}')
            return found;
        return ING_EINVAL;
    }
}
