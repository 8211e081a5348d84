/* Data messages of GET /v1/ws and the JSON replies to them.
 *
 * A text message is one reading (a JSON object), an array of readings, or
 * an envelope {"id":...,"readings":[...]} or {"id":...,"reading":{...}}
 * whose id the reply repeats. An object is an envelope when it has a
 * "reading" or "readings" member. Like a POST /v1/data request, a message
 * is stored whole or not at all.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "pipeline/rawjson.h"
#include "ws/ws_internal.h"

static json_t *answer_new(const char *type, const json_t *id)
{
    json_t *o = json_object();

    if (o == NULL)
        return NULL;
    if (json_object_set_new(o, "type", json_string(type)) != 0 ||
        json_object_set(o, "id", id ? (json_t *)id : json_null()) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

json_t *ws_reply_error(const json_t *id, const char *code, const char *message)
{
    json_t *o = answer_new("error", id);

    if (o == NULL)
        return NULL;
    if (json_object_set_new(o, "error", json_string(code)) != 0 ||
        json_object_set_new(o, "message", json_string(message)) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

json_t *ws_reply_ack(const json_t *id, const pipeline_batch_t *b)
{
    json_t *o = answer_new("ack", id);
    json_t *ids = json_array();
    size_t n = pipeline_batch_accepted(b);

    if (o == NULL || ids == NULL)
        goto error;
    for (size_t i = 0; i < n; i++) {
        if (json_array_append_new(ids, json_string(pipeline_batch_id(b, i))))
            goto error;
    }
    if (json_object_set_new(o, "ids", ids) != 0) {
        ids = NULL;
        goto error;
    }
    return o;
error:
    json_decref(ids);
    json_decref(o);
    return NULL;
}

/* Adds "retry_after" to an error reply. */
static json_t *with_retry(json_t *reply, uint64_t retry_after_s)
{
    if (reply != NULL &&
        json_object_set_new(reply, "retry_after",
                            json_integer((json_int_t)retry_after_s)) != 0) {
        json_decref(reply);
        return NULL;
    }
    return reply;
}

json_t *ws_reply_failed(const json_t *id, int status, uint64_t retry_after_s,
                        int *fatal)
{
    *fatal = 0;
    switch (status) {
    case ING_EFULL:
        return with_retry(
            ws_reply_error(id, "spool_full",
                           "the server's storage is full; the readings "
                           "were not stored, resend them after retry_after "
                           "seconds"),
            retry_after_s);
    case ING_ESHUTDOWN:
        return with_retry(
            ws_reply_error(id, "shutting_down",
                           "the server is shutting down; the readings were "
                           "not stored, resend them after retry_after "
                           "seconds"),
            retry_after_s);
    case ING_EBUSY:
        return with_retry(
            ws_reply_error(id, "idempotency_key_in_progress",
                           "a reading's idempotency key belongs to a "
                           "message that is still being stored; nothing "
                           "was stored, resend after retry_after seconds"),
            retry_after_s);
    case ING_ETOOBIG:
        return ws_reply_error(id, "too_large",
                              "a reading is over the storage's record size "
                              "limit; the readings were not stored, send "
                              "smaller readings");
    default:
        *fatal = 1;
        return ws_reply_error(id, "storage_failed",
                              "storage failed; the readings were not "
                              "stored, reconnect and resend them");
    }
}

void ws_parsed_clear(ws_parsed_t *p)
{
    json_decref(p->id);
    json_decref(p->reply);
    pipeline_batch_free(p->batch);
    memset(p, 0, sizeof(*p));
}

/* Sets an error reply in `out`. Returns 0 or ING_ENOMEM. */
static int reject(ws_parsed_t *out, enum ws_message_result result,
                  const char *code, const char *message)
{
    out->reply = ws_reply_error(out->id, code, message);
    out->result = result;
    return out->reply ? 0 : ING_ENOMEM;
}

/* Finds the readings of `root`: the value itself, an array, or an
 * envelope's "reading" or "readings". Stores them in `*items` (an array
 * the caller releases) or sets a reply. Returns 0 or ING_ENOMEM. */
