/* Unit tests for the file sink: NDJSON lines, rotation, restarts and
 * failed writes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <signal.h>
#include <sys/resource.h>

#include "core/errors.h"
#include "sinks/sink.h"
#include "test_spool_util.h"

#define MAX_FILES 64

typedef struct file_list {
    char names[MAX_FILES][256];
    int count;
} file_list_t;

static int compare_names(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Lists the sink's output files, sorted by name. */
static void list_outputs(const char *dir, file_list_t *out)
{
    DIR *d = opendir(dir);
    struct dirent *de;

    assert_non_null(d);
    out->count = 0;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "readings-", 9) != 0)
            continue;
        assert_true(out->count < MAX_FILES);
        snprintf(out->names[out->count++], sizeof(out->names[0]), "%s",
                 de->d_name);
    }
    closedir(d);
    qsort(out->names, (size_t)out->count, sizeof(out->names[0]), compare_names);
}

/* Reads `dir`/`name` into `buf` and returns its length. */
static size_t read_output(const char *dir, const char *name, char *buf,
                          size_t size)
{
    char path[512];
    FILE *f;
    size_t n;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "r");
    assert_non_null(f);
    n = fread(buf, 1, size - 1, f);
    fclose(f);
    buf[n] = '\0';
    return n;
}

/* Concatenates every output file in name order. */
static size_t read_all_outputs(const char *dir, char *buf, size_t size)
{
    file_list_t files;
    size_t total = 0;

    list_outputs(dir, &files);
    for (int i = 0; i < files.count; i++)
        total += read_output(dir, files.names[i], buf + total, size - total);
    return total;
}

static config_sink_t file_config(const char *path, uint64_t rotate_size)
{
    return (config_sink_t){
        .name = "file",
        .kind = CONFIG_SINK_FILE,
        .path = (char *)path,
        .rotate_size = rotate_size,
        .fsync = 1,
        .batch_records = 0,
    };
}

static void *open_sink(const config_sink_t *cfg)
{
    char err[256] = "";
    void *state = NULL;
    int rc = sink_file_ops.open(cfg, NULL, &state, err, sizeof(err));

    if (rc != 0)
        print_error("open: %s\n", err);
    assert_int_equal(rc, 0);
    return state;
}

/* Delivers the given strings as one batch. */
static int deliver_strings(void *state, const char *const *texts, size_t n)
{
    spool_record_t recs[16];

    assert_true(n <= 16);
    for (size_t i = 0; i < n; i++)
        recs[i] = (spool_record_t){.data = texts[i], .len = strlen(texts[i])};
    sink_outcome_t out[16];
    int rc;

    for (size_t i = 0; i < n; i++)
        out[i].status = SINK_RECORD_RETRY;
    rc = sink_file_ops.deliver(state, recs, n, out);
    for (size_t i = 0; rc == 0 && i < n; i++)
        assert_int_equal(out[i].status, SINK_RECORD_OK);
    return rc;
}

