/* Unit tests for the JSON Schema validator: each keyword, compile-time
 * rejections, error messages and pointers, date-time, and the default
 * device type's schema in schemas/reading.json.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/errors.h"
#include "validate/validate.h"

/* Counting allocations: the executable's malloc, calloc and realloc take
 * precedence over glibc's for every library in the process, and forward to
 * glibc's own entry points. AddressSanitizer replaces these functions
 * itself, so the count is off in sanitizer builds. */
static size_t allocation_count;

#if defined(__SANITIZE_ADDRESS__)
#define COUNT_ALLOCATIONS 0
#else
#define COUNT_ALLOCATIONS 1
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);

void *malloc(size_t size)
{
    allocation_count++;
    return __libc_malloc(size);
}

void *calloc(size_t count, size_t size)
{
    allocation_count++;
    return __libc_calloc(count, size);
}

void *realloc(void *ptr, size_t size)
{
    allocation_count++;
    return __libc_realloc(ptr, size);
}
#endif

/* Compiles schema text that must be valid. */
static schema_t *compile_text(const char *text)
{
    json_error_t jerr;
    json_t *doc = json_loads(text, JSON_DECODE_ANY, &jerr);
    schema_t *schema = NULL;
    char err[512];

    if (doc == NULL)
        fail_msg("bad schema JSON: %s", jerr.text);
    if (schema_compile(doc, &schema, err, sizeof(err)) != 0)
        fail_msg("schema did not compile: %s", err);
    json_decref(doc);
    return schema;
}

/* Compiles schema text that must be rejected, returning the message. */
static const char *compile_error(const char *text)
{
    static char err[512];
    json_error_t jerr;
    json_t *doc = json_loads(text, 0, &jerr);
    schema_t *schema = NULL;
    int rc;

    if (doc == NULL)
        fail_msg("bad schema JSON: %s", jerr.text);
    rc = schema_compile(doc, &schema, err, sizeof(err));
    json_decref(doc);
    assert_int_equal(rc, ING_EINVAL);
    assert_null(schema);
    return err;
}

/* Validates instance text and leaves the errors in `errs`. */
static int check_text(const schema_t *schema, const char *text,
                      validate_errors_t *errs)
{
    json_error_t jerr;
    json_t *instance =
        json_loads(text, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    int n;

    if (instance == NULL)
        fail_msg("bad instance JSON %s: %s", text, jerr.text);
    validate_errors_clear(errs);
    n = schema_validate(schema, instance, errs);
    json_decref(instance);
    return n;
}

static bool is_valid(const schema_t *schema, const char *text)
{
    validate_errors_t errs;
    int n;

    validate_errors_init(&errs);
    n = check_text(schema, text, &errs);
    validate_errors_clear(&errs);
    return n == 0;
}

/* Asserts that the instance fails with exactly one error. */
static void assert_one_error(const schema_t *schema, const char *text,
                             const char *pointer, const char *reason)
{
    validate_errors_t errs;

    validate_errors_init(&errs);
    assert_int_equal(check_text(schema, text, &errs), 1);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.items[0].pointer, pointer);
    assert_string_equal(errs.items[0].reason, reason);
    validate_errors_clear(&errs);
}

static void validate_type_message_lists_types(void **state)
{
    schema_t *s = compile_text("{\"type\": \"number\"}");

    assert_true(is_valid(s, "1"));
    assert_true(is_valid(s, "1.5"));
    assert_one_error(s, "\"x\"", "", "must be of type number, got string");
    schema_free(s);

    s = compile_text("{\"type\": [\"string\", \"null\"]}");
    assert_true(is_valid(s, "null"));
    assert_one_error(s, "3", "", "must be of type null or string, got integer");
    assert_one_error(s, "true", "",
                     "must be of type null or string, got boolean");
    schema_free(s);
}

static void validate_integer_accepts_whole_real(void **state)
{
    schema_t *s = compile_text("{\"type\": \"integer\"}");

    assert_true(is_valid(s, "1"));
    assert_true(is_valid(s, "1.0"));
    assert_true(is_valid(s, "-0.0"));
    assert_one_error(s, "1.5", "", "must be of type integer, got number");
    assert_one_error(s, "[]", "", "must be of type integer, got array");
    schema_free(s);
}

