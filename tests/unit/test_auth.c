/* Unit tests for the device registry and API key snapshot. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <sched.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
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
    char err[256] = "";

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_auth.XXXXXX");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    snprintf(f->path, sizeof(f->path), "%s/registry.db", f->dir);
    if (registry_open(f->path, &f->reg, err, sizeof(err)) != 0) {
        fprintf(stderr, "registry_open: %s\n", err);
        return -1;
    }
    *state = f;
    return 0;
}

/* Removes the database with its -wal and -shm files and the folder. */
static int teardown(void **state)
{
    struct fixture *f = *state;
    struct dirent *entry;
    char file[512];
    DIR *dir;

    registry_close(f->reg);
    dir = opendir(f->dir);
    while (dir != NULL && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        snprintf(file, sizeof(file), "%s/%s", f->dir, entry->d_name);
        unlink(file);
    }
    if (dir != NULL)
        closedir(dir);
    rmdir(f->dir);
    free(f);
    return 0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static auth_t *open_auth(struct fixture *f)
{
    char err[256] = "";
    auth_t *a = NULL;
    int rc = auth_open(f->path, &a, err, sizeof(err));

    if (rc != 0)
        fprintf(stderr, "auth_open: %s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(a);
    return a;
}

static enum auth_result check(auth_t *a, const char *key, auth_device_t *dev)
{
    memset(dev, 0, sizeof(*dev));
    return auth_check_key(a, key, strlen(key), dev);
}

static void auth_device_id_rules(void **state)
{
    char longest[AUTH_DEVICE_ID_MAX + 2];

    (void)state;
    assert_int_equal(auth_device_id_valid("sensor-1"), 1);
    assert_int_equal(auth_device_id_valid("a.b_c:d-E9"), 1);
    assert_int_equal(auth_device_id_valid(""), 0);
    assert_int_equal(auth_device_id_valid(NULL), 0);
    assert_int_equal(auth_device_id_valid("a b"), 0);
    assert_int_equal(auth_device_id_valid("a/b"), 0);
    assert_int_equal(auth_device_id_valid("a+b"), 0);
    assert_int_equal(auth_device_id_valid("caf\xc3\xa9"), 0);

    memset(longest, 'x', sizeof(longest));
    longest[AUTH_DEVICE_ID_MAX] = '\0';
    assert_int_equal(auth_device_id_valid(longest), 1);
    longest[AUTH_DEVICE_ID_MAX] = 'x';
    longest[AUTH_DEVICE_ID_MAX + 1] = '\0';
    assert_int_equal(auth_device_id_valid(longest), 0);
}

static void registry_key_format(void **state)
{
    struct fixture *f = *state;
    char key1[AUTH_KEY_LEN + 1];
    char key2[AUTH_KEY_LEN + 1];

    assert_int_equal(registry_device_add(f->reg, "dev-1", "thermo", key1), 0);
    assert_int_equal(registry_device_add(f->reg, "dev-2", "thermo", key2), 0);
    assert_int_equal(strlen(key1), AUTH_KEY_LEN);
    assert_memory_equal(key1, "ik_", 3);
    for (size_t i = 3; i < AUTH_KEY_LEN; i++) {
        char c = key1[i];
        int base64url = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                        (c >= '0' && c <= '9') || c == '-' || c == '_';
        assert_true(base64url);
    }
    assert_string_not_equal(key1, key2);
}

struct listing {
    int count;
    char ids[8][AUTH_DEVICE_ID_MAX + 1];
    char types[8][AUTH_TYPE_MAX + 1];
    int enabled[8];
    int64_t created_ms[8];
    int64_t key_rotated_ms[8];
    int64_t old_key_expires_ms[8];
};

static void on_entry(const registry_entry_t *e, void *arg)
{
    struct listing *l = arg;

    if (l->count >= 8)
        return;
    snprintf(l->ids[l->count], sizeof(l->ids[0]), "%s", e->id);
    snprintf(l->types[l->count], sizeof(l->types[0]), "%s", e->type);
    l->enabled[l->count] = e->enabled;
    l->created_ms[l->count] = e->created_ms;
    l->key_rotated_ms[l->count] = e->key_rotated_ms;
    l->old_key_expires_ms[l->count] = e->old_key_expires_ms;
    l->count++;
}

static void registry_add_list_sorted(void **state)
{
    struct fixture *f = *state;
    struct listing l = {0};
    char key[AUTH_KEY_LEN + 1];

    assert_int_equal(registry_device_add(f->reg, "zeta", "gps", key), 0);
    assert_int_equal(registry_device_add(f->reg, "alpha", "thermo", key), 0);
    assert_int_equal(registry_device_add(f->reg, "mid:1", "thermo", key), 0);
    assert_int_equal(registry_device_list(f->reg, on_entry, &l), 0);

    assert_int_equal(l.count, 3);
    assert_string_equal(l.ids[0], "alpha");
    assert_string_equal(l.ids[1], "mid:1");
    assert_string_equal(l.ids[2], "zeta");
    assert_string_equal(l.types[0], "thermo");
    assert_string_equal(l.types[2], "gps");
    assert_int_equal(l.enabled[0], 1);
    assert_true(l.created_ms[0] > 0);
    assert_int_equal(l.key_rotated_ms[0], 0);
    assert_int_equal(l.old_key_expires_ms[0], 0);
}

static void registry_add_duplicate_id(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    struct listing l = {0};

    assert_int_equal(registry_device_add(f->reg, "dev", "thermo", key), 0);
    assert_int_equal(registry_device_add(f->reg, "dev", "gps", key),
                     ING_EEXIST);
    assert_int_equal(registry_device_list(f->reg, on_entry, &l), 0);
    assert_int_equal(l.count, 1);
    assert_string_equal(l.types[0], "thermo");
}

static void registry_add_invalid_names(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    char long_type[AUTH_TYPE_MAX + 2];

    memset(long_type, 't', sizeof(long_type));
    long_type[AUTH_TYPE_MAX + 1] = '\0';
    assert_int_equal(registry_device_add(f->reg, "", "thermo", key),
                     ING_EINVAL);
    assert_int_equal(registry_device_add(f->reg, "a b", "thermo", key),
                     ING_EINVAL);
    assert_int_equal(registry_device_add(f->reg, "dev", "", key), ING_EINVAL);
    assert_int_equal(registry_device_add(f->reg, "dev", "a:b", key),
                     ING_EINVAL);
    assert_int_equal(registry_device_add(f->reg, "dev", long_type, key),
                     ING_EINVAL);
    long_type[AUTH_TYPE_MAX] = '\0';
    assert_int_equal(registry_device_add(f->reg, "dev", long_type, key), 0);
}

static void registry_unknown_id(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];

    assert_int_equal(registry_device_set_enabled(f->reg, "nobody", 0),
                     ING_ENOTFOUND);
    assert_int_equal(registry_device_set_enabled(f->reg, "nobody", 1),
                     ING_ENOTFOUND);
    assert_int_equal(registry_device_rotate_key(f->reg, "nobody", 0, key),
                     ING_ENOTFOUND);
}

/* Returns 1 if `needle` occurs in the `len` bytes at `hay`. */
static int contains(const void *hay, size_t len, const char *needle)
{
    size_t n = strlen(needle);

    if (hay == NULL || len < n)
        return 0;
    for (size_t i = 0; i + n <= len; i++) {
        if (memcmp((const char *)hay + i, needle, n) == 0)
            return 1;
    }
    return 0;
}

static void registry_stores_only_key_hash(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    char old_key[AUTH_KEY_LEN + 1];
    unsigned char digest[32];
    unsigned int digest_len = 0;
    sqlite3_stmt *stmt;
    sqlite3 *db;
    int rows = 0;

    assert_int_equal(registry_device_add(f->reg, "dev", "thermo", old_key), 0);
    assert_int_equal(registry_device_rotate_key(f->reg, "dev", 60000, key), 0);
    assert_int_equal(
        EVP_Digest(key, AUTH_KEY_LEN, digest, &digest_len, EVP_sha256(), NULL),
        1);

    assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT *, key_hash FROM devices",
                                        -1, &stmt, NULL),
                     SQLITE_OK);
    while (sqlite3_step(stmt) == SQLITE_ROW) {
        int columns = sqlite3_column_count(stmt);

        rows++;
        for (int c = 0; c < columns - 1; c++) {
            const void *value = sqlite3_column_blob(stmt, c);
            size_t len = (size_t)sqlite3_column_bytes(stmt, c);

            /* Neither key, nor its random part, appears in any column. */
            assert_false(contains(value, len, key + 3));
            assert_false(contains(value, len, old_key + 3));
        }
        assert_int_equal(sqlite3_column_bytes(stmt, columns - 1), 32);
        assert_memory_equal(sqlite3_column_blob(stmt, columns - 1), digest, 32);
    }
    assert_int_equal(rows, 1);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
}

