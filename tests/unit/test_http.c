/* Unit tests for the socket-free parts of the HTTP module: listen
 * addresses, Content-Type and Authorization values, NDJSON splitting and
 * response formatting. Connection behaviour is covered by the integration
 * tests against the real binary. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/errors.h"
#include "http/http_internal.h"

static void listen_parse_ipv4(void **state)
{
    char host[64];
    int port = -1;

    assert_int_equal(http_listen_parse("127.0.0.1:8080", host, sizeof(host),
                                       &port),
                     0);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 8080);
}

static void listen_parse_ipv6(void **state)
{
    char host[64];
    int port = -1;

    assert_int_equal(http_listen_parse("[::1]:9090", host, sizeof(host),
                                       &port),
                     0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 9090);
}

static void listen_parse_any_host(void **state)
{
    char host[64] = "x";
    int port = -1;

    assert_int_equal(http_listen_parse(":80", host, sizeof(host), &port), 0);
    assert_string_equal(host, "");
    assert_int_equal(port, 80);
    assert_int_equal(http_listen_parse("*:81", host, sizeof(host), &port),
                     0);
    assert_string_equal(host, "");
    assert_int_equal(port, 81);
    assert_int_equal(http_listen_parse("localhost:0", host, sizeof(host),
                                       &port),
                     0);
    assert_string_equal(host, "localhost");
    assert_int_equal(port, 0);
}

static void listen_parse_rejects_bad(void **state)
{
    static const char *const bad[] = {
        "8080",        "127.0.0.1",   "127.0.0.1:",   "127.0.0.1:x",
        "127.0.0.1:-1", "127.0.0.1:65536", "::1:80", "[::1]80",
        "[]:80",       "[::1:80",     "host:80x",     "",
    };
    char host[64];
    int port;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        print_message("input: \"%s\"\n", bad[i]);
        assert_int_equal(http_listen_parse(bad[i], host, sizeof(host),
                                           &port),
                         ING_EINVAL);
    }
    assert_int_equal(http_listen_parse(NULL, host, sizeof(host), &port),
                     ING_EINVAL);
}

static void listen_parse_host_too_long(void **state)
{
    char host[4];
    int port;

    assert_int_equal(http_listen_parse("abcd:80", host, sizeof(host), &port),
                     ING_EINVAL);
}

static void content_type_json_variants(void **state)
{
    assert_int_equal(http_content_type_parse("application/json"),
                     HTTP_CT_JSON);
    assert_int_equal(http_content_type_parse("Application/JSON"),
                     HTTP_CT_JSON);
    assert_int_equal(http_content_type_parse("application/json; "
                                             "charset=utf-8"),
                     HTTP_CT_JSON);
    assert_int_equal(http_content_type_parse("application/json;charset="
                                             "\"UTF-8\""),
                     HTTP_CT_JSON);
    assert_int_equal(http_content_type_parse(" application/json ; foo=bar"),
                     HTTP_CT_JSON);
}

static void content_type_ndjson_variants(void **state)
{
    assert_int_equal(http_content_type_parse("application/x-ndjson"),
                     HTTP_CT_NDJSON);
    assert_int_equal(http_content_type_parse("application/ndjson"),
                     HTTP_CT_NDJSON);
    assert_int_equal(http_content_type_parse("application/x-ndjson; "
                                             "charset=utf-8"),
                     HTTP_CT_NDJSON);
}

static void content_type_rejects_others(void **state)
{
    static const char *const bad[] = {
        "text/plain",
        "application/jsonx",
        "application/json; charset=latin1",
        "application/json; charset=\"utf-16\"",
        "application/xml",
        "",
        "application/",
        "multipart/form-data; boundary=x",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        print_message("input: \"%s\"\n", bad[i]);
        assert_int_equal(http_content_type_parse(bad[i]),
                         HTTP_CT_UNSUPPORTED);
    }
}

static void bearer_key_found(void **state)
{
    const char *key = NULL;
    size_t len = 0;

    assert_int_equal(http_bearer_key("Bearer ik_abc", &key, &len), 1);
    assert_int_equal(len, 6);
    assert_memory_equal(key, "ik_abc", 6);
    assert_int_equal(http_bearer_key("bearer   ik_xyz  ", &key, &len), 1);
    assert_int_equal(len, 6);
    assert_memory_equal(key, "ik_xyz", 6);
}

static void bearer_key_missing(void **state)
{
    const char *key = NULL;
    size_t len = 0;

    assert_int_equal(http_bearer_key("Basic dXNlcjpwYXNz", &key, &len), 0);
    assert_int_equal(http_bearer_key("Bearer", &key, &len), 0);
    assert_int_equal(http_bearer_key("Bearer   ", &key, &len), 0);
    assert_int_equal(http_bearer_key("Bearerik_abc", &key, &len), 0);
    assert_int_equal(http_bearer_key("", &key, &len), 0);
}

static void ndjson_skips_blank_lines(void **state)
{
    const char body[] = "{\"a\":1}\r\n\n   \n{\"b\":2}\n\t\r\n{\"c\":3}";
    const char *line;
    size_t len, off = 0;

    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     1);
    assert_int_equal(len, 7);
    assert_memory_equal(line, "{\"a\":1}", 7);
    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     1);
    assert_memory_equal(line, "{\"b\":2}", 7);
    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     1);
    assert_int_equal(len, 7);
    assert_memory_equal(line, "{\"c\":3}", 7);
    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     0);
}

static void ndjson_only_blank(void **state)
{
    const char body[] = "\n\r\n  \n";
    const char *line;
    size_t len, off = 0;

    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     0);
    off = 0;
    assert_int_equal(http_ndjson_next("", 0, &off, &line, &len), 0);
}

static void ndjson_keeps_bad_lines(void **state)
{
    const char body[] = "{\"a\":1}\nnot json\n";
    const char *line;
    size_t len, off = 0;

    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     1);
    assert_int_equal(http_ndjson_next(body, strlen(body), &off, &line, &len),
                     1);
    assert_int_equal(len, 8);
    assert_memory_equal(line, "not json", 8);
}

static void status_reason_known_and_unknown(void **state)
{
    assert_string_equal(http_status_reason(202), "Accepted");
    assert_string_equal(http_status_reason(431),
                        "Request Header Fields Too Large");
    assert_string_equal(http_status_reason(299), "Unknown");
}

/* Formats `resp` and returns it as a NUL-terminated string. */
static char *format(const http_response_t *resp, enum http_conn_mode mode,
                    size_t *len)
{
    char *data = http_response_format(resp, mode, len);
    char *text;

    assert_non_null(data);
    text = malloc(*len + 1);
    assert_non_null(text);
    memcpy(text, data, *len);
    text[*len] = '\0';
    free(data);
    return text;
}

