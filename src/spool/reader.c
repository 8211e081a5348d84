/* Readers, their cursor files and segment deletion.
 *
 * Each reader name has a cursor file cursors/<name> holding its committed
 * position as decimal text. The table of cursors in memory mirrors those
 * files, including the files of readers that are not open: a sink that is
 * configured but stopped still holds back deletion, because its records
 * must wait for it. Deleting cursors/<name> while ingestd is stopped drops
 * a sink for good.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/log.h"
#include "spool/spool_internal.h"

#define READER_NAME_MAX 64
#define READER_BUFFER_SIZE (512 * 1024)
#define CURSOR_TEXT_MAX 32

/* Reader names become file names: 1 to 64 characters of [A-Za-z0-9_.-],
 * not starting with a dot (temporary cursor files start with one). */
static int name_valid(const char *name)
{
    size_t len = name ? strlen(name) : 0;

    if (len == 0 || len > READER_NAME_MAX || name[0] == '.')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-'))
            return 0;
    }
    return 1;
}

static spool_cursor_t *find_cursor(spool_t *s, const char *name)
{
    for (size_t i = 0; i < s->ncursors; i++) {
        if (strcmp(s->cursors[i].name, name) == 0)
            return &s->cursors[i];
    }
    return NULL;
}

static spool_cursor_t *add_cursor(spool_t *s, const char *name,
                                  spool_pos_t committed)
{
    if (s->ncursors == s->cursors_cap) {
        size_t cap = s->cursors_cap ? s->cursors_cap * 2 : 8;
        spool_cursor_t *c = realloc(s->cursors, cap * sizeof(*c));
        if (c == NULL)
            return NULL;
        s->cursors = c;
        s->cursors_cap = cap;
    }
    char *copy = strdup(name);
    if (copy == NULL)
        return NULL;
    s->cursors[s->ncursors] =
        (spool_cursor_t){.name = copy, .committed = committed, .open = 0};
    return &s->cursors[s->ncursors++];
}

static void remove_cursor(spool_t *s, spool_cursor_t *c)
{
    size_t i = (size_t)(c - s->cursors);

    free(c->name);
    memmove(&s->cursors[i], &s->cursors[i + 1],
            (s->ncursors - i - 1) * sizeof(*c));
    s->ncursors--;
}

void spool_cursors_free(spool_t *s)
{
    for (size_t i = 0; i < s->ncursors; i++)
        free(s->cursors[i].name);
    free(s->cursors);
    s->cursors = NULL;
    s->ncursors = s->cursors_cap = 0;
}

/* Parses a cursor file: decimal digits and a newline. */
static int parse_cursor(const char *text, size_t len, spool_pos_t *pos)
{
    spool_pos_t v = 0;
    size_t i = 0;

    for (; i < len && text[i] >= '0' && text[i] <= '9'; i++) {
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (spool_pos_t)(text[i] - '0');
    }
    if (i == 0 || i + 1 != len || text[i] != '\n')
        return -1;
    *pos = v;
    return 0;
}

/* Reads cursors/<name>. An unreadable or invalid file yields position 0,
 * so that the reader starts at the oldest record: a duplicate delivery is
 * better than a lost one. */
static spool_pos_t read_cursor_file(spool_t *s, const char *name)
{
    char text[CURSOR_TEXT_MAX];
    char ebuf[128];
    spool_pos_t pos = 0;
    ssize_t n = -1;
    int fd = openat(s->cursors_fd, name, O_RDONLY | O_CLOEXEC);

    if (fd >= 0) {
        n = spool_pread_full(fd, text, sizeof(text), 0);
        close(fd);
    }
    if (n < 0) {
        log_error("reading spool cursor failed; the reader starts at the "
                  "oldest record",
                  "reader=%s error=%s", name,
                  spool_strerror(ebuf, sizeof(ebuf), errno));
        return 0;
    }
    if (parse_cursor(text, (size_t)n, &pos) < 0) {
        log_error("spool cursor file is invalid; the reader starts at the "
                  "oldest record",
                  "reader=%s", name);
        return 0;
    }
    return pos;
}

int spool_cursors_load(spool_t *s, spool_pos_t *max_pos, char *err,
                       size_t errlen)
{
    int fd = dup(s->cursors_fd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *de;
    int rc = 0;

    *max_pos = 0;
    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "listing %s/%s failed: %s", s->dir,
                 SPOOL_CURSORS_DIR, strerror(errno));
        return ING_EIO;
    }
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.') {
            /* A temporary file left by a crash during a cursor write. */
            if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
                unlinkat(s->cursors_fd, de->d_name, 0);
            continue;
        }
        if (!name_valid(de->d_name)) {
            log_warn("ignoring unexpected file in the spool cursors folder",
                     "file=%s", de->d_name);
            continue;
        }
        spool_pos_t pos = read_cursor_file(s, de->d_name);
        if (add_cursor(s, de->d_name, pos) == NULL) {
            snprintf(err, errlen, "out of memory");
            rc = ING_ENOMEM;
            break;
        }
        if (pos > *max_pos)
            *max_pos = pos;
    }
    closedir(d);
    return rc;
}