static void registry_schema_and_wal(void **state)
{
    struct fixture *f = *state;
    registry_t *again = NULL;
    sqlite3_stmt *stmt;
    char err[256] = "";
    sqlite3 *db;

    /* A second open of an up-to-date database leaves it unchanged. */
    assert_int_equal(registry_open(f->path, &again, err, sizeof(err)), 0);
    registry_close(again);

    assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
    assert_int_equal(
        sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(stmt), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(stmt, 0), "wal");
    sqlite3_finalize(stmt);
    assert_int_equal(
        sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_step(stmt), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(stmt, 0), 3);
    sqlite3_finalize(stmt);

    /* A database from a newer ingestd is rejected, not downgraded. */
    assert_int_equal(
        sqlite3_exec(db, "PRAGMA user_version = 99", NULL, NULL, NULL),
        SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(registry_open(f->path, &again, err, sizeof(err)), ING_EDB);
    assert_null(again);
    assert_non_null(strstr(err, "newer"));
}

static void registry_open_missing_folder(void **state)
{
    struct fixture *f = *state;
    registry_t *r = NULL;
    char path[256];
    char folder[200];
    char err[512] = "";

    snprintf(folder, sizeof(folder), "%s/missing", f->dir);
    snprintf(path, sizeof(path), "%s/registry.db", folder);
    assert_int_equal(registry_open(path, &r, err, sizeof(err)), ING_EDB);
    assert_null(r);
    assert_non_null(strstr(err, folder));
    assert_int_equal(access(folder, F_OK), -1);
}

static void auth_open_missing_file(void **state)
{
    struct fixture *f = *state;
    auth_t *a = NULL;
    char path[256];
    char err[512] = "";

    snprintf(path, sizeof(path), "%s/absent.db", f->dir);
    assert_int_equal(auth_open(path, &a, err, sizeof(err)), ING_EDB);
    assert_null(a);
    assert_non_null(strstr(err, path));
}

static void auth_check_valid_and_wrong_keys(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    char wrong[AUTH_KEY_LEN + 1];
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev-1", "thermo", key), 0);
    a = open_auth(f);
    assert_int_equal(auth_device_count(a), 1);

    assert_int_equal(check(a, key, &dev), AUTH_OK);
    assert_string_equal(dev.id, "dev-1");
    assert_string_equal(dev.type, "thermo");

    memcpy(wrong, key, sizeof(wrong));
    wrong[AUTH_KEY_LEN - 1] = wrong[AUTH_KEY_LEN - 1] == 'A' ? 'B' : 'A';
    assert_int_equal(check(a, wrong, &dev), AUTH_UNKNOWN_KEY);
    assert_int_equal(auth_check_key(a, key, AUTH_KEY_LEN - 1, &dev),
                     AUTH_UNKNOWN_KEY);
    assert_int_equal(auth_check_key(a, "", 0, &dev), AUTH_UNKNOWN_KEY);
    memcpy(wrong, key, sizeof(wrong));
    wrong[0] = 'x';
    assert_int_equal(check(a, wrong, &dev), AUTH_UNKNOWN_KEY);
    auth_close(a);
}

static void auth_disabled_device_filled(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev-1", "gps", key), 0);
    a = open_auth(f);
    assert_int_equal(registry_device_set_enabled(f->reg, "dev-1", 0), 0);

    /* The snapshot changes only on reload. */
    assert_int_equal(check(a, key, &dev), AUTH_OK);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(check(a, key, &dev), AUTH_DISABLED);
    assert_string_equal(dev.id, "dev-1");
    assert_string_equal(dev.type, "gps");

    assert_int_equal(registry_device_set_enabled(f->reg, "dev-1", 1), 0);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(check(a, key, &dev), AUTH_OK);
    auth_close(a);
}

static void auth_lookup_by_device_id(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    char id[32];
    auth_device_t dev;
    auth_t *a;

    /* Enough devices that the id table grows past its first size. */
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof(id), "dev-%d", i);
        assert_int_equal(registry_device_add(f->reg, id, "thermo", key), 0);
    }
    assert_int_equal(registry_device_add(f->reg, "off-1", "gps", key), 0);
    assert_int_equal(registry_device_set_enabled(f->reg, "off-1", 0), 0);
    a = open_auth(f);

    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof(id), "dev-%d", i);
        memset(&dev, 0, sizeof(dev));
        assert_int_equal(auth_lookup_device(a, id, &dev), AUTH_OK);
        assert_string_equal(dev.id, id);
        assert_string_equal(dev.type, "thermo");
    }
    memset(&dev, 0, sizeof(dev));
    assert_int_equal(auth_lookup_device(a, "off-1", &dev), AUTH_DISABLED);
    assert_string_equal(dev.id, "off-1");
    assert_string_equal(dev.type, "gps");
    assert_int_equal(auth_lookup_device(a, "dev-40", &dev),
                     AUTH_UNKNOWN_DEVICE);
    assert_int_equal(auth_lookup_device(a, "dev-1/x", &dev),
                     AUTH_UNKNOWN_DEVICE);
    assert_int_equal(auth_lookup_device(a, "", &dev), AUTH_UNKNOWN_DEVICE);

    /* A device added later is found after a reload, not before. */
    assert_int_equal(registry_device_add(f->reg, "late", "thermo", key), 0);
    assert_int_equal(auth_lookup_device(a, "late", &dev), AUTH_UNKNOWN_DEVICE);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(auth_lookup_device(a, "late", &dev), AUTH_OK);
    auth_close(a);
}