static void validate_maximum_message(void **state)
{
    schema_t *s = compile_text("{\"properties\": {\"sensor_value\": "
                               "{\"maximum\": 100}}}");

    assert_true(is_valid(s, "{\"sensor_value\": 100}"));
    assert_one_error(s, "{\"sensor_value\": 120.5}", "/sensor_value",
                     "must be <= 100, got 120.5");
    schema_free(s);
}

static void validate_bounds_all_four(void **state)
{
    schema_t *s = compile_text("{\"minimum\": 0, \"exclusiveMaximum\": 10}");

    assert_true(is_valid(s, "0"));
    assert_true(is_valid(s, "9.999"));
    assert_one_error(s, "-0.5", "", "must be >= 0, got -0.5");
    assert_one_error(s, "10", "", "must be < 10, got 10");
    assert_true(is_valid(s, "\"not a number\""));
    schema_free(s);

    s = compile_text("{\"exclusiveMinimum\": 1.5, \"maximum\": 2}");
    assert_one_error(s, "1.5", "", "must be > 1.5, got 1.5");
    assert_true(is_valid(s, "2.0"));
    assert_one_error(s, "2.25", "", "must be <= 2, got 2.25");
    schema_free(s);
}

static void validate_bounds_exact_above_2_pow_53(void **state)
{
    /* 2^53 + 1 is not representable as a double, so a comparison through
     * double would call it equal to 2^53. */
    schema_t *s = compile_text("{\"maximum\": 9007199254740992.0}");

    assert_true(is_valid(s, "9007199254740992"));
    assert_false(is_valid(s, "9007199254740993"));
    schema_free(s);

    s = compile_text("{\"minimum\": 9223372036854775807}");
    assert_false(is_valid(s, "9223372036854775806"));
    assert_true(is_valid(s, "9223372036854775807"));
    assert_true(is_valid(s, "1e19"));
    schema_free(s);
}

static void validate_multiple_of_decimals(void **state)
{
    schema_t *s = compile_text("{\"multipleOf\": 0.01}");

    assert_true(is_valid(s, "0.07"));
    assert_true(is_valid(s, "19.99"));
    assert_true(is_valid(s, "4.35"));
    assert_true(is_valid(s, "100"));
    assert_true(is_valid(s, "-0.3"));
    assert_true(is_valid(s, "0"));
    assert_one_error(s, "0.015", "", "must be a multiple of 0.01, got 0.015");
    schema_free(s);

    s = compile_text("{\"multipleOf\": 3}");
    assert_true(is_valid(s, "9"));
    assert_true(is_valid(s, "-9"));
    assert_true(is_valid(s, "9.0"));
    assert_one_error(s, "10", "", "must be a multiple of 3, got 10");
    assert_false(is_valid(s, "4.5"));
    schema_free(s);

    s = compile_text("{\"multipleOf\": 0.5}");
    assert_true(is_valid(s, "1e308"));
    assert_true(is_valid(s, "2.5"));
    assert_false(is_valid(s, "2.25"));
    schema_free(s);
}

static void validate_length_counts_code_points(void **state)
{
    schema_t *s = compile_text("{\"minLength\": 2, \"maxLength\": 3}");

    assert_true(is_valid(s, "\"ab\""));
    /* "é" is two bytes in UTF-8 and "💧" is four, but each is one code
     * point. */
    assert_true(is_valid(s, "\"\xc3\xa9\xc3\xa9\xc3\xa9\""));
    assert_true(is_valid(s, "\"\xf0\x9f\x92\xa7\xf0\x9f\x92\xa7\""));
    assert_one_error(s, "\"\xf0\x9f\x92\xa7\"", "",
                     "must have at least 2 characters, got 1");
    assert_one_error(s, "\"abcd\"", "",
                     "must have at most 3 characters, got 4");
    schema_free(s);
}

static void validate_pattern_message(void **state)
{
    schema_t *s = compile_text("{\"pattern\": \"^a\"}");

    assert_true(is_valid(s, "\"abc\""));
    assert_true(is_valid(s, "42"));
    assert_one_error(s, "\"bab\"", "", "must match pattern \"^a\"");
    schema_free(s);
}

