/* The spool: an append-only, segmented log on local disk that holds every
 * accepted record until every sink has delivered it.
 *
 * Segments are files named by the position of their first byte
 * (00000000000000000000.seg). Each record is framed as a 4-byte little-endian
 * payload length, a 4-byte little-endian CRC32C of the payload, then the
 * payload. A position (spool_pos_t) is a byte offset in the concatenation of
 * all segments ever written, so it only grows.
 *
 * One writer thread appends. Everything queued while the previous
 * fdatasync ran is written and synced together (group commit), and each
 * caller's completion runs only after the fdatasync covering its records
 * returned. Readers see only records that are durable.
 */
#ifndef INGESTD_SPOOL_SPOOL_H
#define INGESTD_SPOOL_SPOOL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

typedef uint64_t spool_pos_t;
typedef struct spool spool_t;
typedef struct spool_reader spool_reader_t;

typedef struct spool_options {
    const char *dir;       /* created if missing */
    int fsync;             /* 1: fdatasync before completion; 0: lossy */
    uint64_t segment_size; /* start a new segment past this many bytes */
    uint64_t max_size;     /* ING_EFULL past this many bytes on disk */
    uint64_t max_record;   /* largest payload accepted */
} spool_options_t;

/* Completion of spool_append, called on the writer thread. `status` is 0
 * when the records are durable, or ING_EIO when the write or fdatasync
 * failed (the records must then be treated as not stored). The callback
 * must not block; it typically hands the result to an event loop. */
typedef void (*spool_done_fn)(void *arg, int status);

/* Opens the spool in `opts->dir`, recovering what is on disk: every
 * complete record is kept, and a torn or corrupt tail of the last segment
 * is truncated, with a log line saying how many bytes were dropped and where.
 * Starts the writer thread. Returns 0, or a negative ing_error with a
 * message in `err`. */
int spool_open(const spool_options_t *opts, spool_t **out, char *err,
               size_t errlen);

/* Queues `count` payloads for appending, as one unit: either all of them
 * are queued or none is. The payload bytes are copied before this returns.
 * `done` is called once, for the whole unit.
 * Returns 0; ING_EFULL when the spool holds max_size bytes or more (the
 * caller answers "try later", nothing is queued); ING_ETOOBIG for a payload
 * over max_record; ING_EINVAL for an empty payload (an all-zero frame is
 * what a crash can leave behind, so it is never valid); ING_ENOMEM;
 * ING_ESHUTDOWN after spool_close started. A max_size of 0 means no limit,
 * and a max_record of 0 means the frame format's limit of 4 GiB - 1. */
int spool_append(spool_t *s, const struct iovec *payloads, size_t count,
                 spool_done_fn done, void *arg);

/* Bytes on disk in all segments, including records queued and not yet
 * written. Thread-safe. */
uint64_t spool_size_bytes(spool_t *s);

/* Returns 1 when spool_size_bytes has reached max_size. */
int spool_is_full(spool_t *s);

/* Position just past the last durable record. */
spool_pos_t spool_durable_end(spool_t *s);

/* Sets the histogram source: each fdatasync's duration in seconds is
 * passed to `observe`, on the writer thread, when set. */
void spool_set_sync_observer(spool_t *s, void (*observe)(double seconds));

/* Stops accepting appends, writes and syncs what is queued (running its
 * completions), stops the writer thread and frees the spool. Readers must
 * be closed first. */
void spool_close(spool_t *s);

/* One record handed to a reader. `data` stays valid until the next call of
 * spool_reader_next or spool_reader_close on the same reader. */
typedef struct spool_record {
    const void *data;
    size_t len;
    spool_pos_t pos; /* position of the record's frame */
    spool_pos_t end; /* position just past it: commit this */
} spool_record_t;

/* Opens the reader `name` (a sink's name), which starts at its committed
 * cursor, stored in `dir`/cursors/`name`, or at the oldest record when it
 * has none. The cursor file is created at once, and every cursor file
 * holds back segment deletion, also while its reader is closed. `name` is
 * 1 to 64 characters of [A-Za-z0-9_.-] and does not start with a dot.
 * Returns 0, ING_EINVAL for a bad name, ING_EEXIST when a reader of that
 * name is open, ING_EIO or ING_ENOMEM. */
int spool_reader_open(spool_t *s, const char *name, spool_reader_t **out);

/* Reads up to `max` durable records after the reader's read position into
 * `recs`, waiting up to `timeout_ms` when none is available (a negative
 * timeout waits until data, spool_reader_wake or spool_close).
 * Stores the number read in `*n` (0 on timeout). Returns 0 or one of:
 * ING_ECORRUPT when a record failed its checksum, which is logged, and the
 * reader skipped to the next segment. ING_EIO when reading a segment
 * failed, which is worth retrying later. ING_ESHUTDOWN when the spool is
 * closing. */
int spool_reader_next(spool_reader_t *r, spool_record_t *recs, size_t max,
                      int timeout_ms, size_t *n);

/* Moves the read position back to the committed cursor, so that records
 * read but not committed are read again (after a failed delivery). */
void spool_reader_rewind(spool_reader_t *r);

/* Durably records that everything before `pos` was delivered: writes the
 * cursor file atomically (write, fsync, rename, fsync of the folder).
 * Segments that every reader has committed past are then deleted.
 * A `pos` at or before the committed cursor changes nothing. Returns 0,
 * ING_EINVAL for a `pos` past the durable end, or ING_EIO. */
int spool_reader_commit(spool_reader_t *r, spool_pos_t pos);

/* The committed cursor, and the committed cursor's lag behind the durable
 * end in bytes. Both are safe to call from any thread. */
spool_pos_t spool_reader_committed(spool_reader_t *r);
uint64_t spool_reader_lag_bytes(spool_reader_t *r);

/* Wakes a reader blocked in spool_reader_next so that it returns at once. */
void spool_reader_wake(spool_reader_t *r);

void spool_reader_close(spool_reader_t *r);

/* CRC32C (Castagnoli) of `len` bytes, continuing from `crc` (start at 0). */
uint32_t spool_crc32c(uint32_t crc, const void *data, size_t len);

#endif
