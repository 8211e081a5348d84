/* Unit tests for spool recovery: torn and corrupt tails, damage inside
 * older segments, failed writes and cursors that do not match the log. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>

#include "core/errors.h"
#include "core/metrics.h"
#include "spool/spool.h"
#include "test_spool_util.h"

#define SEGMENT_SIZE 200

static spool_t *open_spool(const char *dir, uint64_t segment_size)
{
    spool_options_t opts = {
        .dir = dir,
        .fsync = 1,
        .segment_size = segment_size,
        .max_size = 0,
        .max_record = 4096,
    };
    char err[256] = "";
    spool_t *s = NULL;
    int rc = spool_open(&opts, &s, err, sizeof(err));

    if (rc != 0)
        print_error("spool_open: %s\n", err);
    assert_int_equal(rc, 0);
    return s;
}

/* Appends "record-00" .. "record-<count-1>" (each a 17-byte frame). */
static void append_records(spool_t *s, int first, int count)
{
    char text[32];

    for (int i = first; i < first + count; i++) {
        snprintf(text, sizeof(text), "record-%02d", i);
        assert_int_equal(append_sync(s, text), 0);
    }
}

/* Reads every available record, checking it is "record-<next>", and
 * returns how many came. A corrupt segment shows up as ING_ECORRUPT and
 * bumps `*corrupt`. */
static int read_records(spool_reader_t *r, int *next, int *corrupt)
{
    spool_record_t recs[16];
    int count = 0;

    for (;;) {
        size_t n = 0;
        int rc = spool_reader_next(r, recs, 16, 0, &n);
        if (rc == ING_ECORRUPT) {
            /* Skipped records leave a gap in the numbering. */
            (*corrupt)++;
            *next = -1;
            continue;
        }
        assert_int_equal(rc, 0);
        if (n == 0)
            return count;
        for (size_t i = 0; i < n; i++) {
            char text[32];
            char expected[32];
            assert_true(recs[i].len < sizeof(text));
            memcpy(text, recs[i].data, recs[i].len);
            text[recs[i].len] = '\0';
            if (*next >= 0) {
                snprintf(expected, sizeof(expected), "record-%02d", *next);
                assert_string_equal(text, expected);
            }
            *next = atoi(text + 7) + 1;
            count++;
        }
    }
}

static void segment_path(char *buf, size_t size, const char *dir, uint64_t base)
{
    snprintf(buf, size, "%s/%020llu.seg", dir, (unsigned long long)base);
}

static off_t file_size_of(const char *path)
{
    struct stat st;

    assert_int_equal(stat(path, &st), 0);
    return st.st_size;
}

static void append_bytes(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_APPEND);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
}

static void flip_byte(const char *path, off_t off)
{
    int fd = open(path, O_RDWR);
    uint8_t b;

    assert_true(fd >= 0);
    assert_int_equal(pread(fd, &b, 1, off), 1);
    b ^= 0x40;
    assert_int_equal(pwrite(fd, &b, 1, off), 1);
    close(fd);
}

static uint64_t truncated_bytes_total(void)
{
    return metrics_counter_value(metrics_counter(
        "ingestd_spool_recovered_truncated_bytes_total", "", NULL));
}

/* Writes ten records to a one-segment spool, lets `damage` modify the
 * segment file, reopens, and checks that `kept` records survive, that
 * `dropped` bytes were cut, and that appends continue behind them. */
static void check_tail_recovery(void (*damage)(const char *path), int kept,
                                uint64_t dropped)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0);
    spool_reader_t *r = NULL;
    char path[256];
    uint64_t before = truncated_bytes_total();
    int next = 0;
    int corrupt = 0;

    append_records(s, 0, 10);
    spool_close(s);
    segment_path(path, sizeof(path), dir, 0);
    damage(path);

    s = open_spool(dir, 0);
    assert_int_equal(spool_durable_end(s), (uint64_t)kept * 17);
    assert_int_equal(file_size_of(path), kept * 17);
    assert_int_equal(truncated_bytes_total() - before, dropped);
    append_records(s, kept, 1);
    assert_int_equal(spool_reader_open(s, "check", &r), 0);
    assert_int_equal(read_records(r, &next, &corrupt), kept + 1);
    assert_int_equal(corrupt, 0);
    spool_reader_close(r);
    spool_close(s);

    /* A second recovery finds nothing more to cut. */
    before = truncated_bytes_total();
    s = open_spool(dir, 0);
    assert_int_equal(truncated_bytes_total(), before);
    assert_int_equal(spool_durable_end(s), (uint64_t)(kept + 1) * 17);
    spool_close(s);
    remove_tree(dir);
}

