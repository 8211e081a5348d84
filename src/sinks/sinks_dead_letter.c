/* The dead-letter file of a sink: records that the destination rejected
 * for good, kept as NDJSON so that an operator can inspect, fix and replay
 * them. The runner commits past a rejected record only after its line is
 * fsynced here, so a rejected record is never lost.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "core/errors.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "sinks/sinks_internal.h"

int sink_dead_letter_init(sink_dead_letter_t *dl, const char *path,
                          const char *sink_name)
{
    memset(dl, 0, sizeof(*dl));
    dl->fd = -1;
    dl->sink_name = sink_name;
    dl->path = strdup(path);
    return dl->path ? 0 : ING_ENOMEM;
}

static int reserve(sink_dead_letter_t *dl, size_t more)
{
    size_t cap = dl->cap ? dl->cap : 4096;
    char *buf;

    if (dl->len + more <= dl->cap)
        return 0;
    while (cap < dl->len + more)
        cap *= 2;
    buf = realloc(dl->buf, cap);
    if (buf == NULL)
        return ING_ENOMEM;
    dl->buf = buf;
    dl->cap = cap;
    return 0;
}

static void format_now(char *buf, size_t size)
{
    struct timespec ts;
    struct tm tm;
    size_t n;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, size - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

int sink_dead_letter_add(sink_dead_letter_t *dl, const spool_record_t *rec,
                         const char *reason)
{
    json_t *record = json_loadb(rec->data, rec->len, 0, NULL);
    json_t *line;
    char now[40];
    char *text;
    size_t len;
    int rc;

    /* A record that is not JSON is kept as a string, so the line stays
     * valid JSON either way. */
    if (record == NULL)
        record = json_stringn_nocheck(rec->data, rec->len);
    format_now(now, sizeof(now));
    line = json_pack("{s:s, s:s, s:s, s:o}", "sink", dl->sink_name, "reason",
                     reason[0] ? reason : "rejected by the destination",
                     "dead_lettered_at", now, "record", record);
    if (line == NULL)
        return ING_ENOMEM;
    text = json_dumps(line, JSON_COMPACT);
    json_decref(line);
    if (text == NULL)
        return ING_ENOMEM;
    len = strlen(text);
    rc = reserve(dl, len + 1);
    if (rc == 0) {
        memcpy(dl->buf + dl->len, text, len);
        dl->len += len;
        dl->buf[dl->len++] = '\n';
    }
    free(text);
    return rc;
}

/* Opens the file for appending, creating it and its folder. A new file's
 * name is made durable by an fsync of the folder. */
static int open_file(sink_dead_letter_t *dl)
{
    char *dir = strdup(dl->path);
    char *slash;
    int created = 0;
    int dir_fd;

    if (dir == NULL)
        return ING_ENOMEM;
    slash = strrchr(dir, '/');
    if (slash != NULL && slash != dir)
        *slash = '\0';
    else
        strcpy(dir, slash == dir ? "/" : ".");
    if (fs_mkdir_p(dir) < 0)
        goto error;
    dl->fd = open(dl->path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (dl->fd < 0 && errno == ENOENT) {
        dl->fd = open(dl->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                      0640);
        created = 1;
    }
    if (dl->fd < 0)
        goto error;
    if (created) {
        dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir_fd < 0 || fsync(dir_fd) < 0) {
            if (dir_fd >= 0)
                close(dir_fd);
            goto error;
        }
        close(dir_fd);
    }
    free(dir);
    return 0;

error:
    log_write_limited("sink_dead_letter", 5, LOG_LEVEL_ERROR,
                      "opening the dead-letter file failed",
                      "sink=%s path=%s error=\"%s\"", dl->sink_name, dl->path,
                      strerror(errno));
    if (dl->fd >= 0)
        close(dl->fd);
    dl->fd = -1;
    free(dir);
    return ING_EIO;
}

int sink_dead_letter_flush(sink_dead_letter_t *dl)
{
    struct stat st;
    size_t done = 0;
    int err;
    int rc;

    if (dl->len == 0)
        return 0;
    if (dl->fd < 0) {
        rc = open_file(dl);
        if (rc < 0)
            return rc;
    }
    if (fstat(dl->fd, &st) < 0)
        goto error;
    while (done < dl->len) {
        ssize_t n = write(dl->fd, dl->buf + done, dl->len - done);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto undo;
        done += (size_t)n;
    }
    if (fdatasync(dl->fd) < 0)
        goto undo;
    dl->len = 0;
    return 0;

undo:
    err = errno;
    /* A partial line would merge with the next one into invalid JSON, so
     * the file is cut back to its length before this flush. */
    if (ftruncate(dl->fd, st.st_size) < 0)
        log_write_limited("sink_dead_letter", 5, LOG_LEVEL_ERROR,
                          "truncating the dead-letter file failed; it may "
                          "end with a partial line",
                          "sink=%s path=%s error=\"%s\"", dl->sink_name,
                          dl->path, strerror(errno));
    errno = err;
error:
    log_write_limited("sink_dead_letter", 5, LOG_LEVEL_ERROR,
                      "writing the dead-letter file failed",
                      "sink=%s path=%s error=\"%s\"", dl->sink_name, dl->path,
                      strerror(errno));
    /* Reopen next time: the file may have been replaced or damaged. */
    close(dl->fd);
    dl->fd = -1;
    return ING_EIO;
}

void sink_dead_letter_discard(sink_dead_letter_t *dl)
{
    dl->len = 0;
}

void sink_dead_letter_close(sink_dead_letter_t *dl)
{
    if (dl->fd >= 0)
        close(dl->fd);
    dl->fd = -1;
    free(dl->buf);
    free(dl->path);
    dl->buf = NULL;
    dl->path = NULL;
}
