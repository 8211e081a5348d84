/* Idempotency keys of pipeline batches (see idempotency_batch.h). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/log.h"
#include "pipeline/idempotency_batch.h"

/* A cursor left by an earlier run with idempotency on would hold back
 * segment deletion. serve removes it before opening the spool, so this
 * warns only when that removal failed. */
static void warn_stale_cursor(const config_t *cfg)
{
    char path[4096];

    snprintf(path, sizeof(path), "%s/spool/cursors/idempotency",
             cfg->data_dir);
    if (access(path, F_OK) == 0)
        log_warn("idempotency is off, but its spool cursor remains and "
                 "holds back segment deletion; stop ingestd and delete it",
                 "file=%s", path);
}

int idem_pipeline_create(const config_t *cfg, spool_t *spool,
                         idem_pipeline_t **out, char *err, size_t errlen)
{
    idempotency_options_t opts = {0};
    char dir[4096];
    idem_pipeline_t *ip;
    int rc;

    *out = NULL;
    if (spool == NULL)
        return 0;
    if (!cfg->idempotency.enabled) {
        warn_stale_cursor(cfg);
        return 0;
    }
    ip = calloc(1, sizeof(*ip));
    if (ip == NULL)
        return ING_ENOMEM;
    if (cfg->idempotency.field != NULL) {
        ip->field = strdup(cfg->idempotency.field);
        if (ip->field == NULL) {
            free(ip);
            return ING_ENOMEM;
        }
    }
    snprintf(dir, sizeof(dir), "%s/idempotency", cfg->data_dir);
    opts.dir = dir;
    opts.window_ms = cfg->idempotency.window_ms;
    opts.max_keys = cfg->idempotency.max_keys;
    opts.fsync = cfg->spool.durability == SPOOL_DURABILITY_FSYNC;
    rc = idempotency_open(&opts, &ip->ix, err, errlen);
    if (rc == 0)
        rc = idempotency_follow_start(ip->ix, spool, &ip->follow, err,
                                      errlen);
    if (rc != 0) {
        idem_pipeline_destroy(ip);
        return rc;
    }
    *out = ip;
    return 0;
}

void idem_pipeline_destroy(idem_pipeline_t *ip)
{
    if (ip == NULL)
        return;
    idempotency_follow_stop(ip->follow);
    idempotency_close(ip->ix);
    free(ip->field);
    free(ip);
}

void idem_batch_init(idem_batch_t *ib, idem_pipeline_t *ip,
                     const char *device, const char *protocol)
{
    memset(ib, 0, sizeof(*ib));
    ib->ip = ip;
    ib->device = device;
    ib->protocol = protocol;
}

static void count_hit(const idem_batch_t *ib)
{
    char labels[64];

    snprintf(labels, sizeof(labels), "protocol=\"%s\"", ib->protocol);
    metrics_counter_add(
        metrics_counter("ingestd_idempotency_hits_total",
                        "Readings and requests answered with the message "
                        "ids of an earlier acceptance of their key, by "
                        "protocol.",
                        labels),
        1);
}

/* A key is 1 to IDEMPOTENCY_KEY_MAX bytes of UTF-8 without control
 * characters, so that it fits the log and prints in an envelope. */
static int valid_key(const char *key, size_t len)
{
    json_t *text;

    if (len == 0 || len > IDEMPOTENCY_KEY_MAX)
        return 0;
    for (size_t i = 0; i < len; i++) {
        if ((uint8_t)key[i] < 0x20 || key[i] == 0x7f)
            return 0;
    }
    text = json_stringn(key, len); /* NULL unless valid UTF-8 */
    json_decref(text);
    return text != NULL;
}