static void auth_lookup_empty_registry(void **state)
{
    struct fixture *f = *state;
    auth_device_t dev;
    auth_t *a = open_auth(f);

    assert_int_equal(auth_lookup_device(a, "dev-1", &dev),
                     AUTH_UNKNOWN_DEVICE);
    auth_close(a);
}

static void auth_rotate_keeps_old_key_in_grace(void **state)
{
    struct fixture *f = *state;
    char old_key[AUTH_KEY_LEN + 1];
    char new_key[AUTH_KEY_LEN + 1];
    struct listing l = {0};
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev", "thermo", old_key), 0);
    a = open_auth(f);
    /* An hour of grace cannot run out during the test. */
    assert_int_equal(
        registry_device_rotate_key(f->reg, "dev", 3600 * 1000, new_key), 0);
    assert_string_not_equal(old_key, new_key);
    assert_int_equal(auth_reload(a), 0);

    assert_int_equal(check(a, new_key, &dev), AUTH_OK);
    assert_string_equal(dev.id, "dev");
    assert_int_equal(check(a, old_key, &dev), AUTH_OK);
    assert_string_equal(dev.id, "dev");
    assert_int_equal(auth_device_count(a), 1);

    assert_int_equal(registry_device_list(f->reg, on_entry, &l), 0);
    assert_int_equal(l.count, 1);
    assert_true(l.key_rotated_ms[0] >= l.created_ms[0]);
    assert_true(l.old_key_expires_ms[0] > l.key_rotated_ms[0]);
    auth_close(a);
}

