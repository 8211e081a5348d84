/* The file sink: appends each record's payload as one line to NDJSON files
 * named readings-<UTC creation time>-<sequence>.ndjson, so that names sort
 * in write order.
 *
 * A batch is written whole or not at all: after a failed write the file is
 * truncated back to its length before the batch. A file is never reopened
 * once closed, whether by rotation or by a restart, so a consumer may treat
 * every closed file as final.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <dirent.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "sinks/sink.h"

/* How many names one second may use before creating a file gives up. */
#define FILE_SEQUENCE_MAX 1000000u

typedef struct file_sink {
    char *sink_name;
    char *dir;
    int dir_fd;
    uint64_t rotate_size; /* 0: never rotate */
    int fsync;

    int fd; /* current file, or -1 until the next batch opens one */
    char file_name[64];
    uint64_t file_size;
    unsigned sequence;

    char *buf; /* the batch as lines */
    size_t buf_cap;
} file_sink_t;

static const char *error_text(char *buf, size_t size, int err)
{
    char text[96];

    return log_quote(buf, size, strerror_r(err, text, sizeof(text)));
}

static void file_close(void *state)
{
    file_sink_t *f = state;

    if (f == NULL)
        return;
    if (f->fd >= 0)
        close(f->fd);
    if (f->dir_fd >= 0)
        close(f->dir_fd);
    free(f->buf);
    free(f->dir);
    free(f->sink_name);
    free(f);
}

/* Finds the newest output file and cuts a partial last line off it. A
 * process killed in the middle of a write leaves such a line behind; its
 * records were not committed, so they are written again to a new file,
 * and consumers never see a line that is not whole JSON. */
static void repair_newest_file(file_sink_t *f)
{
    char newest[NAME_MAX + 1] = "";
    char ebuf[128];
    char chunk[4096];
    struct dirent *de;
    struct stat st;
    DIR *d;
    int fd, dup_fd;
    off_t end, keep = 0;

    dup_fd = dup(f->dir_fd);
    if (dup_fd < 0 || (d = fdopendir(dup_fd)) == NULL) {
        if (dup_fd >= 0)
            close(dup_fd);
        return;
    }
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (strncmp(de->d_name, "readings-", 9) != 0 || len < 7 ||
            strcmp(de->d_name + len - 7, ".ndjson") != 0)
            continue;
        if (strcmp(de->d_name, newest) > 0)
            snprintf(newest, sizeof(newest), "%s", de->d_name);
    }
    closedir(d);
    if (newest[0] == '\0')
        return;
    fd = openat(f->dir_fd, newest, O_RDWR | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size == 0)
        goto done;
    /* Scan backwards for the last newline. */
    for (end = st.st_size; end > 0 && keep == 0;) {
        size_t want = end > (off_t)sizeof(chunk) ? sizeof(chunk) : (size_t)end;
        ssize_t got = pread(fd, chunk, want, end - (off_t)want);
        if (got != (ssize_t)want)
            goto done;
        for (ssize_t i = got - 1; i >= 0; i--) {
            if (chunk[i] == '\n') {
                keep = end - (off_t)want + i + 1;
                break;
            }
        }
        end -= (off_t)want;
    }
    if (keep == st.st_size)
        goto done;
    if (ftruncate(fd, keep) < 0 || fsync(fd) < 0) {
        log_error("cutting a partial line off sink output failed",
                  "sink=%s file=%s error=%s", f->sink_name, newest,
                  error_text(ebuf, sizeof(ebuf), errno));
        goto done;
    }
    log_warn("cut a partial last line off sink output",
             "sink=%s file=%s bytes=%lld", f->sink_name, newest,
             (long long)(st.st_size - keep));

done:
    if (fd >= 0)
        close(fd);
}

