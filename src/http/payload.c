/* Parsing of request header values, NDJSON bodies and listen addresses.
 * Nothing here touches a socket, so the unit tests call it directly. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/errors.h"
#include "http/http_internal.h"

static int is_ows(char ch)
{
    return ch == ' ' || ch == '\t';
}

static const char *skip_ows(const char *p)
{
    while (is_ows(*p))
        p++;
    return p;
}

/* Returns the length of `p` up to `stop` or the end, without trailing
 * optional white space. */
static size_t token_len(const char *p, char stop)
{
    size_t n = 0;

    while (p[n] != '\0' && p[n] != stop)
        n++;
    while (n > 0 && is_ows(p[n - 1]))
        n--;
    return n;
}

static int token_is(const char *p, size_t n, const char *word)
{
    return strlen(word) == n && strncasecmp(p, word, n) == 0;
}

/* Checks one "name=value" parameter. Only charset is interpreted, because
 * the JSON readers accept UTF-8 only. */
static int param_ok(const char *p, size_t n)
{
    const char *eq = memchr(p, '=', n);
    size_t name_len;
    const char *value;
    size_t value_len;

    if (eq == NULL)
        return n == 0;
    name_len = (size_t)(eq - p);
    while (name_len > 0 && is_ows(p[name_len - 1]))
        name_len--;
    if (!token_is(p, name_len, "charset"))
        return 1;
    value = skip_ows(eq + 1);
    value_len = n - (size_t)(value - p);
    if (value_len >= 2 && value[0] == '"' && value[value_len - 1] == '"') {
        value++;
        value_len -= 2;
    }
    return token_is(value, value_len, "utf-8") ||
           token_is(value, value_len, "utf8");
}

int http_content_type_parse(const char *value)
{
    const char *p = skip_ows(value);
    size_t n = token_len(p, ';');
    int type;

    if (token_is(p, n, "application/json"))
        type = HTTP_CT_JSON;
    else if (token_is(p, n, "application/x-ndjson") ||
             token_is(p, n, "application/ndjson"))
        type = HTTP_CT_NDJSON;
    else
        return HTTP_CT_UNSUPPORTED;

    p = strchr(p, ';');
    while (p != NULL) {
        p = skip_ows(p + 1);
        if (!param_ok(p, token_len(p, ';')))
            return HTTP_CT_UNSUPPORTED;
        p = strchr(p, ';');
    }
    return type;
}

int http_bearer_key(const char *value, const char **key, size_t *len)
{
    const char *p = skip_ows(value);
    size_t n;

    if (strncasecmp(p, "bearer", 6) != 0 || !is_ows(p[6]))
        return 0;
    p = skip_ows(p + 6);
    n = token_len(p, '\0');
    if (n == 0)
        return 0;
    *key = p;
    *len = n;
    return 1;
}

static int is_blank(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!is_ows(p[i]) && p[i] != '\r')
            return 0;
    }
    return 1;
}

int http_ndjson_next(const char *buf, size_t len, size_t *off,
                     const char **line, size_t *line_len)
{
    while (*off < len) {
        const char *start = buf + *off;
        const char *nl = memchr(start, '\n', len - *off);
        size_t n = nl ? (size_t)(nl - start) : len - *off;

        *off += n + (nl ? 1 : 0);
        if (n > 0 && start[n - 1] == '\r')
            n--;
        if (is_blank(start, n))
            continue;
        *line = start;
        *line_len = n;
        return 1;
    }
    return 0;
}

static int parse_port(const char *s, int *port)
{
    char *end;
    long v;

    if (!isdigit((unsigned char)s[0]))
        return ING_EINVAL;
    v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0 || v > 65535)
        return ING_EINVAL;
    *port = (int)v;
    return 0;
}

int http_listen_parse(const char *listen, char *host, size_t hostlen,
                      int *port)
{
    const char *colon;
    size_t n;

    if (listen == NULL)
        return ING_EINVAL;
    if (listen[0] == '[') {
        const char *close = strchr(listen, ']');
        if (close == NULL || close[1] != ':')
            return ING_EINVAL;
        n = (size_t)(close - listen - 1);
        if (n == 0)
            return ING_EINVAL;
        listen++;
        colon = close + 1;
    } else {
        colon = strrchr(listen, ':');
        if (colon == NULL || memchr(listen, ':', (size_t)(colon - listen)))
            return ING_EINVAL;
        n = (size_t)(colon - listen);
    }
    if (n >= hostlen)
        return ING_EINVAL;
    memcpy(host, listen, n);
    host[n] = '\0';
    if (strcmp(host, "*") == 0)
        host[0] = '\0';
    return parse_port(colon + 1, port);
}
