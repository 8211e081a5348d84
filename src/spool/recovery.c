/* Recovery at open: lists the segments, verifies every frame, and cuts a
 * torn or corrupt tail off the last segment.
 *
 * A crash can leave only the last segment with a partial batch, since the
 * writer never appends to an older one. Damage inside an older segment is
 * not a crash artefact: recovery logs it and leaves the bytes in place,
 * and readers skip from the bad frame to the end of that segment.
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
#include "core/log.h"
#include "spool/spool_internal.h"

#define SCAN_BUFFER_SIZE (1024 * 1024)

/* Parses a segment file name: 20 digits followed by ".seg". */
static int parse_segment_name(const char *name, spool_pos_t *base)
{
    spool_pos_t v = 0;

    if (strlen(name) != SPOOL_SEGMENT_NAME_LEN ||
        strcmp(name + 20, SPOOL_SEGMENT_SUFFIX) != 0)
        return -1;
    for (int i = 0; i < 20; i++) {
        if (name[i] < '0' || name[i] > '9')
            return -1;
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (spool_pos_t)(name[i] - '0');
    }
    *base = v;
    return 0;
}

static int compare_segments(const void *a, const void *b)
{
    const spool_segment_t *x = a;
    const spool_segment_t *y = b;

    return x->base < y->base ? -1 : x->base > y->base;
}

static int push_segment(spool_t *s, spool_pos_t base)
{
    if (s->nsegs == s->segs_cap) {
        size_t cap = s->segs_cap ? s->segs_cap * 2 : 16;
        spool_segment_t *segs = realloc(s->segs, cap * sizeof(*segs));
        if (segs == NULL)
            return ING_ENOMEM;
        s->segs = segs;
        s->segs_cap = cap;
    }
    s->segs[s->nsegs++] = (spool_segment_t){.base = base, .size = 0};
    return 0;
}

static int list_segments(spool_t *s, char *err, size_t errlen)
{
    int fd = dup(s->dir_fd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    struct dirent *de;
    int rc = 0;

    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "listing spool folder %s failed: %s", s->dir,
                 strerror(errno));
        return ING_EIO;
    }
    while ((de = readdir(d)) != NULL) {
        spool_pos_t base;
        if (parse_segment_name(de->d_name, &base) < 0)
            continue;
        rc = push_segment(s, base);
        if (rc < 0) {
            snprintf(err, errlen, "out of memory");
            break;
        }
    }
    closedir(d);
    if (rc == 0 && s->nsegs > 1)
        qsort(s->segs, s->nsegs, sizeof(*s->segs), compare_segments);
    return rc;
}

/* Verifies the frames of `fd` from offset 0 up to `limit` bytes and stores
 * the end of the last good frame in `*valid`. Returns 0, or -1 with errno
 * set when reading failed (then nothing may be truncated). */
static int scan_frames(int fd, uint64_t limit, uint64_t *valid)
{
    size_t cap = SCAN_BUFFER_SIZE;
    uint8_t *buf = malloc(cap);
    uint64_t pos = 0;
    int rc = 0;

    if (buf == NULL) {
        errno = ENOMEM;
        return -1;
    }
    while (pos < limit) {
        uint64_t left = limit - pos;
        size_t want = left < cap ? (size_t)left : cap;
        ssize_t got = spool_pread_full(fd, buf, want, pos);
        size_t off = 0;
        int bad = 0;

        if (got < 0) {
            rc = -1;
            break;
        }
        while (off < (size_t)got) {
            uint32_t len;
            size_t need = 0;
            int st = spool_frame_check(buf + off, (size_t)got - off,
                                       limit - pos - off, &len, &need);
            if (st == SPOOL_FRAME_OK) {
                off += SPOOL_FRAME_HEADER + len;
                continue;
            }
            if (st == SPOOL_FRAME_SHORT && (size_t)got == want) {
                /* The frame continues past the buffer: grow it when even
                 * the whole buffer cannot hold this one frame. */
                if (off == 0 && need > cap) {
                    uint8_t *bigger = realloc(buf, need);
                    if (bigger == NULL) {
                        errno = ENOMEM;
                        rc = -1;
                        goto done;
                    }
                    buf = bigger;
                    cap = need;
                }
                break;
            }
            bad = 1;
            break;
        }
        pos += off;
        if (bad || (got == 0))
            break;
    }
done:
    free(buf);
    *valid = pos;
    return rc;
}