static void validate_pattern_dialect(void **state)
{
    schema_t *s = compile_text("{\"pattern\": \"^[0-9]+$\"}");

    /* "$" matches only at the very end, as in ECMA-262. */
    assert_false(is_valid(s, "\"123\\n\""));
    schema_free(s);

    s = compile_text("{\"pattern\": \"^\\\\p{Letter}+$\"}");
    assert_true(is_valid(s, "\"\xc3\xa9t\xc3\xa9\""));
    assert_false(is_valid(s, "\"a1\""));
    schema_free(s);

    s = compile_text("{\"pattern\": \"^\\\\u0041\\\\u{1F4A7}$\"}");
    assert_true(is_valid(s, "\"A\xf0\x9f\x92\xa7\""));
    schema_free(s);
}

static void validate_pattern_backtracking_bounded(void **state)
{
    /* Exponential backtracking hits the match limit and counts as a
     * mismatch instead of running for minutes. */
    schema_t *s = compile_text("{\"pattern\": \"^(a+)+$\"}");

    assert_false(is_valid(s, "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!\""));
    assert_true(is_valid(s, "\"aaaa\""));
    schema_free(s);
}

static void validate_required_pointer(void **state)
{
    schema_t *s = compile_text("{\"required\": [\"device_id\", "
                               "\"sensor_value\"]}");
    validate_errors_t errs;

    assert_true(is_valid(s, "{\"device_id\": 1, \"sensor_value\": 2}"));
    assert_true(is_valid(s, "[]"));
    assert_one_error(s, "{\"device_id\": \"d\"}", "/sensor_value",
                     "is required");
    validate_errors_init(&errs);
    assert_int_equal(check_text(s, "{}", &errs), 2);
    assert_string_equal(errs.items[0].pointer, "/device_id");
    assert_string_equal(errs.items[1].pointer, "/sensor_value");
    validate_errors_clear(&errs);
    schema_free(s);
}

static void validate_additional_properties_false(void **state)
{
    schema_t *s = compile_text("{\"properties\": {\"a\": {}}, "
                               "\"patternProperties\": {\"^x_\": "
                               "{\"type\": \"integer\"}}, "
                               "\"additionalProperties\": false}");

    assert_true(is_valid(s, "{\"a\": 1, \"x_1\": 2}"));
    assert_one_error(s, "{\"a\": 1, \"b\": 2}", "/b",
                     "is not allowed (additionalProperties is false)");
    assert_one_error(s, "{\"x_1\": \"s\"}", "/x_1",
                     "must be of type integer, got string");
    schema_free(s);

    s = compile_text("{\"additionalProperties\": {\"type\": \"string\"}}");
    assert_one_error(s, "{\"a/b~c\": 1}", "/a~1b~0c",
                     "must be of type string, got integer");
    schema_free(s);
}

static void validate_property_names_message(void **state)
{
    schema_t *s = compile_text("{\"propertyNames\": {\"pattern\": \"^a\", "
                               "\"maxLength\": 3}}");

    assert_true(is_valid(s, "{\"ab\": 1, \"abc\": 2}"));
    assert_true(is_valid(s, "[\"zzzz\"]"));
    assert_one_error(s, "{\"ab\": 1, \"bc\": 2}", "/bc",
                     "property name must match pattern \"^a\"");
    assert_one_error(s, "{\"abcd\": 1}", "/abcd",
                     "property name must have at most 3 characters, got 4");
    schema_free(s);

    s = compile_text("{\"propertyNames\": {\"enum\": [\"x\", \"y\"]}}");
    assert_true(is_valid(s, "{\"x\": 1}"));
    assert_false(is_valid(s, "{\"z\": 1}"));
    schema_free(s);
}

static void validate_enum_and_const_by_value(void **state)
{
    schema_t *s = compile_text("{\"enum\": [1, \"a\", {\"k\": [true]}]}");

    assert_true(is_valid(s, "1.0"));
    assert_true(is_valid(s, "{\"k\": [true]}"));
    assert_one_error(s, "2", "", "must be one of [1,\"a\",{\"k\":[true]}]");
    assert_false(is_valid(s, "{\"k\": [true], \"j\": 1}"));
    schema_free(s);

    s = compile_text("{\"const\": {\"a\": 1, \"b\": [0.5]}}");
    assert_true(is_valid(s, "{\"b\": [0.5], \"a\": 1.0}"));
    assert_one_error(s, "{\"a\": 1}", "",
                     "must be equal to {\"a\":1,\"b\":[0.5]}");
    schema_free(s);
}