static int find_readings(json_t *root, ws_parsed_t *out, json_t **items)
{
    json_t *one, *many, *id;

    *items = NULL;
    if (json_is_array(root)) {
        *items = json_incref(root);
        return 0;
    }
    if (!json_is_object(root))
        return reject(out, WS_MESSAGE_INVALID, "invalid_message",
                      "a message must be a reading object, an array of "
                      "readings, or an envelope {\"id\":...,"
                      "\"readings\":[...]}");
    one = json_object_get(root, "reading");
    many = json_object_get(root, "readings");
    if (one == NULL && many == NULL) {
        *items = json_array();
        if (*items == NULL || json_array_append(*items, root) != 0)
            return ING_ENOMEM;
        return 0;
    }
    id = json_object_get(root, "id");
    if (id != NULL && (json_is_string(id) || json_is_number(id)))
        out->id = json_incref(id);
    if (id != NULL && out->id == NULL)
        return reject(out, WS_MESSAGE_INVALID, "invalid_envelope",
                      "the envelope's id must be a string or a number");
    if (one != NULL && many != NULL)
        return reject(out, WS_MESSAGE_INVALID, "invalid_envelope",
                      "an envelope has either \"reading\" or \"readings\", "
                      "not both");
    if (many != NULL && !json_is_array(many))
        return reject(out, WS_MESSAGE_INVALID, "invalid_envelope",
                      "the envelope's \"readings\" must be an array");
    if (one != NULL && !json_is_object(one))
        return reject(out, WS_MESSAGE_INVALID, "invalid_envelope",
                      "the envelope's \"reading\" must be an object");
    if (many != NULL) {
        *items = json_incref(many);
        return 0;
    }
    *items = json_array();
    if (*items == NULL || json_array_append(*items, one) != 0)
        return ING_ENOMEM;
    return 0;
}

/* Sets the reply to a batch with rejected readings: device_mismatch when
 * any reading names another device, validation_failed otherwise. */
static int reject_batch(ws_parsed_t *out, pipeline_batch_t *b,
                        size_t unparsable)
{
    size_t total = pipeline_batch_count(b);
    size_t forbidden = pipeline_batch_forbidden(b);
    size_t invalid = pipeline_batch_invalid(b);
    json_t *errors;
    char message[256];
    int rc;

    /* The pipeline counts unparsable readings as invalid. */
    ws_metrics_readings(WS_READING_FORBIDDEN, forbidden);
    ws_metrics_readings(WS_READING_UNPARSABLE, unparsable);
    ws_metrics_readings(WS_READING_INVALID, invalid - unparsable);
    if (forbidden > 0) {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings name another device in device_id; a "
                 "device may only send its own readings. Nothing was "
                 "stored.",
                 forbidden, total);
        rc = reject(out, WS_MESSAGE_FORBIDDEN, "device_mismatch", message);
    } else {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings failed validation; nothing was "
                 "stored. Fix them and resend the message.",
                 invalid, total);
        rc = reject(out, WS_MESSAGE_INVALID, "validation_failed", message);
    }
    if (rc != 0)
        return rc;
    errors = pipeline_batch_errors(b);
    if (errors == NULL ||
        json_object_set_new(out->reply, "readings", errors) != 0)
        return ING_ENOMEM;
    return 0;
}

/* Hands the envelope's "idempotency_key" to the batch. Returns 0 with no
 * reply, 0 with a reply set, or ING_ENOMEM. */
static int set_idempotency_key(pipeline_batch_t *b, const json_t *key,
                               ws_parsed_t *out)
{
    int rc = ING_EINVAL;

    if (key == NULL)
        return 0;
    if (json_is_string(key))
        rc = pipeline_batch_set_idempotency_key(b, json_string_value(key),
                                                json_string_length(key));
    if (rc == 0 || rc == ING_ENOMEM)
        return rc;
    if (rc == ING_EBUSY)
        return reject(out, WS_MESSAGE_INVALID, "idempotency_key_in_progress",
                      "a message with this idempotency_key is still being "
                      "stored; resend it in a second to get its ids");
    return reject(out, WS_MESSAGE_INVALID, "invalid_envelope",
                  "the envelope's idempotency_key must be a string of 1 to "
                  "255 bytes without control characters");
}

/* Finds the text of each of the `n` items that find_readings returned for
 * `root`, so that each reading is stored as the device sent it. Returns 0
 * or ING_EINVAL, which cannot happen for text that jansson accepted. */
static int find_item_texts(const char *text, size_t len, const json_t *root,
                           size_t n, rawjson_span_t *spans)
{
    rawjson_span_t list = {0, len};
    size_t found = 0;

    if (json_is_object(root)) {
        if (rawjson_object_member(text, len, "reading", &spans[0]) == 1)
            return n == 1 ? 0 : ING_EINVAL;
        if (rawjson_object_member(text, len, "readings", &list) != 1) {
            spans[0] = list; /* a bare reading */
            return n == 1 ? 0 : ING_EINVAL;
        }
    }
    if (rawjson_array_elements(text + list.off, list.len, spans, n, &found) !=
            0 ||
        found != n)
        return ING_EINVAL;
    for (size_t i = 0; i < n; i++)
        spans[i].off += list.off;
    return 0;
}

