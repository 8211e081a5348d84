/* Opening and closing the spool, appends and the writer thread.
 *
 * Appends frame their payloads into the pending batch under the lock. The
 * writer swaps the pending batch for an empty one, writes it with one
 * pwrite at the end of the active segment, runs one fdatasync for all of
 * it, and only then runs the completions. Whatever arrives while that
 * fdatasync runs lands in the next batch, which is the group commit.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "spool/spool_internal.h"

#define CRC_STACK_COUNT 16

static int64_t size_gauge(void *arg)
{
    return (int64_t)spool_size_bytes(arg);
}

static int64_t zero_gauge(void *arg)
{
    return 0;
}

/* Looks up the spool's metric series. Registration is idempotent, so a
 * spool opened again in the same process reuses them. */
static void register_metrics(spool_t *s)
{
    s->appends_total = metrics_counter(
        "ingestd_spool_appends_total",
        "Append calls whose records were written to the spool.", NULL);
    s->records_total = metrics_counter("ingestd_spool_records_total",
                                       "Records written to the spool.", NULL);
    s->truncated_total = metrics_counter(
        "ingestd_spool_recovered_truncated_bytes_total",
        "Bytes of torn or corrupt tail dropped by spool recovery.", NULL);
}

void spool_segment_name(char name[SPOOL_SEGMENT_NAME_LEN + 1], spool_pos_t base)
{
    snprintf(name, SPOOL_SEGMENT_NAME_LEN + 1, "%020" PRIu64 ".seg", base);
}

static uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static void store_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

int spool_frame_check(const uint8_t *p, size_t avail, uint64_t room,
                      uint32_t *len, size_t *need)
{
    uint32_t n;

    if (room < SPOOL_FRAME_HEADER)
        return SPOOL_FRAME_BAD;
    if (avail < SPOOL_FRAME_HEADER) {
        *need = SPOOL_FRAME_HEADER;
        return SPOOL_FRAME_SHORT;
    }
    n = load_le32(p);
    *len = n;
    if (n == 0)
        return SPOOL_FRAME_BAD;
    /* A length running past the segment end means a torn or corrupt
     * header. The check also bounds what a caller allocates. */
    if ((uint64_t)n > room - SPOOL_FRAME_HEADER)
        return SPOOL_FRAME_BAD;
    if (avail - SPOOL_FRAME_HEADER < n) {
        *need = SPOOL_FRAME_HEADER + (size_t)n;
        return SPOOL_FRAME_SHORT;
    }
    if (spool_crc32c(0, p + SPOOL_FRAME_HEADER, n) != load_le32(p + 4))
        return SPOOL_FRAME_BAD;
    return SPOOL_FRAME_OK;
}

const char *spool_strerror(char *buf, size_t size, int err)
{
    char text[96];

    /* The GNU strerror_r returns a pointer that may or may not be `text`. */
    return log_quote(buf, size, strerror_r(err, text, sizeof(text)));
}

ssize_t spool_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n =
            pread(fd, (uint8_t *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        done += (size_t)n;
    }
    return (ssize_t)done;
}

static int pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, (const uint8_t *)buf + done, len - done,
                           (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        done += (size_t)n;
    }
    return 0;
}

static uint64_t max_record(const spool_t *s)
{
    if (s->opts.max_record == 0 || s->opts.max_record > UINT32_MAX)
        return UINT32_MAX;
    return s->opts.max_record;
}

/* Bytes of all segments plus queued bytes; the caller holds the lock. */
static uint64_t size_locked(const spool_t *s)
{
    return s->durable_end - s->segs[0].base + s->queued_bytes;
}

static int batch_reserve(spool_batch_t *b, size_t bytes)
{
    if (b->len + bytes > b->cap) {
        size_t cap = b->cap ? b->cap : 64 * 1024;
        while (cap < b->len + bytes)
            cap *= 2;
        uint8_t *data = realloc(b->data, cap);
        if (data == NULL)
            return ING_ENOMEM;
        b->data = data;
        b->cap = cap;
    }
    if (b->ncompletions == b->completions_cap) {
        size_t cap = b->completions_cap ? b->completions_cap * 2 : 64;
        spool_completion_t *c =
            realloc(b->completions, cap * sizeof(*b->completions));
        if (c == NULL)
            return ING_ENOMEM;
        b->completions = c;
        b->completions_cap = cap;
    }
    return 0;
}

static void batch_clear(spool_batch_t *b)
{
    b->len = 0;
    b->ncompletions = 0;
    b->records = 0;
}

static void batch_free(spool_batch_t *b)
{
    free(b->data);
    free(b->completions);
    memset(b, 0, sizeof(*b));
}