static void sink_file_writes_lines(void **state)
{
    const char *dir = make_temp_dir();
    char path[256];
    const char *batch[] = {"{\"a\":1}", "{\"b\":2}", "{\"c\":3}"};
    file_list_t files;
    char buf[256];
    void *sink;

    /* The output folder and its parents are created. */
    snprintf(path, sizeof(path), "%s/out/nested", dir);
    config_sink_t cfg = file_config(path, 0);
    sink = open_sink(&cfg);
    assert_int_equal(deliver_strings(sink, batch, 3), 0);
    assert_int_equal(deliver_strings(sink, batch, 1), 0);
    sink_file_ops.close(sink);

    list_outputs(path, &files);
    assert_int_equal(files.count, 1);
    assert_int_equal(strlen(files.names[0]),
                     strlen("readings-20261204T170000Z-000000.ndjson"));
    assert_non_null(strstr(files.names[0], ".ndjson"));
    read_output(path, files.names[0], buf, sizeof(buf));
    assert_string_equal(buf, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n{\"a\":1}\n");
    remove_tree(dir);
}

static void sink_file_rotates_by_size(void **state)
{
    const char *dir = make_temp_dir();
    config_sink_t cfg = file_config(dir, 20);
    void *sink = open_sink(&cfg);
    char expected[1024] = "";
    char all[1024];
    char lines[12][16];
    file_list_t files;

    /* Each batch is 2 lines of 8 bytes: a file passes 20 bytes with its
     * second batch and is then closed. */
    for (int i = 0; i < 12; i += 2) {
        const char *batch[2];
        for (int k = 0; k < 2; k++) {
            snprintf(lines[i + k], sizeof(lines[0]), "line-%02d", i + k);
            batch[k] = lines[i + k];
            strcat(expected, lines[i + k]);
            strcat(expected, "\n");
        }
        assert_int_equal(deliver_strings(sink, batch, 2), 0);
    }
    sink_file_ops.close(sink);

    list_outputs(dir, &files);
    assert_int_equal(files.count, 3);
    for (int i = 0; i < files.count; i++) {
        char buf[256];
        size_t n = read_output(dir, files.names[i], buf, sizeof(buf));
        assert_int_equal(n, 32);
        assert_int_equal(buf[n - 1], '\n');
    }
    /* Name order is write order. */
    read_all_outputs(dir, all, sizeof(all));
    assert_string_equal(all, expected);
    remove_tree(dir);
}

static void sink_file_restart_uses_new_file(void **state)
{
    const char *dir = make_temp_dir();
    config_sink_t cfg = file_config(dir, 0);
    const char *first[] = {"first"};
    const char *second[] = {"second"};
    file_list_t files;
    char buf[256];
    char all[256];
    void *sink;

    sink = open_sink(&cfg);
    assert_int_equal(deliver_strings(sink, first, 1), 0);
    sink_file_ops.close(sink);

    /* A restart with nothing to deliver creates no file. */
    sink = open_sink(&cfg);
    sink_file_ops.close(sink);
    list_outputs(dir, &files);
    assert_int_equal(files.count, 1);

    sink = open_sink(&cfg);
    assert_int_equal(deliver_strings(sink, second, 1), 0);
    sink_file_ops.close(sink);

    list_outputs(dir, &files);
    assert_int_equal(files.count, 2);
    read_output(dir, files.names[0], buf, sizeof(buf));
    assert_string_equal(buf, "first\n");
    read_output(dir, files.names[1], buf, sizeof(buf));
    assert_string_equal(buf, "second\n");
    read_all_outputs(dir, all, sizeof(all));
    assert_string_equal(all, "first\nsecond\n");
    remove_tree(dir);
}

/* A batch that does not fit under RLIMIT_FSIZE fails as a whole and
 * leaves only complete lines behind; the retry then succeeds. */
static void sink_file_failed_write_truncates(void **state)
{
    const char *dir = make_temp_dir();
    config_sink_t cfg = file_config(dir, 0);
    void *sink = open_sink(&cfg);
    static char big[3000];
    const char *small[] = {"small-1", "small-2"};
    const char *batch[] = {"before-big", big};
    struct rlimit saved, low;
    file_list_t files;
    char buf[8192];

    memset(big, 'x', sizeof(big) - 1);
    assert_int_equal(deliver_strings(sink, small, 2), 0);

    signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    low = saved;
    low.rlim_cur = 1000;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &low), 0);
    int rc = deliver_strings(sink, batch, 2);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    assert_int_equal(rc, ING_EIO);

    list_outputs(dir, &files);
    assert_int_equal(files.count, 1);
    read_output(dir, files.names[0], buf, sizeof(buf));
    assert_string_equal(buf, "small-1\nsmall-2\n");

    assert_int_equal(deliver_strings(sink, batch, 2), 0);
    sink_file_ops.close(sink);
    read_all_outputs(dir, buf, sizeof(buf));
    assert_int_equal(strncmp(buf, "small-1\nsmall-2\nbefore-big\nxxx", 30), 0);
    assert_int_equal(strlen(buf), 16 + 11 + sizeof(big));
    remove_tree(dir);
}

static void sink_file_requires_path(void **state)
{
    config_sink_t cfg = file_config("", 0);
    char err[256] = "";
    void *sink = NULL;

    assert_int_equal(sink_file_ops.open(&cfg, NULL, &sink, err, sizeof(err)),
                     ING_ECONFIG);
    assert_non_null(strstr(err, "path"));
    assert_string_equal(sink_file_ops.kind, "file");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(sink_file_writes_lines),
        cmocka_unit_test(sink_file_rotates_by_size),
        cmocka_unit_test(sink_file_restart_uses_new_file),
        cmocka_unit_test(sink_file_failed_write_truncates),
        cmocka_unit_test(sink_file_requires_path),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