static void validate_items_and_prefix_items(void **state)
{
    schema_t *s = compile_text("{\"properties\": {\"list\": {"
                               "\"prefixItems\": [{\"type\": \"string\"}], "
                               "\"items\": {\"type\": \"number\"}, "
                               "\"minItems\": 1, \"maxItems\": 3}}}");

    assert_true(is_valid(s, "{\"list\": [\"a\", 1, 2.5]}"));
    assert_one_error(s, "{\"list\": [\"a\", 1, \"b\"]}", "/list/2",
                     "must be of type number, got string");
    assert_one_error(s, "{\"list\": [1]}", "/list/0",
                     "must be of type string, got integer");
    assert_one_error(s, "{\"list\": []}", "/list",
                     "must have at least 1 item, got 0");
    assert_one_error(s, "{\"list\": [\"a\", 1, 2, 3]}", "/list",
                     "must have at most 3 items, got 4");
    schema_free(s);

    s = compile_text("{\"prefixItems\": [true], \"items\": false}");
    assert_true(is_valid(s, "[1]"));
    assert_one_error(s, "[1, 2]", "/1", "is not allowed (items is false)");
    schema_free(s);
}

static void validate_unique_items_by_value(void **state)
{
    schema_t *s = compile_text("{\"uniqueItems\": true}");

    assert_true(is_valid(s, "[1, 2, \"1\", [1], {\"a\": 1}]"));
    assert_one_error(s, "[1, 2, 1.0]", "",
                     "must not contain duplicate items (items 0 and 2 are "
                     "equal)");
    assert_false(is_valid(s, "[{\"a\": 1, \"b\": 2}, {\"b\": 2, \"a\": 1}]"));
    schema_free(s);
}

static void validate_property_counts(void **state)
{
    schema_t *s = compile_text("{\"minProperties\": 1, "
                               "\"maxProperties\": 2}");

    assert_true(is_valid(s, "{\"a\": 1}"));
    assert_one_error(s, "{}", "", "must have at least 1 property, got 0");
    assert_one_error(s, "{\"a\": 1, \"b\": 2, \"c\": 3}", "",
                     "must have at most 2 properties, got 3");
    schema_free(s);
}

static void validate_combinators_summarised(void **state)
{
    schema_t *s = compile_text("{\"anyOf\": [{\"type\": \"string\"}, "
                               "{\"minimum\": 10}]}");

    assert_true(is_valid(s, "\"a\""));
    assert_true(is_valid(s, "11"));
    assert_one_error(s, "5", "", "must match at least one schema in anyOf");
    schema_free(s);

    s = compile_text("{\"oneOf\": [{\"type\": \"integer\"}, "
                     "{\"minimum\": 2}]}");
    assert_true(is_valid(s, "1"));
    assert_true(is_valid(s, "2.5"));
    assert_one_error(s, "3", "",
                     "must match exactly one schema in oneOf, matched 0 "
                     "and 1");
    assert_one_error(s, "1.5", "",
                     "must match exactly one schema in oneOf, matched none");
    schema_free(s);

    s = compile_text("{\"not\": {\"type\": \"null\"}}");
    assert_true(is_valid(s, "0"));
    assert_one_error(s, "null", "", "must not match the schema in not");
    schema_free(s);
}

static void validate_all_of_reports_each(void **state)
{
    schema_t *s = compile_text("{\"allOf\": [{\"minimum\": 5}, "
                               "{\"multipleOf\": 2}]}");
    validate_errors_t errs;

    assert_true(is_valid(s, "6"));
    validate_errors_init(&errs);
    assert_int_equal(check_text(s, "3", &errs), 2);
    assert_string_equal(errs.items[0].reason, "must be >= 5, got 3");
    assert_string_equal(errs.items[1].reason, "must be a multiple of 2, got 3");
    validate_errors_clear(&errs);
    schema_free(s);
}

static void validate_if_then_else(void **state)
{
    schema_t *s = compile_text(
        "{\"if\": {\"properties\": {\"unit\": {\"const\": \"F\"}}}, "
        "\"then\": {\"properties\": {\"t\": {\"maximum\": 300}}}, "
        "\"else\": {\"properties\": {\"t\": {\"maximum\": 150}}}}");

    assert_true(is_valid(s, "{\"unit\": \"F\", \"t\": 200}"));
    assert_one_error(s, "{\"unit\": \"C\", \"t\": 200}", "/t",
                     "must be <= 150, got 200");
    assert_one_error(s, "{\"unit\": \"F\", \"t\": 301}", "/t",
                     "must be <= 300, got 301");
    schema_free(s);
}