int spool_append(spool_t *s, const struct iovec *payloads, size_t count,
                 spool_done_fn done, void *arg)
{
    uint32_t crc_stack[CRC_STACK_COUNT];
    uint32_t *crcs = crc_stack;
    size_t total = 0;
    int rc = 0;

    for (size_t i = 0; i < count; i++) {
        /* An empty frame would be all zero bytes, which is also what a
         * crash can leave at the end of a file, so recovery treats a zero
         * length as damage and appends may not create one. */
        if (payloads[i].iov_len == 0)
            return ING_EINVAL;
        if (payloads[i].iov_len > max_record(s))
            return ING_ETOOBIG;
        total += SPOOL_FRAME_HEADER + payloads[i].iov_len;
    }
    if (count > CRC_STACK_COUNT) {
        crcs = malloc(count * sizeof(*crcs));
        if (crcs == NULL)
            return ING_ENOMEM;
    }
    /* Checksums are computed before taking the lock, so that appending
     * threads do not serialize on them. */
    for (size_t i = 0; i < count; i++)
        crcs[i] = spool_crc32c(0, payloads[i].iov_base, payloads[i].iov_len);

    pthread_mutex_lock(&s->lock);
    if (s->closing) {
        rc = ING_ESHUTDOWN;
        goto done;
    }
    if (s->opts.max_size > 0 && size_locked(s) >= s->opts.max_size) {
        rc = ING_EFULL;
        goto done;
    }
    rc = batch_reserve(&s->pending, total);
    if (rc < 0)
        goto done;
    for (size_t i = 0; i < count; i++) {
        uint8_t *p = s->pending.data + s->pending.len;
        store_le32(p, (uint32_t)payloads[i].iov_len);
        store_le32(p + 4, crcs[i]);
        if (payloads[i].iov_len > 0)
            memcpy(p + SPOOL_FRAME_HEADER, payloads[i].iov_base,
                   payloads[i].iov_len);
        s->pending.len += SPOOL_FRAME_HEADER + payloads[i].iov_len;
    }
    s->pending.completions[s->pending.ncompletions++] =
        (spool_completion_t){.done = done, .arg = arg};
    s->pending.records += count;
    s->queued_bytes += total;
    pthread_cond_signal(&s->writer_cv);
done:
    pthread_mutex_unlock(&s->lock);
    if (crcs != crc_stack)
        free(crcs);
    return rc;
}

static int fsync_dir(int fd, const char *what)
{
    char ebuf[128];

    if (fsync(fd) == 0)
        return 0;
    log_error("spool folder fsync failed", "dir=%s error=%s", what,
              spool_strerror(ebuf, sizeof(ebuf), errno));
    return ING_EIO;
}

/* Starts a new segment at the end of the active one. On failure the
 * writer keeps appending to the active segment and tries again before the
 * next batch. */
static void rotate_segment(spool_t *s)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];
    spool_pos_t base = s->active_base + s->active_size;
    char ebuf[128];
    int fd;

    spool_segment_name(name, base);
    fd = openat(s->dir_fd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0) {
        log_write_limited("spool_rotate", 5, LOG_LEVEL_ERROR,
                          "creating spool segment failed",
                          "segment=%s error=%s", name,
                          spool_strerror(ebuf, sizeof(ebuf), errno));
        return;
    }
    /* The new name must be durable before records in it are acknowledged,
     * or recovery could lose the whole segment. */
    if (fsync_dir(s->dir_fd, s->dir) < 0) {
        unlinkat(s->dir_fd, name, 0);
        close(fd);
        return;
    }
    pthread_mutex_lock(&s->lock);
    if (s->nsegs == s->segs_cap) {
        size_t cap = s->segs_cap * 2;
        spool_segment_t *segs = realloc(s->segs, cap * sizeof(*segs));
        if (segs == NULL) {
            pthread_mutex_unlock(&s->lock);
            unlinkat(s->dir_fd, name, 0);
            close(fd);
            return;
        }
        s->segs = segs;
        s->segs_cap = cap;
    }
    s->segs[s->nsegs++] = (spool_segment_t){.base = base, .size = 0};
    pthread_mutex_unlock(&s->lock);

    close(s->active_fd);
    s->active_fd = fd;
    s->active_base = base;
    s->active_size = 0;
    s->rotate_next = 0;
    log_debug("spool segment started", "segment=%s", name);
}

