/* The spool follower: a spool reader named "idempotency" that copies the
 * key of every durable record into the idempotency log.
 *
 * Its cursor is committed only after the log frames of the records before
 * it were synced, and the spool deletes no segment that a cursor has not
 * passed. So a record whose key is not yet in the log is still in the
 * spool, where the next start finds it (idempotency_follow_start reads
 * everything after the cursor before the listeners open).
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "core/errors.h"
#include "core/log.h"
#include "pipeline/idempotency_internal.h"

#define READER_NAME "idempotency"
#define READ_BATCH 512
#define WAIT_MS 1000

struct idempotency_follow {
    idempotency_t *ix;
    spool_reader_t *reader;
    pthread_t thread;
    int thread_started;
    atomic_int stop;
};

/* Copies the key of one record into the log and, with `restore`, into the
 * table. Records without a key, or whose envelope does not parse, are
 * skipped. Returns 0 or ING_ENOMEM. */
static int index_record(idempotency_t *ix, const spool_record_t *rec,
                        int restore, int64_t now_ms)
{
    static const char marker[] = "\"idempotency_key\":";
    uint8_t id[IDEMPOTENCY_ID_BYTES];
    const char *device, *key, *message_id, *received_at;
    size_t key_len;
    int64_t received_ms;
    json_t *doc;
    int rc = 0;

    /* Most records carry no key, and a byte search is far cheaper than
     * parsing them. */
    if (memmem(rec->data, rec->len, marker, sizeof(marker) - 1) == NULL)
        return 0;
    doc = json_loadb(rec->data, rec->len, 0, NULL);
    if (doc == NULL)
        return 0;
    key = json_string_value(json_object_get(doc, "idempotency_key"));
    key_len = json_string_length(json_object_get(doc, "idempotency_key"));
    device = json_string_value(json_object_get(doc, "device_id"));
    message_id = json_string_value(json_object_get(doc, "message_id"));
    received_at = json_string_value(json_object_get(doc, "received_at"));
    if (key == NULL || device == NULL || message_id == NULL ||
        received_at == NULL || key_len == 0 ||
        key_len > IDEMPOTENCY_KEY_MAX ||
        idempotency_uuid_parse(message_id, id) != 0 ||
        idempotency_parse_time(received_at, &received_ms) != 0)
        goto done;
    if (restore)
        rc = idempotency_restore(ix, device, key, key_len, received_ms, id,
                                 now_ms);
    if (rc == 0)
        rc = idempotency_log_append(ix, received_ms, device, key, key_len,
                                    id);
    if (rc == ING_EINVAL)
        rc = 0;
done:
    json_decref(doc);
    return rc;
}

/* Logs the keys of `n` records, syncs the log and commits the cursor past
 * them. On failure the reader rewinds, so the records are read again. */
static int index_records(idempotency_follow_t *f, const spool_record_t *recs,
                         size_t n, int restore)
{
    int64_t now_ms = idempotency_now_ms();
    int rc = 0;

    for (size_t i = 0; i < n && rc == 0; i++)
        rc = index_record(f->ix, &recs[i], restore, now_ms);
    if (rc == 0)
        rc = idempotency_log_sync(f->ix, now_ms);
    if (rc == 0 && n > 0)
        rc = spool_reader_commit(f->reader, recs[n - 1].end);
    if (rc != 0) {
        f->ix->queue_len = 0;
        spool_reader_rewind(f->reader);
    }
    return rc;
}

static void *follow_main(void *arg)
{
    idempotency_follow_t *f = arg;
    spool_record_t recs[READ_BATCH];
    size_t n;
    int rc;

    while (!atomic_load(&f->stop)) {
        rc = spool_reader_next(f->reader, recs, READ_BATCH, WAIT_MS, &n);
        if (rc == ING_ESHUTDOWN)
            break;
        if (rc == ING_EIO) {
            sleep(1);
            continue;
        }
        if (rc != 0)
            continue;
        idempotency_expire(f->ix, idempotency_now_ms());
        if (index_records(f, recs, n, 0) != 0) {
            log_write_limited("idempotency_follow", 5, LOG_LEVEL_ERROR,
                              "indexing spool records failed; retrying in "
                              "a second",
                              "records=%zu", n);
            sleep(1);
        }
    }
    return NULL;
}

/* Reads every durable record after the cursor, restoring its key. */
static int catch_up(idempotency_follow_t *f, char *err, size_t errlen)
{
    spool_record_t *recs = malloc(READ_BATCH * sizeof(*recs));
    size_t n, total = 0;
    int rc;

    if (recs == NULL)
        return ING_ENOMEM;
    for (;;) {
        rc = spool_reader_next(f->reader, recs, READ_BATCH, 0, &n);
        if (rc == ING_ECORRUPT)
            continue; /* logged; the reader moved to the next segment */
        if (rc != 0 || n == 0)
            break;
        rc = index_records(f, recs, n, 1);
        if (rc != 0)
            break;
        total += n;
    }
    free(recs);
    if (rc != 0) {
        snprintf(err, errlen,
                 "reading the spool to rebuild the idempotency index "
                 "failed: %s",
                 ing_strerror(rc));
        return rc;
    }
    log_info("idempotency index caught up with the spool",
             "records=%zu keys=%zu", total, idempotency_key_count(f->ix));
    return 0;
}

int idempotency_follow_start(idempotency_t *ix, spool_t *spool,
                             idempotency_follow_t **out, char *err,
                             size_t errlen)
{
    idempotency_follow_t *f = calloc(1, sizeof(*f));
    int rc;

    if (f == NULL)
        return ING_ENOMEM;
    f->ix = ix;
    rc = spool_reader_open(spool, READER_NAME, &f->reader);
    if (rc != 0) {
        snprintf(err, errlen, "cannot open the spool reader \"%s\": %s",
                 READER_NAME, ing_strerror(rc));
        free(f);
        return rc;
    }
    rc = catch_up(f, err, errlen);
    if (rc == 0 && pthread_create(&f->thread, NULL, follow_main, f) != 0) {
        snprintf(err, errlen, "cannot start the idempotency thread");
        rc = ING_ENOMEM;
    }
    if (rc != 0) {
        spool_reader_close(f->reader);
        free(f);
        return rc;
    }
    f->thread_started = 1;
    *out = f;
    return 0;
}

void idempotency_follow_stop(idempotency_follow_t *f)
{
    if (f == NULL)
        return;
    atomic_store(&f->stop, 1);
    spool_reader_wake(f->reader);
    if (f->thread_started)
        pthread_join(f->thread, NULL);
    spool_reader_close(f->reader);
    free(f);
}
