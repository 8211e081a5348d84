/* Unit tests of the flow-control tables: token buckets, daily quotas,
 * connection counts, expiry and the table bound. Times are passed in, so
 * no test depends on the clock.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>
#include <pthread.h>

#include "core/errors.h"
#include "pipeline/limits.h"

#define DAY_MS 86400000ull
/* Noon UTC on some day, far from midnight. */
#define T0 (20000 * DAY_MS + DAY_MS / 2)

static limits_t *make(uint64_t rate, uint64_t burst)
{
    limits_options_t opts = {.table_size = 1024,
                             .connection_rate = rate,
                             .connection_burst = burst};
    limits_t *l = NULL;

    assert_int_equal(limits_create(&opts, &l), 0);
    return l;
}

static void limits_burst_then_rate(void **state)
{
    config_limits_t lim = {.readings_per_second = 10, .burst = 5};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    for (int i = 0; i < 5; i++)
        assert_int_equal(
            limits_take_readings(l, "d1", &lim, 1, 10, T0, &wait), 0);
    assert_int_equal(limits_take_readings(l, "d1", &lim, 1, 10, T0, &wait),
                     ING_ERATE);
    assert_int_equal(wait, 100);
    /* Another device has its own bucket. */
    assert_int_equal(limits_take_readings(l, "d2", &lim, 1, 10, T0, &wait),
                     0);
    assert_int_equal(
        limits_take_readings(l, "d1", &lim, 1, 10, T0 + 100, &wait), 0);
    assert_int_equal(wait, 0);
    limits_destroy(l);
}

static void limits_oversized_request_needs_full_bucket(void **state)
{
    config_limits_t lim = {.readings_per_second = 10, .burst = 5};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    /* 20 readings never fit a bucket of 5, so they pass on a full bucket
     * and leave a debt of 15 readings, 1.5 s at 10 per second. */
    assert_int_equal(limits_take_readings(l, "d", &lim, 20, 0, T0, &wait), 0);
    assert_int_equal(limits_take_readings(l, "d", &lim, 1, 0, T0, &wait),
                     ING_ERATE);
    assert_int_equal(wait, 1600);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 20, 0, T0 + 1600, &wait),
        ING_ERATE);
    assert_int_equal(wait, 400);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 20, 0, T0 + 2000, &wait), 0);
    limits_destroy(l);
}

static void limits_bytes_per_second(void **state)
{
    config_limits_t lim = {.bytes_per_second = 1000};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    assert_int_equal(limits_take_readings(l, "d", &lim, 1, 800, T0, &wait),
                     0);
    assert_int_equal(limits_take_readings(l, "d", &lim, 1, 400, T0, &wait),
                     ING_ERATE);
    assert_int_equal(wait, 200);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 1, 400, T0 + 200, &wait), 0);
    limits_destroy(l);
}

static void limits_failed_take_charges_nothing(void **state)
{
    config_limits_t lim = {.readings_per_second = 100,
                           .bytes_per_second = 100,
                           .daily_readings = 1000};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    /* The bytes bucket rejects the request, so the readings bucket and the daily
     * count must stay untouched: 100 readings still pass afterwards. */
    assert_int_equal(limits_take_readings(l, "d", &lim, 1, 100, T0, &wait),
                     0);
    assert_int_equal(limits_take_readings(l, "d", &lim, 50, 50, T0, &wait),
                     ING_ERATE);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 99, 100, T0 + 1000, &wait), 0);
    limits_destroy(l);
}

static void limits_daily_quota_resets_at_midnight(void **state)
{
    config_limits_t lim = {.daily_readings = 3};
    uint64_t before_midnight = T0 + DAY_MS / 2 - 5000;
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 2, 0, before_midnight, &wait), 0);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 2, 0, before_midnight, &wait),
        ING_EQUOTA);
    assert_int_equal(wait, 5000);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 1, 0, before_midnight, &wait), 0);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 1, 0, before_midnight, &wait),
        ING_EQUOTA);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 3, 0, before_midnight + 5000,
                             &wait),
        0);
    limits_destroy(l);
}

