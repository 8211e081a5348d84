/* Unit tests for the spool: CRC32C, appends, group commit, readers,
 * cursors, the size limit and segment deletion. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdatomic.h>

#include "core/errors.h"
#include "core/metrics.h"
#include "spool/crc32c.h"
#include "spool/spool.h"
#include "test_spool_util.h"

static spool_t *open_spool(const char *dir, int fsync, uint64_t segment_size,
                           uint64_t max_size)
{
    spool_options_t opts = {
        .dir = dir,
        .fsync = fsync,
        .segment_size = segment_size,
        .max_size = max_size,
        .max_record = 64 * 1024,
    };
    char err[256] = "";
    spool_t *s = NULL;
    int rc = spool_open(&opts, &s, err, sizeof(err));

    if (rc != 0)
        print_error("spool_open: %s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(s);
    return s;
}

/* Reads the next record, waiting at most a second, into `buf`. */
static void read_one(spool_reader_t *r, char *buf, size_t size,
                     spool_record_t *out)
{
    spool_record_t rec;
    size_t n = 0;

    assert_int_equal(spool_reader_next(r, &rec, 1, 1000, &n), 0);
    assert_int_equal(n, 1);
    assert_true(rec.len < size);
    memcpy(buf, rec.data, rec.len);
    buf[rec.len] = '\0';
    if (out != NULL)
        *out = rec;
}

static void crc32c_known_vectors(void **state)
{
    static const struct {
        const char *name;
        int fill; /* -1: ascending bytes, -2: descending, else a constant */
        size_t len;
        uint32_t crc;
    } cases[] = {
        /* RFC 3720, appendix B.4. */
        {"zeros", 0x00, 32, 0x8A9136AA},
        {"ones", 0xFF, 32, 0x62A8AB43},
        {"ascending", -1, 32, 0x46DD794E},
        {"descending", -2, 32, 0x113FDB5C},
    };
    uint8_t buf[32];

    assert_int_equal(spool_crc32c(0, "123456789", 9), 0xE3069283);
    assert_int_equal(crc32c_table(0, "123456789", 9), 0xE3069283);
    assert_int_equal(spool_crc32c(0, "", 0), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        for (size_t j = 0; j < cases[i].len; j++) {
            if (cases[i].fill == -1)
                buf[j] = (uint8_t)j;
            else if (cases[i].fill == -2)
                buf[j] = (uint8_t)(31 - j);
            else
                buf[j] = (uint8_t)cases[i].fill;
        }
        print_message("case %s\n", cases[i].name);
        assert_int_equal(crc32c_table(0, buf, cases[i].len), cases[i].crc);
        assert_int_equal(spool_crc32c(0, buf, cases[i].len), cases[i].crc);
        if (crc32c_hw_available())
            assert_int_equal(crc32c_hw(0, buf, cases[i].len), cases[i].crc);
    }
}

/* The hardware and table versions agree on every length and alignment,
 * and a CRC continued over two pieces equals the CRC of the whole. */
static void crc32c_table_matches_hw(void **state)
{
    uint8_t buf[600];
    uint32_t seed = 12345;

    for (size_t i = 0; i < sizeof(buf); i++) {
        seed = seed * 1103515245u + 12345u;
        buf[i] = (uint8_t)(seed >> 16);
    }
    for (size_t off = 0; off < 9; off++) {
        for (size_t len = 0; len + off <= sizeof(buf); len += 7) {
            uint32_t whole = crc32c_table(0, buf + off, len);
            uint32_t half = crc32c_table(0, buf + off, len / 2);
            half = crc32c_table(half, buf + off + len / 2, len - len / 2);
            assert_int_equal(half, whole);
            assert_int_equal(spool_crc32c(0, buf + off, len), whole);
            if (crc32c_hw_available())
                assert_int_equal(crc32c_hw(0, buf + off, len), whole);
        }
    }
}

