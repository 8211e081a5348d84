#include "pipeline/pipeline.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pthread.h>

#include "core/errors.h"
#include "core/ids.h"
#include "core/log.h"
#include "pipeline/rawjson.h"
#include "pipeline/idempotency_batch.h"
#include "pipeline/flow.h"
#include "validate/validate.h"

typedef struct compiled_type {
    char *name;
    schema_t *schema;
} compiled_type_t;

struct pipeline {
    spool_t *spool;
    compiled_type_t *types;
    size_t type_count;
    idem_pipeline_t *idem; /* NULL when idempotency is off */
    const config_t *cfg;
    pipeline_flow_t *flow;
};

struct pipeline_loop {
    pipeline_t *pipeline;
    uv_loop_t *loop;
    uv_async_t async;
    pthread_mutex_t lock;
    pipeline_batch_t *completed; /* filled by the spool writer thread */
    size_t pending;              /* touched on the loop thread only */
};

/* An accepted reading, already serialized as its spool record. */
typedef struct envelope {
    char id[UUID_STR_LEN];
    char *json;
    size_t len;
} envelope_t;

struct pipeline_batch {
    pipeline_loop_t *pl;
    auth_device_t dev;
    char protocol[16];
    char *content_type;
    json_t *metadata; /* extra envelope fields, or NULL */
    const schema_t *schema;
    char received_at[32];
    /* The minified JSON text of the reading being added by
     * pipeline_batch_add_raw, stored in place of its jansson form. */
    const char *raw_payload;
    size_t raw_payload_len;
    int64_t received_ms; /* received_at as a number */
    idem_batch_t idem; /* idempotency keys and the reported ids */

    envelope_t *accepted;
    size_t accepted_count;
    size_t accepted_cap;

    json_t *errors; /* array of {"index":i,"errors":[...]} */
    size_t count;
    size_t invalid;
    size_t forbidden;

    pipeline_done_fn done;
    void *done_arg;
    int status;
    pipeline_batch_t *next_completed;

    uint64_t retry_after_ms; /* after ING_ERATE or ING_EQUOTA */
    int retrying;            /* the adapter holds and resubmits it */
    int turned_away;         /* counted once by flow control */
};

static const schema_t *find_schema(const pipeline_t *p, const char *type)
{
    for (size_t i = 0; i < p->type_count; i++) {
        if (strcmp(p->types[i].name, type) == 0)
            return p->types[i].schema;
    }
    return NULL;
}

int pipeline_create(const config_t *cfg, spool_t *spool, pipeline_t **out,
                    char *err, size_t errlen)
{
    char schema_err[512];
    pipeline_t *p = calloc(1, sizeof(*p));
    int rc;

    if (p == NULL)
        return ING_ENOMEM;
    p->spool = spool;
    p->cfg = cfg;
    if (pipeline_flow_create(cfg, spool, &p->flow) != 0) {
        free(p);
        return ING_ENOMEM;
    }
    p->types = calloc(cfg->device_type_count ? cfg->device_type_count : 1,
                      sizeof(*p->types));
    if (p->types == NULL) {
        pipeline_flow_destroy(p->flow);
        free(p);
        return ING_ENOMEM;
    }
    for (size_t i = 0; i < cfg->device_type_count; i++) {
        const config_device_type_t *t = &cfg->device_types[i];
        compiled_type_t *ct = &p->types[p->type_count];

        ct->name = strdup(t->name);
        if (ct->name == NULL) {
            pipeline_destroy(p);
            return ING_ENOMEM;
        }
        p->type_count++;
        if (schema_compile(t->schema, &ct->schema, schema_err,
                           sizeof(schema_err)) != 0) {
            snprintf(err, errlen, "device type \"%s\" (schema %s): %s",
                     t->name, t->schema_path ? t->schema_path : "inline",
                     schema_err);
            pipeline_destroy(p);
            return ING_ECONFIG;
        }
    }
    rc = idem_pipeline_create(cfg, spool, &p->idem, err, errlen);
    if (rc != 0) {
        pipeline_destroy(p);
        return rc;
    }
    *out = p;
    return 0;
}

void pipeline_destroy(pipeline_t *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->type_count; i++) {
        free(p->types[i].name);
        schema_free(p->types[i].schema);
    }
    free(p->types);
    idem_pipeline_destroy(p->idem);
    pipeline_flow_destroy(p->flow);
    free(p);
}