static void auth_rotate_old_key_expires(void **state)
{
    struct fixture *f = *state;
    char old_key[AUTH_KEY_LEN + 1];
    char new_key[AUTH_KEY_LEN + 1];
    struct listing l = {0};
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev", "thermo", old_key), 0);
    a = open_auth(f);
    assert_int_equal(registry_device_rotate_key(f->reg, "dev", 1, new_key), 0);
    assert_int_equal(auth_reload(a), 0);
    /* Sleeping well past the 1 ms grace makes the outcome independent of
     * how fast the reload ran. */
    sleep_ms(5);
    assert_int_equal(check(a, old_key, &dev), AUTH_UNKNOWN_KEY);
    assert_int_equal(check(a, new_key, &dev), AUTH_OK);

    assert_int_equal(registry_device_list(f->reg, on_entry, &l), 0);
    assert_int_equal(l.old_key_expires_ms[0], 0);
    auth_close(a);
}

static void auth_rotate_without_grace(void **state)
{
    struct fixture *f = *state;
    char old_key[AUTH_KEY_LEN + 1];
    char new_key[AUTH_KEY_LEN + 1];
    char newest_key[AUTH_KEY_LEN + 1];
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev", "thermo", old_key), 0);
    assert_int_equal(
        registry_device_rotate_key(f->reg, "dev", 3600 * 1000, new_key), 0);
    /* Rotating with no grace also revokes a previous key still in grace. */
    assert_int_equal(registry_device_rotate_key(f->reg, "dev", 0, newest_key),
                     0);
    a = open_auth(f);
    assert_int_equal(check(a, newest_key, &dev), AUTH_OK);
    assert_int_equal(check(a, new_key, &dev), AUTH_UNKNOWN_KEY);
    assert_int_equal(check(a, old_key, &dev), AUTH_UNKNOWN_KEY);
    auth_close(a);
}