static double elapsed_seconds(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) +
           (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

/* Puts the active segment back to its length before a failed batch, so
 * that no half-written frame stays in front of the next batch. */
static void undo_write(spool_t *s, uint64_t offset)
{
    char ebuf[128];

    if (ftruncate(s->active_fd, (off_t)offset) == 0)
        return;
    log_error("spool truncate after failed write failed; starting a new "
              "segment",
              "segment_base=%" PRIu64 " offset=%" PRIu64 " error=%s",
              s->active_base, offset,
              spool_strerror(ebuf, sizeof(ebuf), errno));
    s->rotate_next = 1;
}

/* Writes and syncs one batch. Returns 0 or ING_EIO. */
static int write_batch(spool_t *s, spool_batch_t *b)
{
    char ebuf[128];
    uint64_t offset;
    int rc = 0;

    if (s->rotate_next || (s->active_size >= s->opts.segment_size &&
                           s->active_size > 0 && b->len > 0))
        rotate_segment(s);
    offset = s->active_size;
    if (b->len > 0 && pwrite_full(s->active_fd, b->data, b->len, offset) < 0) {
        log_error("spool write failed",
                  "segment_base=%" PRIu64 " offset=%" PRIu64
                  " bytes=%zu error=%s",
                  s->active_base, offset, b->len,
                  spool_strerror(ebuf, sizeof(ebuf), errno));
        rc = ING_EIO;
    }
    if (rc == 0 && b->len > 0 && s->opts.fsync) {
        struct timespec start;
        void (*observe)(double);

        clock_gettime(CLOCK_MONOTONIC, &start);
        if (fdatasync(s->active_fd) < 0) {
            log_error("spool fdatasync failed",
                      "segment_base=%" PRIu64 " offset=%" PRIu64
                      " bytes=%zu error=%s",
                      s->active_base, offset, b->len,
                      spool_strerror(ebuf, sizeof(ebuf), errno));
            rc = ING_EIO;
        }
        observe = atomic_load(&s->observe);
        if (observe != NULL)
            observe(elapsed_seconds(&start));
    }
    if (rc < 0)
        undo_write(s, offset);

    pthread_mutex_lock(&s->lock);
    s->queued_bytes -= b->len;
    if (rc == 0 && b->len > 0) {
        s->active_size += b->len;
        s->segs[s->nsegs - 1].size += b->len;
        s->durable_end += b->len;
        pthread_cond_broadcast(&s->durable_cv);
    }
    pthread_mutex_unlock(&s->lock);

    if (rc == 0) {
        metrics_counter_add(s->appends_total, b->ncompletions);
        metrics_counter_add(s->records_total, b->records);
    }
    return rc;
}

static void *writer_main(void *arg)
{
    spool_t *s = arg;
    spool_batch_t batch = {0};

    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (s->pending.ncompletions == 0 && !s->closing)
            pthread_cond_wait(&s->writer_cv, &s->lock);
        if (s->pending.ncompletions == 0)
            break;
        spool_batch_t next = s->pending;
        s->pending = batch;
        batch = next;
        pthread_mutex_unlock(&s->lock);

        int status = write_batch(s, &batch);
        for (size_t i = 0; i < batch.ncompletions; i++) {
            spool_completion_t *c = &batch.completions[i];
            if (c->done != NULL)
                c->done(c->arg, status);
        }
        batch_clear(&batch);
        pthread_mutex_lock(&s->lock);
    }
    pthread_mutex_unlock(&s->lock);
    batch_free(&batch);
    return NULL;
}

/* Frees everything of a spool whose writer is not running. */
static void spool_free(spool_t *s)
{
    if (s->active_fd >= 0)
        close(s->active_fd);
    if (s->cursors_fd >= 0)
        close(s->cursors_fd);
    if (s->dir_fd >= 0)
        close(s->dir_fd);
    if (s->lock_fd >= 0)
        close(s->lock_fd);
    spool_cursors_free(s);
    batch_free(&s->pending);
    free(s->segs);
    free(s->dir);
    pthread_cond_destroy(&s->durable_cv);
    pthread_cond_destroy(&s->writer_cv);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

static int init_sync(spool_t *s)
{
    pthread_condattr_t attr;

    if (pthread_mutex_init(&s->lock, NULL) != 0)
        return ING_ENOMEM;
    if (pthread_cond_init(&s->writer_cv, NULL) != 0)
        return ING_ENOMEM;
    /* Readers wait with deadlines on the monotonic clock, so that a wall
     * clock step neither cuts nor stretches their timeout. */
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&s->durable_cv, &attr);
    pthread_condattr_destroy(&attr);
    return rc == 0 ? 0 : ING_ENOMEM;
}

/* Creates the folders and takes the LOCK file, so that two processes never
 * write the same spool. */
