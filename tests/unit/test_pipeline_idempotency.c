/* Unit tests for the idempotency index: claims, commits, expiry,
 * eviction, the log's reload and torn tail, and the spool follower's
 * rebuild of keys that only the spool holds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>

#include "core/errors.h"
#include "pipeline/idempotency.h"
#include "test_spool_util.h"

#define WINDOW_MS 60000
#define T0 INT64_C(1800000000000) /* a receive time in 2027 */

/* The owners of reservations: any distinct addresses. */
static int owner_a, owner_b;

static idempotency_t *open_index(const char *dir, uint64_t max_keys)
{
    idempotency_options_t opts = {
        .dir = dir,
        .window_ms = WINDOW_MS,
        .max_keys = max_keys,
        .fsync = 1,
    };
    char err[256] = "";
    idempotency_t *ix = NULL;
    int rc = idempotency_open(&opts, &ix, err, sizeof(err));

    if (rc != 0)
        print_error("idempotency_open: %s\n", err);
    assert_int_equal(rc, 0);
    return ix;
}

static void make_id(uint8_t id[IDEMPOTENCY_ID_BYTES], int n)
{
    memset(id, 0, IDEMPOTENCY_ID_BYTES);
    id[0] = 0x01;
    id[15] = (uint8_t)n;
    id[14] = (uint8_t)(n >> 8);
    id[13] = (uint8_t)(n >> 16);
}

/* Claims `key` for `owner` and commits it with one id made from `n`. */
static void store_key(idempotency_t *ix, const char *device, const char *key,
                      int n, int64_t received_ms)
{
    uint8_t id[IDEMPOTENCY_ID_BYTES];
    uint8_t *ids = NULL;
    size_t nids = 0;

    make_id(id, n);
    assert_int_equal(idempotency_claim(ix, device, key, strlen(key),
                                       &owner_a, received_ms, &ids, &nids),
                     IDEMPOTENCY_NEW);
    assert_int_equal(idempotency_commit(ix, device, key, strlen(key),
                                        &owner_a, received_ms, id, 1),
                     0);
}

/* Claims `key` and returns the result, releasing a new reservation and
 * storing the first replayed id's last byte in `*first` (or -1). */
static int probe(idempotency_t *ix, const char *device, const char *key,
                 int64_t now_ms, int *first)
{
    uint8_t *ids = NULL;
    size_t nids = 0;
    int rc = idempotency_claim(ix, device, key, strlen(key), &owner_b, now_ms,
                               &ids, &nids);

    *first = -1;
    if (rc == IDEMPOTENCY_NEW)
        idempotency_release(ix, device, key, strlen(key), &owner_b);
    if (rc == IDEMPOTENCY_REPLAY) {
        assert_true(nids >= 1);
        *first = ids[15] | ids[14] << 8 | ids[13] << 16;
    }
    free(ids);
    return rc;
}