static void validate_dependent_required_pointer(void **state)
{
    schema_t *s = compile_text("{\"dependentRequired\": "
                               "{\"lat\": [\"lon\"]}}");

    assert_true(is_valid(s, "{}"));
    assert_true(is_valid(s, "{\"lat\": 1, \"lon\": 2}"));
    assert_one_error(s, "{\"lat\": 1}", "/lon",
                     "is required when \"lat\" is present");
    schema_free(s);
}

static void validate_boolean_schemas(void **state)
{
    schema_t *s = compile_text("true");

    assert_true(is_valid(s, "{\"anything\": [1]}"));
    schema_free(s);
    s = compile_text("false");
    assert_one_error(s, "1", "", "is not allowed (schema is false)");
    schema_free(s);
    s = compile_text("{\"properties\": {\"a\": false}}");
    assert_one_error(s, "{\"a\": 1}", "/a",
                     "is not allowed (properties is false)");
    schema_free(s);
}

static void validate_local_refs(void **state)
{
    schema_t *s = compile_text(
        "{\"$defs\": {\"percent\": {\"type\": \"number\", \"minimum\": 0, "
        "\"maximum\": 100}, \"a/b%\": {\"type\": \"string\"}}, "
        "\"properties\": {\"humidity\": {\"$ref\": \"#/$defs/percent\"}, "
        "\"battery\": {\"$ref\": \"#/properties/humidity\"}, "
        "\"name\": {\"$ref\": \"#/$defs/a~1b%25\"}}}");

    assert_true(is_valid(s, "{\"humidity\": 50, \"battery\": 1, "
                            "\"name\": \"x\"}"));
    assert_one_error(s, "{\"battery\": 101}", "/battery",
                     "must be <= 100, got 101");
    assert_one_error(s, "{\"name\": 1}", "/name",
                     "must be of type string, got integer");
    schema_free(s);
}

static void validate_recursive_ref(void **state)
{
    schema_t *s = compile_text(
        "{\"type\": \"object\", \"properties\": {\"value\": {\"type\": "
        "\"integer\"}, \"children\": {\"type\": \"array\", \"items\": "
        "{\"$ref\": \"#\"}}}}");

    assert_true(is_valid(s, "{\"value\": 1, \"children\": [{\"value\": 2, "
                            "\"children\": [{\"value\": 3}]}]}"));
    assert_one_error(
        s, "{\"children\": [{\"children\": [{\"value\": \"x\"}]}]}",
        "/children/0/children/0/value", "must be of type integer, got string");
    schema_free(s);
}

static void validate_deep_instance_bounded(void **state)
{
    schema_t *s = compile_text("{\"items\": {\"$ref\": \"#\"}}");
    json_t *root = json_array(), *cur = root;
    validate_errors_t errs;

    /* Deeper than any parser limit, so only a json_t built in code gets
     * here, and it must fail cleanly instead of exhausting the stack. */
    for (int i = 0; i < 5000; i++) {
        json_t *next = json_array();
        json_array_append_new(cur, next);
        cur = next;
    }
    validate_errors_init(&errs);
    assert_int_equal(schema_validate(s, root, &errs), 1);
    assert_non_null(strstr(errs.items[0].reason, "nested too deeply"));
    validate_errors_clear(&errs);
    json_decref(root);
    schema_free(s);
}

static void validate_error_limit(void **state)
{
    schema_t *s = compile_text("{\"items\": {\"type\": \"string\"}}");
    validate_errors_t errs;
    json_t *many = json_array();

    for (int i = 0; i < 40; i++)
        json_array_append_new(many, json_integer(i));
    validate_errors_init(&errs);
    assert_int_equal(schema_validate(s, many, &errs), 16);
    assert_int_equal(errs.count, 16);
    assert_string_equal(errs.items[15].pointer, "/15");
    validate_errors_clear(&errs);
    assert_int_equal(errs.count, 0);
    errs.limit = 2;
    assert_int_equal(schema_validate(s, many, &errs), 2);
    validate_errors_clear(&errs);
    assert_int_equal(schema_validate(s, many, NULL), 1);
    json_decref(many);
    schema_free(s);
}