int idem_batch_push_id(idem_batch_t *ib, const char *id)
{
    if (ib->id_count == ib->id_cap) {
        size_t cap = ib->id_cap ? ib->id_cap * 2 : 8;
        char(*grown)[UUID_STR_LEN] = realloc(ib->ids, cap * sizeof(*grown));
        if (grown == NULL)
            return ING_ENOMEM;
        ib->ids = grown;
        ib->id_cap = cap;
    }
    memcpy(ib->ids[ib->id_count++], id, UUID_STR_LEN);
    return 0;
}

/* Reports the original ids of a replayed key. */
static int push_binary_ids(idem_batch_t *ib, const uint8_t *ids, size_t n)
{
    char text[UUID_STR_LEN];

    for (size_t i = 0; i < n; i++) {
        idempotency_uuid_format(ids + i * IDEMPOTENCY_ID_BYTES, text);
        if (idem_batch_push_id(ib, text) != 0)
            return ING_ENOMEM;
    }
    return 0;
}

int idem_batch_set_request_key(idem_batch_t *ib, const char *key,
                               size_t len)
{
    uint8_t *ids = NULL;
    size_t nids = 0;
    int rc;

    if (ib->ip == NULL)
        return 0;
    if (ib->request_key != NULL || ib->request_replay || !valid_key(key, len))
        return ING_EINVAL;
    rc = idempotency_claim(ib->ip->ix, ib->device, key, len, ib,
                           idempotency_now_ms(), &ids, &nids);
    switch (rc) {
    case IDEMPOTENCY_NEW:
        ib->request_key = strndup(key, len);
        if (ib->request_key == NULL) {
            idempotency_release(ib->ip->ix, ib->device, key, len, ib);
            return ING_ENOMEM;
        }
        ib->request_len = len;
        return 0;
    case IDEMPOTENCY_REPLAY:
        rc = push_binary_ids(ib, ids, nids);
        free(ids);
        if (rc != 0)
            return rc;
        ib->request_replay = 1;
        ib->replayed = nids;
        count_hit(ib);
        return 0;
    case IDEMPOTENCY_BUSY:
        return ING_EBUSY;
    default:
        return rc;
    }
}

/* Finds the reading's own key in the configured field: a string, or an
 * integer written in decimal. Returns NULL when there is none usable. */
