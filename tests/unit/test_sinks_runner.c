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

/* A sink that decides each record's outcome from its number n: multiples
 * of 5 are rejected for good, and record 7 is not acknowledged the first
 * `retry_left` times it is sent. It counts how often each record was sent
 * and acknowledged. */
typedef struct scripted_sink {
    pthread_mutex_t lock;
    int retry_left;
    int sent[64];
    int acked[64];
    int fail_whole; /* deliver returns ING_EIO for this many calls */
} scripted_sink_t;

static scripted_sink_t scripted;

static int scripted_open(const config_sink_t *cfg, sink_ctx_t *ctx,
                         void **state, char *err, size_t errlen)
{
    sink_set_connected(ctx, true);
    assert_string_equal(sink_log_name(ctx), cfg->name);
    *state = &scripted;
    return 0;
}

static int scripted_deliver(void *state, const spool_record_t *recs, size_t n,
                            sink_outcome_t *out)
{
    scripted_sink_t *f = state;
    int rc = 0;

    pthread_mutex_lock(&f->lock);
    if (f->fail_whole > 0) {
        f->fail_whole--;
        /* Outcomes set before a failure as a whole must be ignored. */
        for (size_t i = 0; i < n; i++)
            out[i].status = SINK_RECORD_OK;
        rc = ING_EIO;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        int v = atoi((const char *)recs[i].data + 5);

        f->sent[v]++;
        if (v % 5 == 0) {
            out[i].status = SINK_RECORD_REJECTED;
            snprintf(out[i].reason, sizeof(out[i].reason),
                     "record %d is a multiple of 5", v);
        } else if (v == 7 && f->retry_left > 0) {
            f->retry_left--;
            out[i].status = SINK_RECORD_RETRY;
        } else {
            out[i].status = SINK_RECORD_OK;
            f->acked[v]++;
        }
    }

done:
    pthread_mutex_unlock(&f->lock);
    return rc;
}

static const sink_ops_t scripted_ops = {
    .kind = "scripted",
    .open = scripted_open,
    .deliver = scripted_deliver,
    .close = flaky_close,
};

static void reset_scripted(void)
{
    memset(&scripted, 0, sizeof(scripted));
    pthread_mutex_init(&scripted.lock, NULL);
}

static int acked_count(void)
{
    int total = 0;

    pthread_mutex_lock(&scripted.lock);
    for (int i = 0; i < 64; i++)
        total += scripted.acked[i] > 0;
    pthread_mutex_unlock(&scripted.lock);
    return total;
}

/* Waits until the sink committed everything in the spool. The bound only
 * keeps a broken runner from hanging the suite. */
static void wait_for_commit(const char *labels, spool_t *s)
{
    char expected[160];

    snprintf(expected, sizeof(expected), "ingestd_sink_lag_bytes{%s} 0",
             labels);
    for (int i = 0; i < 3000; i++) {
        size_t len;
        char *text = metrics_render(&len);
        int done = strstr(text, expected) != NULL;

        free(text);
        if (done)
            return;
        sleep_ms(10);
    }
    fail_msg("the sink did not commit the spool's end %llu",
             (unsigned long long)spool_durable_end(s));
}

static uint64_t counter(const char *name, const char *labels)
{
    return metrics_counter_value(metrics_counter(name, "", labels));
}