static int file_open(const config_sink_t *cfg, sink_ctx_t *ctx, void **state,
                     char *err, size_t errlen)
{
    file_sink_t *f;

    if (cfg->path == NULL || cfg->path[0] == '\0') {
        snprintf(err, errlen, "sink %s: path is not set", cfg->name);
        return ING_ECONFIG;
    }
    if (fs_mkdir_p(cfg->path) < 0) {
        snprintf(err, errlen, "sink %s: creating folder %s failed: %s",
                 cfg->name, cfg->path, strerror(errno));
        return ING_EIO;
    }
    f = calloc(1, sizeof(*f));
    if (f == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    f->fd = -1;
    f->dir_fd = open(cfg->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    f->dir = strdup(cfg->path);
    f->sink_name = strdup(cfg->name);
    f->rotate_size = cfg->rotate_size;
    f->fsync = cfg->fsync;
    if (f->dir_fd < 0) {
        snprintf(err, errlen, "sink %s: opening folder %s failed: %s",
                 cfg->name, cfg->path, strerror(errno));
        file_close(f);
        return ING_EIO;
    }
    if (f->dir == NULL || f->sink_name == NULL) {
        snprintf(err, errlen, "out of memory");
        file_close(f);
        return ING_ENOMEM;
    }
    repair_newest_file(f);
    /* A local folder has no connection to lose. */
    sink_set_connected(ctx, true);
    *state = f;
    return 0;
}

/* Creates the next output file. O_EXCL guarantees that no earlier file,
 * also not one from before a restart, is ever written again. */
static int open_next_file(file_sink_t *f)
{
    char stamp[32];
    char ebuf[128];
    struct tm tm;
    time_t now = time(NULL);

    gmtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
    for (unsigned tries = 0; tries < FILE_SEQUENCE_MAX; tries++) {
        snprintf(f->file_name, sizeof(f->file_name), "readings-%s-%06u.ndjson",
                 stamp, f->sequence);
        f->sequence = (f->sequence + 1) % FILE_SEQUENCE_MAX;
        f->fd = openat(f->dir_fd, f->file_name,
                       O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
        if (f->fd >= 0)
            break;
        if (errno != EEXIST)
            break;
    }
    if (f->fd < 0) {
        log_write_limited("sink_file_create", 5, LOG_LEVEL_ERROR,
                          "creating sink output file failed",
                          "sink=%s file=%s error=%s", f->sink_name,
                          f->file_name, error_text(ebuf, sizeof(ebuf), errno));
        return ING_EIO;
    }
    /* The new name must survive a crash as long as the lines in it. */
    if (f->fsync && fsync(f->dir_fd) < 0) {
        log_write_limited("sink_file_create", 5, LOG_LEVEL_ERROR,
                          "sink output folder fsync failed",
                          "sink=%s dir=%s error=%s", f->sink_name, f->dir,
                          error_text(ebuf, sizeof(ebuf), errno));
        close(f->fd);
        f->fd = -1;
        return ING_EIO;
    }
    f->file_size = 0;
    log_info("sink output file started", "sink=%s file=%s", f->sink_name,
             f->file_name);
    return 0;
}

static void close_current(file_sink_t *f)
{
    if (f->fd < 0)
        return;
    close(f->fd);
    f->fd = -1;
}

/* Copies the payloads into the batch buffer, one line each. */
static int build_lines(file_sink_t *f, const spool_record_t *recs, size_t n,
                       size_t *len)
{
    size_t total = 0;
    size_t off = 0;

    for (size_t i = 0; i < n; i++)
        total += recs[i].len + 1;
    if (total > f->buf_cap) {
        char *buf = realloc(f->buf, total);
        if (buf == NULL)
            return ING_ENOMEM;
        f->buf = buf;
        f->buf_cap = total;
    }
    for (size_t i = 0; i < n; i++) {
        memcpy(f->buf + off, recs[i].data, recs[i].len);
        off += recs[i].len;
        f->buf[off++] = '\n';
    }
    *len = total;
    return 0;
}

static int write_full(int fd, const char *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

/* Undoes a failed batch. When the file cannot be cut back, or a failed
 * fdatasync left its cached pages in an unknown state, the file is closed
 * and the retry goes to a new one. */
static void undo_batch(file_sink_t *f, uint64_t before, int abandon)
{
    char ebuf[128];

    if (ftruncate(f->fd, (off_t)before) < 0) {
        log_error("truncating sink output file after a failed write failed; "
                  "it may end with a partial line",
                  "sink=%s file=%s offset=%" PRIu64 " error=%s", f->sink_name,
                  f->file_name, before, error_text(ebuf, sizeof(ebuf), errno));
        abandon = 1;
    }
    if (abandon)
        close_current(f);
}

/* Writes the batch whole or not at all, so every outcome is the same:
 * OK, or a negative return for the runner to retry. */
static int file_deliver(void *state, const spool_record_t *recs, size_t n,
                        sink_outcome_t *out)
{
    file_sink_t *f = state;
    char ebuf[128];
    uint64_t before;
    size_t len = 0;
    int rc;

    if (n == 0)
        return 0;
    rc = build_lines(f, recs, n, &len);
    if (rc < 0)
        return rc;
    if (f->fd < 0) {
        rc = open_next_file(f);
        if (rc < 0)
            return rc;
    }
    before = f->file_size;
    if (write_full(f->fd, f->buf, len, before) < 0) {
        log_write_limited("sink_file_write", 5, LOG_LEVEL_ERROR,
                          "writing sink output file failed",
                          "sink=%s file=%s bytes=%zu error=%s", f->sink_name,
                          f->file_name, len,
                          error_text(ebuf, sizeof(ebuf), errno));
        undo_batch(f, before, 0);
        return ING_EIO;
    }
    if (f->fsync && fdatasync(f->fd) < 0) {
        log_write_limited("sink_file_write", 5, LOG_LEVEL_ERROR,
                          "sink output file fdatasync failed",
                          "sink=%s file=%s error=%s", f->sink_name,
                          f->file_name, error_text(ebuf, sizeof(ebuf), errno));
        undo_batch(f, before, 1);
        return ING_EIO;
    }
    f->file_size += len;
    for (size_t i = 0; i < n; i++)
        out[i].status = SINK_RECORD_OK;
    if (f->rotate_size > 0 && f->file_size >= f->rotate_size)
        close_current(f);
    return 0;
}

const sink_ops_t sink_file_ops = {
    .kind = "file",
    .open = file_open,
    .deliver = file_deliver,
    .close = file_close,
};
