/* Unit tests of the byte-level JSON helpers: minifying, splitting a
 * top-level array and finding an object member, on valid text and on
 * truncated or malformed text that must not be read past its length.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/errors.h"
#include "pipeline/rawjson.h"

/* Minifies `in` into a buffer of exactly strlen(in) bytes, so that
 * AddressSanitizer or valgrind would see a write past it, and returns a
 * NUL-terminated copy, or NULL when minify failed with `*rc`. */
static char *minify(const char *in, size_t max_depth, int *rc)
{
    size_t len = strlen(in);
    char *out = malloc(len ? len : 1);
    char *copy;
    size_t n = 0;

    assert_non_null(out);
    *rc = rawjson_minify(in, len, out, &n, max_depth);
    if (*rc != 0) {
        free(out);
        return NULL;
    }
    copy = calloc(1, n + 1);
    assert_non_null(copy);
    memcpy(copy, out, n);
    free(out);
    return copy;
}

static void rawjson_minify_keeps_numbers(void **state)
{
    const char *in = "{ \"a\" : 0.1 ,\n\t\"b\": 1E2, \"c\": -0,\r\n"
                     " \"d\": 3.14159265358979323846264338327950288 }";
    int rc;
    char *out = minify(in, 0, &rc);

    (void)state;
    assert_int_equal(rc, 0);
    assert_string_equal(out, "{\"a\":0.1,\"b\":1E2,\"c\":-0,"
                             "\"d\":3.14159265358979323846264338327950288}");
    free(out);
}

static void rawjson_minify_copies_strings(void **state)
{
    const char *in = "[ \"a b\" , \"x\\\" ]\" , \"\\\\\", \" \\t \" ]";
    int rc;
    char *out = minify(in, 0, &rc);

    (void)state;
    assert_int_equal(rc, 0);
    assert_string_equal(out, "[\"a b\",\"x\\\" ]\",\"\\\\\",\" \\t \"]");
    free(out);
}

static void rawjson_minify_limits_depth(void **state)
{
    int rc;
    char *out;

    (void)state;
    out = minify("[[[1]]]", 3, &rc);
    assert_int_equal(rc, 0);
    assert_string_equal(out, "[[[1]]]");
    free(out);
    assert_null(minify("[[[[1]]]]", 3, &rc));
    assert_int_equal(rc, ING_ETOOBIG);
    /* Brackets inside strings are no nesting. */
    out = minify("{\"a\":\"[[[[[[\"}", 1, &rc);
    assert_int_equal(rc, 0);
    free(out);
}

static void rawjson_minify_rejects_malformed(void **state)
{
    static const char *const bad[] = {
        "\"abc", "\"abc\\", "[1,2", "{\"a\":1}}", "]", "[\"a]",
    };
    int rc;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        assert_null(minify(bad[i], 0, &rc));
        assert_int_equal(rc, ING_EINVAL);
    }
}

static void rawjson_array_splits_elements(void **state)
{
    const char *in = " [ {\"a\":[1,2]} , \"s,]\" ,3.0e1,null,[] ] \n";
    rawjson_span_t spans[8];
    size_t count = 0;

    (void)state;
    assert_int_equal(rawjson_array_elements(in, strlen(in), spans, 8, &count),
                     0);
    assert_int_equal(count, 5);
    assert_memory_equal(in + spans[0].off, "{\"a\":[1,2]}", spans[0].len);
    assert_int_equal(spans[0].len, 11);
    assert_memory_equal(in + spans[1].off, "\"s,]\"", spans[1].len);
    assert_int_equal(spans[2].len, 5);
    assert_memory_equal(in + spans[2].off, "3.0e1", 5);
    assert_int_equal(spans[3].len, 4);
    assert_int_equal(spans[4].len, 2);
}

static void rawjson_array_empty_and_errors(void **state)
{
    static const char *const bad[] = {
        "", "{}", "[1,", "[1 2]", "[1]x", "[\"a", "[[1]", "[,1]",
    };
    rawjson_span_t spans[4];
    size_t count = 99;

    (void)state;
    assert_int_equal(rawjson_array_elements("[ ]", 3, spans, 4, &count), 0);
    assert_int_equal(count, 0);
    assert_int_equal(rawjson_array_elements("[1,2,3]", 7, spans, 2, &count),
                     ING_ETOOBIG);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(
            rawjson_array_elements(bad[i], strlen(bad[i]), spans, 4, &count),
            ING_EINVAL);
}

static void rawjson_member_found(void **state)
{
    const char *in = "{\"id\":\"r\",\"readings\" : [ {\"x\":1} ],\"n\":{}}";
    rawjson_span_t v = {0, 0};

    (void)state;
    assert_int_equal(rawjson_object_member(in, strlen(in), "readings", &v), 1);
    assert_int_equal(v.len, 11);
    assert_memory_equal(in + v.off, "[ {\"x\":1} ]", v.len);
    assert_int_equal(rawjson_object_member(in, strlen(in), "n", &v), 1);
    assert_memory_equal(in + v.off, "{}", 2);
    assert_int_equal(rawjson_object_member(in, strlen(in), "reading", &v), 0);
}

static void rawjson_member_escaped_key(void **state)
{
    /* "read\u0069ng" is the key "reading". */
    const char *in = "{\"read\\u0069ng\":{\"v\":1},\"x\\\"\":2}";
    rawjson_span_t v = {0, 0};

    (void)state;
    assert_int_equal(rawjson_object_member(in, strlen(in), "reading", &v), 1);
    assert_memory_equal(in + v.off, "{\"v\":1}", v.len);
    assert_int_equal(rawjson_object_member(in, strlen(in), "x\"", &v), 1);
    assert_memory_equal(in + v.off, "2", v.len);
}

static void rawjson_member_last_wins(void **state)
{
    const char *in = "{\"a\":1,\"a\":22}";
    rawjson_span_t v = {0, 0};

    (void)state;
    assert_int_equal(rawjson_object_member(in, strlen(in), "a", &v), 1);
    assert_memory_equal(in + v.off, "22", 2);
}

static void rawjson_member_rejects_malformed(void **state)
{
    static const char *const bad[] = {
        "", "[]", "{\"a\"", "{\"a\":", "{\"a\":1", "{a:1}", "{\"a\" 1}",
        "{\"a\":1,}", "{\"a\":[1}",
    };
    rawjson_span_t v;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(
            rawjson_object_member(bad[i], strlen(bad[i]), "a", &v),
            ING_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(rawjson_minify_keeps_numbers),
        cmocka_unit_test(rawjson_minify_copies_strings),
        cmocka_unit_test(rawjson_minify_limits_depth),
        cmocka_unit_test(rawjson_minify_rejects_malformed),
        cmocka_unit_test(rawjson_array_splits_elements),
        cmocka_unit_test(rawjson_array_empty_and_errors),
        cmocka_unit_test(rawjson_member_found),
        cmocka_unit_test(rawjson_member_escaped_key),
        cmocka_unit_test(rawjson_member_last_wins),
        cmocka_unit_test(rawjson_member_rejects_malformed),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
