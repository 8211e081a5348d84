/* Formatting of HTTP responses. Every error response is a JSON object with an
 * "error" code and a "message" that states what is wrong and what to do. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "core/errors.h"
#include "http/http_internal.h"

struct status_reason {
    int status;
    const char *reason;
};

static const struct status_reason reasons[] = {
    {100, "Continue"},
    {200, "OK"},
    {202, "Accepted"},
    {400, "Bad Request"},
    {401, "Unauthorized"},
    {403, "Forbidden"},
    {404, "Not Found"},
    {405, "Method Not Allowed"},
    {408, "Request Timeout"},
    {409, "Conflict"},
    {411, "Length Required"},
    {413, "Content Too Large"},
    {415, "Unsupported Media Type"},
    {417, "Expectation Failed"},
    {426, "Upgrade Required"},
    {429, "Too Many Requests"},
    {431, "Request Header Fields Too Large"},
    {500, "Internal Server Error"},
    {501, "Not Implemented"},
    {503, "Service Unavailable"},
};

const char *http_status_reason(int status)
{
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
        if (reasons[i].status == status)
            return reasons[i].reason;
    }
    return "Unknown";
}

static const char *connection_header(enum http_conn_mode mode)
{
    switch (mode) {
    case HTTP_MODE_CLOSE:
        return "Connection: close\r\n";
    case HTTP_MODE_KEEP_10:
        return "Connection: keep-alive\r\n";
    default:
        return "";
    }
}

char *http_response_format(const http_response_t *resp,
                           enum http_conn_mode mode, size_t *len)
{
    char date[64];
    char head[512];
    struct tm tm;
    time_t now = time(NULL);
    const char *extra = resp->headers ? resp->headers : "";
    int head_len;
    char *out;

    gmtime_r(&now, &tm);
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
    head_len = snprintf(head, sizeof(head),
                        "HTTP/1.1 %d %s\r\nDate: %s\r\nContent-Type: %s\r\n"
                        "Content-Length: %zu\r\n%s",
                        resp->status, http_status_reason(resp->status), date,
                        resp->content_type ? resp->content_type
                                           : "application/json",
                        resp->body_len, connection_header(mode));
    if (head_len < 0 || (size_t)head_len >= sizeof(head))
        return NULL;

    size_t extra_len = strlen(extra);
    size_t total = (size_t)head_len + extra_len + 2 + resp->body_len;
    out = malloc(total);
    if (out == NULL)
        return NULL;
    memcpy(out, head, (size_t)head_len);
    memcpy(out + head_len, extra, extra_len);
    memcpy(out + head_len + extra_len, "\r\n", 2);
    if (resp->body_len > 0)
        memcpy(out + head_len + extra_len + 2, resp->body, resp->body_len);
    *len = total;
    return out;
}

int http_response_json(http_response_t *resp, int status, const json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);

    if (text == NULL)
        return ING_ENOMEM;
    resp->status = status;
    resp->content_type = "application/json";
    resp->body = text;
    resp->body_len = strlen(text);
    return 0;
}

/* Makes a JSON string of `s`. Messages can quote device bytes (a JSON
 * parser's error text does), so invalid UTF-8 is replaced with '?'. */
static json_t *safe_string(const char *s)
{
    json_t *str = json_string(s);
    char *copy;

    if (str != NULL)
        return str;
    copy = strdup(s);
    if (copy == NULL)
        return NULL;
    for (char *p = copy; *p; p++) {
        if ((unsigned char)*p >= 0x80)
            *p = '?';
    }
    str = json_string(copy);
    free(copy);
    return str;
}

int http_response_error(http_response_t *resp, int status, const char *code,
                        const char *message, const char *headers,
                        const json_t *readings)
{
    json_t *obj = json_object();
    int rc = ING_ENOMEM;

    if (obj == NULL)
        return ING_ENOMEM;
    if (json_object_set_new(obj, "error", json_string(code)) != 0 ||
        json_object_set_new(obj, "message", safe_string(message)) != 0)
        goto done;
    if (readings != NULL &&
        json_object_set(obj, "readings", (json_t *)readings) != 0)
        goto done;
    if (headers != NULL) {
        resp->headers = strdup(headers);
        if (resp->headers == NULL)
            goto done;
    }
    rc = http_response_json(resp, status, obj);
    resp->code = code;
done:
    json_decref(obj);
    return rc;
}

void http_response_clear(http_response_t *resp)
{
    free(resp->headers);
    free(resp->body);
    memset(resp, 0, sizeof(*resp));
}
