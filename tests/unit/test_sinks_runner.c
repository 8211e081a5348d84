/* Unit tests for the sink runner: delivery from the spool through the file
 * sink, retries after failed deliveries, and commits across restarts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <time.h>

#include "core/errors.h"
#include "core/metrics.h"
#include "sinks/sinks_internal.h"
#include "test_spool_util.h"

static spool_t *open_spool(const char *dir)
{
    spool_options_t opts = {
        .dir = dir,
        .fsync = 1,
        .segment_size = 4096,
        .max_size = 0,
        .max_record = 4096,
    };
    char err[256] = "";
    spool_t *s = NULL;

    assert_int_equal(spool_open(&opts, &s, err, sizeof(err)), 0);
    return s;
}

static void append_numbered(spool_t *s, int first, int count)
{
    char text[64];

    for (int i = first; i < first + count; i++) {
        snprintf(text, sizeof(text), "{\"n\":%d}", i);
        assert_int_equal(append_sync(s, text), 0);
    }
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

/* Counts newlines in every file of `dir`. */
static int count_lines(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    int lines = 0;

    if (d == NULL)
        return 0;
    while ((de = readdir(d)) != NULL) {
        char path[512];
        FILE *f;
        int c;
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        f = fopen(path, "r");
        if (f == NULL)
            continue;
        while ((c = fgetc(f)) != EOF)
            lines += (c == '\n');
        fclose(f);
    }
    closedir(d);
    return lines;
}

/* Waits for the file sink to write `lines` lines. The bound only keeps a
 * broken runner from hanging the suite; it is not a speed check. */
static void wait_for_lines(const char *dir, int lines)
{
    for (int i = 0; i < 3000 && count_lines(dir) < lines; i++)
        sleep_ms(10);
    assert_int_equal(count_lines(dir), lines);
}

static void sinks_file_delivers_and_commits(void **state)
{
    const char *base = make_temp_dir();
    char spool_dir[256], out_dir[256], cursor[300];
    config_sink_t sc = {
        .name = "archive",
        .kind = CONFIG_SINK_FILE,
        .path = out_dir,
        .rotate_size = 0,
        .fsync = 1,
        .batch_records = 7,
        .dead_letter = "/nonexistent/dead-letter.ndjson",
    };
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s;
    unsigned long long stored = 0;
    FILE *f;
    size_t len;
    char *text;

    snprintf(spool_dir, sizeof(spool_dir), "%s/spool", base);
    snprintf(out_dir, sizeof(out_dir), "%s/out", base);
    snprintf(cursor, sizeof(cursor), "%s/cursors/archive", spool_dir);
    s = open_spool(spool_dir);
    append_numbered(s, 0, 50);

    assert_int_equal(sinks_start(&cfg, s, &sinks, err, sizeof(err)), 0);
    append_numbered(s, 50, 50);
    wait_for_lines(out_dir, 100);
    assert_int_equal(sinks_healthy(sinks), 1);
    sinks_stop(sinks, 5000);

    /* The cursor covers every delivered record. */
    f = fopen(cursor, "r");
    assert_non_null(f);
    assert_int_equal(fscanf(f, "%llu", &stored), 1);
    fclose(f);
    assert_int_equal(stored, spool_durable_end(s));

    text = metrics_render(&len);
    assert_non_null(text);
    assert_non_null(
        strstr(text, "ingestd_sink_records_total{sink=\"archive\"} 100"));
    free(text);

    /* After a restart nothing is delivered twice, and new records flow. */
    assert_int_equal(sinks_start(&cfg, s, &sinks, err, sizeof(err)), 0);
    append_numbered(s, 100, 5);
    wait_for_lines(out_dir, 105);
    sinks_stop(sinks, 5000);
    assert_int_equal(count_lines(out_dir), 105);

    spool_close(s);
    remove_tree(base);
}

/* A sink whose deliver fails a set number of times, then records what it
 * receives. */
