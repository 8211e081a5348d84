/* The idempotency keys of one pipeline batch: the request-level key set by
 * the adapter, the per-reading keys taken from idempotency.field, and the
 * message ids the batch reports (new ones and original ones of replays).
 * Internal to the pipeline module; adapters use pipeline.h.
 */
#ifndef INGESTD_PIPELINE_IDEMPOTENCY_BATCH_H
#define INGESTD_PIPELINE_IDEMPOTENCY_BATCH_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "core/config.h"
#include "core/ids.h"
#include "core/metrics.h"
#include "pipeline/idempotency.h"
#include "spool/spool.h"

/* The index and its settings, shared by every batch of a pipeline. */
typedef struct idem_pipeline {
    idempotency_t *ix;
    idempotency_follow_t *follow;
    char *field; /* reading field of per-reading keys, or NULL */
} idem_pipeline_t;

/* A key reserved by the batch for one of its readings. */
typedef struct idem_claim {
    char *key;
    size_t len;
    size_t id_index; /* of the reading's id in the reported ids */
} idem_claim_t;

typedef struct idem_batch {
    idem_pipeline_t *ip; /* NULL when idempotency is off */
    const char *device;  /* borrowed from the batch */
    const char *protocol;

    char (*ids)[UUID_STR_LEN]; /* reported, one per accepted reading */
    size_t id_count, id_cap;

    char *request_key; /* reserved request-level key, or NULL */
    size_t request_len;
    int request_replay; /* the whole batch repeats an earlier one */

    idem_claim_t *claims;
    size_t claim_count, claim_cap;
    char number[24]; /* an integer key as text */

    size_t replayed; /* reported ids that are original ones */
    size_t busy;     /* readings whose key another batch holds */
    int settled;     /* claims committed or released */
} idem_batch_t;

enum idem_reading {
    IDEM_STORE = 0,    /* store the reading, under the key returned */
    IDEM_ANSWERED = 1, /* not stored: replayed or busy */
};

/* Opens the index under <data_dir>/idempotency and starts following
 * `spool`. Stores NULL in `*out` when idempotency is off or there is no
 * spool (check-config). Returns 0 or a negative ing_error with `err`. */
int idem_pipeline_create(const config_t *cfg, spool_t *spool,
                         idem_pipeline_t **out, char *err, size_t errlen);
void idem_pipeline_destroy(idem_pipeline_t *ip);

void idem_batch_init(idem_batch_t *ib, idem_pipeline_t *ip,
                     const char *device, const char *protocol);

/* Claims the request-level key. Returns 0 (new or replayed), ING_EBUSY,
 * ING_EINVAL for a key that is empty, over IDEMPOTENCY_KEY_MAX bytes, not
 * UTF-8 or with control characters, or ING_ENOMEM. */
int idem_batch_set_request_key(idem_batch_t *ib, const char *key,
                               size_t len);

/* Decides what happens to a valid reading: stored (with the key to put in
 * its envelope in `*key`, or NULL) or answered from the index. Returns an
 * enum idem_reading or ING_ENOMEM. */
int idem_batch_check_reading(idem_batch_t *ib, const json_t *reading,
                             const char **key, size_t *len);

/* Records the id of a reading that will be stored. Returns 0 or
 * ING_ENOMEM. */
int idem_batch_push_id(idem_batch_t *ib, const char *id);

/* Commits the batch's reserved keys when `status` is 0, else releases
 * them. Runs once; later calls do nothing. */
void idem_batch_settle(idem_batch_t *ib, int status, int64_t received_ms);

/* Releases what is still reserved and frees the lists. */
void idem_batch_clear(idem_batch_t *ib);

#endif