static void sinks_outcomes_dead_letter_and_retry(void **state)
{
    const char *base = make_temp_dir();
    char dead_letter[256], spool_dir[256];
    config_sink_t sc = {
        .name = "scripted", .batch_records = 6, .dead_letter = dead_letter};
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    const sink_ops_t *ops[] = {&scripted_ops};
    sinks_backoff_t backoff = {.initial_ms = 1, .max_ms = 4};
    const char *labels = "sink=\"scripted\"";
    uint64_t dead_before = counter("ingestd_sink_dead_lettered_total", labels);
    uint64_t retries_before = counter("ingestd_sink_retries_total", labels);
    uint64_t records_before = counter("ingestd_sink_records_total", labels);
    char err[256] = "";
    char line[512];
    sinks_t *sinks = NULL;
    int rejected[8], lines = 0;
    spool_t *s;
    FILE *f;

    snprintf(dead_letter, sizeof(dead_letter), "%s/dl/scripted.ndjson",
             base);
    snprintf(spool_dir, sizeof(spool_dir), "%s/spool", base);
    s = open_spool(spool_dir);
    reset_scripted();
    scripted.retry_left = 2;
    append_numbered(s, 0, 20);

    assert_int_equal(
        sinks_start_with(&cfg, ops, &backoff, s, &sinks, err, sizeof(err)), 0);
    wait_for_commit(labels, s);
    sinks_stop(sinks, 5000);

    /* Every record that is not a multiple of 5 was acknowledged; record 7
     * took three attempts. The batch [6..11] was cut at 7, so record 6
     * was committed before the retry and sent once, while 8 to 11 were
     * sent again with 7. Record 10, rejected behind the retried 7, was
     * dead-lettered only once the records before it were settled. */
    assert_int_equal(acked_count(), 16);
    assert_int_equal(scripted.sent[7], 3);
    assert_int_equal(scripted.sent[6], 1);
    assert_int_equal(scripted.sent[8], 3);
    assert_int_equal(scripted.sent[10], 3);
    assert_int_equal(scripted.sent[0], 1);
    assert_int_equal(scripted.sent[5], 1);
    assert_int_equal(scripted.sent[15], 1);
    assert_int_equal(
        counter("ingestd_sink_dead_lettered_total", labels) - dead_before, 4);
    assert_int_equal(
        counter("ingestd_sink_records_total", labels) - records_before, 16);
    assert_true(counter("ingestd_sink_retries_total", labels) -
                    retries_before >=
                2);

    /* The dead-letter file has one line per rejected record, in order,
     * with the reason and the record itself. */
    f = fopen(dead_letter, "r");
    assert_non_null(f);
    while (fgets(line, sizeof(line), f) != NULL && lines < 8) {
        char reason[64];

        assert_non_null(strstr(line, "{\"sink\":\"scripted\",\"reason\":"));
        assert_int_equal(
            sscanf(strstr(line, "\"record\":{\"n\":") + 14, "%d",
                   &rejected[lines]),
            1);
        snprintf(reason, sizeof(reason), "record %d is a multiple of 5",
                 rejected[lines]);
        assert_non_null(strstr(line, reason));
        lines++;
    }
    fclose(f);
    assert_int_equal(lines, 4);
    for (int i = 0; i < 4; i++)
        assert_int_equal(rejected[i], i * 5);
    spool_close(s);
    remove_tree(base);
}

static void sinks_failed_deliver_ignores_outcomes(void **state)
{
    const char *base = make_temp_dir();
    char dead_letter[256];
    config_sink_t sc = {
        .name = "scripted2", .batch_records = 8, .dead_letter = dead_letter};
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    const sink_ops_t *ops[] = {&scripted_ops};
    sinks_backoff_t backoff = {.initial_ms = 1, .max_ms = 2};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s = open_spool(base);

    snprintf(dead_letter, sizeof(dead_letter), "%s/dl.ndjson", base);
    reset_scripted();
    scripted.fail_whole = 3;
    append_numbered(s, 1, 4);
    assert_int_equal(
        sinks_start_with(&cfg, ops, &backoff, s, &sinks, err, sizeof(err)), 0);
    wait_for_commit("sink=\"scripted2\"", s);
    sinks_stop(sinks, 5000);
    /* The three failed calls counted nothing; the fourth delivered all. */
    for (int v = 1; v <= 4; v++) {
        assert_int_equal(scripted.sent[v], 1);
        assert_int_equal(scripted.acked[v], 1);
    }
    spool_close(s);
    remove_tree(base);
}