static void limits_unlimited_tracks_nothing(void **state)
{
    config_limits_t lim = {0};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    for (int i = 0; i < 1000; i++)
        assert_int_equal(
            limits_take_readings(l, "d", &lim, 100, 1 << 20, T0, &wait), 0);
    assert_int_equal(limits_device_entries(l), 0);
    limits_destroy(l);
}

static void limits_connection_rate_per_address(void **state)
{
    limits_t *l = make(2, 3);
    uint64_t wait;

    (void)state;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(limits_connection_open(l, LIMITS_LISTENER_HTTP,
                                                "127.0.0.2", T0, &wait),
                         0);
    }
    assert_int_equal(limits_connection_open(l, LIMITS_LISTENER_MQTT,
                                            "127.0.0.2", T0, &wait),
                     ING_ERATE);
    assert_int_equal(wait, 500);
    assert_int_equal(limits_connection_open(l, LIMITS_LISTENER_HTTP,
                                            "127.0.0.3", T0, &wait),
                     0);
    assert_int_equal(limits_connection_count(l, LIMITS_LISTENER_COUNT), 4);
    assert_int_equal(limits_connection_open(l, LIMITS_LISTENER_HTTP,
                                            "127.0.0.2", T0 + 500, &wait),
                     0);
    limits_destroy(l);
}

static void limits_connection_maximums(void **state)
{
    limits_options_t opts = {.table_size = 1024, .max_connections = 3};
    limits_t *l = NULL;
    uint64_t wait;

    (void)state;
    opts.listener_max[LIMITS_LISTENER_MQTT] = 1;
    assert_int_equal(limits_create(&opts, &l), 0);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_MQTT, "a", T0, &wait), 0);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_MQTT, "a", T0, &wait),
        ING_EFULL);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_HTTP, "a", T0, &wait), 0);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_HTTPS, "a", T0, &wait), 0);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_HTTP, "a", T0, &wait),
        ING_EFULL);
    assert_int_equal(limits_connection_count(l, LIMITS_LISTENER_COUNT), 3);
    assert_int_equal(limits_connection_count(l, LIMITS_LISTENER_MQTT), 1);
    limits_connection_close(l, LIMITS_LISTENER_HTTP);
    assert_int_equal(
        limits_connection_open(l, LIMITS_LISTENER_HTTP, "a", T0, &wait), 0);
    limits_destroy(l);
}

static void limits_device_connections(void **state)
{
    limits_t *l = make(0, 0);

    (void)state;
    assert_int_equal(limits_device_connect(l, "d", 2, T0), 0);
    assert_int_equal(limits_device_connect(l, "d", 2, T0), 0);
    assert_int_equal(limits_device_connect(l, "d", 2, T0), ING_EQUOTA);
    assert_int_equal(limits_device_connect(l, "e", 2, T0), 0);
    limits_device_disconnect(l, "d");
    assert_int_equal(limits_device_connect(l, "d", 2, T0), 0);
    /* 0 is unlimited and counts nothing. */
    assert_int_equal(limits_device_connect(l, "f", 0, T0), 0);
    limits_destroy(l);
}

static void limits_idle_entries_expire(void **state)
{
    config_limits_t lim = {.readings_per_second = 10, .burst = 10};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    assert_int_equal(limits_take_readings(l, "d", &lim, 10, 0, T0, &wait),
                     0);
    assert_int_equal(limits_device_connect(l, "c", 1, T0), 0);
    assert_int_equal(limits_device_entries(l), 2);
    /* The bucket of "d" is full again after 1 s; before that its state
     * still matters. The connected "c" stays. */
    limits_sweep(l, T0 + 999);
    assert_int_equal(limits_device_entries(l), 2);
    limits_sweep(l, T0 + 1000);
    assert_int_equal(limits_device_entries(l), 1);
    limits_device_disconnect(l, "c");
    limits_sweep(l, T0 + 1000);
    assert_int_equal(limits_device_entries(l), 0);
    limits_destroy(l);
}