typedef struct flaky_sink {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    int fail_left;
    int calls;
    int delivered;
    int next_expected;
    int out_of_order;
    int block_at; /* this call waits for `release`; -1 for none */
    int blocked;
    int release;
    int first_of_failed[16];
} flaky_sink_t;

static flaky_sink_t flaky;

static int flaky_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                      char *err, size_t errlen)
{
    *state = &flaky;
    return 0;
}

static int flaky_deliver(void *state, const spool_record_t *recs, size_t n,
                         sink_outcome_t *out)
{
    flaky_sink_t *f = state;
    int rc = 0;

    pthread_mutex_lock(&f->lock);
    int first = atoi((const char *)recs[0].data + 5);
    if (f->calls == f->block_at) {
        f->blocked = 1;
        pthread_cond_broadcast(&f->cv);
        while (!f->release)
            pthread_cond_wait(&f->cv, &f->lock);
    }
    if (f->fail_left > 0) {
        if (f->calls < 16)
            f->first_of_failed[f->calls] = first;
        f->fail_left--;
        rc = ING_EIO;
    } else {
        for (size_t i = 0; i < n; i++) {
            int v = atoi((const char *)recs[i].data + 5);
            if (v != f->next_expected)
                f->out_of_order++;
            f->next_expected = v + 1;
            out[i].status = SINK_RECORD_OK;
        }
        f->delivered += (int)n;
    }
    f->calls++;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->lock);
    return rc;
}

static void flaky_close(void *state)
{
}

static const sink_ops_t flaky_ops = {
    .kind = "flaky",
    .open = flaky_open,
    .deliver = flaky_deliver,
    .close = flaky_close,
};

static void sinks_retry_after_failed_deliver(void **state)
{
    const char *base = make_temp_dir();
    config_sink_t sc = {
        .name = "flaky",
        .kind = CONFIG_SINK_FILE,
        .batch_records = 4,
        .dead_letter = "/nonexistent/dead-letter.ndjson",
    };
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    const sink_ops_t *ops[] = {&flaky_ops};
    sinks_backoff_t backoff = {.initial_ms = 1, .max_ms = 4};
    metrics_counter_t *failures =
        metrics_counter("ingestd_sink_failures_total", "", "sink=\"flaky\"");
    uint64_t failures_before = metrics_counter_value(failures);
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s = open_spool(base);

    char lag[128];
    size_t len;
    char *text;

    memset(&flaky, 0, sizeof(flaky));
    pthread_mutex_init(&flaky.lock, NULL);
    pthread_cond_init(&flaky.cv, NULL);
    flaky.fail_left = 3;
    flaky.block_at = 2;
    append_numbered(s, 0, 10);

    assert_int_equal(
        sinks_start_with(&cfg, ops, &backoff, s, &sinks, err, sizeof(err)), 0);
    pthread_mutex_lock(&flaky.lock);
    while (!flaky.blocked)
        pthread_cond_wait(&flaky.cv, &flaky.lock);
    pthread_mutex_unlock(&flaky.lock);

    /* Parked in the third call: two failures are handled, nothing is
     * committed, so the lag is the whole spool. */
    assert_int_equal(sinks_healthy(sinks), 0);
    snprintf(lag, sizeof(lag), "ingestd_sink_lag_bytes{sink=\"flaky\"} %llu",
             (unsigned long long)spool_durable_end(s));
    text = metrics_render(&len);
    assert_non_null(text);
    assert_non_null(strstr(text, lag));
    free(text);

    pthread_mutex_lock(&flaky.lock);
    flaky.release = 1;
    pthread_cond_broadcast(&flaky.cv);
    while (flaky.delivered < 10)
        pthread_cond_wait(&flaky.cv, &flaky.lock);
    pthread_mutex_unlock(&flaky.lock);
    sinks_stop(sinks, 5000);

    /* Every retry restarted from the committed cursor: record 0. */
    for (int i = 0; i < 3; i++)
        assert_int_equal(flaky.first_of_failed[i], 0);
    assert_int_equal(flaky.out_of_order, 0);
    assert_int_equal(flaky.delivered, 10);
    assert_int_equal(metrics_counter_value(failures) - failures_before, 3);
    spool_close(s);
    remove_tree(base);
}