static void idempotency_claim_then_replay(void **state)
{
    idempotency_t *ix = open_index(NULL, 100);
    int first;

    (void)state;
    store_key(ix, "dev-1", "k1", 7, T0);
    assert_int_equal(probe(ix, "dev-1", "k1", T0 + 1, &first),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(first, 7);
    /* Keys are per device. */
    assert_int_equal(probe(ix, "dev-2", "k1", T0 + 1, &first),
                     IDEMPOTENCY_NEW);
    assert_int_equal(probe(ix, "dev-1", "k2", T0 + 1, &first),
                     IDEMPOTENCY_NEW);
    assert_int_equal(idempotency_key_count(ix), 1);
    idempotency_close(ix);
}

static void idempotency_busy_until_released(void **state)
{
    idempotency_t *ix = open_index(NULL, 100);
    uint8_t *ids = NULL;
    size_t nids = 0;
    int first;

    (void)state;
    assert_int_equal(idempotency_claim(ix, "dev-1", "k", 1, &owner_a, T0,
                                       &ids, &nids),
                     IDEMPOTENCY_NEW);
    assert_int_equal(probe(ix, "dev-1", "k", T0, &first), IDEMPOTENCY_BUSY);
    /* A release by someone else changes nothing. */
    idempotency_release(ix, "dev-1", "k", 1, &owner_b);
    assert_int_equal(probe(ix, "dev-1", "k", T0, &first), IDEMPOTENCY_BUSY);
    /* A failed first attempt leaves the key free for the retry. */
    idempotency_release(ix, "dev-1", "k", 1, &owner_a);
    assert_int_equal(probe(ix, "dev-1", "k", T0, &first), IDEMPOTENCY_NEW);
    assert_int_equal(idempotency_key_count(ix), 0);
    idempotency_close(ix);
}

static void idempotency_commit_several_ids(void **state)
{
    idempotency_t *ix = open_index(NULL, 100);
    uint8_t ids_in[3 * IDEMPOTENCY_ID_BYTES];
    uint8_t *ids = NULL;
    size_t nids = 0;

    (void)state;
    for (int i = 0; i < 3; i++)
        make_id(ids_in + i * IDEMPOTENCY_ID_BYTES, 10 + i);
    assert_int_equal(idempotency_claim(ix, "dev-1", "req", 3, &owner_a, T0,
                                       &ids, &nids),
                     IDEMPOTENCY_NEW);
    assert_int_equal(idempotency_commit(ix, "dev-1", "req", 3, &owner_a, T0,
                                        ids_in, 3),
                     0);
    assert_int_equal(idempotency_claim(ix, "dev-1", "req", 3, &owner_b, T0,
                                       &ids, &nids),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(nids, 3);
    assert_memory_equal(ids, ids_in, sizeof(ids_in));
    free(ids);
    idempotency_close(ix);
}

static void idempotency_key_expires(void **state)
{
    idempotency_t *ix = open_index(NULL, 100);
    int first;

    (void)state;
    store_key(ix, "dev-1", "old", 1, T0);
    store_key(ix, "dev-1", "new", 2, T0 + WINDOW_MS / 2);
    assert_int_equal(probe(ix, "dev-1", "old", T0 + WINDOW_MS - 1, &first),
                     IDEMPOTENCY_REPLAY);
    /* A claim after the window finds the key free again. */
    assert_int_equal(probe(ix, "dev-1", "old", T0 + WINDOW_MS, &first),
                     IDEMPOTENCY_NEW);
    assert_int_equal(idempotency_expire(ix, T0 + WINDOW_MS + 1), 0);
    assert_int_equal(idempotency_expire(ix, T0 + WINDOW_MS * 2), 1);
    assert_int_equal(idempotency_key_count(ix), 0);
    idempotency_close(ix);
}

static void idempotency_evicts_oldest(void **state)
{
    idempotency_t *ix = open_index(NULL, 3);
    char key[16];
    int first;

    (void)state;
    for (int i = 0; i < 5; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        store_key(ix, "dev-1", key, i, T0 + i);
    }
    assert_int_equal(idempotency_key_count(ix), 3);
    assert_int_equal(probe(ix, "dev-1", "k0", T0 + 10, &first),
                     IDEMPOTENCY_NEW);
    assert_int_equal(probe(ix, "dev-1", "k1", T0 + 10, &first),
                     IDEMPOTENCY_NEW);
    for (int i = 2; i < 5; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        assert_int_equal(probe(ix, "dev-1", key, T0 + 10, &first),
                         IDEMPOTENCY_REPLAY);
        assert_int_equal(first, i);
    }
    idempotency_close(ix);
}

/* Writes log frames as the follower does: one per stored record. */
static void log_key(idempotency_t *ix, const char *device, const char *key,
                    int n, int64_t received_ms)
{
    uint8_t id[IDEMPOTENCY_ID_BYTES];

    make_id(id, n);
    assert_int_equal(idempotency_log_append(ix, received_ms, device, key,
                                            strlen(key), id),
                     0);
}

static void idempotency_log_reloads(void **state)
{
    const char *dir = make_temp_dir();
    int64_t now = idempotency_now_ms();
    idempotency_t *ix = open_index(dir, 100);
    uint8_t *ids = NULL;
    size_t nids = 0;
    int first;

    (void)state;
    log_key(ix, "dev-1", "a", 1, now);
    /* Two records of one batch under one request key. */
    log_key(ix, "dev-1", "req", 2, now);
    log_key(ix, "dev-1", "req", 3, now);
    log_key(ix, "dev-1", "gone", 4, now - WINDOW_MS - 1);
    assert_int_equal(idempotency_log_sync(ix, now), 0);
    idempotency_close(ix);

    ix = open_index(dir, 100);
    assert_int_equal(probe(ix, "dev-1", "a", now, &first),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(first, 1);
    assert_int_equal(idempotency_claim(ix, "dev-1", "req", 3, &owner_b, now,
                                       &ids, &nids),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(nids, 2);
    assert_int_equal(ids[15], 2);
    assert_int_equal(ids[IDEMPOTENCY_ID_BYTES + 15], 3);
    free(ids);
    /* An entry already expired in the log is not loaded. */
    assert_int_equal(probe(ix, "dev-1", "gone", now, &first),
                     IDEMPOTENCY_NEW);
    idempotency_close(ix);
    remove_tree(dir);
}

static void idempotency_log_truncates_torn_tail(void **state)
{
    const char *dir = make_temp_dir();
    int64_t now = idempotency_now_ms();
    idempotency_t *ix = open_index(dir, 100);
    char path[256];
    struct stat before, after;
    const uint8_t torn[] = {40, 0, 0, 0, 1, 2, 3, 4, 5, 6};
    int fd, first;

    (void)state;
    log_key(ix, "dev-1", "kept", 1, now);
    assert_int_equal(idempotency_log_sync(ix, now), 0);
    idempotency_close(ix);

    /* A crash in the middle of a write leaves part of a frame. */
    snprintf(path, sizeof(path), "%s/00000000000000000001.log", dir);
    assert_int_equal(stat(path, &before), 0);
    fd = open(path, O_WRONLY | O_APPEND);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, torn, sizeof(torn)), (ssize_t)sizeof(torn));
    close(fd);

    ix = open_index(dir, 100);
    assert_int_equal(stat(path, &after), 0);
    assert_int_equal(after.st_size, before.st_size);
    assert_int_equal(probe(ix, "dev-1", "kept", now, &first),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(first, 1);
    idempotency_close(ix);
    remove_tree(dir);
}

static void idempotency_log_deletes_expired_segments(void **state)
{
    const char *dir = make_temp_dir();
    int64_t now = idempotency_now_ms();
    idempotency_t *ix;

    (void)state;
    /* Every start opens a new segment, so three starts make three. */
    for (int i = 0; i < 3; i++) {
        ix = open_index(dir, 100);
        log_key(ix, "dev-1", i == 2 ? "live" : "old", i, now - WINDOW_MS + i);
        assert_int_equal(idempotency_log_sync(ix, now - WINDOW_MS + 10), 0);
        idempotency_close(ix);
    }
    ix = open_index(dir, 100);
    assert_int_equal(count_files(dir, ".log"), 4);
    /* At `now`, segments 1 and 2 hold only expired keys; 3 is still live
     * until its key expires, and 4 is the active one. */
    assert_int_equal(idempotency_log_sync(ix, now + 1), 0);
    assert_int_equal(count_files(dir, ".log"), 2);
    assert_int_equal(idempotency_log_sync(ix, now + 3), 0);
    assert_int_equal(count_files(dir, ".log"), 1);
    idempotency_close(ix);
    remove_tree(dir);
}

static spool_t *open_spool(const char *dir)
{
    spool_options_t opts = {
        .dir = dir,
        .fsync = 1,
        .segment_size = 1 << 20,
        .max_size = 0,
        .max_record = 64 * 1024,
    };
    char err[256] = "";
    spool_t *s = NULL;
    int rc = spool_open(&opts, &s, err, sizeof(err));

    if (rc != 0)
        print_error("spool_open: %s\n", err);
    assert_int_equal(rc, 0);
    return s;
}

/* The crash the follower covers: records are durable and acknowledged,
 * but the process died before their keys reached the log. */
static void idempotency_follow_rebuilds_from_spool(void **state)
{
    const char *base = make_temp_dir();
    char spool_dir[256], index_dir[256], record[512];
    char received_at[32];
    int64_t now = idempotency_now_ms();
    time_t secs = (time_t)(now / 1000);
    struct tm tm;
    idempotency_follow_t *f = NULL;
    idempotency_t *ix;
    spool_t *s;
    char err[256] = "";
    int first;

    (void)state;
    snprintf(spool_dir, sizeof(spool_dir), "%s/spool", base);
    snprintf(index_dir, sizeof(index_dir), "%s/idempotency", base);
    gmtime_r(&secs, &tm);
    strftime(received_at, sizeof(received_at), "%Y-%m-%dT%H:%M:%S.000Z",
             &tm);
    s = open_spool(spool_dir);
    snprintf(record, sizeof(record),
             "{\"message_id\":\"01000000-0000-0000-0000-000000000009\","
             "\"device_id\":\"dev-1\",\"device_type\":\"default\","
             "\"protocol\":\"http\",\"received_at\":\"%s\","
             "\"idempotency_key\":\"m-9\",\"payload\":{\"v\":1}}",
             received_at);
    assert_int_equal(append_sync(s, record), 0);
    assert_int_equal(append_sync(s, "{\"message_id\":\"x\",\"payload\":{}}"),
                     0);

    ix = open_index(index_dir, 100);
    assert_int_equal(idempotency_follow_start(ix, s, &f, err, sizeof(err)),
                     0);
    assert_int_equal(probe(ix, "dev-1", "m-9", now, &first),
                     IDEMPOTENCY_REPLAY);
    assert_int_equal(first, 9);
    idempotency_follow_stop(f);
    idempotency_close(ix);
    spool_close(s);

    /* The key is now in the log, and the cursor is past the record. */
    ix = open_index(index_dir, 100);
    assert_int_equal(probe(ix, "dev-1", "m-9", now, &first),
                     IDEMPOTENCY_REPLAY);
    idempotency_close(ix);
    remove_tree(base);
}

static void idempotency_uuid_round_trip(void **state)
{
    const char *text = "0190c2a1-7e4b-7c3d-9f00-0123456789ab";
    uint8_t id[IDEMPOTENCY_ID_BYTES];
    char back[37];
    int64_t ms;

    (void)state;
    assert_int_equal(idempotency_uuid_parse(text, id), 0);
    idempotency_uuid_format(id, back);
    assert_string_equal(back, text);
    assert_int_equal(idempotency_uuid_parse("0190c2a1-7e4b", id), ING_EINVAL);
    assert_int_equal(
        idempotency_uuid_parse("0190c2a1x7e4b-7c3d-9f00-0123456789ab", id),
        ING_EINVAL);
    assert_int_equal(idempotency_parse_time("2027-01-15T08:00:00.250Z", &ms),
                     0);
    assert_int_equal(ms, INT64_C(1800000000250));
    assert_int_equal(idempotency_parse_time("yesterday", &ms), ING_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(idempotency_claim_then_replay),
        cmocka_unit_test(idempotency_busy_until_released),
        cmocka_unit_test(idempotency_commit_several_ids),
        cmocka_unit_test(idempotency_key_expires),
        cmocka_unit_test(idempotency_evicts_oldest),
        cmocka_unit_test(idempotency_log_reloads),
        cmocka_unit_test(idempotency_log_truncates_torn_tail),
        cmocka_unit_test(idempotency_log_deletes_expired_segments),
        cmocka_unit_test(idempotency_follow_rebuilds_from_spool),
        cmocka_unit_test(idempotency_uuid_round_trip),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