int pipeline_spool_full(pipeline_t *p)
{
    return pipeline_flow_congested(p->flow);
}

limits_t *pipeline_limits(pipeline_t *p)
{
    return pipeline_flow_limits(p->flow);
}

const config_t *pipeline_config(pipeline_t *p)
{
    return p->cfg;
}

int pipeline_device_connect(pipeline_t *p, const auth_device_t *dev)
{
    return limits_device_connect(pipeline_limits(p), dev->id,
                                 p->cfg->limits.max_connections_per_device,
                                 limits_now_ms());
}

void pipeline_device_disconnect(pipeline_t *p, const auth_device_t *dev)
{
    if (p->cfg->limits.max_connections_per_device > 0)
        limits_device_disconnect(pipeline_limits(p), dev->id);
}

void pipeline_count_rejected(const char *protocol, const char *reason)
{
    pipeline_flow_count(protocol, reason, 0);
}

pipeline_t *pipeline_loop_pipeline(pipeline_loop_t *pl)
{
    return pl->pipeline;
}

/* Runs on the loop thread after the spool writer handed over completed
 * batches. The list is taken whole under the lock, then each completion
 * runs without it. */
static void on_completions(uv_async_t *handle)
{
    pipeline_loop_t *pl = handle->data;
    pipeline_batch_t *list, *next;

    pthread_mutex_lock(&pl->lock);
    list = pl->completed;
    pl->completed = NULL;
    pthread_mutex_unlock(&pl->lock);

    for (; list; list = next) {
        next = list->next_completed;
        list->next_completed = NULL;
        pl->pending--;
        list->done(list, list->status, list->done_arg);
    }
}

pipeline_loop_t *pipeline_loop_attach(pipeline_t *p, uv_loop_t *loop)
{
    pipeline_loop_t *pl = calloc(1, sizeof(*pl));

    if (pl == NULL)
        return NULL;
    pl->pipeline = p;
    pl->loop = loop;
    pthread_mutex_init(&pl->lock, NULL);
    if (uv_async_init(loop, &pl->async, on_completions) != 0) {
        pthread_mutex_destroy(&pl->lock);
        free(pl);
        return NULL;
    }
    pl->async.data = pl;
    return pl;
}

static void on_async_closed(uv_handle_t *handle)
{
    pipeline_loop_t *pl = handle->data;

    pthread_mutex_destroy(&pl->lock);
    free(pl);
}

void pipeline_loop_detach(pipeline_loop_t *pl)
{
    if (pl->pending > 0) {
        log_error("pipeline detached with batches pending",
                  "pending=%zu", pl->pending);
    }
    uv_close((uv_handle_t *)&pl->async, on_async_closed);
}

size_t pipeline_loop_pending(pipeline_loop_t *pl)
{
    return pl->pending;
}