void spool_cursors_clamp(spool_t *s)
{
    for (size_t i = 0; i < s->ncursors; i++) {
        spool_cursor_t *c = &s->cursors[i];
        if (c->committed <= s->durable_end)
            continue;
        log_warn("spool cursor is past the end of the spool; records after "
                 "the end were lost, so the reader continues at the end",
                 "reader=%s cursor=%" PRIu64 " end=%" PRIu64, c->name,
                 c->committed, s->durable_end);
        c->committed = s->durable_end;
    }
}

/* Replaces cursors/<name> atomically: write a temporary file, fsync it,
 * rename it over the old one, and fsync the folder so the rename lasts. */
static int write_cursor_file(spool_t *s, const char *name, spool_pos_t pos)
{
    char tmp[READER_NAME_MAX + 8];
    char text[CURSOR_TEXT_MAX];
    char ebuf[128];
    int len = snprintf(text, sizeof(text), "%" PRIu64 "\n", pos);
    int fd;

    snprintf(tmp, sizeof(tmp), ".%s.tmp", name);
    fd = openat(s->cursors_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                0640);
    if (fd < 0)
        goto error;
    if (write(fd, text, (size_t)len) != len || fsync(fd) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        goto error;
    }
    if (close(fd) < 0)
        goto error;
    if (renameat(s->cursors_fd, tmp, s->cursors_fd, name) < 0)
        goto error;
    if (fsync(s->cursors_fd) < 0)
        goto error;
    return 0;

error:
    log_write_limited("spool_cursor_write", 5, LOG_LEVEL_ERROR,
                      "writing spool cursor failed",
                      "reader=%s pos=%" PRIu64 " error=%s", name, pos,
                      spool_strerror(ebuf, sizeof(ebuf), errno));
    unlinkat(s->cursors_fd, tmp, 0);
    return ING_EIO;
}

void spool_delete_segments(spool_t *s)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];
    spool_pos_t *doomed = NULL;
    spool_pos_t min;
    size_t count = 0;

    pthread_mutex_lock(&s->lock);
    if (s->ncursors == 0)
        goto done;
    min = s->cursors[0].committed;
    for (size_t i = 1; i < s->ncursors; i++) {
        if (s->cursors[i].committed < min)
            min = s->cursors[i].committed;
    }
    /* Segment i ends where segment i + 1 starts. */
    while (count + 1 < s->nsegs && s->segs[count + 1].base <= min)
        count++;
    if (count == 0)
        goto done;
    doomed = malloc(count * sizeof(*doomed));
    if (doomed == NULL) {
        count = 0;
        goto done;
    }
    for (size_t i = 0; i < count; i++)
        doomed[i] = s->segs[i].base;
    memmove(s->segs, s->segs + count, (s->nsegs - count) * sizeof(*s->segs));
    s->nsegs -= count;
done:
    pthread_mutex_unlock(&s->lock);

    /* Readers only ever open segments at or after their committed cursor,
     * so none of these is opened again once out of the table. */
    for (size_t i = 0; i < count; i++) {
        spool_segment_name(name, doomed[i]);
        if (unlinkat(s->dir_fd, name, 0) < 0) {
            char ebuf[128];
            log_error("deleting spool segment failed", "segment=%s error=%s",
                      name, spool_strerror(ebuf, sizeof(ebuf), errno));
            continue;
        }
        log_info("deleted spool segment", "segment=%s", name);
    }
    free(doomed);
}

