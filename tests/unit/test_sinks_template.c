/* Unit tests for destination templates and envelope parsing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/errors.h"
#include "sinks/template.h"

static sink_envelope_t sample_envelope(void)
{
    sink_envelope_t env = {0};

    strcpy(env.message_id, "01HZX");
    strcpy(env.device_id, "dev-7");
    strcpy(env.device_type, "thermo");
    strcpy(env.protocol, "http");
    return env;
}

static void template_expands_placeholders(void **state)
{
    static const struct {
        const char *text;
        const char *expanded;
    } cases[] = {
        {"telemetry", "telemetry"},
        {"telemetry.{device_type}", "telemetry.thermo"},
        {"{device_type}.{device_id}", "thermo.dev-7"},
        {"t/{protocol}/{device_id}/x", "t/http/dev-7/x"},
        {"{device_id}{device_id}", "dev-7dev-7"},
        {"", ""},
    };
    sink_envelope_t env = sample_envelope();
    char buf[128];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        sink_template_t *t = NULL;
        char err[128] = "";

        assert_int_equal(
            sink_template_compile(cases[i].text, &t, err, sizeof(err)), 0);
        assert_int_equal(sink_template_expand(t, &env, buf, sizeof(buf)),
                         (int)strlen(cases[i].expanded));
        assert_string_equal(buf, cases[i].expanded);
        assert_string_equal(sink_template_text(t), cases[i].text);
        sink_template_free(t);
    }
}

static void template_rejects_bad_braces(void **state)
{
    static const struct {
        const char *text;
        const char *message;
    } cases[] = {
        {"t.{device}", "unknown placeholder {device}; use {device_id}, "
                       "{device_type} or {protocol}"},
        {"t.{DEVICE_ID}", "unknown placeholder {DEVICE_ID}; use {device_id}, "
                          "{device_type} or {protocol}"},
        {"t.{device_id", "'{' at offset 2 has no closing '}'"},
        {"t.}", "'}' without '{' at offset 2; braces may appear only in "
                "{device_id}, {device_type} or {protocol}"},
        {"{}", "unknown placeholder {}; use {device_id}, {device_type} or "
               "{protocol}"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        sink_template_t *t = NULL;
        char err[160] = "";

        assert_int_equal(
            sink_template_compile(cases[i].text, &t, err, sizeof(err)),
            ING_EINVAL);
        assert_null(t);
        assert_string_equal(err, cases[i].message);
    }
}

static void template_constant_detection(void **state)
{
    sink_template_t *constant = NULL, *varying = NULL;
    char err[128];

    assert_int_equal(
        sink_template_compile("telemetry", &constant, err, sizeof(err)), 0);
    assert_int_equal(sink_template_compile("t.{protocol}", &varying, err,
                                           sizeof(err)),
                     0);
    assert_int_equal(sink_template_is_constant(constant), 1);
    assert_int_equal(sink_template_is_constant(varying), 0);
    sink_template_free(constant);
    sink_template_free(varying);
}

static void template_expand_errors(void **state)
{
    sink_envelope_t env = sample_envelope();
    sink_template_t *t = NULL;
    char err[128];
    char small[8];
    char buf[64];

    assert_int_equal(
        sink_template_compile("telemetry.{device_type}", &t, err, sizeof(err)),
        0);
    /* "telemetry.thermo" needs 17 bytes with its NUL. */
    assert_int_equal(sink_template_expand(t, &env, small, sizeof(small)),
                     ING_ETOOBIG);
    assert_int_equal(sink_template_expand(t, &env, buf, 16), ING_ETOOBIG);
    assert_int_equal(sink_template_expand(t, &env, buf, 17), 16);
    /* A record without a device type cannot be routed. */
    env.device_type[0] = '\0';
    assert_int_equal(sink_template_expand(t, &env, buf, sizeof(buf)),
                     ING_EINVAL);
    sink_template_free(t);
}

static void envelope_parse_fields(void **state)
{
    static const char text[] =
        "{\"message_id\":\"m1\",\"device_id\":\"d1\",\"device_type\":"
        "\"thermo\",\"protocol\":\"mqtt\",\"received_at\":"
        "\"2024-05-01T12:00:00.123Z\",\"content_type\":\"application/json\","
        "\"payload\":{\"t\":1}}";
    sink_envelope_t env;

    assert_int_equal(sink_envelope_parse(text, strlen(text), &env), 0);
    assert_string_equal(env.message_id, "m1");
    assert_string_equal(env.device_id, "d1");
    assert_string_equal(env.device_type, "thermo");
    assert_string_equal(env.protocol, "mqtt");
    assert_string_equal(env.received_at, "2024-05-01T12:00:00.123Z");
}

static void envelope_parse_rejects_bad_input(void **state)
{
    static const char *const bad[] = {
        "not json",
        "[1,2]",
        "{\"device_id\":7}",
        "{\"protocol\":\"a-protocol-name-that-is-far-too-long\"}",
    };
    sink_envelope_t env;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(sink_envelope_parse(bad[i], strlen(bad[i]), &env),
                         ING_EINVAL);
    /* Missing fields are empty, not an error. */
    assert_int_equal(sink_envelope_parse("{}", 2, &env), 0);
    assert_string_equal(env.device_id, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(template_expands_placeholders),
        cmocka_unit_test(template_rejects_bad_braces),
        cmocka_unit_test(template_constant_detection),
        cmocka_unit_test(template_expand_errors),
        cmocka_unit_test(envelope_parse_fields),
        cmocka_unit_test(envelope_parse_rejects_bad_input),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
