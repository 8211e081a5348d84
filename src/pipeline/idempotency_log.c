/* The idempotency log: segment files 00000000000000000001.log, ... in the
 * index's folder, each a sequence of frames.
 *
 * A frame is a 4-byte payload length, a 4-byte CRC32C of the payload,
 * then the payload. The payload is received_ms (8 bytes), the message id
 * (16 bytes), the device id's length and the key's length (2 bytes each),
 * the device id and the key. Integers are little endian. Each
 * start writes to a new segment, so a torn tail left by a crash is always
 * at the end of a segment that is no longer written.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "pipeline/idempotency_internal.h"

#define FRAME_HEADER 8
#define PAYLOAD_FIXED (8 + IDEMPOTENCY_ID_BYTES + 2 + 2)
#define DEFAULT_SEGMENT_BYTES (UINT64_C(8) << 20)
#define SEGMENT_NAME_LEN 24 /* 20 digits and ".log" */
#define DEVICE_MAX 1024     /* longer device ids are not ours: corrupt */

static void store_le(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t load_le(const uint8_t *p, int bytes)
{
    uint64_t v = 0;

    for (int i = bytes - 1; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void segment_name(char name[SEGMENT_NAME_LEN + 1], uint64_t seq)
{
    snprintf(name, SEGMENT_NAME_LEN + 1, "%020" PRIu64 ".log", seq);
}

static int parse_segment_name(const char *name, uint64_t *seq)
{
    char *end;

    if (strlen(name) != SEGMENT_NAME_LEN || name[0] < '0' || name[0] > '9')
        return -1;
    *seq = strtoull(name, &end, 10);
    return end == name + 20 && strcmp(end, ".log") == 0 ? 0 : -1;
}

static uint64_t segment_bytes(const idempotency_t *ix)
{
    return ix->opts.segment_bytes ? ix->opts.segment_bytes
                                  : DEFAULT_SEGMENT_BYTES;
}

static int add_segment(idempotency_t *ix, uint64_t seq)
{
    if (ix->nsegs == ix->segs_cap) {
        size_t cap = ix->segs_cap ? ix->segs_cap * 2 : 16;
        idem_segment_t *grown = realloc(ix->segs, cap * sizeof(*grown));
        if (grown == NULL)
            return ING_ENOMEM;
        ix->segs = grown;
        ix->segs_cap = cap;
    }
    ix->segs[ix->nsegs++] = (idem_segment_t){.seq = seq, .max_ms = INT64_MIN};
    return 0;
}

static int compare_seq(const void *a, const void *b)
{
    const idem_segment_t *x = a, *y = b;

    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Counts a frame in its segment: a frame starts a new key unless it
 * continues the previous frame's (device, key, receive time), as the
 * records of one batch stored under one key do. */
static void count_frame(idempotency_t *ix, idem_segment_t *seg, uint64_t hash,
                        int64_t received_ms)
{
    if (hash != ix->last_frame_hash || received_ms != ix->last_frame_ms)
        seg->keys++;
    ix->last_frame_hash = hash;
    ix->last_frame_ms = received_ms;
    if (received_ms > seg->max_ms)
        seg->max_ms = received_ms;
}

/* Parses one frame's payload and restores it into the table. Returns 0,
 * ING_ECORRUPT for a payload that does not parse, or ING_ENOMEM. */
static int restore_frame(idempotency_t *ix, idem_segment_t *seg,
                         const uint8_t *p, size_t len, int64_t now_ms)
{
    char device[DEVICE_MAX + 1];
    int64_t received_ms;
    size_t device_len, key_len;
    const char *key;

    if (len < PAYLOAD_FIXED)
        return ING_ECORRUPT;
    received_ms = (int64_t)load_le(p, 8);
    device_len = load_le(p + 24, 2);
    key_len = load_le(p + 26, 2);
    if (PAYLOAD_FIXED + device_len + key_len != len || key_len == 0 ||
        device_len == 0 || device_len > DEVICE_MAX ||
        key_len > IDEMPOTENCY_KEY_MAX ||
        memchr(p + PAYLOAD_FIXED, '\0', device_len) != NULL)
        return ING_ECORRUPT;
    memcpy(device, p + PAYLOAD_FIXED, device_len);
    device[device_len] = '\0';
    key = (const char *)p + PAYLOAD_FIXED + device_len;
    count_frame(ix, seg, idem_hash(device, key, key_len), received_ms);
    return idempotency_restore(ix, device, key, key_len, received_ms, p + 8,
                               now_ms);
}

static int read_file(int dir_fd, const char *name, uint8_t **data,
                     size_t *len)
{
    int fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC);
    struct stat st;
    size_t done = 0;
    uint8_t *buf = NULL;

    if (fd < 0 || fstat(fd, &st) != 0)
        goto error;
    buf = malloc(st.st_size > 0 ? (size_t)st.st_size : 1);
    if (buf == NULL)
        goto error;
    while (done < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + done, (size_t)st.st_size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            goto error;
        done += (size_t)n;
    }
    close(fd);
    *data = buf;
    *len = done;
    return 0;
error:
    if (fd >= 0)
        close(fd);
    free(buf);
    return ING_EIO;
}

/* Loads one segment. A frame that is cut short or fails its checksum ends
 * the segment: the file is truncated there, with a log line. */
static int load_segment(idempotency_t *ix, idem_segment_t *seg,
                        int64_t now_ms, char *err, size_t errlen)
{
    char name[SEGMENT_NAME_LEN + 1];
    uint8_t *data;
    size_t len, off = 0;
    int rc;

    segment_name(name, seg->seq);
    if (read_file(ix->dir_fd, name, &data, &len) != 0) {
        snprintf(err, errlen, "cannot read idempotency log %s/%s: %s",
                 ix->dir, name, strerror(errno));
        return ING_EIO;
    }
    while (off + FRAME_HEADER <= len) {
        uint32_t plen = (uint32_t)load_le(data + off, 4);
        uint32_t crc = (uint32_t)load_le(data + off + 4, 4);
        if (plen == 0 || plen > len - off - FRAME_HEADER ||
            spool_crc32c(0, data + off + FRAME_HEADER, plen) != crc)
            break;
        rc = restore_frame(ix, seg, data + off + FRAME_HEADER, plen, now_ms);
        if (rc == ING_ENOMEM) {
            free(data);
            snprintf(err, errlen, "out of memory loading %s/%s", ix->dir,
                     name);
            return rc;
        }
        if (rc != 0)
            break;
        off += FRAME_HEADER + plen;
    }
    free(data);
    if (off < len) {
        log_warn("idempotency log has a torn or corrupt tail; truncating it",
                 "file=%s/%s offset=%zu dropped_bytes=%zu", ix->dir, name,
                 off, len - off);
        int fd = openat(ix->dir_fd, name, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)off) != 0 || fsync(fd) != 0) {
            snprintf(err, errlen, "cannot truncate idempotency log %s/%s: %s",
                     ix->dir, name, strerror(errno));
            if (fd >= 0)
                close(fd);
            return ING_EIO;
        }
        close(fd);
    }
    return 0;
}

static int list_segments(idempotency_t *ix, char *err, size_t errlen)
{
    int fd = dup(ix->dir_fd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *de;
    uint64_t seq;
    int rc = 0;

    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "cannot list %s: %s", ix->dir, strerror(errno));
        return ING_EIO;
    }
    while (rc == 0 && (de = readdir(d)) != NULL) {
        if (parse_segment_name(de->d_name, &seq) == 0)
            rc = add_segment(ix, seq);
    }
    closedir(d);
    if (ix->nsegs > 0)
        qsort(ix->segs, ix->nsegs, sizeof(*ix->segs), compare_seq);
    return rc;
}