static void compile_rejects_unknown_keyword(void **state)
{
    assert_string_equal(
        compile_error("{\"properties\": {\"x\": {\"maximun\": 3}}}"),
        "#/properties/x: unsupported keyword \"maximun\"");
    assert_string_equal(
        compile_error("{\"properties\": {\"x\": {\"format\": \"email\"}}}"),
        "#/properties/x: unsupported keyword \"format\" value \"email\"");
    assert_string_equal(
        compile_error("{\"$defs\": {\"a/b\": {\"unevaluatedProperties\": "
                      "false}}}"),
        "#/$defs/a~1b: unsupported keyword \"unevaluatedProperties\"");
    assert_string_equal(compile_error("{\"allOf\": [{}, {\"contains\": {}}]}"),
                        "#/allOf/1: unsupported keyword \"contains\"");
}

static void compile_rejects_unsupported_refs(void **state)
{
    const char *err;

    err = compile_error("{\"$ref\": \"http://example.com/s.json\"}");
    assert_non_null(strstr(err, "#: unsupported keyword \"$ref\""));
    assert_non_null(strstr(err, "http://example.com/s.json"));
    err = compile_error("{\"$ref\": \"#anchor\"}");
    assert_non_null(strstr(err, "unsupported keyword \"$ref\" to an anchor"));
    err = compile_error("{\"properties\": {\"a\": {\"$id\": \"a.json\"}}}");
    assert_non_null(strstr(err, "#/properties/a: unsupported keyword "
                                "\"$id\""));
    err = compile_error("{\"$schema\": "
                        "\"http://json-schema.org/draft-07/schema#\"}");
    assert_non_null(strstr(err, "#: unsupported keyword \"$schema\""));
    err = compile_error("{\"$ref\": \"#/$defs/missing\"}");
    assert_non_null(strstr(err, "no such location"));
}

static void compile_rejects_ref_cycle(void **state)
{
    const char *err = compile_error(
        "{\"$defs\": {\"a\": {\"allOf\": [{\"$ref\": \"#/$defs/b\"}]}, "
        "\"b\": {\"$ref\": \"#/$defs/a\"}}, \"$ref\": \"#/$defs/a\"}");

    assert_non_null(strstr(err, "never end"));
}

static void compile_rejects_invalid_values(void **state)
{
    assert_string_equal(compile_error("{\"minimum\": \"0\"}"),
                        "#: invalid \"minimum\": expected a number, got "
                        "string");
    assert_string_equal(compile_error("{\"minLength\": -1}"),
                        "#: invalid \"minLength\": expected a non-negative "
                        "integer, got number");
    assert_string_equal(compile_error("{\"multipleOf\": 0}"),
                        "#: invalid \"multipleOf\": expected a number "
                        "greater than 0, got number");
    assert_string_equal(compile_error("{\"type\": \"float\"}"),
                        "#: invalid \"type\": unknown type \"float\"");
    assert_string_equal(compile_error("{\"required\": [\"a\", \"a\"]}"),
                        "#: invalid \"required\": \"a\" appears twice");
    assert_string_equal(compile_error("{\"items\": [{}]}"),
                        "#/items: invalid schema: expected an object or a "
                        "boolean, got array");
    assert_non_null(strstr(compile_error("{\"pattern\": \"(\"}"),
                           "#: invalid \"pattern\" \"(\""));
    assert_string_equal(compile_error("{\"anyOf\": []}"),
                        "#: invalid \"anyOf\": expected a non-empty array of "
                        "schemas, got array");
}

static void compile_accepts_annotations(void **state)
{
    schema_t *s = compile_text(
        "{\"$schema\": \"https://json-schema.org/draft/2020-12/schema\", "
        "\"$id\": \"https://example.com/reading.json\", \"$comment\": \"c\", "
        "\"title\": \"t\", \"description\": \"d\", \"default\": {}, "
        "\"examples\": [{}], \"deprecated\": false, \"readOnly\": false, "
        "\"writeOnly\": false, \"maxLength\": 2.0}");

    assert_true(is_valid(s, "{}"));
    schema_free(s);
}

static void date_time_accepts_rfc3339(void **state)
{
    static const char *valid[] = {
        "2026-12-04T17:00:00Z",
        "2026-12-04T17:00:00+01:00",
        "2026-12-04T17:00:00.123456-08:30",
        "2026-12-04t17:00:00z",
        "2024-02-29T00:00:00Z",
        "1998-12-31T23:59:60Z",
        "1998-12-31T15:59:60.5-08:00",
    };
    for (size_t i = 0; i < sizeof(valid) / sizeof(valid[0]); i++) {
        if (!validate_is_date_time(valid[i]))
            fail_msg("rejected valid date-time %s", valid[i]);
    }
}

