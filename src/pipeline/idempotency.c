/* The in-memory table of the idempotency index: a chained hash table of
 * (device, key) entries plus a FIFO list of committed entries, oldest
 * first, which expiry and eviction walk.
 *
 * Memory accounting counts each entry's allocation (header, device id and
 * key), extra id arrays and the bucket array. It does not count malloc's
 * own overhead, so RSS grows somewhat faster than ingestd_idempotency_bytes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/errors.h"
#include "core/log.h"
#include "pipeline/idempotency_internal.h"

#define INITIAL_BUCKETS 1024

int64_t idempotency_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t idem_hash(const char *device, const char *key, size_t key_len)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (const char *p = device; *p != '\0'; p++) {
        h ^= (uint8_t)*p;
        h *= UINT64_C(1099511628211);
    }
    h *= UINT64_C(1099511628211); /* the NUL between device and key */
    for (size_t i = 0; i < key_len; i++) {
        h ^= (uint8_t)key[i];
        h *= UINT64_C(1099511628211);
    }
    return h;
}

static size_t entry_size(const idem_entry_t *e)
{
    return sizeof(*e) + e->device_len + 1u + e->key_len;
}

static void update_gauges(idempotency_t *ix)
{
    metrics_gauge_set(ix->keys_gauge, (int64_t)ix->entries);
    metrics_gauge_set(ix->bytes_gauge, (int64_t)ix->bytes);
}

static idem_entry_t **find_slot(idempotency_t *ix, uint64_t hash,
                                const char *device, const char *key,
                                size_t key_len)
{
    idem_entry_t **slot = &ix->buckets[hash & (ix->bucket_count - 1)];
    size_t device_len = strlen(device);

    for (; *slot != NULL; slot = &(*slot)->chain) {
        const idem_entry_t *e = *slot;
        if (e->hash == hash && e->device_len == device_len &&
            e->key_len == key_len && memcmp(e->text, device, device_len) == 0 &&
            memcmp(e->text + device_len + 1, key, key_len) == 0)
            return slot;
    }
    return slot;
}

/* Doubles the bucket array once the table has as many entries as it has
 * buckets. A failed allocation keeps the old array, which only makes the
 * chains longer. */
static void maybe_grow(idempotency_t *ix)
{
    size_t count = ix->bucket_count * 2;
    idem_entry_t **grown;

    if (ix->entries < ix->bucket_count)
        return;
    grown = calloc(count, sizeof(*grown));
    if (grown == NULL)
        return;
    for (size_t i = 0; i < ix->bucket_count; i++) {
        idem_entry_t *e = ix->buckets[i], *next;
        for (; e != NULL; e = next) {
            next = e->chain;
            e->chain = grown[e->hash & (count - 1)];
            grown[e->hash & (count - 1)] = e;
        }
    }
    free(ix->buckets);
    ix->bytes += (count - ix->bucket_count) * sizeof(*grown);
    ix->buckets = grown;
    ix->bucket_count = count;
}

static void fifo_unlink(idempotency_t *ix, idem_entry_t *e)
{
    if (e->older != NULL)
        e->older->newer = e->newer;
    else
        ix->oldest = e->newer;
    if (e->newer != NULL)
        e->newer->older = e->older;
    else
        ix->newest = e->older;
    e->older = e->newer = NULL;
}

static void fifo_push(idempotency_t *ix, idem_entry_t *e)
{
    e->older = ix->newest;
    e->newer = NULL;
    if (ix->newest != NULL)
        ix->newest->newer = e;
    else
        ix->oldest = e;
    ix->newest = e;
}

static void free_ids(idempotency_t *ix, idem_entry_t *e)
{
    if (e->nids > 1)
        ix->bytes -= (e->nids - 1) * sizeof(*e->more);
    free(e->more);
    e->more = NULL;
    e->nids = 0;
}

/* Unlinks the entry at `slot` from everything and frees it. */
static void remove_at(idempotency_t *ix, idem_entry_t **slot)
{
    idem_entry_t *e = *slot;

    *slot = e->chain;
    if (e->owner == NULL) {
        fifo_unlink(ix, e);
        ix->committed--;
    }
    free_ids(ix, e);
    ix->bytes -= entry_size(e);
    ix->entries--;
    free(e);
}