static void auth_reload_if_changed_sees_commit(void **state)
{
    struct fixture *f = *state;
    char key1[AUTH_KEY_LEN + 1];
    char key2[AUTH_KEY_LEN + 1];
    auth_device_t dev;
    auth_t *a;

    assert_int_equal(registry_device_add(f->reg, "dev-1", "thermo", key1), 0);
    a = open_auth(f);
    assert_int_equal(auth_reload_if_changed(a), 0);

    /* The registry uses its own connection, like the CLI would. */
    assert_int_equal(registry_device_add(f->reg, "dev-2", "gps", key2), 0);
    assert_int_equal(check(a, key2, &dev), AUTH_UNKNOWN_KEY);
    assert_int_equal(auth_reload_if_changed(a), 1);
    assert_int_equal(auth_device_count(a), 2);
    assert_int_equal(check(a, key2, &dev), AUTH_OK);
    assert_string_equal(dev.id, "dev-2");
    assert_int_equal(auth_reload_if_changed(a), 0);

    assert_int_equal(registry_device_set_enabled(f->reg, "dev-1", 0), 0);
    assert_int_equal(auth_reload_if_changed(a), 1);
    assert_int_equal(check(a, key1, &dev), AUTH_DISABLED);
    assert_int_equal(auth_reload_if_changed(a), 0);
    auth_close(a);
}

#define STABLE_DEVICES 8
#define CHECKER_THREADS 3
#define MAX_CHECKS_PER_THREAD 2000000
#define RELOAD_ROUNDS 60

struct checker {
    auth_t *auth;
    atomic_int *stop;
    atomic_long checks;
    char (*keys)[AUTH_KEY_LEN + 1];
    int failures;
};

static void *run_checker(void *arg)
{
    struct checker *c = arg;
    auth_device_t dev;
    char expected[16];

    /* The threads run until the reloads are done, so that they overlap
     * with them. The cap only bounds the run. */
    for (long i = 0; i < MAX_CHECKS_PER_THREAD && !atomic_load(c->stop); i++) {
        int k = (int)(i % STABLE_DEVICES);

        snprintf(expected, sizeof(expected), "stable-%d", k);
        if (auth_check_key(c->auth, c->keys[k], AUTH_KEY_LEN, &dev) !=
                AUTH_OK ||
            strcmp(dev.id, expected) != 0)
            c->failures++;
        atomic_fetch_add(&c->checks, 1);
    }
    return NULL;
}