static int open_dirs(spool_t *s, char *err, size_t errlen)
{
    char path[PATH_MAX];

    snprintf(path, sizeof(path), "%s/%s", s->dir, SPOOL_CURSORS_DIR);
    if (fs_mkdir_p(path) < 0) {
        snprintf(err, errlen, "creating spool folder %s failed: %s", path,
                 strerror(errno));
        return ING_EIO;
    }
    s->dir_fd = open(s->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    s->cursors_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (s->dir_fd < 0 || s->cursors_fd < 0) {
        snprintf(err, errlen, "opening spool folder %s failed: %s", s->dir,
                 strerror(errno));
        return ING_EIO;
    }
    s->lock_fd = openat(s->dir_fd, "LOCK", O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (s->lock_fd < 0) {
        snprintf(err, errlen, "creating %s/LOCK failed: %s", s->dir,
                 strerror(errno));
        return ING_EIO;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        snprintf(err, errlen,
                 "spool folder %s is in use by another ingestd (%s/LOCK is "
                 "locked)",
                 s->dir, s->dir);
        return ING_EEXIST;
    }
    return 0;
}

int spool_open(const spool_options_t *opts, spool_t **out, char *err,
               size_t errlen)
{
    spool_t *s;
    spool_pos_t fresh_base = 0;
    int rc;

    if (opts == NULL || opts->dir == NULL || opts->dir[0] == '\0') {
        snprintf(err, errlen, "spool folder is not set");
        return ING_EINVAL;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "out of memory");
        return ING_ENOMEM;
    }
    s->dir_fd = s->cursors_fd = s->lock_fd = s->active_fd = -1;
    s->opts = *opts;
    s->dir = strdup(opts->dir);
    s->opts.dir = s->dir;
    if (s->opts.segment_size == 0)
        s->opts.segment_size = SPOOL_DEFAULT_SEGMENT_SIZE;
    if (s->dir == NULL || init_sync(s) < 0) {
        snprintf(err, errlen, "out of memory");
        rc = ING_ENOMEM;
        goto error;
    }
    register_metrics(s);
    rc = open_dirs(s, err, errlen);
    if (rc < 0)
        goto error;
    /* An empty spool starts at the highest cursor, so that positions keep
     * growing even when an operator removed every segment. */
    rc = spool_cursors_load(s, &fresh_base, err, errlen);
    if (rc < 0)
        goto error;
    rc = spool_recover(s, fresh_base, err, errlen);
    if (rc < 0)
        goto error;
    spool_cursors_clamp(s);
    spool_delete_segments(s);

    if (pthread_create(&s->writer, NULL, writer_main, s) != 0) {
        snprintf(err, errlen, "starting the spool writer thread failed");
        rc = ING_ENOMEM;
        goto error;
    }
    s->writer_started = 1;
    metrics_gauge_func("ingestd_spool_size_bytes",
                       "Bytes in spool segments, including queued appends.",
                       NULL, size_gauge, s);
    log_info(
        "spool opened",
        "dir=%s segments=%zu size=%" PRIu64 " durable_end=%" PRIu64 " fsync=%d",
        s->dir, s->nsegs, spool_size_bytes(s), s->durable_end, s->opts.fsync);
    *out = s;
    return 0;

error:
    spool_free(s);
    return rc;
}

void spool_close(spool_t *s)
{
    if (s == NULL)
        return;
    pthread_mutex_lock(&s->lock);
    s->closing = 1;
    pthread_cond_broadcast(&s->writer_cv);
    pthread_cond_broadcast(&s->durable_cv);
    pthread_mutex_unlock(&s->lock);
    if (s->writer_started)
        pthread_join(s->writer, NULL);
    /* Re-registering takes the metrics lock, so no scrape can still be
     * inside size_gauge with this spool once it returns. */
    metrics_gauge_func("ingestd_spool_size_bytes",
                       "Bytes in spool segments, including queued appends.",
                       NULL, zero_gauge, NULL);
    log_info("spool closed", "dir=%s durable_end=%" PRIu64, s->dir,
             s->durable_end);
    spool_free(s);
}

uint64_t spool_size_bytes(spool_t *s)
{
    uint64_t size;

    pthread_mutex_lock(&s->lock);
    size = size_locked(s);
    pthread_mutex_unlock(&s->lock);
    return size;
}

int spool_is_full(spool_t *s)
{
    return s->opts.max_size > 0 && spool_size_bytes(s) >= s->opts.max_size;
}

spool_pos_t spool_durable_end(spool_t *s)
{
    spool_pos_t end;

    pthread_mutex_lock(&s->lock);
    end = s->durable_end;
    pthread_mutex_unlock(&s->lock);
    return end;
}

void spool_set_sync_observer(spool_t *s, void (*observe)(double seconds))
{
    atomic_store(&s->observe, observe);
}