/* Creates segment `seq`, makes its name durable and makes it active. */
static int open_active(idempotency_t *ix, uint64_t seq)
{
    char name[SEGMENT_NAME_LEN + 1];
    int fd;

    segment_name(name, seq);
    fd = openat(ix->dir_fd, name,
                O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0)
        return ING_EIO;
    if (ix->opts.fsync && fsync(ix->dir_fd) != 0) {
        close(fd);
        unlinkat(ix->dir_fd, name, 0);
        return ING_EIO;
    }
    if (add_segment(ix, seq) != 0) {
        close(fd);
        unlinkat(ix->dir_fd, name, 0);
        return ING_ENOMEM;
    }
    if (ix->active_fd >= 0)
        close(ix->active_fd);
    ix->active_fd = fd;
    ix->active_size = 0;
    ix->active_opened_ms = idempotency_now_ms();
    ix->last_frame_hash = 0;
    ix->last_frame_ms = INT64_MIN;
    return 0;
}

int idem_log_open(idempotency_t *ix, int64_t now_ms, char *err,
                  size_t errlen)
{
    uint64_t next_seq = 1;
    int rc;

    if (fs_mkdir_p(ix->dir) != 0) {
        snprintf(err, errlen, "cannot create %s: %s", ix->dir,
                 strerror(errno));
        return ING_EIO;
    }
    ix->dir_fd = open(ix->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (ix->dir_fd < 0) {
        snprintf(err, errlen, "cannot open %s: %s", ix->dir, strerror(errno));
        return ING_EIO;
    }
    rc = list_segments(ix, err, errlen);
    for (size_t i = 0; rc == 0 && i < ix->nsegs; i++) {
        ix->last_frame_hash = 0;
        ix->last_frame_ms = INT64_MIN;
        rc = load_segment(ix, &ix->segs[i], now_ms, err, errlen);
        next_seq = ix->segs[i].seq + 1;
    }
    if (rc != 0)
        return rc;
    rc = open_active(ix, next_seq);
    if (rc != 0) {
        snprintf(err, errlen, "cannot create a segment in %s: %s", ix->dir,
                 strerror(errno));
        return rc;
    }
    log_info("idempotency index loaded", "dir=%s segments=%zu keys=%zu",
             ix->dir, ix->nsegs, ix->entries);
    return 0;
}

void idem_log_close(idempotency_t *ix)
{
    if (ix->active_fd >= 0)
        close(ix->active_fd);
    if (ix->dir_fd >= 0)
        close(ix->dir_fd);
    ix->active_fd = ix->dir_fd = -1;
    free(ix->segs);
    free(ix->queue);
    ix->segs = NULL;
    ix->queue = NULL;
}

int idempotency_log_append(idempotency_t *ix, int64_t received_ms,
                           const char *device, const char *key,
                           size_t key_len,
                           const uint8_t id[IDEMPOTENCY_ID_BYTES])
{
    size_t device_len = strlen(device);
    size_t plen = PAYLOAD_FIXED + device_len + key_len;
    uint8_t *p;

    if (ix->dir == NULL)
        return 0;
    if (device_len == 0 || device_len > DEVICE_MAX || key_len == 0 ||
        key_len > IDEMPOTENCY_KEY_MAX)
        return ING_EINVAL;
    if (ix->queue_len + FRAME_HEADER + plen > ix->queue_cap) {
        size_t cap = ix->queue_cap ? ix->queue_cap * 2 : 64 * 1024;
        while (cap < ix->queue_len + FRAME_HEADER + plen)
            cap *= 2;
        uint8_t *grown = realloc(ix->queue, cap);
        if (grown == NULL)
            return ING_ENOMEM;
        ix->queue = grown;
        ix->queue_cap = cap;
    }
    p = ix->queue + ix->queue_len;
    store_le(p, plen, 4);
    store_le(p + FRAME_HEADER, (uint64_t)received_ms, 8);
    memcpy(p + FRAME_HEADER + 8, id, IDEMPOTENCY_ID_BYTES);
    store_le(p + FRAME_HEADER + 24, device_len, 2);
    store_le(p + FRAME_HEADER + 26, key_len, 2);
    memcpy(p + FRAME_HEADER + PAYLOAD_FIXED, device, device_len);
    memcpy(p + FRAME_HEADER + PAYLOAD_FIXED + device_len, key, key_len);
    store_le(p + 4, spool_crc32c(0, p + FRAME_HEADER, plen), 4);
    ix->queue_len += FRAME_HEADER + plen;
    count_frame(ix, &ix->segs[ix->nsegs - 1], idem_hash(device, key, key_len),
                received_ms);
    return 0;
}

static int write_queue(idempotency_t *ix)
{
    size_t done = 0;

    while (done < ix->queue_len) {
        ssize_t n = write(ix->active_fd, ix->queue + done,
                          ix->queue_len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto error;
        done += (size_t)n;
    }
    if (ix->opts.fsync && fdatasync(ix->active_fd) != 0)
        goto error;
    ix->active_size += ix->queue_len;
    ix->queue_len = 0;
    return 0;
error:
    log_write_limited("idempotency_log_write", 5, LOG_LEVEL_ERROR,
                      "writing the idempotency log failed; the spool keeps "
                      "the records until a retry succeeds",
                      "dir=%s bytes=%zu error=\"%s\"", ix->dir, ix->queue_len,
                      strerror(errno));
    /* Drop what reached the file, so that the retry does not leave the
     * same frames twice or a torn frame in the middle. */
    if (ftruncate(ix->active_fd, (off_t)ix->active_size) != 0)
        log_error("truncating the idempotency log after a failed write "
                  "failed",
                  "dir=%s error=\"%s\"", ix->dir, strerror(errno));
    ix->queue_len = 0;
    return ING_EIO;
}

/* Deletes segments from the oldest while they are not the active one and
 * either every entry in them expired or the newer segments already hold
 * max_keys keys, which are all the table keeps. */
static void delete_old_segments(idempotency_t *ix, int64_t now_ms)
{
    char name[SEGMENT_NAME_LEN + 1];
    uint64_t newer_keys = 0;
    size_t drop = 0;

    for (size_t i = 1; i < ix->nsegs; i++)
        newer_keys += ix->segs[i].keys;
    while (drop + 1 < ix->nsegs) {
        const idem_segment_t *seg = &ix->segs[drop];
        int expired = seg->max_ms + (int64_t)ix->opts.window_ms <= now_ms ||
                      seg->max_ms == INT64_MIN;
        if (!expired && newer_keys < ix->opts.max_keys)
            break;
        segment_name(name, seg->seq);
        if (unlinkat(ix->dir_fd, name, 0) != 0 && errno != ENOENT) {
            log_write_limited("idempotency_log_unlink", 5, LOG_LEVEL_ERROR,
                              "deleting an idempotency log segment failed",
                              "file=%s/%s error=\"%s\"", ix->dir, name,
                              strerror(errno));
            break;
        }
        drop++;
        if (drop < ix->nsegs)
            newer_keys -= ix->segs[drop].keys;
    }
    if (drop > 0) {
        memmove(ix->segs, ix->segs + drop,
                (ix->nsegs - drop) * sizeof(*ix->segs));
        ix->nsegs -= drop;
    }
}

int idempotency_log_sync(idempotency_t *ix, int64_t now_ms)
{
    idem_segment_t *active;

    if (ix->dir == NULL)
        return 0;
    if (ix->queue_len > 0 && write_queue(ix) != 0)
        return ING_EIO;
    active = &ix->segs[ix->nsegs - 1];
    /* A segment also ends after a quarter of the window, so that expired
     * entries leave the disk at most that much later than the memory. */
    if (ix->active_size >= segment_bytes(ix) ||
        (ix->active_size > 0 &&
         now_ms - ix->active_opened_ms > (int64_t)(ix->opts.window_ms / 4))) {
        if (open_active(ix, active->seq + 1) != 0)
            log_write_limited("idempotency_log_rotate", 5, LOG_LEVEL_ERROR,
                              "starting a new idempotency log segment failed; "
                              "appending to the current one",
                              "dir=%s error=\"%s\"", ix->dir,
                              strerror(errno));
    }
    delete_old_segments(ix, now_ms);
    return 0;
}