static void auth_check_during_reloads(void **state)
{
    struct fixture *f = *state;
    char keys[STABLE_DEVICES][AUTH_KEY_LEN + 1];
    struct checker checkers[CHECKER_THREADS];
    pthread_t threads[CHECKER_THREADS];
    char key[AUTH_KEY_LEN + 1];
    atomic_int stop = 0;
    char id[32];
    auth_t *a;

    for (int i = 0; i < STABLE_DEVICES; i++) {
        snprintf(id, sizeof(id), "stable-%d", i);
        assert_int_equal(registry_device_add(f->reg, id, "thermo", keys[i]), 0);
    }
    a = open_auth(f);
    for (int t = 0; t < CHECKER_THREADS; t++) {
        checkers[t].auth = a;
        checkers[t].stop = &stop;
        checkers[t].checks = 0;
        checkers[t].keys = keys;
        checkers[t].failures = 0;
        assert_int_equal(
            pthread_create(&threads[t], NULL, run_checker, &checkers[t]), 0);
    }
    /* Start reloading only once every thread is checking, so that the
     * reloads overlap with the checks even on a loaded machine. */
    for (int t = 0; t < CHECKER_THREADS; t++) {
        while (atomic_load(&checkers[t].checks) == 0)
            sched_yield();
    }
    /* Each round swaps in a new snapshot while the threads hold the old
     * one, which is where a reference counting bug would free it early. */
    for (int round = 0; round < RELOAD_ROUNDS; round++) {
        snprintf(id, sizeof(id), "extra-%d", round);
        assert_int_equal(registry_device_add(f->reg, id, "gps", key), 0);
        if (round % 2 == 0)
            assert_int_equal(auth_reload(a), 0);
        else
            assert_int_equal(auth_reload_if_changed(a), 1);
    }
    atomic_store(&stop, 1);
    /* Join every thread before any assert can leave this function, since
     * the threads use its stack. */
    for (int t = 0; t < CHECKER_THREADS; t++)
        assert_int_equal(pthread_join(threads[t], NULL), 0);
    for (int t = 0; t < CHECKER_THREADS; t++) {
        assert_int_equal(checkers[t].failures, 0);
        assert_true(atomic_load(&checkers[t].checks) > 0);
    }
    assert_int_equal(auth_device_count(a), STABLE_DEVICES + RELOAD_ROUNDS);
    auth_close(a);
}