static void spool_append_read_back(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 0, 0);
    spool_reader_t *r = NULL;
    struct iovec iov[3] = {
        {.iov_base = "alpha", .iov_len = 5},
        {.iov_base = "beta", .iov_len = 4},
        {.iov_base = "gamma", .iov_len = 5},
    };
    spool_record_t recs[8];
    waiter_t w;
    size_t n = 0;

    waiter_init(&w);
    assert_int_equal(spool_append(s, iov, 3, on_waiter_done, &w), 0);
    waiter_wait(&w, 1);
    assert_int_equal(w.last_status, 0);
    assert_int_equal(append_sync(s, "delta"), 0);
    assert_int_equal(spool_durable_end(s), 4 * 8 + 5 + 4 + 5 + 5);
    assert_int_equal(spool_size_bytes(s), spool_durable_end(s));

    assert_int_equal(spool_reader_open(s, "file", &r), 0);
    assert_int_equal(spool_reader_lag_bytes(r), spool_durable_end(s));
    assert_int_equal(spool_reader_next(r, recs, 8, 0, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(recs[0].data, "alpha", 5);
    assert_int_equal(recs[0].len, 5);
    assert_int_equal(recs[0].pos, 0);
    assert_int_equal(recs[0].end, 13);
    assert_memory_equal(recs[1].data, "beta", 4);
    assert_int_equal(recs[1].pos, 13);
    assert_memory_equal(recs[2].data, "gamma", 5);
    assert_memory_equal(recs[3].data, "delta", 5);
    assert_int_equal(recs[3].end, spool_durable_end(s));

    /* Nothing more: a zero timeout returns at once with no records. */
    assert_int_equal(spool_reader_next(r, recs, 8, 0, &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(spool_reader_commit(r, recs[3].end), 0);
    assert_int_equal(spool_reader_committed(r), spool_durable_end(s));
    assert_int_equal(spool_reader_lag_bytes(r), 0);

    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

static void spool_append_rejects_bad_payloads(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);
    static char big[64 * 1024 + 1];
    struct iovec ok = {.iov_base = "ok", .iov_len = 2};
    struct iovec empty = {.iov_base = "", .iov_len = 0};
    struct iovec too_big = {.iov_base = big, .iov_len = sizeof(big)};
    struct iovec mixed[2] = {ok, too_big};

    assert_int_equal(spool_append(s, &empty, 1, NULL, NULL), ING_EINVAL);
    assert_int_equal(spool_append(s, &too_big, 1, NULL, NULL), ING_ETOOBIG);
    /* All or nothing: the good record of a rejected unit is not queued. */
    assert_int_equal(spool_append(s, mixed, 2, NULL, NULL), ING_ETOOBIG);
    assert_int_equal(spool_size_bytes(s), 0);
    spool_close(s);
    assert_int_equal(count_files(dir, ".seg"), 1);
    remove_tree(dir);
}

#define THREADS 4
#define APPENDS_PER_THREAD 1000

typedef struct append_thread {
    spool_t *spool;
    int id;
    atomic_int calls[APPENDS_PER_THREAD];
    atomic_int failures;
} append_thread_t;

static atomic_int total_calls;
static pthread_mutex_t total_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t total_cv = PTHREAD_COND_INITIALIZER;

typedef struct append_ctx {
    append_thread_t *thread;
    int index;
} append_ctx_t;

static void on_counted_done(void *arg, int status)
{
    append_ctx_t *ctx = arg;

    atomic_fetch_add(&ctx->thread->calls[ctx->index], 1);
    if (status != 0)
        atomic_fetch_add(&ctx->thread->failures, 1);
    pthread_mutex_lock(&total_lock);
    atomic_fetch_add(&total_calls, 1);
    pthread_cond_broadcast(&total_cv);
    pthread_mutex_unlock(&total_lock);
    free(ctx);
}

/* Appends units of one or two records: "t<thread>-<index>-<part>". */
static void *append_main(void *arg)
{
    append_thread_t *t = arg;
    char a[32];
    char b[32];

    for (int i = 0; i < APPENDS_PER_THREAD; i++) {
        append_ctx_t *ctx = malloc(sizeof(*ctx));
        int len_a = snprintf(a, sizeof(a), "t%d-%06d-0", t->id, i);
        int len_b = snprintf(b, sizeof(b), "t%d-%06d-1", t->id, i);
        struct iovec iov[2] = {
            {.iov_base = a, .iov_len = (size_t)len_a},
            {.iov_base = b, .iov_len = (size_t)len_b},
        };
        ctx->thread = t;
        ctx->index = i;
        if (spool_append(t->spool, iov, 1 + (size_t)(i % 2), on_counted_done,
                         ctx) != 0)
            abort();
    }
    return NULL;
}

static void spool_concurrent_appends_in_order(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 4096, 0);
    static append_thread_t threads[THREADS];
    pthread_t tids[THREADS];
    int next_index[THREADS] = {0};
    int next_part[THREADS] = {0};
    spool_reader_t *r = NULL;
    spool_record_t recs[256];
    size_t total_records = 0;
    size_t expected_records = 0;

    atomic_store(&total_calls, 0);
    for (int t = 0; t < THREADS; t++) {
        memset(&threads[t], 0, sizeof(threads[t]));
        threads[t].spool = s;
        threads[t].id = t;
        assert_int_equal(
            pthread_create(&tids[t], NULL, append_main, &threads[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(tids[t], NULL);
    pthread_mutex_lock(&total_lock);
    while (atomic_load(&total_calls) < THREADS * APPENDS_PER_THREAD)
        pthread_cond_wait(&total_cv, &total_lock);
    pthread_mutex_unlock(&total_lock);

    for (int t = 0; t < THREADS; t++) {
        assert_int_equal(atomic_load(&threads[t].failures), 0);
        for (int i = 0; i < APPENDS_PER_THREAD; i++)
            assert_int_equal(atomic_load(&threads[t].calls[i]), 1);
    }
    assert_int_equal(spool_reader_open(s, "check", &r), 0);
    for (;;) {
        size_t n = 0;
        assert_int_equal(spool_reader_next(r, recs, 256, 0, &n), 0);
        if (n == 0)
            break;
        for (size_t k = 0; k < n; k++) {
            char text[32];
            int t, index, part;
            assert_true(recs[k].len < sizeof(text));
            memcpy(text, recs[k].data, recs[k].len);
            text[recs[k].len] = '\0';
            assert_int_equal(sscanf(text, "t%d-%d-%d", &t, &index, &part), 3);
            assert_in_range(t, 0, THREADS - 1);
            /* Each thread's records arrive in the order it appended. */
            assert_int_equal(index, next_index[t]);
            assert_int_equal(part, next_part[t]);
            if (part == 0 && index % 2 == 1) {
                next_part[t] = 1;
            } else {
                next_part[t] = 0;
                next_index[t]++;
            }
            total_records++;
        }
    }
    for (int t = 0; t < THREADS; t++)
        assert_int_equal(next_index[t], APPENDS_PER_THREAD);
    for (int i = 0; i < APPENDS_PER_THREAD; i++)
        expected_records += 1 + (size_t)(i % 2);
    assert_int_equal(total_records, THREADS * expected_records);

    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

/* The observer runs on the writer thread after each fdatasync and before
 * that batch's completions. Holding it lets the test queue appends while
 * the writer is provably busy with the previous batch. */
static pthread_mutex_t observe_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t observe_cv = PTHREAD_COND_INITIALIZER;
static int observe_calls;
static int observe_hold;

static void on_observe_hold(double seconds)
{
    pthread_mutex_lock(&observe_lock);
    observe_calls++;
    pthread_cond_broadcast(&observe_cv);
    while (observe_hold)
        pthread_cond_wait(&observe_cv, &observe_lock);
    pthread_mutex_unlock(&observe_lock);
}

static void spool_group_commit_batches(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 0, 0);
    struct iovec iov = {.iov_base = "reading", .iov_len = 7};
    waiter_t first, rest;
    const int queued = 100;

    waiter_init(&first);
    waiter_init(&rest);
    observe_calls = 0;
    observe_hold = 1;
    spool_set_sync_observer(s, on_observe_hold);

    assert_int_equal(spool_append(s, &iov, 1, on_waiter_done, &first), 0);
    pthread_mutex_lock(&observe_lock);
    while (observe_calls < 1)
        pthread_cond_wait(&observe_cv, &observe_lock);
    pthread_mutex_unlock(&observe_lock);

    /* The writer is parked after the first fdatasync. */
    for (int i = 0; i < queued; i++)
        assert_int_equal(spool_append(s, &iov, 1, on_waiter_done, &rest), 0);
    pthread_mutex_lock(&first.lock);
    assert_int_equal(first.calls, 0);
    pthread_mutex_unlock(&first.lock);

    pthread_mutex_lock(&observe_lock);
    observe_hold = 0;
    pthread_cond_broadcast(&observe_cv);
    pthread_mutex_unlock(&observe_lock);
    waiter_wait(&first, 1);
    waiter_wait(&rest, queued);

    /* 101 appends, 2 fdatasyncs: all queued ones shared one. */
    pthread_mutex_lock(&observe_lock);
    assert_int_equal(observe_calls, 2);
    pthread_mutex_unlock(&observe_lock);
    assert_int_equal(first.failures, 0);
    assert_int_equal(rest.failures, 0);
    assert_int_equal(spool_durable_end(s), (uint64_t)(queued + 1) * 15);

    spool_set_sync_observer(s, NULL);
    spool_close(s);
    remove_tree(dir);
}

static void spool_lossy_mode_skips_sync(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);

    observe_calls = 0;
    observe_hold = 0;
    spool_set_sync_observer(s, on_observe_hold);
    assert_int_equal(append_sync(s, "one"), 0);
    assert_int_equal(append_sync(s, "two"), 0);
    assert_int_equal(spool_durable_end(s), 22);
    assert_int_equal(observe_calls, 0);
    spool_close(s);
    remove_tree(dir);
}

static void spool_close_flushes_queued(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 0, 0);
    struct iovec iov = {.iov_base = "queued", .iov_len = 6};
    waiter_t w;
    spool_reader_t *r = NULL;
    spool_record_t recs[64];
    size_t n = 0;

    waiter_init(&w);
    for (int i = 0; i < 50; i++)
        assert_int_equal(spool_append(s, &iov, 1, on_waiter_done, &w), 0);
    spool_close(s);
    /* spool_close ran every completion before it returned. */
    assert_int_equal(w.calls, 50);
    assert_int_equal(w.failures, 0);

    s = open_spool(dir, 1, 0, 0);
    assert_int_equal(spool_reader_open(s, "check", &r), 0);
    assert_int_equal(spool_reader_next(r, recs, 64, 0, &n), 0);
    assert_int_equal(n, 50);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

typedef struct blocked_read {
    spool_reader_t *reader;
    int rc;
    size_t n;
    char text[16];
} blocked_read_t;

static void *blocked_read_main(void *arg)
{
    blocked_read_t *b = arg;
    spool_record_t rec;

    b->rc = spool_reader_next(b->reader, &rec, 1, -1, &b->n);
    if (b->rc == 0 && b->n == 1 && rec.len < sizeof(b->text)) {
        memcpy(b->text, rec.data, rec.len);
        b->text[rec.len] = '\0';
    }
    return NULL;
}

static void spool_reader_blocks_until_data(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 0, 0);
    blocked_read_t b = {0};
    pthread_t tid;

    assert_int_equal(spool_reader_open(s, "wait", &b.reader), 0);
    assert_int_equal(pthread_create(&tid, NULL, blocked_read_main, &b), 0);
    assert_int_equal(append_sync(s, "late"), 0);
    pthread_join(tid, NULL);
    assert_int_equal(b.rc, 0);
    assert_int_equal(b.n, 1);
    assert_string_equal(b.text, "late");

    /* A wake returns a blocked (or the next) wait with no records. */
    memset(b.text, 0, sizeof(b.text));
    assert_int_equal(pthread_create(&tid, NULL, blocked_read_main, &b), 0);
    spool_reader_wake(b.reader);
    pthread_join(tid, NULL);
    assert_int_equal(b.rc, 0);
    assert_int_equal(b.n, 0);

    spool_reader_close(b.reader);
    spool_close(s);
    remove_tree(dir);
}

static void spool_reader_rewind_rereads(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);
    spool_reader_t *r = NULL;
    spool_record_t rec;
    char text[16];

    assert_int_equal(append_sync(s, "r1"), 0);
    assert_int_equal(append_sync(s, "r2"), 0);
    assert_int_equal(append_sync(s, "r3"), 0);
    assert_int_equal(spool_reader_open(s, "rw", &r), 0);
    read_one(r, text, sizeof(text), &rec);
    assert_string_equal(text, "r1");
    assert_int_equal(spool_reader_commit(r, rec.end), 0);
    read_one(r, text, sizeof(text), NULL);
    assert_string_equal(text, "r2");
    read_one(r, text, sizeof(text), NULL);
    assert_string_equal(text, "r3");

    spool_reader_rewind(r);
    read_one(r, text, sizeof(text), NULL);
    assert_string_equal(text, "r2");

    /* A commit past the durable end is a caller bug. */
    assert_int_equal(spool_reader_commit(r, spool_durable_end(s) + 1),
                     ING_EINVAL);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

static void spool_reader_names_checked(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);
    spool_reader_t *r = NULL;
    spool_reader_t *again = NULL;

    assert_int_equal(spool_reader_open(s, "", &r), ING_EINVAL);
    assert_int_equal(spool_reader_open(s, ".hidden", &r), ING_EINVAL);
    assert_int_equal(spool_reader_open(s, "a/b", &r), ING_EINVAL);
    assert_int_equal(spool_reader_open(s, "kafka-main_1.x", &r), 0);
    assert_int_equal(spool_reader_open(s, "kafka-main_1.x", &again),
                     ING_EEXIST);
    spool_reader_close(r);
    assert_int_equal(spool_reader_open(s, "kafka-main_1.x", &again), 0);
    spool_reader_close(again);
    spool_close(s);
    remove_tree(dir);
}

static void spool_open_locks_folder(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);
    spool_options_t opts = {.dir = dir};
    spool_t *second = NULL;
    char err[256] = "";

    assert_int_equal(spool_open(&opts, &second, err, sizeof(err)), ING_EEXIST);
    assert_non_null(strstr(err, "in use"));
    spool_close(s);
    remove_tree(dir);
}

static void spool_cursor_persists(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 1, 0, 0);
    spool_reader_t *r = NULL;
    spool_record_t rec;
    char text[16];
    char path[256];
    FILE *f;
    unsigned long long stored = 0;

    for (int i = 0; i < 10; i++) {
        snprintf(text, sizeof(text), "rec-%d", i);
        assert_int_equal(append_sync(s, text), 0);
    }
    assert_int_equal(spool_reader_open(s, "file", &r), 0);
    for (int i = 0; i < 5; i++)
        read_one(r, text, sizeof(text), &rec);
    assert_string_equal(text, "rec-4");
    assert_int_equal(spool_reader_commit(r, rec.end), 0);
    /* Read but not committed: these come again after a restart. */
    read_one(r, text, sizeof(text), NULL);
    spool_reader_close(r);
    spool_close(s);

    snprintf(path, sizeof(path), "%s/cursors/file", dir);
    f = fopen(path, "r");
    assert_non_null(f);
    assert_int_equal(fscanf(f, "%llu", &stored), 1);
    fclose(f);
    assert_int_equal(stored, rec.end);

    s = open_spool(dir, 1, 0, 0);
    assert_int_equal(spool_reader_open(s, "file", &r), 0);
    assert_int_equal(spool_reader_committed(r), rec.end);
    read_one(r, text, sizeof(text), NULL);
    assert_string_equal(text, "rec-5");
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

/* Appends records of 100 payload bytes until the spool reports full. */
static int fill_spool(spool_t *s)
{
    char payload[101];
    int accepted = 0;

    memset(payload, 'x', 100);
    payload[100] = '\0';
    for (int i = 0; i < 10000; i++) {
        int rc = append_sync(s, payload);
        if (rc == ING_EFULL)
            return accepted;
        assert_int_equal(rc, 0);
        accepted++;
    }
    fail_msg("the spool never reported full");
    return accepted;
}

static void spool_full_until_commit(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 1024, 4096);
    spool_reader_t *r = NULL;
    spool_record_t recs[64];
    spool_pos_t end_before;
    struct iovec unit[5];
    size_t n = 0;
    int accepted;

    assert_int_equal(spool_reader_open(s, "sink", &r), 0);
    accepted = fill_spool(s);
    /* 4096 bytes of 108-byte frames: the 38th append crosses the limit. */
    assert_int_equal(accepted, 38);
    assert_int_equal(spool_is_full(s), 1);
    end_before = spool_durable_end(s);

    /* All or nothing: a rejected unit leaves no trace. */
    for (int i = 0; i < 5; i++)
        unit[i] = (struct iovec){.iov_base = "unit", .iov_len = 4};
    assert_int_equal(spool_append(s, unit, 5, NULL, NULL), ING_EFULL);
    assert_int_equal(spool_durable_end(s), end_before);
    assert_true(count_files(dir, ".seg") > 1);

    for (;;) {
        assert_int_equal(spool_reader_next(r, recs, 64, 0, &n), 0);
        if (n == 0)
            break;
        assert_int_equal(spool_reader_commit(r, recs[n - 1].end), 0);
    }
    assert_int_equal(spool_reader_committed(r), end_before);
    /* Only the active segment is left, so there is room again. */
    assert_int_equal(count_files(dir, ".seg"), 1);
    assert_int_equal(spool_is_full(s), 0);
    assert_true(spool_size_bytes(s) < 4096);
    assert_int_equal(append_sync(s, "accepted again"), 0);

    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

/* Appends `count` records and returns the durable end. */
static spool_pos_t append_many(spool_t *s, int count)
{
    char text[64];

    for (int i = 0; i < count; i++) {
        snprintf(text, sizeof(text), "record number %04d of the test", i);
        assert_int_equal(append_sync(s, text), 0);
    }
    return spool_durable_end(s);
}

/* Reads everything the reader has not read and commits it. */
static void drain_and_commit(spool_reader_t *r)
{
    spool_record_t recs[64];
    size_t n = 0;

    for (;;) {
        assert_int_equal(spool_reader_next(r, recs, 64, 0, &n), 0);
        if (n == 0)
            return;
        assert_int_equal(spool_reader_commit(r, recs[n - 1].end), 0);
    }
}

static void spool_deletion_waits_for_all_readers(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 256, 0);
    spool_reader_t *a = NULL;
    spool_reader_t *b = NULL;
    int segments;

    /* With no reader registered yet, nothing may be deleted. */
    append_many(s, 40);
    segments = count_files(dir, ".seg");
    assert_true(segments > 3);

    assert_int_equal(spool_reader_open(s, "a", &a), 0);
    assert_int_equal(spool_reader_open(s, "b", &b), 0);
    drain_and_commit(a);
    assert_int_equal(count_files(dir, ".seg"), segments);

    /* A closed reader still holds back deletion, also across restarts. */
    spool_reader_close(b);
    spool_reader_close(a);
    spool_close(s);
    s = open_spool(dir, 0, 256, 0);
    assert_int_equal(count_files(dir, ".seg"), segments);
    assert_int_equal(spool_reader_open(s, "a", &a), 0);
    append_many(s, 10);
    drain_and_commit(a);
    assert_true(count_files(dir, ".seg") > segments);

    /* Once b catches up, everything but the active segment goes. */
    assert_int_equal(spool_reader_open(s, "b", &b), 0);
    drain_and_commit(b);
    assert_int_equal(count_files(dir, ".seg"), 1);

    /* A reader registered now starts at the oldest record left. */
    spool_reader_t *late = NULL;
    spool_record_t rec;
    size_t n = 0;
    assert_int_equal(spool_reader_open(s, "late", &late), 0);
    assert_int_equal(spool_reader_next(late, &rec, 1, 0, &n), 0);
    assert_int_equal(n, 1);
    spool_reader_close(late);

    spool_reader_close(a);
    spool_reader_close(b);
    spool_close(s);
    remove_tree(dir);
}

static void spool_metrics_count_appends(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0, 0, 0);
    metrics_counter_t *appends =
        metrics_counter("ingestd_spool_appends_total", "", NULL);
    metrics_counter_t *records =
        metrics_counter("ingestd_spool_records_total", "", NULL);
    uint64_t appends_before = metrics_counter_value(appends);
    uint64_t records_before = metrics_counter_value(records);
    struct iovec iov[2] = {
        {.iov_base = "a", .iov_len = 1},
        {.iov_base = "b", .iov_len = 1},
    };
    waiter_t w;
    char *text;
    size_t len;

    waiter_init(&w);
    assert_int_equal(spool_append(s, iov, 2, on_waiter_done, &w), 0);
    waiter_wait(&w, 1);
    assert_int_equal(metrics_counter_value(appends) - appends_before, 1);
    assert_int_equal(metrics_counter_value(records) - records_before, 2);
    text = metrics_render(&len);
    assert_non_null(text);
    assert_non_null(strstr(text, "ingestd_spool_size_bytes 18"));
    free(text);
    spool_close(s);
    remove_tree(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(crc32c_known_vectors),
        cmocka_unit_test(crc32c_table_matches_hw),
        cmocka_unit_test(spool_append_read_back),
        cmocka_unit_test(spool_append_rejects_bad_payloads),
        cmocka_unit_test(spool_concurrent_appends_in_order),
        cmocka_unit_test(spool_group_commit_batches),
        cmocka_unit_test(spool_lossy_mode_skips_sync),
        cmocka_unit_test(spool_close_flushes_queued),
        cmocka_unit_test(spool_reader_blocks_until_data),
        cmocka_unit_test(spool_reader_rewind_rereads),
        cmocka_unit_test(spool_reader_names_checked),
        cmocka_unit_test(spool_open_locks_folder),
        cmocka_unit_test(spool_cursor_persists),
        cmocka_unit_test(spool_full_until_commit),
        cmocka_unit_test(spool_deletion_waits_for_all_readers),
        cmocka_unit_test(spool_metrics_count_appends),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