/* Removes the committed entry `e`, searching its bucket for the slot. */
static void remove_entry(idempotency_t *ix, idem_entry_t *e)
{
    idem_entry_t **slot = &ix->buckets[e->hash & (ix->bucket_count - 1)];

    while (*slot != e)
        slot = &(*slot)->chain;
    remove_at(ix, slot);
}

static idem_entry_t *insert_new(idempotency_t *ix, idem_entry_t **slot,
                                uint64_t hash, const char *device,
                                const char *key, size_t key_len)
{
    size_t device_len = strlen(device);
    idem_entry_t *e = calloc(1, sizeof(*e) + device_len + 1 + key_len);

    if (e == NULL)
        return NULL;
    e->hash = hash;
    e->device_len = (uint16_t)device_len;
    e->key_len = (uint16_t)key_len;
    memcpy(e->text, device, device_len + 1);
    memcpy(e->text + device_len + 1, key, key_len);
    e->chain = *slot;
    *slot = e;
    ix->entries++;
    ix->bytes += entry_size(e);
    return e;
}

/* Sets the ids of `e`. Returns 0 or ING_ENOMEM. */
static int set_ids(idempotency_t *ix, idem_entry_t *e, const uint8_t *ids,
                   size_t nids)
{
    free_ids(ix, e);
    if (nids > 1) {
        e->more = malloc((nids - 1) * sizeof(*e->more));
        if (e->more == NULL)
            return ING_ENOMEM;
        memcpy(e->more, ids + IDEMPOTENCY_ID_BYTES,
               (nids - 1) * sizeof(*e->more));
        ix->bytes += (nids - 1) * sizeof(*e->more);
    }
    memcpy(e->first, ids, IDEMPOTENCY_ID_BYTES);
    e->nids = (uint32_t)nids;
    return 0;
}

static const uint8_t *id_at(const idem_entry_t *e, size_t i)
{
    return i == 0 ? e->first : e->more[i - 1];
}

static int expired(const idempotency_t *ix, int64_t received_ms,
                   int64_t now_ms)
{
    return received_ms + (int64_t)ix->opts.window_ms <= now_ms;
}

/* Evicts the oldest committed keys while there are more than max_keys. */
static void evict_over_limit(idempotency_t *ix)
{
    uint64_t evicted = 0;

    while (ix->committed > ix->opts.max_keys && ix->oldest != NULL) {
        remove_entry(ix, ix->oldest);
        evicted++;
    }
    if (evicted > 0) {
        metrics_counter_add(ix->evictions, evicted);
        log_write_limited("idempotency_evicted", 1, LOG_LEVEL_WARN,
                          "idempotency keys evicted before their window "
                          "ended; repeats of them will be stored again",
                          "evicted=%llu max_keys=%llu",
                          (unsigned long long)evicted,
                          (unsigned long long)ix->opts.max_keys);
    }
}

int idempotency_open(const idempotency_options_t *opts, idempotency_t **out,
                     char *err, size_t errlen)
{
    idempotency_t *ix = calloc(1, sizeof(*ix));
    int rc;

    if (ix == NULL)
        return ING_ENOMEM;
    pthread_mutex_init(&ix->lock, NULL);
    ix->opts = *opts;
    ix->dir_fd = ix->active_fd = -1;
    ix->bucket_count = INITIAL_BUCKETS;
    ix->buckets = calloc(ix->bucket_count, sizeof(*ix->buckets));
    if (ix->buckets == NULL) {
        idempotency_close(ix);
        return ING_ENOMEM;
    }
    ix->bytes = sizeof(*ix) + ix->bucket_count * sizeof(*ix->buckets);
    ix->keys_gauge = metrics_gauge(
        "ingestd_idempotency_keys",
        "Idempotency keys in memory, committed and in flight.", NULL);
    ix->bytes_gauge = metrics_gauge(
        "ingestd_idempotency_bytes",
        "Bytes allocated by the idempotency index, without malloc overhead.",
        NULL);
    ix->evictions = metrics_counter(
        "ingestd_idempotency_evictions_total",
        "Idempotency keys dropped before their window ended because the "
        "index held idempotency.max_keys keys.",
        NULL);
    if (opts->dir != NULL) {
        ix->dir = strdup(opts->dir);
        if (ix->dir == NULL) {
            idempotency_close(ix);
            return ING_ENOMEM;
        }
        rc = idem_log_open(ix, idempotency_now_ms(), err, errlen);
        if (rc != 0) {
            idempotency_close(ix);
            return rc;
        }
    }
    update_gauges(ix);
    *out = ix;
    return 0;
}