static void date_time_rejects_malformed(void **state)
{
    static const char *invalid[] = {
        "",
        "2026-12-04",
        "2026-12-04T17:00Z",
        "2026-12-04T17:00:00",
        "2026-12-04 17:00:00Z",
        "2026-13-04T17:00:00Z",
        "2023-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-12-04T24:00:00Z",
        "2026-12-04T17:60:00Z",
        "2026-12-04T17:00:00.Z",
        "2026-12-04T17:00:00+1:00",
        "2026-12-04T17:00:00+24:00",
        "1998-12-31T22:59:60Z",
        "2026-12-04T17:00:00Zjunk",
        "\xd9\xa2"
        "026-12-04T17:00:00Z",
    };
    for (size_t i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++) {
        if (validate_is_date_time(invalid[i]))
            fail_msg("accepted invalid date-time \"%s\"", invalid[i]);
    }
    assert_false(validate_is_date_time(NULL));
}

static void date_time_format_message(void **state)
{
    schema_t *s = compile_text("{\"format\": \"date-time\"}");

    assert_true(is_valid(s, "\"2026-12-04T17:00:00Z\""));
    assert_true(is_valid(s, "12"));
    assert_one_error(s, "\"yesterday\"", "", "must be a date-time (RFC 3339)");
    /* A NUL byte must not cut the string short and let it pass. */
    assert_false(is_valid(s, "\"2026-12-04T17:00:00Z\\u0000x\""));
    schema_free(s);
}

static schema_t *load_reading_schema(void)
{
    const char *source = getenv("INGESTD_SOURCE_DIR");
    char path[PATH_MAX];
    json_error_t jerr;
    json_t *doc;
    schema_t *schema = NULL;
    char err[512];

    snprintf(path, sizeof(path), "%s/schemas/reading.json",
             source != NULL ? source : "..");
    doc = json_load_file(path, 0, &jerr);
    if (doc == NULL)
        fail_msg("cannot load %s: %s", path, jerr.text);
    if (schema_compile(doc, &schema, err, sizeof(err)) != 0)
        fail_msg("%s did not compile: %s", path, err);
    json_decref(doc);
    return schema;
}

static void reading_schema_accepts_readings(void **state)
{
    schema_t *s = load_reading_schema();

    assert_true(is_valid(s, "{\"device_id\": \"dev-1\", \"timestamp\": "
                            "\"2026-12-04T17:00:00Z\", \"sensor_value\": "
                            "42.5}"));
    assert_true(is_valid(s, "{\"device_id\": \"dev-1\", \"timestamp\": "
                            "1796403600000, \"sensor_value\": 0, "
                            "\"temperature\": -12.5, \"humidity\": 55, "
                            "\"battery\": 100, \"firmware\": \"1.2.3\"}"));
    schema_free(s);
}

static void reading_schema_rejects_readings(void **state)
{
    schema_t *s = load_reading_schema();
    validate_errors_t errs;

    assert_one_error(s, "{\"device_id\": \"d\", \"timestamp\": 0}",
                     "/sensor_value", "is required");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": 0, "
                     "\"sensor_value\": 120.5}",
                     "/sensor_value", "must be <= 100, got 120.5");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": -1, "
                     "\"sensor_value\": 1}",
                     "/timestamp", "must be >= 0, got -1");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": \"today\", "
                     "\"sensor_value\": 1}",
                     "/timestamp", "must be a date-time (RFC 3339)");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": 1.5, "
                     "\"sensor_value\": 1}",
                     "/timestamp",
                     "must be of type string or integer, got number");
    assert_one_error(s,
                     "{\"device_id\": \"\", \"timestamp\": 0, "
                     "\"sensor_value\": 1}",
                     "/device_id", "must have at least 1 character, got 0");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": 0, "
                     "\"sensor_value\": \"1\"}",
                     "/sensor_value", "must be of type number, got string");
    assert_one_error(s,
                     "{\"device_id\": \"d\", \"timestamp\": 0, "
                     "\"sensor_value\": 1, \"temperature\": 151}",
                     "/temperature", "must be <= 150, got 151");
    assert_one_error(s, "[]", "", "must be of type object, got array");
    validate_errors_init(&errs);
    assert_int_equal(check_text(s, "{}", &errs), 3);
    validate_errors_clear(&errs);
    schema_free(s);
}