int spool_reader_open(spool_t *s, const char *name, spool_reader_t **out)
{
    spool_reader_t *r;
    spool_cursor_t *c;
    spool_pos_t start;
    int is_new = 0;
    int rc = 0;

    if (!name_valid(name))
        return ING_EINVAL;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return ING_ENOMEM;
    r->name = strdup(name);
    r->buf_cap = READER_BUFFER_SIZE;
    r->buf = malloc(r->buf_cap);
    r->fd = -1;
    r->spool = s;
    if (r->name == NULL || r->buf == NULL) {
        rc = ING_ENOMEM;
        goto error;
    }

    pthread_mutex_lock(&s->lock);
    c = find_cursor(s, name);
    if (c != NULL && c->open) {
        pthread_mutex_unlock(&s->lock);
        rc = ING_EEXIST;
        goto error;
    }
    if (c == NULL) {
        /* A new reader starts at the oldest record and holds back
         * deletion from now on. */
        c = add_cursor(s, name, s->segs[0].base);
        is_new = 1;
    }
    if (c == NULL) {
        pthread_mutex_unlock(&s->lock);
        rc = ING_ENOMEM;
        goto error;
    }
    c->open = 1;
    start = c->committed;
    if (start < s->segs[0].base) {
        log_warn("spool cursor points before the oldest segment; records "
                 "between them were removed outside ingestd",
                 "reader=%s cursor=%" PRIu64 " oldest=%" PRIu64, name, start,
                 s->segs[0].base);
        start = s->segs[0].base;
    }
    pthread_mutex_unlock(&s->lock);

    r->read_pos = start;
    atomic_store(&r->committed, start);
    if (is_new && write_cursor_file(s, name, start) < 0) {
        pthread_mutex_lock(&s->lock);
        remove_cursor(s, find_cursor(s, name));
        pthread_mutex_unlock(&s->lock);
        rc = ING_EIO;
        goto error;
    }
    log_info("spool reader opened", "reader=%s pos=%" PRIu64, name, start);
    *out = r;
    return 0;

error:
    free(r->buf);
    free(r->name);
    free(r);
    return rc;
}

static void deadline_after(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Waits until a durable record lies after the read position. Returns 0
 * when there is one, 1 on timeout or wake, or ING_ESHUTDOWN. The caller
 * holds the lock. */
static int wait_for_data(spool_reader_t *r, int timeout_ms)
{
    spool_t *s = r->spool;
    struct timespec deadline;
    int timed_out = 0;

    if (timeout_ms > 0)
        deadline_after(&deadline, timeout_ms);
    for (;;) {
        if (s->closing)
            return ING_ESHUTDOWN;
        if (r->read_pos < s->durable_end)
            return 0;
        if (r->woken) {
            r->woken = 0;
            return 1;
        }
        if (timeout_ms == 0 || timed_out)
            return 1;
        if (timeout_ms < 0)
            pthread_cond_wait(&s->durable_cv, &s->lock);
        else if (pthread_cond_timedwait(&s->durable_cv, &s->lock, &deadline) ==
                 ETIMEDOUT)
            timed_out = 1;
    }
}

/* Returns the index of the segment containing `pos`. The caller holds the
 * lock and has checked that pos is at or after the first segment's base. */
static size_t find_segment(const spool_t *s, spool_pos_t pos)
{
    size_t lo = 0;
    size_t hi = s->nsegs;

    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->segs[mid].base <= pos)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

static int open_segment(spool_reader_t *r, spool_pos_t base)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];

    if (r->fd >= 0 && r->fd_base == base)
        return 0;
    if (r->fd >= 0)
        close(r->fd);
    spool_segment_name(name, base);
    r->fd = openat(r->spool->dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        char ebuf[128];
        log_write_limited("spool_reader_open_segment", 5, LOG_LEVEL_ERROR,
                          "opening spool segment failed",
                          "reader=%s segment=%s error=%s", r->name, name,
                          spool_strerror(ebuf, sizeof(ebuf), errno));
        return ING_EIO;
    }
    r->fd_base = base;
    return 0;
}

/* Skips from a bad frame at the read position to `seg_end`. */
static int skip_corrupt(spool_reader_t *r, spool_pos_t seg_end)
{
    log_error("spool record is corrupt; skipping the rest of its segment",
              "reader=%s pos=%" PRIu64 " skipped_bytes=%" PRIu64, r->name,
              r->read_pos, seg_end - r->read_pos);
    r->read_pos = seg_end;
    return ING_ECORRUPT;
}

/* Reads frames of one segment between the read position and `seg_end`
 * into the reader's buffer. */