static void response_format_keep_alive(void **state)
{
    http_response_t resp = {.status = 202,
                            .content_type = "application/json",
                            .body = "{}",
                            .body_len = 2};
    size_t len;
    char *text = format(&resp, HTTP_MODE_KEEP_11, &len);

    assert_true(strncmp(text, "HTTP/1.1 202 Accepted\r\n", 23) == 0);
    assert_non_null(strstr(text, "\r\nContent-Length: 2\r\n"));
    assert_non_null(strstr(text, "\r\nContent-Type: application/json\r\n"));
    assert_null(strstr(text, "Connection:"));
    assert_string_equal(text + len - 6, "\r\n\r\n{}");
    free(text);

    text = format(&resp, HTTP_MODE_KEEP_10, &len);
    assert_non_null(strstr(text, "\r\nConnection: keep-alive\r\n"));
    free(text);
}

static void response_format_close_and_headers(void **state)
{
    http_response_t resp = {.status = 503,
                            .headers = "Retry-After: 5\r\n",
                            .body = "",
                            .body_len = 0};
    size_t len;
    char *text = format(&resp, HTTP_MODE_CLOSE, &len);

    assert_true(strncmp(text, "HTTP/1.1 503 Service Unavailable\r\n", 34) ==
                0);
    assert_non_null(strstr(text, "\r\nConnection: close\r\n"));
    assert_non_null(strstr(text, "\r\nRetry-After: 5\r\n\r\n"));
    assert_non_null(strstr(text, "\r\nContent-Length: 0\r\n"));
    assert_string_equal(text + len - 4, "\r\n\r\n");
    free(text);
}

static void response_error_is_json(void **state)
{
    http_response_t resp = {0};
    json_t *readings = json_pack("[{s:i}]", "index", 3);
    json_t *body;
    json_error_t error;

    assert_int_equal(http_response_error(&resp, 400, "validation_failed",
                                         "a \"quoted\" message",
                                         "X-Test: 1\r\n", readings),
                     0);
    assert_int_equal(resp.status, 400);
    assert_string_equal(resp.content_type, "application/json");
    assert_string_equal(resp.headers, "X-Test: 1\r\n");
    assert_string_equal(resp.code, "validation_failed");
    body = json_loadb(resp.body, resp.body_len, 0, &error);
    assert_non_null(body);
    assert_string_equal(json_string_value(json_object_get(body, "error")),
                        "validation_failed");
    assert_string_equal(json_string_value(json_object_get(body, "message")),
                        "a \"quoted\" message");
    assert_int_equal(json_array_size(json_object_get(body, "readings")), 1);
    json_decref(body);
    json_decref(readings);
    http_response_clear(&resp);
    assert_null(resp.body);
    assert_null(resp.headers);
}

static void response_error_replaces_bad_utf8(void **state)
{
    http_response_t resp = {0};
    json_t *body;
    json_error_t error;

    assert_int_equal(http_response_error(&resp, 400, "invalid_json",
                                         "near '\xff\xfe'", NULL, NULL),
                     0);
    body = json_loadb(resp.body, resp.body_len, 0, &error);
    assert_non_null(body);
    assert_string_equal(json_string_value(json_object_get(body, "message")),
                        "near '?" "?'");
    assert_null(json_object_get(body, "readings"));
    json_decref(body);
    http_response_clear(&resp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(listen_parse_ipv4),
        cmocka_unit_test(listen_parse_ipv6),
        cmocka_unit_test(listen_parse_any_host),
        cmocka_unit_test(listen_parse_rejects_bad),
        cmocka_unit_test(listen_parse_host_too_long),
        cmocka_unit_test(content_type_json_variants),
        cmocka_unit_test(content_type_ndjson_variants),
        cmocka_unit_test(content_type_rejects_others),
        cmocka_unit_test(bearer_key_found),
        cmocka_unit_test(bearer_key_missing),
        cmocka_unit_test(ndjson_skips_blank_lines),
        cmocka_unit_test(ndjson_only_blank),
        cmocka_unit_test(ndjson_keeps_bad_lines),
        cmocka_unit_test(status_reason_known_and_unknown),
        cmocka_unit_test(response_format_keep_alive),
        cmocka_unit_test(response_format_close_and_headers),
        cmocka_unit_test(response_error_is_json),
        cmocka_unit_test(response_error_replaces_bad_utf8),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