static const char *reading_key(idem_batch_t *ib, const json_t *reading,
                               size_t *len)
{
    const json_t *v;

    if (ib->ip->field == NULL || !json_is_object(reading))
        return NULL;
    v = json_object_get(reading, ib->ip->field);
    if (json_is_integer(v)) {
        *len = (size_t)snprintf(ib->number, sizeof(ib->number),
                                "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return ib->number;
    }
    if (!json_is_string(v) ||
        !valid_key(json_string_value(v), json_string_length(v)))
        return NULL;
    *len = json_string_length(v);
    return json_string_value(v);
}

static int add_claim(idem_batch_t *ib, const char *key, size_t len)
{
    idem_claim_t *c;

    if (ib->claim_count == ib->claim_cap) {
        size_t cap = ib->claim_cap ? ib->claim_cap * 2 : 4;
        idem_claim_t *grown = realloc(ib->claims, cap * sizeof(*grown));
        if (grown == NULL)
            return ING_ENOMEM;
        ib->claims = grown;
        ib->claim_cap = cap;
    }
    c = &ib->claims[ib->claim_count];
    c->key = strndup(key, len);
    if (c->key == NULL)
        return ING_ENOMEM;
    c->len = len;
    c->id_index = ib->id_count;
    ib->claim_count++;
    return 0;
}

int idem_batch_check_reading(idem_batch_t *ib, const json_t *reading,
                             const char **key, size_t *len)
{
    uint8_t *ids = NULL;
    size_t nids = 0;
    const char *k;
    int rc;

    *key = NULL;
    *len = 0;
    if (ib->ip == NULL)
        return IDEM_STORE;
    if (ib->request_key != NULL) {
        *key = ib->request_key;
        *len = ib->request_len;
        return IDEM_STORE;
    }
    k = reading_key(ib, reading, len);
    if (k == NULL)
        return IDEM_STORE;
    /* The same key twice in one batch: the second reading repeats the
     * first, which this batch stores. */
    for (size_t i = 0; i < ib->claim_count; i++) {
        const idem_claim_t *c = &ib->claims[i];
        if (c->len == *len && memcmp(c->key, k, *len) == 0 &&
            c->id_index < ib->id_count) {
            ib->replayed++;
            count_hit(ib);
            return idem_batch_push_id(ib, ib->ids[c->id_index]) == 0
                       ? IDEM_ANSWERED
                       : ING_ENOMEM;
        }
    }
    rc = idempotency_claim(ib->ip->ix, ib->device, k, *len, ib,
                           idempotency_now_ms(), &ids, &nids);
    switch (rc) {
    case IDEMPOTENCY_NEW:
        if (add_claim(ib, k, *len) != 0) {
            idempotency_release(ib->ip->ix, ib->device, k, *len, ib);
            return ING_ENOMEM;
        }
        *key = ib->claims[ib->claim_count - 1].key;
        return IDEM_STORE;
    case IDEMPOTENCY_REPLAY:
        /* A key first used for a whole request maps to several ids, and
         * a reading repeating it gets the first. */
        rc = push_binary_ids(ib, ids, 1);
        free(ids);
        if (rc != 0)
            return rc;
        ib->replayed++;
        count_hit(ib);
        return IDEM_ANSWERED;
    case IDEMPOTENCY_BUSY:
        ib->busy++;
        return IDEM_ANSWERED;
    default:
        return rc;
    }
}

static void commit_request(idem_batch_t *ib, int64_t received_ms)
{
    uint8_t *ids = malloc(ib->id_count * IDEMPOTENCY_ID_BYTES + 1);
    size_t n = 0;

    for (size_t i = 0; ids != NULL && i < ib->id_count; i++) {
        if (idempotency_uuid_parse(ib->ids[i], ids + n * IDEMPOTENCY_ID_BYTES)
            == 0)
            n++;
    }
    if (ids == NULL ||
        idempotency_commit(ib->ip->ix, ib->device, ib->request_key,
                           ib->request_len, ib, received_ms, ids, n) != 0) {
        /* The key stays unknown in memory until the follower's log is
         * read at the next start, so a repeat before then is stored. */
        log_write_limited("idempotency_commit", 5, LOG_LEVEL_ERROR,
                          "recording an idempotency key failed: out of memory",
                          "device=%s", ib->device);
        idempotency_release(ib->ip->ix, ib->device, ib->request_key,
                            ib->request_len, ib);
    }
    free(ids);
}

void idem_batch_settle(idem_batch_t *ib, int status, int64_t received_ms)
{
    uint8_t id[IDEMPOTENCY_ID_BYTES];

    if (ib->ip == NULL || ib->settled)
        return;
    ib->settled = 1;
    if (ib->request_key != NULL) {
        if (status == 0)
            commit_request(ib, received_ms);
        else
            idempotency_release(ib->ip->ix, ib->device, ib->request_key,
                                ib->request_len, ib);
    }
    for (size_t i = 0; i < ib->claim_count; i++) {
        const idem_claim_t *c = &ib->claims[i];
        int stored = status == 0 && c->id_index < ib->id_count &&
                     idempotency_uuid_parse(ib->ids[c->id_index], id) == 0;
        if (!stored ||
            idempotency_commit(ib->ip->ix, ib->device, c->key, c->len, ib,
                               received_ms, id, 1) != 0)
            idempotency_release(ib->ip->ix, ib->device, c->key, c->len, ib);
    }
}

void idem_batch_clear(idem_batch_t *ib)
{
    idem_batch_settle(ib, ING_ESHUTDOWN, 0);
    for (size_t i = 0; i < ib->claim_count; i++)
        free(ib->claims[i].key);
    free(ib->claims);
    free(ib->ids);
    free(ib->request_key);
}