static void sinks_dead_letter_failure_blocks_commit(void **state)
{
    const char *base = make_temp_dir();
    char dead_letter[256], blocker[256];
    config_sink_t sc = {
        .name = "scripted3", .batch_records = 8, .dead_letter = dead_letter};
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    const sink_ops_t *ops[] = {&scripted_ops};
    sinks_backoff_t backoff = {.initial_ms = 1, .max_ms = 2};
    metrics_gauge_t *connected = metrics_gauge("ingestd_sink_connected", "",
                                               "sink=\"scripted3\"");
    char err[256] = "";
    char described[512];
    sinks_t *sinks = NULL;
    spool_t *s;
    FILE *f;

    /* The dead-letter folder cannot be created: a file is in its way. */
    snprintf(blocker, sizeof(blocker), "%s/blocker", base);
    snprintf(dead_letter, sizeof(dead_letter), "%s/blocker/dl.ndjson", base);
    f = fopen(blocker, "w");
    assert_non_null(f);
    fclose(f);
    s = open_spool(base);
    reset_scripted();
    append_numbered(s, 1, 6); /* record 5 is rejected */

    assert_int_equal(
        sinks_start_with(&cfg, ops, &backoff, s, &sinks, err, sizeof(err)), 0);
    /* Records 1 to 4 are committed; 5 cannot be, so it and 6 are sent
     * again and again. */
    for (int i = 0; i < 3000; i++) {
        int sent;

        pthread_mutex_lock(&scripted.lock);
        sent = scripted.sent[5];
        pthread_mutex_unlock(&scripted.lock);
        if (sent >= 3)
            break;
        sleep_ms(10);
    }
    assert_true(scripted.sent[5] >= 3);
    assert_int_equal(sinks_healthy(sinks), 0);
    assert_int_equal(metrics_gauge_value(connected), 1);
    sinks_describe(sinks, described, sizeof(described));
    assert_string_equal(described,
                        "{\"scripted3\":{\"type\":\"scripted\","
                        "\"connected\":true,\"healthy\":false,"
                        "\"lag_records\":2}}");

    /* Once the folder can be created, the record goes to the file. */
    assert_int_equal(unlink(blocker), 0);
    wait_for_commit("sink=\"scripted3\"", s);
    sinks_stop(sinks, 5000);
    assert_int_equal(scripted.sent[1], 1);
    assert_int_equal(scripted.acked[6] >= 1, 1);
    assert_int_equal(access(dead_letter, F_OK), 0);
    assert_int_equal(metrics_gauge_value(connected), 0);
    spool_close(s);
    remove_tree(base);
}

static void sinks_drain_waits_for_delivery(void **state)
{
    const char *base = make_temp_dir();
    char out_dir[256], dead_letter[256];
    config_sink_t sc = {
        .name = "drained",
        .kind = CONFIG_SINK_FILE,
        .path = out_dir,
        .fsync = 1,
        .batch_records = 1,
        .dead_letter = dead_letter,
    };
    config_t cfg = {.sinks = &sc, .sink_count = 1};
    char err[256] = "";
    sinks_t *sinks = NULL;
    spool_t *s;

    snprintf(out_dir, sizeof(out_dir), "%s/out", base);
    snprintf(dead_letter, sizeof(dead_letter), "%s/dl.ndjson", base);
    s = open_spool(base);
    assert_int_equal(sinks_start(&cfg, s, &sinks, err, sizeof(err)), 0);
    append_numbered(s, 0, 200);
    sinks_drain(sinks, 60000);
    /* Draining returns once the sink committed everything. */
    assert_int_equal(count_lines(out_dir), 200);
    sinks_stop(sinks, 5000);
    sinks_drain(NULL, 1000);
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
        cmocka_unit_test(sinks_outcomes_dead_letter_and_retry),
        cmocka_unit_test(sinks_failed_deliver_ignores_outcomes),
        cmocka_unit_test(sinks_dead_letter_failure_blocks_commit),
        cmocka_unit_test(sinks_drain_waits_for_delivery),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
