/* Shared between the idempotency table (idempotency.c), its log
 * (idempotency_log.c) and the spool follower (idempotency_follow.c). */
#ifndef INGESTD_PIPELINE_IDEMPOTENCY_INTERNAL_H
#define INGESTD_PIPELINE_IDEMPOTENCY_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include "core/metrics.h"
#include "pipeline/idempotency.h"

/* One key of one device. A reserved entry has an owner and is only in its
 * hash bucket. A committed entry has no owner and is also in the FIFO list
 * that expiry and eviction walk from the oldest end. */
typedef struct idem_entry {
    struct idem_entry *chain; /* next in the hash bucket */
    struct idem_entry *older; /* FIFO neighbours, committed entries only */
    struct idem_entry *newer;
    const void *owner;        /* the reserving batch, NULL once committed */
    uint8_t (*more)[IDEMPOTENCY_ID_BYTES]; /* ids after the first */
    int64_t received_ms;
    uint64_t hash;
    uint32_t nids;
    uint16_t device_len;
    uint16_t key_len;
    uint8_t first[IDEMPOTENCY_ID_BYTES];
    char text[]; /* the device id, a NUL, then the key bytes */
} idem_entry_t;

/* One file of the log, named by its sequence number. */
typedef struct idem_segment {
    uint64_t seq;
    int64_t max_ms; /* newest receive time of its frames */
    uint64_t keys;  /* frames that start a new (device, key, time) */
} idem_segment_t;

struct idempotency {
    pthread_mutex_t lock;
    idempotency_options_t opts;
    char *dir; /* NULL when there is no log */

    idem_entry_t **buckets;
    size_t bucket_count; /* a power of two */
    size_t entries;      /* reserved and committed */
    size_t committed;
    size_t bytes;
    idem_entry_t *oldest;
    idem_entry_t *newest;

    metrics_gauge_t *keys_gauge;
    metrics_gauge_t *bytes_gauge;
    metrics_counter_t *evictions;

    /* The log, touched only by the thread that opened the index and then
     * by the follower's thread. */
    int dir_fd;
    int active_fd;
    uint64_t active_size;
    int64_t active_opened_ms;
    idem_segment_t *segs; /* oldest first; the last one is active */
    size_t nsegs, segs_cap;
    uint8_t *queue; /* frames waiting for idempotency_log_sync */
    size_t queue_len, queue_cap;
    uint64_t last_frame_hash; /* identity of the previous frame appended */
    int64_t last_frame_ms;
};

/* Loads the log segments in ix->dir and opens a new active segment.
 * Called by idempotency_open. */
int idem_log_open(idempotency_t *ix, int64_t now_ms, char *err,
                  size_t errlen);
void idem_log_close(idempotency_t *ix);

/* FNV-1a over the device id, a NUL and the key. */
uint64_t idem_hash(const char *device, const char *key, size_t key_len);


#endif