/* Builds the batch from `items`, whose texts are `spans` of `text`, under
 * the envelope's idempotency `key` (NULL for none). Returns 0 or
 * ING_ENOMEM. */
static int build_batch(const ws_ingest_config_t *cfg, const auth_device_t *dev,
                       json_t *items, const char *text,
                       const rawjson_span_t *spans, const json_t *key,
                       ws_parsed_t *out)
{
    size_t n = json_array_size(items);
    size_t unparsable = 0;
    pipeline_batch_t *b;
    char message[160];

    if (n == 0)
        return reject(out, WS_MESSAGE_INVALID, "empty_message",
                      "the message contains no readings; send at least one "
                      "JSON object");
    if (n > cfg->max_readings) {
        snprintf(message, sizeof(message),
                 "the message contains %zu readings, the limit is %llu; "
                 "split it into smaller messages",
                 n, (unsigned long long)cfg->max_readings);
        return reject(out, WS_MESSAGE_INVALID, "too_many_readings", message);
    }
    b = pipeline_batch_new(cfg->pl, dev, "ws", "application/json");
    if (b == NULL)
        return ING_ENOMEM;
    if (set_idempotency_key(b, key, out) != 0 || out->reply != NULL) {
        pipeline_batch_free(b);
        return out->reply != NULL ? 0 : ING_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *value = json_array_get(items, i);
        if (!json_is_object(value)) {
            pipeline_batch_add_unparsable(b, "must be an object");
            unparsable++;
        } else if (pipeline_batch_add_raw(b, value, text + spans[i].off,
                                          spans[i].len) < 0) {
            pipeline_batch_free(b);
            return ING_ENOMEM;
        }
    }
    if (pipeline_batch_invalid(b) > 0 || pipeline_batch_forbidden(b) > 0) {
        int rc = reject_batch(out, b, unparsable);
        pipeline_batch_free(b);
        return rc;
    }
    out->batch = b;
    return 0;
}

int ws_message_parse(const ws_ingest_config_t *cfg, const auth_device_t *dev,
                     const char *text, size_t len, ws_parsed_t *out)
{
    json_error_t error;
    json_t *root, *items = NULL;
    const json_t *key = NULL;
    rawjson_span_t *spans = NULL;
    char message[256];
    size_t n;
    int rc;

    memset(out, 0, sizeof(*out));
    if (len == 0)
        return reject(out, WS_MESSAGE_INVALID, "empty_message",
                      "empty message; send a JSON reading");
    /* Scalars parse too, so that they get the more helpful reply.
     * Duplicate keys are rejected because readers disagree on which one
     * counts: {"device_id":"other","device_id":"me"} must not pass. */
    root = json_loadb(text, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES,
                      &error);
    if (root == NULL) {
        snprintf(message, sizeof(message),
                 "invalid JSON at line %d column %d: %s", error.line,
                 error.column, error.text);
        rc = reject(out, WS_MESSAGE_INVALID, "invalid_json", message);
        if (rc == 0 && json_object_set_new(out->reply, "position",
                                           json_integer(error.position)) != 0)
            rc = ING_ENOMEM;
        goto done;
    }
    rc = find_readings(root, out, &items);
    /* Only an envelope carries a key; in a bare reading the member is
     * the reading's own. */
    if (out->id != NULL || (json_is_object(root) &&
                            (json_object_get(root, "reading") != NULL ||
                             json_object_get(root, "readings") != NULL)))
        key = json_object_get(root, "idempotency_key");
    if (rc == 0 && out->reply == NULL) {
        n = json_array_size(items);
        spans = malloc((n ? n : 1) * sizeof(*spans));
        if (spans == NULL)
            rc = ING_ENOMEM;
        else if (find_item_texts(text, len, root, n, spans) != 0)
            rc = reject(out, WS_MESSAGE_ERROR, "internal_error",
                        "the server could not find a reading's text; "
                        "report this message to the operator");
        else
            rc = build_batch(cfg, dev, items, text, spans, key, out);
    }
done:
    free(spans);
    json_decref(items);
    json_decref(root);
    if (rc != 0)
        ws_parsed_clear(out);
    return rc;
}
