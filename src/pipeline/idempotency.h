/* The idempotency index: which keys each device has used, and the message
 * ids that the first acceptance of each key produced.
 *
 * A key is claimed when a batch that carries it is built, committed with
 * its message ids once the spool made the batch durable, and released when
 * the batch fails. A claim of a committed key is a replay: the caller
 * replies with the original ids and stores nothing. A claim of a key whose
 * batch is still in flight is busy. Keys expire `window_ms` after the
 * batch was received. Past `max_keys`, the oldest committed keys are
 * evicted early.
 *
 * Persistence is a segmented log of (received_ms, device, key, message id)
 * frames in its own folder, written by the spool follower
 * (idempotency_follow_start), which reads every durable spool record and
 * commits its spool cursor only after the log frames of those records were
 * synced. The spool keeps a segment until that cursor passed it, so every
 * key of an acknowledged record is in the log, in the spool, or in both.
 * docs/idempotency.md gives the full argument.
 *
 * Every function is thread-safe: one mutex guards the table.
 */
#ifndef INGESTD_PIPELINE_IDEMPOTENCY_H
#define INGESTD_PIPELINE_IDEMPOTENCY_H

#include <stddef.h>
#include <stdint.h>

#include "spool/spool.h"

#define IDEMPOTENCY_KEY_MAX 255 /* bytes of one key */
#define IDEMPOTENCY_ID_BYTES 16 /* a binary UUID */

typedef struct idempotency idempotency_t;
typedef struct idempotency_follow idempotency_follow_t;

typedef struct idempotency_options {
    const char *dir;    /* log folder, created if missing; NULL: no log */
    uint64_t window_ms; /* lifetime of a committed key */
    uint64_t max_keys;  /* committed keys kept in memory */
    int fsync;          /* 1: fdatasync the log before the spool cursor */
    /* Bytes after which the log starts a new segment; 0 means 8 MiB. */
    uint64_t segment_bytes;
} idempotency_options_t;

enum idempotency_claim_result {
    IDEMPOTENCY_NEW = 0,    /* reserved for the caller's batch */
    IDEMPOTENCY_REPLAY = 1, /* committed earlier: the original ids */
    IDEMPOTENCY_BUSY = 2,   /* reserved by another batch in flight */
};

/* Opens the index and loads every log segment in `opts->dir`, oldest
 * first, skipping entries older than the window. A torn or corrupt tail of
 * a segment is truncated away and logged. Returns 0, or ING_EIO or
 * ING_ENOMEM with a message in `err`. */
int idempotency_open(const idempotency_options_t *opts, idempotency_t **out,
                     char *err, size_t errlen);

/* Frees the index. The follower must be stopped first. Accepts NULL. */
void idempotency_close(idempotency_t *ix);

/* Looks up `key` of `device`. When it is absent or expired, reserves it
 * for `owner` and returns IDEMPOTENCY_NEW. When it is committed, copies
 * its ids into a new malloc'd array in `*ids` (count in `*nids`, the
 * caller frees it) and returns IDEMPOTENCY_REPLAY. Returns
 * IDEMPOTENCY_BUSY when another owner reserved it, or ING_ENOMEM. */
int idempotency_claim(idempotency_t *ix, const char *device, const char *key,
                      size_t key_len, const void *owner, int64_t now_ms,
                      uint8_t **ids, size_t *nids);

/* Turns the reservation of `owner` into a committed key with `nids` ids
 * (16 bytes each) and the batch's receive time. Does nothing when `owner`
 * has no reservation of that key. Returns 0 or ING_ENOMEM, which
 * releases the reservation. */
int idempotency_commit(idempotency_t *ix, const char *device,
                       const char *key, size_t key_len, const void *owner,
                       int64_t received_ms, const uint8_t *ids, size_t nids);

/* Drops the reservation of `owner`, so that the key can be claimed again.
 * Does nothing when `owner` has none. */
void idempotency_release(idempotency_t *ix, const char *device,
                         const char *key, size_t key_len, const void *owner);

/* Adds one id to a committed key, as read back from the log or the spool.
 * An entry with the same receive time gains the id (one batch stores
 * several records under one key), an older entry is replaced, and a newer
 * one is kept. Entries already expired at `now_ms` are skipped. Returns 0
 * or ING_ENOMEM. */
int idempotency_restore(idempotency_t *ix, const char *device,
                        const char *key, size_t key_len, int64_t received_ms,
                        const uint8_t id[IDEMPOTENCY_ID_BYTES],
                        int64_t now_ms);

/* Removes committed keys that expired at `now_ms`. Returns how many. */
size_t idempotency_expire(idempotency_t *ix, int64_t now_ms);

/* Committed and reserved keys, and the bytes the table uses. */
size_t idempotency_key_count(idempotency_t *ix);
size_t idempotency_bytes(idempotency_t *ix);

/* Queues one log frame. Call only from the follower's thread (or before
 * it starts); idempotency_log_sync writes the queue. Returns 0 or
 * ING_ENOMEM. */
int idempotency_log_append(idempotency_t *ix, int64_t received_ms,
                           const char *device, const char *key,
                           size_t key_len,
                           const uint8_t id[IDEMPOTENCY_ID_BYTES]);

/* Writes the queued frames to the active segment and, with fsync on,
 * fdatasyncs it. Then starts a new segment when the active one is full,
 * and deletes old segments whose every entry expired or lies beyond the
 * newest max_keys keys. Returns 0, or ING_EIO when the write or sync
 * failed: the queue is then dropped, and the caller appends the frames
 * again from their source. */
int idempotency_log_sync(idempotency_t *ix, int64_t now_ms);

/* Starts following `spool` with the reader named "idempotency". First,
 * on the calling thread, it restores and logs every durable record after
 * that reader's cursor: records acknowledged before a crash whose keys may
 * be missing from the log. Then a thread keeps logging new records.
 * Returns 0, or a negative ing_error with a message in `err`. */
int idempotency_follow_start(idempotency_t *ix, spool_t *spool,
                             idempotency_follow_t **out, char *err,
                             size_t errlen);

/* Stops the follower thread and closes its reader. Accepts NULL. */
void idempotency_follow_stop(idempotency_follow_t *f);

/* Converts a canonical UUID text (36 characters) to 16 bytes and back.
 * Parsing returns 0 or ING_EINVAL. */
int idempotency_uuid_parse(const char *text, uint8_t id[IDEMPOTENCY_ID_BYTES]);
void idempotency_uuid_format(const uint8_t id[IDEMPOTENCY_ID_BYTES],
                             char text[37]);

/* Returns the wall-clock time in milliseconds since the epoch, the clock
 * of receive times and of the window. */
int64_t idempotency_now_ms(void);

/* Parses "2026-12-04T17:00:00.123Z" (the envelope's received_at) into
 * milliseconds since the epoch. Returns 0 or ING_EINVAL. */
int idempotency_parse_time(const char *text, int64_t *ms);

#endif
