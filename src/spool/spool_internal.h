/* State shared by the files of the spool module: the writer (spool.c),
 * recovery (recovery.c) and readers with their cursors (reader.c).
 * Not part of the module interface.
 */
#ifndef INGESTD_SPOOL_SPOOL_INTERNAL_H
#define INGESTD_SPOOL_SPOOL_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "core/metrics.h"
#include "spool/spool.h"

/* Each frame starts with a 4-byte length and a 4-byte CRC32C. */
#define SPOOL_FRAME_HEADER 8

/* Segment file names: 20 decimal digits of the base position and ".seg". */
#define SPOOL_SEGMENT_NAME_LEN 24
#define SPOOL_SEGMENT_SUFFIX ".seg"

#define SPOOL_DEFAULT_SEGMENT_SIZE (64u * 1024 * 1024)
#define SPOOL_CURSORS_DIR "cursors"

typedef struct spool_segment {
    spool_pos_t base; /* position of the first byte, also the file name */
    uint64_t size;    /* bytes that belong to the log, from base */
} spool_segment_t;

/* The committed position of one reader name, loaded from cursors/ at open
 * or created when a reader of that name first opened. It stays in the
 * table after the reader closes, so that a stopped sink still holds back
 * segment deletion. */
typedef struct spool_cursor {
    char *name;
    spool_pos_t committed;
    int open; /* 1 while a spool_reader_t of this name is open */
} spool_cursor_t;

typedef struct spool_completion {
    spool_done_fn done;
    void *arg;
} spool_completion_t;

/* Framed bytes and completions of appends that wait for the writer. */
typedef struct spool_batch {
    uint8_t *data;
    size_t len;
    size_t cap;
    spool_completion_t *completions;
    size_t ncompletions;
    size_t completions_cap;
    uint64_t records;
} spool_batch_t;

struct spool {
    spool_options_t opts;
    char *dir;
    int dir_fd;     /* the spool folder, for fsync after creating files */
    int cursors_fd; /* the cursors folder, for fsync after renames */
    int lock_fd;    /* holds an flock on LOCK while the spool is open */

    /* `lock` guards every field below up to the writer-only section. */
    pthread_mutex_t lock;
    pthread_cond_t writer_cv;  /* pending appends or closing */
    pthread_cond_t durable_cv; /* durable_end moved, a wake, or closing */
    spool_segment_t *segs;     /* oldest first; the last one is active */
    size_t nsegs;
    size_t segs_cap;
    spool_pos_t durable_end;
    uint64_t queued_bytes; /* framed bytes accepted and not yet on disk */
    spool_batch_t pending;
    int closing;
    spool_cursor_t *cursors;
    size_t ncursors;
    size_t cursors_cap;

    /* Only the writer thread (and open/close, when it is not running)
     * touches these. */
    pthread_t writer;
    int writer_started;
    int active_fd;
    spool_pos_t active_base;
    uint64_t active_size;
    int rotate_next; /* a failed truncate left junk: start a new segment */

    _Atomic(void (*)(double)) observe;

    metrics_counter_t *appends_total;
    metrics_counter_t *records_total;
    metrics_counter_t *truncated_total;
};

struct spool_reader {
    spool_t *spool;
    char *name;
    spool_pos_t read_pos;
    _Atomic uint64_t committed;
    int woken; /* guarded by spool->lock */

    int fd;              /* open segment, or -1 */
    spool_pos_t fd_base; /* base of the segment `fd` refers to */
    uint8_t *buf;        /* records handed out point into it */
    size_t buf_cap;
};

enum spool_frame_check {
    SPOOL_FRAME_OK = 0,
    SPOOL_FRAME_SHORT = 1, /* more bytes are needed, see *need */
    SPOOL_FRAME_BAD = 2,   /* torn, past the segment end, or bad CRC */
};

/* Checks the frame at `p`, of which `avail` bytes are in memory, while
 * `room` bytes of the segment remain from the frame's start. Stores the
 * payload length in `*len` when the header is readable, and the bytes
 * needed for the whole frame in `*need` when SPOOL_FRAME_SHORT. */
int spool_frame_check(const uint8_t *p, size_t avail, uint64_t room,
                      uint32_t *len, size_t *need);

/* Writes the file name of the segment at `base` into `name`. */
void spool_segment_name(char name[SPOOL_SEGMENT_NAME_LEN + 1],
                        spool_pos_t base);

/* Lists and verifies the segments in s->dir, truncates a torn tail of the
 * last one, and fills s->segs and s->durable_end. Creates the first
 * segment at `fresh_base` when there is none. Opens the last segment as
 * s->active_fd. Returns 0, or a negative ing_error with a message in
 * `err`. */
int spool_recover(spool_t *s, spool_pos_t fresh_base, char *err, size_t errlen);

/* Loads every cursor file in cursors/ into s->cursors and stores the
 * highest committed position in `*max_pos`. Returns 0 or a negative
 * ing_error with a message in `err`. */
int spool_cursors_load(spool_t *s, spool_pos_t *max_pos, char *err,
                       size_t errlen);

/* Moves cursors that point past the durable end back to it, since the
 * records they passed are gone (lossy mode after a power loss). */
void spool_cursors_clamp(spool_t *s);

/* Deletes segments that every cursor has committed past, never the active
 * one. Nothing is deleted while no cursor exists. */
void spool_delete_segments(spool_t *s);

void spool_cursors_free(spool_t *s);

/* Formats the text of errno value `err` as a logfmt value in `buf`. */
const char *spool_strerror(char *buf, size_t size, int err);

/* Reads exactly `len` bytes at `off`. Returns the bytes read, which is
 * less than `len` only at the end of the file, or -1 with errno set. */
ssize_t spool_pread_full(int fd, void *buf, size_t len, uint64_t off);

#endif