void idempotency_close(idempotency_t *ix)
{
    if (ix == NULL)
        return;
    idem_log_close(ix);
    for (size_t i = 0; ix->buckets != NULL && i < ix->bucket_count; i++) {
        idem_entry_t *e = ix->buckets[i], *next;
        for (; e != NULL; e = next) {
            next = e->chain;
            free(e->more);
            free(e);
        }
    }
    free(ix->buckets);
    free(ix->dir);
    pthread_mutex_destroy(&ix->lock);
    metrics_gauge_set(ix->keys_gauge, 0);
    metrics_gauge_set(ix->bytes_gauge, 0);
    free(ix);
}

static int copy_ids(const idem_entry_t *e, uint8_t **ids, size_t *nids)
{
    uint8_t *copy = malloc((size_t)e->nids * IDEMPOTENCY_ID_BYTES);

    if (copy == NULL)
        return ING_ENOMEM;
    for (size_t i = 0; i < e->nids; i++)
        memcpy(copy + i * IDEMPOTENCY_ID_BYTES, id_at(e, i),
               IDEMPOTENCY_ID_BYTES);
    *ids = copy;
    *nids = e->nids;
    return 0;
}

int idempotency_claim(idempotency_t *ix, const char *device, const char *key,
                      size_t key_len, const void *owner, int64_t now_ms,
                      uint8_t **ids, size_t *nids)
{
    uint64_t hash = idem_hash(device, key, key_len);
    idem_entry_t **slot;
    int rc = IDEMPOTENCY_NEW;

    pthread_mutex_lock(&ix->lock);
    slot = find_slot(ix, hash, device, key, key_len);
    if (*slot != NULL && (*slot)->owner == NULL &&
        expired(ix, (*slot)->received_ms, now_ms))
        remove_at(ix, slot);
    if (*slot != NULL) {
        if ((*slot)->owner != NULL)
            rc = IDEMPOTENCY_BUSY;
        else
            rc = copy_ids(*slot, ids, nids) == 0 ? IDEMPOTENCY_REPLAY
                                                 : ING_ENOMEM;
        goto done;
    }
    if (insert_new(ix, slot, hash, device, key, key_len) == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    (*slot)->owner = owner;
    maybe_grow(ix);
    update_gauges(ix);
done:
    pthread_mutex_unlock(&ix->lock);
    return rc;
}

int idempotency_commit(idempotency_t *ix, const char *device,
                       const char *key, size_t key_len, const void *owner,
                       int64_t received_ms, const uint8_t *ids, size_t nids)
{
    uint64_t hash = idem_hash(device, key, key_len);
    idem_entry_t **slot;
    int rc = 0;

    pthread_mutex_lock(&ix->lock);
    slot = find_slot(ix, hash, device, key, key_len);
    if (*slot == NULL || (*slot)->owner != owner || owner == NULL)
        goto done;
    if (nids == 0 || set_ids(ix, *slot, ids, nids) != 0) {
        remove_at(ix, slot);
        rc = nids == 0 ? 0 : ING_ENOMEM;
        goto done;
    }
    (*slot)->owner = NULL;
    (*slot)->received_ms = received_ms;
    fifo_push(ix, *slot);
    ix->committed++;
    evict_over_limit(ix);
done:
    update_gauges(ix);
    pthread_mutex_unlock(&ix->lock);
    return rc;
}

void idempotency_release(idempotency_t *ix, const char *device,
                         const char *key, size_t key_len, const void *owner)
{
    uint64_t hash = idem_hash(device, key, key_len);
    idem_entry_t **slot;

    pthread_mutex_lock(&ix->lock);
    slot = find_slot(ix, hash, device, key, key_len);
    if (*slot != NULL && owner != NULL && (*slot)->owner == owner)
        remove_at(ix, slot);
    update_gauges(ix);
    pthread_mutex_unlock(&ix->lock);
}

/* Appends `id` to a committed entry unless it is there already, as when
 * the log and the spool both hold the same record. */
static int add_id(idempotency_t *ix, idem_entry_t *e, const uint8_t *id)
{
    uint8_t(*grown)[IDEMPOTENCY_ID_BYTES];

    for (size_t i = 0; i < e->nids; i++) {
        if (memcmp(id_at(e, i), id, IDEMPOTENCY_ID_BYTES) == 0)
            return 0;
    }
    grown = realloc(e->more, e->nids * sizeof(*grown));
    if (grown == NULL)
        return ING_ENOMEM;
    memcpy(grown[e->nids - 1], id, IDEMPOTENCY_ID_BYTES);
    e->more = grown;
    e->nids++;
    ix->bytes += sizeof(*grown);
    return 0;
}

int idempotency_restore(idempotency_t *ix, const char *device,
                        const char *key, size_t key_len, int64_t received_ms,
                        const uint8_t id[IDEMPOTENCY_ID_BYTES],
                        int64_t now_ms)
{
    uint64_t hash = idem_hash(device, key, key_len);
    idem_entry_t **slot, *e;
    int rc = 0;

    if (expired(ix, received_ms, now_ms))
        return 0;
    pthread_mutex_lock(&ix->lock);
    slot = find_slot(ix, hash, device, key, key_len);
    e = *slot;
    if (e != NULL && e->owner != NULL)
        goto done;
    if (e != NULL && e->received_ms == received_ms) {
        rc = add_id(ix, e, id);
        goto done;
    }
    if (e != NULL && e->received_ms > received_ms)
        goto done;
    if (e != NULL) {
        /* The key was used again after an earlier use expired. */
        fifo_unlink(ix, e);
        ix->committed--;
    } else {
        e = insert_new(ix, slot, hash, device, key, key_len);
        if (e == NULL) {
            rc = ING_ENOMEM;
            goto done;
        }
    }
    set_ids(ix, e, id, 1);
    e->received_ms = received_ms;
    fifo_push(ix, e);
    ix->committed++;
    maybe_grow(ix);
    evict_over_limit(ix);
done:
    update_gauges(ix);
    pthread_mutex_unlock(&ix->lock);
    return rc;
}

size_t idempotency_expire(idempotency_t *ix, int64_t now_ms)
{
    size_t n = 0;

    pthread_mutex_lock(&ix->lock);
    /* The list is in commit order, which follows receive order closely
     * but not exactly, so an expired entry can sit behind a live one for
     * a while. A claim checks expiry itself, so that only delays the
     * memory's release. */
    while (ix->oldest != NULL && expired(ix, ix->oldest->received_ms, now_ms)) {
        remove_entry(ix, ix->oldest);
        n++;
    }
    if (n > 0)
        update_gauges(ix);
    pthread_mutex_unlock(&ix->lock);
    return n;
}

size_t idempotency_key_count(idempotency_t *ix)
{
    size_t n;

    pthread_mutex_lock(&ix->lock);
    n = ix->entries;
    pthread_mutex_unlock(&ix->lock);
    return n;
}

size_t idempotency_bytes(idempotency_t *ix)
{
    size_t n;

    pthread_mutex_lock(&ix->lock);
    n = ix->bytes;
    pthread_mutex_unlock(&ix->lock);
    return n;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int idempotency_uuid_parse(const char *text, uint8_t id[IDEMPOTENCY_ID_BYTES])
{
    size_t j = 0;

    for (size_t i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return ING_EINVAL;
            continue;
        }
        int hi = hex_value(text[i]);
        if (hi < 0)
            return ING_EINVAL;
        int lo = hex_value(text[i + 1]);
        if (lo < 0)
            return ING_EINVAL;
        id[j++] = (uint8_t)(hi << 4 | lo);
        i++;
    }
    return text[36] == '\0' ? 0 : ING_EINVAL;
}

void idempotency_uuid_format(const uint8_t id[IDEMPOTENCY_ID_BYTES],
                             char text[37])
{
    static const char digits[] = "0123456789abcdef";
    size_t j = 0;

    for (size_t i = 0; i < IDEMPOTENCY_ID_BYTES; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            text[j++] = '-';
        text[j++] = digits[id[i] >> 4];
        text[j++] = digits[id[i] & 15];
    }
    text[j] = '\0';
}

int idempotency_parse_time(const char *text, int64_t *ms)
{
    struct tm tm = {0};
    int millis = 0;
    const char *rest = strptime(text, "%Y-%m-%dT%H:%M:%S", &tm);

    if (rest == NULL)
        return ING_EINVAL;
    if (sscanf(rest, ".%3dZ", &millis) != 1 || millis < 0)
        return ING_EINVAL;
    *ms = (int64_t)timegm(&tm) * 1000 + millis;
    return 0;
}