static void registry_file_mode_private(void **state)
{
    struct fixture *f = *state;
    struct stat st;

    assert_int_equal(stat(f->path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
}

/* A version 1 database, written as the first ingestd release wrote it,
 * gains the credential columns and keeps its devices and keys. */
static void registry_migrates_version_1(void **state)
{
    struct fixture *f = *state;
    char path[160];
    char err[256] = "";
    uint8_t hash[32] = {1};
    registry_t *r = NULL;
    sqlite3_stmt *stmt;
    sqlite3 *db;

    snprintf(path, sizeof(path), "%s/v1.db", f->dir);
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(
        sqlite3_exec(db,
                     "CREATE TABLE devices (id TEXT PRIMARY KEY,"
                     " type TEXT NOT NULL, enabled INTEGER NOT NULL,"
                     " key_hash BLOB NOT NULL UNIQUE, old_key_hash BLOB,"
                     " old_key_expires_ms INTEGER, created_ms INTEGER,"
                     " key_rotated_ms INTEGER);"
                     "PRAGMA user_version = 1",
                     NULL, NULL, NULL),
        SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db,
                                        "INSERT INTO devices VALUES ('old-1',"
                                        " 'gps', 1, ?1, NULL, NULL, 0, 0)",
                                        -1, &stmt, NULL),
                     SQLITE_OK);
    sqlite3_bind_blob(stmt, 1, hash, sizeof(hash), SQLITE_STATIC);
    assert_int_equal(sqlite3_step(stmt), SQLITE_DONE);
    sqlite3_finalize(stmt);
    sqlite3_close(db);

    assert_int_equal(registry_open(path, &r, err, sizeof(err)), 0);
    assert_int_equal(registry_device_set_cert(r, "old-1", hash), 0);
    registry_close(r);
    unlink(path);
}

static void certificate_check(void **state)
{
    struct fixture *f = *state;
    unsigned char pin[32];
    unsigned char other[32];
    char key[AUTH_KEY_LEN + 1];
    auth_failure_t why;
    auth_device_t dev;
    auth_t *a;

    memset(pin, 0xab, sizeof(pin));
    memset(other, 0xcd, sizeof(other));
    assert_int_equal(registry_device_add(f->reg, "dev-1", "gps", key), 0);
    a = open_auth(f);

    /* Without a pin, any verified certificate naming the device works. */
    memset(&dev, 0, sizeof(dev));
    assert_int_equal(auth_check_certificate(a, "dev-1", other, &dev, &why),
                     AUTH_OK);
    assert_string_equal(dev.id, "dev-1");
    assert_string_equal(dev.type, "gps");
    assert_int_equal(auth_check_certificate(a, "dev-2", other, &dev, &why),
                     AUTH_UNKNOWN_DEVICE);
    assert_string_equal(why.reason, "unknown_device");
    assert_int_equal(auth_check_certificate(a, "bad id", other, &dev, &why),
                     AUTH_UNKNOWN_DEVICE);
    assert_string_equal(why.reason, "unknown_device");

    assert_int_equal(registry_device_set_cert(f->reg, "dev-1", pin), 0);
    assert_int_equal(registry_device_set_cert(f->reg, "dev-9", pin),
                     ING_ENOTFOUND);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(auth_check_certificate(a, "dev-1", pin, &dev, &why),
                     AUTH_OK);
    assert_int_equal(auth_check_certificate(a, "dev-1", other, &dev, &why),
                     AUTH_UNKNOWN_DEVICE);
    assert_string_equal(why.reason, "fingerprint_mismatch");

    assert_int_equal(registry_device_set_enabled(f->reg, "dev-1", 0), 0);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(auth_check_certificate(a, "dev-1", pin, &dev, &why),
                     AUTH_DISABLED);
    assert_string_equal(why.reason, "disabled");

    assert_int_equal(registry_device_set_enabled(f->reg, "dev-1", 1), 0);
    assert_int_equal(registry_device_set_cert(f->reg, "dev-1", NULL), 0);
    assert_int_equal(auth_reload(a), 0);
    assert_int_equal(auth_check_certificate(a, "dev-1", other, &dev, &why),
                     AUTH_OK);
    auth_close(a);
}

#define FIXTURE_TEST(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(auth_device_id_rules),
        FIXTURE_TEST(registry_key_format),
        FIXTURE_TEST(registry_add_list_sorted),
        FIXTURE_TEST(registry_add_duplicate_id),
        FIXTURE_TEST(registry_add_invalid_names),
        FIXTURE_TEST(registry_unknown_id),
        FIXTURE_TEST(registry_stores_only_key_hash),
        FIXTURE_TEST(registry_schema_and_wal),
        FIXTURE_TEST(registry_open_missing_folder),
        FIXTURE_TEST(auth_open_missing_file),
        FIXTURE_TEST(auth_check_valid_and_wrong_keys),
        FIXTURE_TEST(auth_disabled_device_filled),
        FIXTURE_TEST(auth_lookup_by_device_id),
        FIXTURE_TEST(auth_lookup_empty_registry),
        FIXTURE_TEST(auth_rotate_keeps_old_key_in_grace),
        FIXTURE_TEST(auth_rotate_old_key_expires),
        FIXTURE_TEST(auth_rotate_without_grace),
        FIXTURE_TEST(auth_reload_if_changed_sees_commit),
        FIXTURE_TEST(auth_check_during_reloads),
        FIXTURE_TEST(registry_file_mode_private),
        FIXTURE_TEST(registry_migrates_version_1),
        FIXTURE_TEST(certificate_check),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