static void damage_partial_frame(const char *path)
{
    /* A header announcing 100 bytes, followed by only 10 of them. */
    uint8_t torn[18] = {100, 0, 0, 0, 1, 2, 3, 4};

    memset(torn + 8, 'z', 10);
    append_bytes(path, torn, sizeof(torn));
}

static void damage_partial_header(const char *path)
{
    append_bytes(path, "\x09\x00\x00", 3);
}

static void damage_absurd_length(const char *path)
{
    uint8_t header[16] = {0xf0, 0xff, 0xff, 0xff, 0, 0, 0, 0};

    append_bytes(path, header, sizeof(header));
}

static void damage_zero_tail(const char *path)
{
    static const uint8_t zeros[4096];

    append_bytes(path, zeros, sizeof(zeros));
}

static void damage_last_payload(const char *path)
{
    /* The last byte of record 9's payload. */
    flip_byte(path, 10 * 17 - 1);
}

static void damage_last_crc(const char *path)
{
    flip_byte(path, 9 * 17 + 5);
}

static void spool_recovers_partial_frame(void **state)
{
    check_tail_recovery(damage_partial_frame, 10, 18);
}

static void spool_recovers_partial_header(void **state)
{
    check_tail_recovery(damage_partial_header, 10, 3);
}

static void spool_recovers_absurd_length(void **state)
{
    check_tail_recovery(damage_absurd_length, 10, 16);
}

static void spool_recovers_zero_tail(void **state)
{
    check_tail_recovery(damage_zero_tail, 10, 4096);
}

static void spool_recovers_bad_payload_tail(void **state)
{
    check_tail_recovery(damage_last_payload, 9, 17);
}

static void spool_recovers_bad_crc_tail(void **state)
{
    check_tail_recovery(damage_last_crc, 9, 17);
}

/* A corrupt frame in the middle of the last segment: everything from it
 * on is cut, since the writer could not have gone on past a torn write. */
static void damage_middle(const char *path)
{
    flip_byte(path, 4 * 17 + 9);
}

static void spool_recovers_corrupt_middle_of_last(void **state)
{
    check_tail_recovery(damage_middle, 4, 6 * 17);
}

/* Builds a spool of several segments holding records 0..39. Each append
 * is its own batch, so the first segment rotates once it reaches 200
 * bytes and contains records 0..11. */
static void build_segments(const char *dir)
{
    char path[256];
    spool_t *s = open_spool(dir, SEGMENT_SIZE);

    append_records(s, 0, 40);
    spool_close(s);
    assert_true(count_files(dir, ".seg") >= 3);
    segment_path(path, sizeof(path), dir, 12 * 17);
    assert_int_equal(file_size_of(path), 12 * 17);
}

