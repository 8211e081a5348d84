/* Unit tests for the bridge's topic templates and reconnect backoff. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "bridge/bridge_internal.h"

static void topic_filter_shared_and_plain(void **state)
{
    char *filter;

    (void)state;
    filter = bridge_topic_filter("devices/{device_id}/data", "ingestd");
    assert_string_equal(filter, "$share/ingestd/devices/+/data");
    free(filter);
    filter = bridge_topic_filter("devices/{device_id}/data", NULL);
    assert_string_equal(filter, "devices/+/data");
    free(filter);
    filter = bridge_topic_filter("{device_id}", "g");
    assert_string_equal(filter, "$share/g/+");
    free(filter);
    filter = bridge_topic_filter("a/b/{device_id}", NULL);
    assert_string_equal(filter, "a/b/+");
    free(filter);
}

static void topic_expand_feedback(void **state)
{
    char *topic;

    (void)state;
    topic = bridge_topic_expand("devices/{device_id}/errors", "sensor-1");
    assert_string_equal(topic, "devices/sensor-1/errors");
    free(topic);
    topic = bridge_topic_expand("{device_id}", "x");
    assert_string_equal(topic, "x");
    free(topic);
}

static void topic_match_extracts_id(void **state)
{
    static const struct {
        const char *template;
        const char *topic;
        const char *id; /* NULL when the topic must not match */
    } cases[] = {
        {"devices/{device_id}/data", "devices/sensor-1/data", "sensor-1"},
        {"devices/{device_id}/data", "devices/a.b:c_d-1/data", "a.b:c_d-1"},
        {"devices/{device_id}/data", "devices//data", NULL},
        {"devices/{device_id}/data", "devices/a/b/data", NULL},
        {"devices/{device_id}/data", "devices/a/data/x", NULL},
        {"devices/{device_id}/data", "device/a/data", NULL},
        {"devices/{device_id}/data", "devices/a/dat", NULL},
        {"devices/{device_id}/data", "devices/data", NULL},
        {"devices/{device_id}", "devices/abc", "abc"},
        {"devices/{device_id}", "devices/abc/", NULL},
        {"{device_id}/up", "abc/up", "abc"},
        {"{device_id}/up", "/up", NULL},
        {"{device_id}", "abc", "abc"},
        {"{device_id}", "a/b", NULL},
    };
    char id[AUTH_DEVICE_ID_MAX + 1];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int matched;

        memset(id, 0, sizeof(id));
        matched = bridge_topic_match(cases[i].template, cases[i].topic, id,
                                     sizeof(id));
        if (cases[i].id == NULL) {
            assert_int_equal(matched, 0);
            continue;
        }
        assert_int_equal(matched, 1);
        assert_string_equal(id, cases[i].id);
    }
}

static void topic_match_id_too_long(void **state)
{
    char id[4];

    (void)state;
    assert_int_equal(
        bridge_topic_match("d/{device_id}", "d/abc", id, sizeof(id)), 1);
    assert_string_equal(id, "abc");
    assert_int_equal(
        bridge_topic_match("d/{device_id}", "d/abcd", id, sizeof(id)), 0);
}

static void backoff_grows_within_bounds(void **state)
{
    (void)state;
    /* The lowest draw is always the minimum. */
    assert_int_equal(bridge_backoff_ms(0, 500, 30000, 0), 500);
    assert_int_equal(bridge_backoff_ms(9, 500, 30000, 0), 500);
    /* The first wait is exactly the minimum, whatever the draw. */
    assert_int_equal(bridge_backoff_ms(0, 500, 30000, 12345), 500);
    /* The cap doubles: 500, 1000, 2000 ... and the draw is modulo the
     * window plus one, so window - 1 + 1 lands on the cap. */
    assert_int_equal(bridge_backoff_ms(1, 500, 30000, 500), 1000);
    assert_int_equal(bridge_backoff_ms(2, 500, 30000, 1500), 2000);
    assert_int_equal(bridge_backoff_ms(2, 500, 30000, 1501), 500);
    /* Past the maximum, the cap stays at the maximum. */
    assert_int_equal(bridge_backoff_ms(40, 500, 30000, 29500), 30000);
    assert_int_equal(bridge_backoff_ms(1000, 500, 30000, 29500), 30000);
    /* A maximum below the minimum means a fixed wait. */
    assert_int_equal(bridge_backoff_ms(5, 500, 100, 777), 500);
}

static void backoff_draws_cover_window(void **state)
{
    uint64_t low = UINT64_MAX, high = 0;

    (void)state;
    for (uint64_t r = 0; r < 5000; r++) {
        uint64_t wait = bridge_backoff_ms(3, 100, 1000, r * 7919);

        assert_in_range(wait, 100, 800);
        if (wait < low)
            low = wait;
        if (wait > high)
            high = wait;
    }
    assert_int_equal(low, 100);
    assert_int_equal(high, 800);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(topic_filter_shared_and_plain),
        cmocka_unit_test(topic_expand_feedback),
        cmocka_unit_test(topic_match_extracts_id),
        cmocka_unit_test(topic_match_id_too_long),
        cmocka_unit_test(backoff_grows_within_bounds),
        cmocka_unit_test(backoff_draws_cover_window),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