static void validate_valid_path_allocates_nothing(void **state)
{
    schema_t *s;
    json_t *reading;
    validate_errors_t errs;
    size_t before;

    if (!COUNT_ALLOCATIONS)
        skip();
    s = compile_text(
        "{\"type\": \"object\", \"required\": [\"id\"], "
        "\"properties\": {\"id\": {\"type\": \"string\", \"pattern\": "
        "\"^dev-[0-9]+$\", \"maxLength\": 64}, \"t\": {\"format\": "
        "\"date-time\"}, \"v\": {\"multipleOf\": 0.01, \"maximum\": 100}, "
        "\"unit\": {\"enum\": [\"C\", \"F\"]}, \"tags\": {\"type\": "
        "\"array\", \"uniqueItems\": true, \"items\": {\"$ref\": "
        "\"#/$defs/tag\"}}}, \"propertyNames\": {\"maxLength\": 8}, "
        "\"patternProperties\": {\"^x_\": {\"type\": \"number\"}}, "
        "\"anyOf\": [{\"required\": [\"v\"]}, {\"required\": [\"t\"]}], "
        "\"$defs\": {\"tag\": {\"type\": \"string\", \"minLength\": 1}}}");
    reading = json_loads(
        "{\"id\": \"dev-42\", \"t\": \"2026-12-04T17:00:00.5+01:00\", "
        "\"v\": 19.99, \"unit\": \"C\", \"tags\": [\"a\", \"b\"], "
        "\"x_1\": 2.5}",
        0, NULL);
    assert_non_null(reading);
    validate_errors_init(&errs);
    /* The first match on a thread creates that thread's PCRE2 match
     * data. */
    assert_int_equal(schema_validate(s, reading, &errs), 0);
    before = allocation_count;
    for (int i = 0; i < 100; i++)
        assert_int_equal(schema_validate(s, reading, &errs), 0);
    assert_int_equal(allocation_count - before, 0);
    /* An error allocates its strings, which shows the count works. */
    json_object_set_new(reading, "v", json_real(100.5));
    assert_int_equal(schema_validate(s, reading, &errs), 1);
    assert_true(allocation_count - before > 0);
    validate_errors_clear(&errs);
    json_decref(reading);
    schema_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(validate_type_message_lists_types),
        cmocka_unit_test(validate_integer_accepts_whole_real),
        cmocka_unit_test(validate_maximum_message),
        cmocka_unit_test(validate_bounds_all_four),
        cmocka_unit_test(validate_bounds_exact_above_2_pow_53),
        cmocka_unit_test(validate_multiple_of_decimals),
        cmocka_unit_test(validate_length_counts_code_points),
        cmocka_unit_test(validate_pattern_message),
        cmocka_unit_test(validate_pattern_dialect),
        cmocka_unit_test(validate_pattern_backtracking_bounded),
        cmocka_unit_test(validate_required_pointer),
        cmocka_unit_test(validate_additional_properties_false),
        cmocka_unit_test(validate_property_names_message),
        cmocka_unit_test(validate_enum_and_const_by_value),
        cmocka_unit_test(validate_items_and_prefix_items),
        cmocka_unit_test(validate_unique_items_by_value),
        cmocka_unit_test(validate_property_counts),
        cmocka_unit_test(validate_combinators_summarised),
        cmocka_unit_test(validate_all_of_reports_each),
        cmocka_unit_test(validate_if_then_else),
        cmocka_unit_test(validate_dependent_required_pointer),
        cmocka_unit_test(validate_boolean_schemas),
        cmocka_unit_test(validate_local_refs),
        cmocka_unit_test(validate_recursive_ref),
        cmocka_unit_test(validate_deep_instance_bounded),
        cmocka_unit_test(validate_error_limit),
        cmocka_unit_test(validate_valid_path_allocates_nothing),
        cmocka_unit_test(compile_rejects_unknown_keyword),
        cmocka_unit_test(compile_rejects_unsupported_refs),
        cmocka_unit_test(compile_rejects_ref_cycle),
        cmocka_unit_test(compile_rejects_invalid_values),
        cmocka_unit_test(compile_accepts_annotations),
        cmocka_unit_test(date_time_accepts_rfc3339),
        cmocka_unit_test(date_time_rejects_malformed),
        cmocka_unit_test(date_time_format_message),
        cmocka_unit_test(reading_schema_accepts_readings),
        cmocka_unit_test(reading_schema_rejects_readings),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