static void spool_skips_corrupt_old_segment(void **state)
{
    const char *dir = make_temp_dir();
    spool_reader_t *r = NULL;
    spool_t *s;
    char path[256];
    off_t size_before;
    int next = -1;
    int corrupt = 0;

    build_segments(dir);
    segment_path(path, sizeof(path), dir, 0);
    size_before = file_size_of(path);
    flip_byte(path, 2 * 17 + 9); /* payload of record 2 */

    s = open_spool(dir, SEGMENT_SIZE);
    /* Older segments are never truncated: the damage stays on disk. */
    assert_int_equal(file_size_of(path), size_before);
    assert_int_equal(spool_durable_end(s), 40 * 17);
    assert_int_equal(spool_reader_open(s, "check", &r), 0);

    /* Records 0 and 1, then the skip, then 12 onwards in order. */
    assert_int_equal(read_records(r, &next, &corrupt), 2 + (40 - 12));
    assert_int_equal(corrupt, 1);
    assert_int_equal(next, 40);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

static void spool_skips_short_old_segment(void **state)
{
    const char *dir = make_temp_dir();
    spool_reader_t *r = NULL;
    spool_t *s;
    char path[256];
    int next = -1;
    int corrupt = 0;

    build_segments(dir);
    /* The first segment lost its last three records and half of one. */
    segment_path(path, sizeof(path), dir, 0);
    assert_int_equal(truncate(path, (off_t)(8 * 17 + 5)), 0);

    s = open_spool(dir, SEGMENT_SIZE);
    assert_int_equal(spool_reader_open(s, "check", &r), 0);
    assert_int_equal(read_records(r, &next, &corrupt), 8 + (40 - 12));
    assert_int_equal(corrupt, 1);
    assert_int_equal(next, 40);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

/* A write that fails midway (here: past RLIMIT_FSIZE) fails the whole
 * batch, and the segment goes back to its length before the batch. */
static void spool_failed_write_rolls_back(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0);
    spool_reader_t *r = NULL;
    struct rlimit saved, low;
    static char big[2000];
    struct iovec iov[2] = {
        {.iov_base = big, .iov_len = sizeof(big)},
        {.iov_base = big, .iov_len = sizeof(big)},
    };
    char path[256];
    waiter_t w;
    int next = 0;
    int corrupt = 0;

    memset(big, 'b', sizeof(big));
    append_records(s, 0, 10);
    segment_path(path, sizeof(path), dir, 0);

    signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    low = saved;
    low.rlim_cur = 3000;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &low), 0);
    waiter_init(&w);
    assert_int_equal(spool_append(s, iov, 2, on_waiter_done, &w), 0);
    waiter_wait(&w, 1);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);

    assert_int_equal(w.last_status, ING_EIO);
    assert_int_equal(file_size_of(path), 10 * 17);
    assert_int_equal(spool_durable_end(s), 10 * 17);
    assert_int_equal(spool_size_bytes(s), 10 * 17);

    /* The spool keeps working, and the failed records never appear. */
    append_records(s, 10, 1);
    assert_int_equal(spool_reader_open(s, "check", &r), 0);
    assert_int_equal(read_records(r, &next, &corrupt), 11);
    assert_int_equal(corrupt, 0);
    spool_reader_close(r);
    spool_close(s);

    s = open_spool(dir, 0);
    assert_int_equal(spool_durable_end(s), 11 * 17);
    spool_close(s);
    remove_tree(dir);
}

static void write_text_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void spool_clamps_cursor_past_end(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s = open_spool(dir, 0);
    spool_reader_t *r = NULL;
    char path[256];
    int next = 10;
    int corrupt = 0;

    append_records(s, 0, 10);
    spool_close(s);
    snprintf(path, sizeof(path), "%s/cursors/ahead", dir);
    write_text_file(path, "5000\n");

    s = open_spool(dir, 0);
    assert_int_equal(spool_reader_open(s, "ahead", &r), 0);
    assert_int_equal(spool_reader_committed(r), 10 * 17);
    /* Records appended now are not skipped. */
    append_records(s, 10, 2);
    assert_int_equal(read_records(r, &next, &corrupt), 2);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

static void spool_empty_starts_at_highest_cursor(void **state)
{
    const char *dir = make_temp_dir();
    spool_t *s;
    spool_reader_t *r = NULL;
    char path[256];
    int next = 0;
    int corrupt = 0;

    snprintf(path, sizeof(path), "%s/cursors", dir);
    assert_int_equal(mkdir(path, 0750), 0);
    snprintf(path, sizeof(path), "%s/cursors/old", dir);
    write_text_file(path, "1700\n");
    snprintf(path, sizeof(path), "%s/cursors/broken", dir);
    write_text_file(path, "12x\n");

    s = open_spool(dir, 0);
    assert_int_equal(spool_durable_end(s), 1700);
    segment_path(path, sizeof(path), dir, 1700);
    assert_int_equal(file_size_of(path), 0);
    append_records(s, 0, 1);
    /* An unparsable cursor counts as position 0: start at the oldest. */
    assert_int_equal(spool_reader_open(s, "broken", &r), 0);
    assert_int_equal(spool_reader_committed(r), 1700);
    assert_int_equal(read_records(r, &next, &corrupt), 1);
    spool_reader_close(r);
    spool_close(s);
    remove_tree(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(spool_recovers_partial_frame),
        cmocka_unit_test(spool_recovers_partial_header),
        cmocka_unit_test(spool_recovers_absurd_length),
        cmocka_unit_test(spool_recovers_zero_tail),
        cmocka_unit_test(spool_recovers_bad_payload_tail),
        cmocka_unit_test(spool_recovers_bad_crc_tail),
        cmocka_unit_test(spool_recovers_corrupt_middle_of_last),
        cmocka_unit_test(spool_skips_corrupt_old_segment),
        cmocka_unit_test(spool_skips_short_old_segment),
        cmocka_unit_test(spool_failed_write_rolls_back),
        cmocka_unit_test(spool_clamps_cursor_past_end),
        cmocka_unit_test(spool_empty_starts_at_highest_cursor),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