static void sinks_healthy_after_recovery(void **state)
{
    const char *base = make_temp_dir();
    config_sink_t sc = {.name = "flaky",
                        .kind = CONFIG_SINK_FILE,
                        .dead_letter = "/nonexistent/dead-letter.ndjson"};
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    const sink_ops_t *ops[] = {&flaky_ops};
    sinks_backoff_t backoff = {.initial_ms = 1, .max_ms = 2};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s = open_spool(base);

    memset(&flaky, 0, sizeof(flaky));
    pthread_mutex_init(&flaky.lock, NULL);
    pthread_cond_init(&flaky.cv, NULL);
    flaky.fail_left = 1;
    flaky.block_at = 2;
    append_numbered(s, 0, 3);
    assert_int_equal(
        sinks_start_with(&cfg, ops, &backoff, s, &sinks, err, sizeof(err)), 0);
    pthread_mutex_lock(&flaky.lock);
    while (flaky.delivered < 3)
        pthread_cond_wait(&flaky.cv, &flaky.lock);
    pthread_mutex_unlock(&flaky.lock);

    /* Call 0 failed and call 1 delivered. Call 2, for a new record, starts
     * only after call 1's commit, and parks there. */
    append_numbered(s, 3, 1);
    pthread_mutex_lock(&flaky.lock);
    while (!flaky.blocked)
        pthread_cond_wait(&flaky.cv, &flaky.lock);
    pthread_mutex_unlock(&flaky.lock);
    assert_int_equal(sinks_healthy(sinks), 1);

    pthread_mutex_lock(&flaky.lock);
    flaky.release = 1;
    pthread_cond_broadcast(&flaky.cv);
    pthread_mutex_unlock(&flaky.lock);
    sinks_stop(sinks, 5000);
    assert_int_equal(flaky.delivered, 4);
    spool_close(s);
    remove_tree(base);
}

static void sinks_reject_unknown_kind(void **state)
{
    const char *base = make_temp_dir();
    config_sink_t sc = {.name = "odd", .kind = (enum config_sink_kind)42};
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s = open_spool(base);

    assert_int_equal(sinks_start(&cfg, s, &sinks, err, sizeof(err)),
                     ING_ECONFIG);
    assert_non_null(strstr(err, "odd"));
    spool_close(s);
    remove_tree(base);
}

static void sinks_stop_idle_runner(void **state)
{
    const char *base = make_temp_dir();
    char out_dir[256];
    config_sink_t sc = {
        .name = "idle",
        .kind = CONFIG_SINK_FILE,
        .path = out_dir,
        .dead_letter = "/nonexistent/dead-letter.ndjson",
    };
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s;

    snprintf(out_dir, sizeof(out_dir), "%s/out", base);
    s = open_spool(base);
    assert_int_equal(sinks_start(&cfg, s, &sinks, err, sizeof(err)), 0);
    assert_int_equal(sinks_healthy(sinks), 1);
    sinks_stop(sinks, 5000);
    /* Its cursor exists although it delivered nothing. */
    assert_int_equal(count_files(base, ".seg"), 1);
    char cursor[300];
    snprintf(cursor, sizeof(cursor), "%s/cursors/idle", base);
    assert_int_equal(access(cursor, F_OK), 0);
    spool_close(s);
    remove_tree(base);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sinks_file_delivers_and_commits),
        cmocka_unit_test(sinks_retry_after_failed_deliver),
        cmocka_unit_test(sinks_healthy_after_recovery),
        cmocka_unit_test(sinks_reject_unknown_kind),
        cmocka_unit_test(sinks_stop_idle_runner),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