static void limits_daily_count_outlives_full_bucket(void **state)
{
    config_limits_t lim = {.readings_per_second = 10, .daily_readings = 5};
    limits_t *l = make(0, 0);
    uint64_t wait;

    (void)state;
    assert_int_equal(limits_take_readings(l, "d", &lim, 5, 0, T0, &wait), 0);
    limits_sweep(l, T0 + 60000);
    assert_int_equal(limits_device_entries(l), 1);
    assert_int_equal(
        limits_take_readings(l, "d", &lim, 1, 0, T0 + 60000, &wait),
        ING_EQUOTA);
    limits_sweep(l, T0 + DAY_MS);
    assert_int_equal(limits_device_entries(l), 0);
    limits_destroy(l);
}

static void limits_table_stays_bounded(void **state)
{
    limits_options_t opts = {.table_size = 128};
    config_limits_t lim = {.daily_readings = 100};
    limits_t *l = NULL;
    char id[32];
    uint64_t wait;

    (void)state;
    assert_int_equal(limits_create(&opts, &l), 0);
    for (int i = 0; i < 10000; i++) {
        snprintf(id, sizeof(id), "device-%d", i);
        assert_int_equal(
            limits_take_readings(l, id, &lim, 1, 0, T0 + (uint64_t)i, &wait),
            0);
    }
    assert_true(limits_device_entries(l) <= 128);
    assert_true(limits_device_entries(l) > 0);
    limits_destroy(l);
}

static void limits_peer_address_forms(void **state)
{
    char out[64];

    (void)state;
    limits_peer_address("127.0.0.2:5000", out, sizeof(out));
    assert_string_equal(out, "127.0.0.2");
    limits_peer_address("[::1]:443", out, sizeof(out));
    assert_string_equal(out, "::1");
    limits_peer_address("fe80::1", out, sizeof(out));
    assert_string_equal(out, "fe80::1");
    limits_peer_address("host", out, sizeof(out));
    assert_string_equal(out, "host");
}

#define THREADS 4
#define TAKES 5000

struct race {
    limits_t *l;
    int passed;
};

static void *race_thread(void *arg)
{
    struct race *r = arg;
    config_limits_t lim = {.daily_readings = 7000};
    uint64_t wait;

    for (int i = 0; i < TAKES; i++) {
        if (limits_take_readings(r->l, "shared", &lim, 1, 0, T0, &wait) == 0)
            r->passed++;
    }
    return NULL;
}

static void limits_threads_share_one_quota(void **state)
{
    struct race races[THREADS];
    pthread_t threads[THREADS];
    limits_t *l = make(0, 0);
    int total = 0;

    (void)state;
    for (int i = 0; i < THREADS; i++) {
        races[i] = (struct race){.l = l};
        assert_int_equal(
            pthread_create(&threads[i], NULL, race_thread, &races[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        total += races[i].passed;
    }
    assert_int_equal(total, 7000);
    limits_destroy(l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(limits_burst_then_rate),
        cmocka_unit_test(limits_oversized_request_needs_full_bucket),
        cmocka_unit_test(limits_bytes_per_second),
        cmocka_unit_test(limits_failed_take_charges_nothing),
        cmocka_unit_test(limits_daily_quota_resets_at_midnight),
        cmocka_unit_test(limits_unlimited_tracks_nothing),
        cmocka_unit_test(limits_connection_rate_per_address),
        cmocka_unit_test(limits_connection_maximums),
        cmocka_unit_test(limits_device_connections),
        cmocka_unit_test(limits_idle_entries_expire),
        cmocka_unit_test(limits_daily_count_outlives_full_bucket),
        cmocka_unit_test(limits_table_stays_bounded),
        cmocka_unit_test(limits_peer_address_forms),
        cmocka_unit_test(limits_threads_share_one_quota),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
