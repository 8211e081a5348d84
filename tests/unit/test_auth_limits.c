/* Unit tests of the per-device limit overrides in the registry: storing,
 * clearing, and reading them into the service's snapshot.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth/auth.h"
#include "core/errors.h"

struct fixture {
    char dir[64];
    char path[128];
    registry_t *reg;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    char key[AUTH_KEY_LEN + 1];
    char err[256] = "";

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_auth_limits.XXXXXX");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    snprintf(f->path, sizeof(f->path), "%s/registry.db", f->dir);
    if (registry_open(f->path, &f->reg, err, sizeof(err)) != 0) {
        fprintf(stderr, "registry_open: %s\n", err);
        return -1;
    }
    if (registry_device_add(f->reg, "meter-1", "meter", key) != 0)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    const char *suffixes[] = {"", "-wal", "-shm"};
    char file[200];

    registry_close(f->reg);
    for (size_t i = 0; i < 3; i++) {
        snprintf(file, sizeof(file), "%s%s", f->path, suffixes[i]);
        unlink(file);
    }
    rmdir(f->dir);
    free(f);
    return 0;
}

static void copy_limits(const registry_entry_t *e, void *arg)
{
    *(auth_limits_t *)arg = e->limits;
}

static void registry_limits_round_trip(void **state)
{
    struct fixture *f = *state;
    auth_limits_t set = {0}, got;

    set.set = (1u << AUTH_LIMIT_READINGS_PER_SECOND) |
              (1u << AUTH_LIMIT_DAILY_READINGS);
    set.value[AUTH_LIMIT_READINGS_PER_SECOND] = 5;
    set.value[AUTH_LIMIT_DAILY_READINGS] = 0;
    assert_int_equal(registry_device_set_limits(f->reg, "meter-1", &set), 0);
    memset(&got, 0xff, sizeof(got));
    assert_int_equal(
        registry_device_get(f->reg, "meter-1", copy_limits, &got), 0);
    assert_int_equal(got.set, set.set);
    assert_int_equal(got.value[AUTH_LIMIT_READINGS_PER_SECOND], 5);
    /* An override of 0 is kept: it means unlimited, not "follow type". */
    assert_int_equal(got.value[AUTH_LIMIT_DAILY_READINGS], 0);

    set.set = 0;
    assert_int_equal(registry_device_set_limits(f->reg, "meter-1", &set), 0);
    assert_int_equal(
        registry_device_get(f->reg, "meter-1", copy_limits, &got), 0);
    assert_int_equal(got.set, 0);
}

static void registry_limits_unknown_device(void **state)
{
    struct fixture *f = *state;
    auth_limits_t set = {.set = 1u << AUTH_LIMIT_BURST};

    assert_int_equal(registry_device_set_limits(f->reg, "nobody", &set),
                     ING_ENOTFOUND);
}

static void snapshot_carries_limits(void **state)
{
    struct fixture *f = *state;
    auth_limits_t set = {0};
    auth_device_t dev;
    char err[256] = "";
    auth_t *a = NULL;

    set.set = 1u << AUTH_LIMIT_BYTES_PER_SECOND;
    set.value[AUTH_LIMIT_BYTES_PER_SECOND] = 4096;
    assert_int_equal(registry_device_set_limits(f->reg, "meter-1", &set), 0);
    assert_int_equal(auth_open(f->path, &a, err, sizeof(err)), 0);
    assert_int_equal(auth_lookup_device(a, "meter-1", &dev), AUTH_OK);
    assert_int_equal(dev.limits.set, 1u << AUTH_LIMIT_BYTES_PER_SECOND);
    assert_int_equal(dev.limits.value[AUTH_LIMIT_BYTES_PER_SECOND], 4096);
    auth_close(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(registry_limits_round_trip, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(registry_limits_unknown_device, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(snapshot_carries_limits, setup,
                                        teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