static void format_now(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, len - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

pipeline_batch_t *pipeline_batch_new(pipeline_loop_t *pl,
                                     const auth_device_t *dev,
                                     const char *protocol,
                                     const char *content_type)
{
    pipeline_batch_t *b = calloc(1, sizeof(*b));

    if (b == NULL)
        return NULL;
    b->pl = pl;
    b->dev = *dev;
    snprintf(b->protocol, sizeof(b->protocol), "%s", protocol);
    if (content_type != NULL) {
        b->content_type = strdup(content_type);
        if (b->content_type == NULL)
            goto error;
    }
    b->errors = json_array();
    if (b->errors == NULL)
        goto error;
    b->schema = find_schema(pl->pipeline, dev->type);
    format_now(b->received_at, sizeof(b->received_at));
    idempotency_parse_time(b->received_at, &b->received_ms);
    idem_batch_init(&b->idem, pl->pipeline->idem, b->dev.id, b->protocol);
    return b;

error:
    free(b->content_type);
    free(b);
    return NULL;
}

/* Appends {"index":i,"errors":[{"pointer":p,"reason":r}, ...]}. */
static int record_errors(pipeline_batch_t *b, size_t index,
                         const validate_errors_t *errs, const char *pointer,
                         const char *reason)
{
    json_t *list = json_array();
    json_t *entry;

    if (list == NULL)
        return ING_ENOMEM;
    if (errs != NULL) {
        for (size_t i = 0; i < errs->count; i++) {
            json_array_append_new(
                list, json_pack("{s:s, s:s}", "pointer",
                                errs->items[i].pointer, "reason",
                                errs->items[i].reason));
        }
    } else {
        json_array_append_new(
            list, json_pack("{s:s, s:s}", "pointer", pointer, "reason", reason));
    }
    entry = json_pack("{s:I, s:o}", "index", (json_int_t)index, "errors", list);
    if (entry == NULL)
        return ING_ENOMEM;
    return json_array_append_new(b->errors, entry) == 0 ? 0 : ING_ENOMEM;
}

/* Serializes the envelope `env`, which has no "payload" yet, and appends
 * "payload" with the JSON text `raw`, so that the stored reading keeps the
 * device's bytes. Returns a malloc'd string and its length, or NULL. */
static char *dump_with_payload(const json_t *env, const char *raw,
                               size_t raw_len, size_t *len)
{
    static const char member[] = ",\"payload\":";
    char *head = json_dumps(env, JSON_COMPACT | JSON_PRESERVE_ORDER);
    size_t head_len, n;
    char *out;

    if (head == NULL)
        return NULL;
    /* The envelope is a non-empty object, so it ends with its '}'. */
    head_len = strlen(head) - 1;
    out = malloc(head_len + sizeof(member) - 1 + raw_len + 2);
    if (out != NULL) {
        memcpy(out, head, head_len);
        n = head_len;
        memcpy(out + n, member, sizeof(member) - 1);
        n += sizeof(member) - 1;
        memcpy(out + n, raw, raw_len);
        n += raw_len;
        out[n++] = '}';
        out[n] = '\0';
        *len = n;
    }
    free(head);
    return out;
}

static int append_envelope(pipeline_batch_t *b, const json_t *reading,
                           const char *key, size_t key_len)
{
    envelope_t *e;
    json_t *env;

    if (b->accepted_count == b->accepted_cap) {
        size_t cap = b->accepted_cap ? b->accepted_cap * 2 : 8;
        envelope_t *grown = realloc(b->accepted, cap * sizeof(*grown));
        if (grown == NULL)
            return ING_ENOMEM;
        b->accepted = grown;
        b->accepted_cap = cap;
    }
    e = &b->accepted[b->accepted_count];
    if (ids_uuid7(e->id) != 0)
        return ING_EIO;
    env = json_pack("{s:s, s:s, s:s, s:s, s:s}", "message_id", e->id,
                    "device_id", b->dev.id, "device_type", b->dev.type,
                    "protocol", b->protocol, "received_at", b->received_at);
    if (env == NULL)
        return ING_ENOMEM;
    if (key != NULL)
        json_object_set_new(env, "idempotency_key", json_stringn(key, key_len));
    if (b->content_type != NULL)
        json_object_set_new(env, "content_type",
                            json_string(b->content_type));
    if (b->metadata != NULL)
        json_object_update(env, b->metadata);
    if (b->raw_payload != NULL) {
        e->json = dump_with_payload(env, b->raw_payload, b->raw_payload_len,
                                    &e->len);
    } else {
        /* The payload is borrowed; dumping it now means the caller may
         * free the parsed reading as soon as this returns. */
        json_object_set(env, "payload", (json_t *)reading);
        e->json = json_dumps(env, JSON_COMPACT | JSON_PRESERVE_ORDER);
        e->len = e->json != NULL ? strlen(e->json) : 0;
    }
    json_decref(env);
    if (e->json == NULL)
        return ING_ENOMEM;
    b->accepted_count++;
    return idem_batch_push_id(&b->idem, e->id);
}

int pipeline_batch_set_metadata(pipeline_batch_t *b, const char *key,
                                json_t *value)
{
    static const char *const reserved[] = {
        "message_id",   "device_id",       "device_type", "protocol",
        "received_at",  "idempotency_key", "content_type", "payload"};

    if (value == NULL)
        return ING_ENOMEM;
    for (size_t i = 0; i < sizeof(reserved) / sizeof(reserved[0]); i++) {
        if (strcmp(key, reserved[i]) == 0)
            goto invalid;
    }
    if (b->count > 0)
        goto invalid;
    if (b->metadata == NULL)
        b->metadata = json_object();
    if (b->metadata == NULL) {
        json_decref(value);
        return ING_ENOMEM;
    }
    if (json_object_set_new(b->metadata, key, value) != 0)
        return ING_ENOMEM;
    return 0;
invalid:
    json_decref(value);
    return ING_EINVAL;
}

int pipeline_batch_add(pipeline_batch_t *b, const json_t *reading)
{
    size_t index = b->count++;
    validate_errors_t errs;
    const json_t *claimed;
    char reason[AUTH_DEVICE_ID_MAX * 2 + 96];
    const char *key;
    size_t key_len;
    int n, rc;

    if (b->idem.request_replay)
        return PIPELINE_ACCEPTED; /* answered with the original ids */

    /* A device speaks only for itself: a device_id field naming another
     * device is rejected before validation. */
    claimed = json_is_object(reading) ? json_object_get(reading, "device_id")
                                      : NULL;
    if (json_is_string(claimed) &&
        strcmp(json_string_value(claimed), b->dev.id) != 0) {
        snprintf(reason, sizeof(reason),
                 "names device \"%.128s\", but the credentials belong to "
                 "device \"%s\"",
                 json_string_value(claimed), b->dev.id);
        b->forbidden++;
        rc = record_errors(b, index, NULL, "/device_id", reason);
        return rc ? rc : PIPELINE_FORBIDDEN;
    }
    if (b->schema == NULL) {
        snprintf(reason, sizeof(reason),
                 "device type \"%s\" has no schema on this server; ask the "
                 "operator to configure it",
                 b->dev.type);
        b->invalid++;
        rc = record_errors(b, index, NULL, "", reason);
        return rc ? rc : PIPELINE_INVALID;
    }

    validate_errors_init(&errs);
    n = schema_validate(b->schema, reading, &errs);
    if (n > 0) {
        b->invalid++;
        rc = record_errors(b, index, &errs, NULL, NULL);
        validate_errors_clear(&errs);
        return rc ? rc : PIPELINE_INVALID;
    }
    validate_errors_clear(&errs);
    rc = idem_batch_check_reading(&b->idem, reading, &key, &key_len);
    if (rc == IDEM_STORE)
        rc = append_envelope(b, reading, key, key_len);
    else if (rc == IDEM_ANSWERED)
        rc = 0;
    return rc ? rc : PIPELINE_ACCEPTED;
}

int pipeline_batch_add_raw(pipeline_batch_t *b, const json_t *reading,
                           const char *raw, size_t raw_len)
{
    uint64_t max_depth = b->pl->pipeline->cfg->limits.max_json_depth;
    char reason[128];
    char *minified = malloc(raw_len ? raw_len : 1);
    size_t len = 0;
    int rc;

    if (minified == NULL)
        return ING_ENOMEM;
    rc = rawjson_minify(raw, raw_len, minified, &len, max_depth);
    if (rc != 0) {
        free(minified);
        if (rc == ING_ETOOBIG)
            snprintf(reason, sizeof(reason),
                     "arrays and objects are nested more than %llu levels "
                     "deep (limits.max_json_depth)",
                     (unsigned long long)max_depth);
        else
            snprintf(reason, sizeof(reason),
                     "the reading's JSON text could not be scanned");
        pipeline_batch_add_unparsable(b, reason);
        return PIPELINE_INVALID;
    }
    b->raw_payload = minified;
    b->raw_payload_len = len;
    rc = pipeline_batch_add(b, reading);
    b->raw_payload = NULL;
    b->raw_payload_len = 0;
    free(minified);
    return rc;
}

void pipeline_batch_add_unparsable(pipeline_batch_t *b, const char *reason)
{
    size_t index = b->count++;

    if (b->idem.request_replay)
        return;

    b->invalid++;
    record_errors(b, index, NULL, "", reason);
}

size_t pipeline_batch_count(const pipeline_batch_t *b)
{
    return b->count;
}

size_t pipeline_batch_invalid(const pipeline_batch_t *b)
{
    return b->invalid;
}

size_t pipeline_batch_forbidden(const pipeline_batch_t *b)
{
    return b->forbidden;
}

json_t *pipeline_batch_errors(const pipeline_batch_t *b)
{
    return json_deep_copy(b->errors);
}

const char *pipeline_batch_id(const pipeline_batch_t *b, size_t i)
{
    return i < b->idem.id_count ? b->idem.ids[i] : NULL;
}

size_t pipeline_batch_accepted(const pipeline_batch_t *b)
{
    return b->idem.id_count;
}

size_t pipeline_batch_replayed(const pipeline_batch_t *b)
{
    return b->idem.replayed;
}

int pipeline_batch_set_idempotency_key(pipeline_batch_t *b, const char *key,
                                       size_t len)
{
    if (b->count > 0)
        return ING_EINVAL;
    return idem_batch_set_request_key(&b->idem, key, len);
}

uint64_t pipeline_batch_retry_after_ms(const pipeline_batch_t *b)
{
    return b->retry_after_ms;
}

void pipeline_batch_set_retrying(pipeline_batch_t *b)
{
    b->retrying = 1;
}

/* Counts the batch once when flow control turns it away with `rc`. */
static int turned_away(pipeline_batch_t *b, int rc)
{
    const char *reason = rc == ING_ERATE    ? "rate_limited"
                         : rc == ING_EQUOTA ? "quota_exceeded"
                                            : "spool_full";

    if (!b->turned_away) {
        b->turned_away = 1;
        pipeline_flow_count(b->protocol, reason, b->retrying);
    }
    return rc;
}

/* Applies the checks every protocol shares before a batch may go to the
 * spool: the spool's congestion, then the device's limits. */
static int check_flow(pipeline_batch_t *b)
{
    pipeline_t *p = b->pl->pipeline;
    uint64_t bytes = 0;
    int rc;

    b->retry_after_ms = 0;
    if (pipeline_flow_congested(p->flow))
        return turned_away(b, ING_EFULL);
    for (size_t i = 0; i < b->accepted_count; i++)
        bytes += b->accepted[i].len;
    rc = pipeline_flow_take(p->flow, &b->dev, b->accepted_count, bytes,
                            &b->retry_after_ms);
    return rc == 0 ? 0 : turned_away(b, rc);
}

/* Runs on the spool writer thread: hand the batch to its loop. */
static void on_spool_done(void *arg, int status)
{
    pipeline_batch_t *b = arg;
    pipeline_loop_t *pl = b->pl;

    /* Keys are committed before the adapter acknowledges, so that a
     * repeat arriving right after the acknowledgement is recognised. */
    idem_batch_settle(&b->idem, status, b->received_ms);
    b->status = status;
    pthread_mutex_lock(&pl->lock);
    b->next_completed = pl->completed;
    pl->completed = b;
    pthread_mutex_unlock(&pl->lock);
    uv_async_send(&pl->async);
}

/* Completes a batch whose every reading repeats an earlier one: nothing
 * is stored, and the completion runs on the loop like any other. */
static int complete_replay(pipeline_batch_t *b, pipeline_done_fn done,
                           void *arg)
{
    b->done = done;
    b->done_arg = arg;
    b->pl->pending++;
    on_spool_done(b, 0);
    return 0;
}

int pipeline_batch_submit(pipeline_batch_t *b, pipeline_done_fn done,
                          void *arg)
{
    struct iovec stack_iov[16];
    struct iovec *iov = stack_iov;
    int rc;

    if (b->idem.busy > 0)
        return ING_EBUSY;
    if (b->invalid > 0 || b->forbidden > 0 || b->idem.id_count == 0)
        return ING_EINVAL;
    if (b->accepted_count == 0)
        return complete_replay(b, done, arg);
    rc = check_flow(b);
    if (rc != 0)
        return rc;
    if (b->accepted_count > 16) {
        iov = malloc(b->accepted_count * sizeof(*iov));
        if (iov == NULL)
            return ING_ENOMEM;
    }
    for (size_t i = 0; i < b->accepted_count; i++) {
        iov[i].iov_base = b->accepted[i].json;
        iov[i].iov_len = b->accepted[i].len;
    }
    /* The completion may run on the writer thread before spool_append
     * returns, so everything it reads is set first. */
    b->done = done;
    b->done_arg = arg;
    b->pl->pending++;
    rc = spool_append(b->pl->pipeline->spool, iov, b->accepted_count,
                      on_spool_done, b);
    if (rc != 0)
        b->pl->pending--;
    if (rc == ING_EFULL)
        turned_away(b, rc);
    if (iov != stack_iov)
        free(iov);
    return rc;
}

void pipeline_batch_free(pipeline_batch_t *b)
{
    if (b == NULL)
        return;
    for (size_t i = 0; i < b->accepted_count; i++)
        free(b->accepted[i].json);
    free(b->accepted);
    idem_batch_clear(&b->idem);
    json_decref(b->errors);
    json_decref(b->metadata);
    free(b->content_type);
    free(b);
}