static uint64_t file_size(int fd)
{
    struct stat st;

    if (fstat(fd, &st) < 0)
        return 0;
    return (uint64_t)st.st_size;
}

/* Checks a segment that is not the last. Its size is fixed by the next
 * segment's base. Damage is logged and left for readers to skip. */
static int check_old_segment(spool_t *s, size_t i, char *err, size_t errlen)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];
    spool_segment_t *seg = &s->segs[i];
    uint64_t logical = s->segs[i + 1].base - seg->base;
    uint64_t on_disk, valid;
    int fd;

    spool_segment_name(name, seg->base);
    fd = openat(s->dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "opening spool segment %s/%s failed: %s", s->dir,
                 name, strerror(errno));
        return ING_EIO;
    }
    on_disk = file_size(fd);
    if (scan_frames(fd, on_disk < logical ? on_disk : logical, &valid) < 0) {
        snprintf(err, errlen, "reading spool segment %s/%s failed: %s", s->dir,
                 name, strerror(errno));
        close(fd);
        return ING_EIO;
    }
    close(fd);
    if (valid < logical)
        log_error("spool segment has a corrupt or missing record; readers "
                  "will skip the rest of the segment",
                  "segment=%s pos=%" PRIu64 " skipped_bytes=%" PRIu64, name,
                  seg->base + valid, logical - valid);
    if (on_disk > logical)
        log_warn("spool segment is longer than the next segment's start; "
                 "the extra bytes are ignored",
                 "segment=%s extra_bytes=%" PRIu64, name, on_disk - logical);
    seg->size = logical;
    return 0;
}

/* Checks the last segment, truncates a torn tail and keeps it open as the
 * active segment. */
static int recover_last_segment(spool_t *s, char *err, size_t errlen)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];
    spool_segment_t *seg = &s->segs[s->nsegs - 1];
    uint64_t on_disk, valid;
    int fd;

    spool_segment_name(name, seg->base);
    fd = openat(s->dir_fd, name, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "opening spool segment %s/%s failed: %s", s->dir,
                 name, strerror(errno));
        return ING_EIO;
    }
    on_disk = file_size(fd);
    if (scan_frames(fd, on_disk, &valid) < 0) {
        snprintf(err, errlen, "reading spool segment %s/%s failed: %s", s->dir,
                 name, strerror(errno));
        close(fd);
        return ING_EIO;
    }
    if (valid < on_disk) {
        /* The cut must be durable before new records land behind it, or a
         * second crash could join old junk and new frames. */
        if (ftruncate(fd, (off_t)valid) < 0 || fdatasync(fd) < 0) {
            snprintf(err, errlen, "truncating spool segment %s/%s failed: %s",
                     s->dir, name, strerror(errno));
            close(fd);
            return ING_EIO;
        }
        log_warn("truncated torn tail of spool segment",
                 "segment=%s pos=%" PRIu64 " dropped_bytes=%" PRIu64, name,
                 seg->base + valid, on_disk - valid);
        metrics_counter_add(s->truncated_total, on_disk - valid);
    }
    seg->size = valid;
    s->active_fd = fd;
    s->active_base = seg->base;
    s->active_size = valid;
    s->durable_end = seg->base + valid;
    return 0;
}

static int create_first_segment(spool_t *s, spool_pos_t base, char *err,
                                size_t errlen)
{
    char name[SPOOL_SEGMENT_NAME_LEN + 1];
    int fd;

    spool_segment_name(name, base);
    fd = openat(s->dir_fd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0 || fsync(s->dir_fd) < 0) {
        snprintf(err, errlen, "creating spool segment %s/%s failed: %s", s->dir,
                 name, strerror(errno));
        if (fd >= 0)
            close(fd);
        return ING_EIO;
    }
    close(fd);
    return push_segment(s, base);
}

int spool_recover(spool_t *s, spool_pos_t fresh_base, char *err, size_t errlen)
{
    int rc = list_segments(s, err, errlen);

    if (rc < 0)
        return rc;
    if (s->nsegs == 0) {
        rc = create_first_segment(s, fresh_base, err, errlen);
        if (rc < 0)
            return rc;
    }
    for (size_t i = 0; i + 1 < s->nsegs; i++) {
        rc = check_old_segment(s, i, err, errlen);
        if (rc < 0)
            return rc;
    }
    return recover_last_segment(s, err, errlen);
}