static int read_frames(spool_reader_t *r, spool_pos_t seg_end,
                       spool_record_t *recs, size_t max, size_t *n)
{
    size_t count = 0;
    size_t off = 0;
    size_t want;
    ssize_t got;

reread:
    want =
        seg_end - r->read_pos < r->buf_cap ? seg_end - r->read_pos : r->buf_cap;
    got = spool_pread_full(r->fd, r->buf, want, r->read_pos - r->fd_base);
    if (got < 0) {
        char ebuf[128];
        log_write_limited("spool_reader_read", 5, LOG_LEVEL_ERROR,
                          "reading spool segment failed",
                          "reader=%s pos=%" PRIu64 " error=%s", r->name,
                          r->read_pos,
                          spool_strerror(ebuf, sizeof(ebuf), errno));
        return ING_EIO;
    }
    while (count < max && r->read_pos + off < seg_end) {
        spool_pos_t pos = r->read_pos + off;
        uint32_t len;
        size_t need = 0;
        int st = spool_frame_check(r->buf + off, (size_t)got - off,
                                   seg_end - pos, &len, &need);

        if (st == SPOOL_FRAME_OK) {
            recs[count++] = (spool_record_t){
                .data = r->buf + off + SPOOL_FRAME_HEADER,
                .len = len,
                .pos = pos,
                .end = pos + SPOOL_FRAME_HEADER + len,
            };
            off += SPOOL_FRAME_HEADER + len;
            continue;
        }
        /* A frame cut by the buffer's end is read again next call, or,
         * when it is the first frame, after the buffer has grown. A file
         * that ends before the segment does is damage. */
        if (st == SPOOL_FRAME_SHORT && (size_t)got == want) {
            if (count > 0)
                break;
            uint8_t *bigger = realloc(r->buf, need);
            if (bigger == NULL)
                return ING_ENOMEM;
            r->buf = bigger;
            r->buf_cap = need;
            goto reread;
        }
        if (count > 0)
            break;
        return skip_corrupt(r, seg_end);
    }
    r->read_pos += off;
    *n = count;
    return 0;
}

int spool_reader_next(spool_reader_t *r, spool_record_t *recs, size_t max,
                      int timeout_ms, size_t *n)
{
    spool_t *s = r->spool;
    spool_pos_t seg_base, seg_end;
    size_t i;
    int rc;

    *n = 0;
    if (max == 0)
        return 0;
    pthread_mutex_lock(&s->lock);
    rc = wait_for_data(r, timeout_ms);
    if (rc != 0) {
        pthread_mutex_unlock(&s->lock);
        return rc < 0 ? rc : 0;
    }
    if (r->read_pos < s->segs[0].base)
        r->read_pos = s->segs[0].base;
    i = find_segment(s, r->read_pos);
    seg_base = s->segs[i].base;
    seg_end =
        i + 1 == s->nsegs ? s->durable_end : s->segs[i].base + s->segs[i].size;
    pthread_mutex_unlock(&s->lock);

    rc = open_segment(r, seg_base);
    if (rc < 0)
        return rc;
    return read_frames(r, seg_end, recs, max, n);
}

void spool_reader_rewind(spool_reader_t *r)
{
    r->read_pos = atomic_load(&r->committed);
}

int spool_reader_commit(spool_reader_t *r, spool_pos_t pos)
{
    spool_t *s = r->spool;
    spool_cursor_t *c;
    int rc;

    pthread_mutex_lock(&s->lock);
    if (pos > s->durable_end) {
        pthread_mutex_unlock(&s->lock);
        return ING_EINVAL;
    }
    pthread_mutex_unlock(&s->lock);
    if (pos <= atomic_load(&r->committed))
        return 0;

    /* Only this reader writes its cursor file, so the write needs no
     * lock. */
    rc = write_cursor_file(s, r->name, pos);
    if (rc < 0)
        return rc;
    atomic_store(&r->committed, pos);
    if (r->read_pos < pos)
        r->read_pos = pos;
    pthread_mutex_lock(&s->lock);
    c = find_cursor(s, r->name);
    if (c != NULL)
        c->committed = pos;
    pthread_mutex_unlock(&s->lock);
    spool_delete_segments(s);
    return 0;
}

spool_pos_t spool_reader_committed(spool_reader_t *r)
{
    return atomic_load(&r->committed);
}

uint64_t spool_reader_lag_bytes(spool_reader_t *r)
{
    spool_pos_t end = spool_durable_end(r->spool);
    spool_pos_t committed = atomic_load(&r->committed);

    return end > committed ? end - committed : 0;
}

void spool_reader_wake(spool_reader_t *r)
{
    spool_t *s = r->spool;

    pthread_mutex_lock(&s->lock);
    r->woken = 1;
    pthread_cond_broadcast(&s->durable_cv);
    pthread_mutex_unlock(&s->lock);
}

void spool_reader_close(spool_reader_t *r)
{
    spool_t *s;
    spool_cursor_t *c;

    if (r == NULL)
        return;
    s = r->spool;
    pthread_mutex_lock(&s->lock);
    c = find_cursor(s, r->name);
    if (c != NULL)
        c->open = 0;
    pthread_mutex_unlock(&s->lock);
    if (r->fd >= 0)
        close(r->fd);
    log_info("spool reader closed", "reader=%s committed=%" PRIu64, r->name,
             atomic_load(&r->committed));
    free(r->buf);
    free(r->name);
    free(r);
}
