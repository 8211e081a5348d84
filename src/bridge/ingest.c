/* Message handling on the bridge loop: topic to device, JSON to readings,
 * readings to a pipeline batch, and the batch's completion to the
 * acknowledgement that on_message sends by returning.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "bridge/bridge_internal.h"
#include "core/errors.h"
#include "core/log.h"
#include "pipeline/rawjson.h"

/* Bounds of the wait before storing a message again after the spool
 * rejected it (full, failed write, allocation failure). */
#define STORE_RETRY_MIN_MS 100
#define STORE_RETRY_MAX_MS 5000

/* Outcomes of try_store besides the enum bridge_result values. */
enum { STORE_SUBMITTED = -1, STORE_RETRY = -2 };

const char *const bridge_result_names[BRIDGE_RESULT_COUNT] = {
    [BRIDGE_STORED] = "stored",
    [BRIDGE_INVALID_JSON] = "invalid_json",
    [BRIDGE_INVALID] = "invalid",
    [BRIDGE_FORBIDDEN] = "forbidden",
    [BRIDGE_UNKNOWN_DEVICE] = "unknown_device",
    [BRIDGE_DEVICE_DISABLED] = "device_disabled",
    [BRIDGE_TOO_LARGE] = "too_large",
    [BRIDGE_UNMATCHED_TOPIC] = "unmatched_topic",
};

uint64_t bridge_random(bridge_t *b)
{
    uint64_t x = b->random_state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b->random_state = x;
    return x;
}

void bridge_job_finish(bridge_t *b, bridge_job_t *job, int result)
{
    metrics_counter_add(b->messages[result], 1);
    pthread_mutex_lock(&b->lock);
    job->result = result;
    job->done = 1;
    pthread_cond_broadcast(&b->job_done);
    pthread_mutex_unlock(&b->lock);
}

/* Logs a message that is acknowledged without being stored. The log is
 * rate-limited per bridge process, since one misconfigured device can
 * publish thousands of such messages a second. */
static void log_rejected(bridge_t *b, const bridge_job_t *job, int result,
                         const char *detail)
{
    char topic[256], device[160], reason[256];

    log_write_limited(
        "bridge-rejected", 10, LOG_LEVEL_WARN,
        "bridge message rejected and acknowledged",
        "bridge=%s topic=%s device=%s result=%s reason=%s", b->cfg->name,
        log_quote(topic, sizeof(topic), job->topic_has_nul ? "" : job->topic),
        log_quote(device, sizeof(device), job->device_id),
        bridge_result_names[result],
        log_quote(reason, sizeof(reason), detail ? detail : ""));
}

/* Stores a feedback document for on_message to publish, when the bridge
 * has a feedback topic. Takes ownership of `doc`. */
static void set_feedback(bridge_t *b, bridge_job_t *job, json_t *doc)
{
    if (b->cfg->feedback_topic != NULL && doc != NULL) {
        free(job->feedback);
        job->feedback = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
    }
    json_decref(doc);
}

/* Rejects the job with an error document in the style of the HTTP API:
 * {"error":..., "message":...} plus the failing readings when known. */
static int reject(bridge_t *b, bridge_job_t *job, int result, const char *error,
                  const char *message, json_t *readings)
{
    json_t *doc = json_pack("{s:s, s:s}", "error", error, "message", message);

    if (doc != NULL && readings != NULL)
        json_object_set(doc, "readings", readings);
    log_rejected(b, job, result, message);
    set_feedback(b, job, doc);
    return result;
}

/* Finds the device named by the job's topic. Returns 0 and fills `dev`,
 * or the enum bridge_result that rejects the job. */
static int find_device(bridge_t *b, bridge_job_t *job, auth_device_t *dev)
{
    const config_bridge_t *cfg = b->cfg;
    enum auth_result found;
    int matched = 0;

    for (size_t i = 0; !job->topic_has_nul && i < cfg->topic_count; i++) {
        matched = bridge_topic_match(cfg->topics[i], job->topic, job->device_id,
                                     sizeof(job->device_id));
        if (matched)
            break;
    }
    if (!matched) {
        job->device_id[0] = '\0';
        log_rejected(b, job, BRIDGE_UNMATCHED_TOPIC,
                     "the topic matches no topic template");
        return BRIDGE_UNMATCHED_TOPIC;
    }
    found = auth_lookup_device(b->auth, job->device_id, dev);
    if (found == AUTH_DISABLED) {
        log_rejected(b, job, BRIDGE_DEVICE_DISABLED,
                     "the device is disabled in the registry");
        return BRIDGE_DEVICE_DISABLED;
    }
    if (found != AUTH_OK) {
        log_rejected(b, job, BRIDGE_UNKNOWN_DEVICE,
                     "no device with this id is registered");
        /* An id that is not registered gets no feedback, so that the
         * bridge cannot be used to publish to arbitrary topics. */
        job->device_id[0] = '\0';
        return BRIDGE_UNKNOWN_DEVICE;
    }
    return 0;
}

/* Parses the payload: one reading (an object) or a batch (an array of
 * them). Stores the readings in `*out`, or returns the result that
 * rejects the job. */
static int parse_payload(bridge_t *b, bridge_job_t *job, json_t **out)
{
    uint64_t max_readings = b->root->http.max_readings_per_request;
    char message[256];
    json_error_t error;
    json_t *doc;

    if (job->len > b->root->http.max_body_bytes) {
        snprintf(message, sizeof(message),
                 "the message has %zu bytes, over the limit of %llu bytes "
                 "(http.max_body_bytes); split the batch",
                 job->len, (unsigned long long)b->root->http.max_body_bytes);
        return reject(b, job, BRIDGE_TOO_LARGE, "body_too_large", message,
                      NULL);
    }
    if (job->len == 0)
        return reject(b, job, BRIDGE_INVALID, "empty_body",
                      "the message is empty; publish one reading or an "
                      "array of readings",
                      NULL);
    doc = json_loadb(job->payload, job->len, JSON_REJECT_DUPLICATES, &error);
    if (doc == NULL) {
        snprintf(message, sizeof(message),
                 "invalid JSON at line %d, column %d: %s", error.line,
                 error.column, error.text);
        return reject(b, job, BRIDGE_INVALID_JSON, "invalid_json", message,
                      NULL);
    }
    if (!json_is_object(doc) && !json_is_array(doc)) {
        json_decref(doc);
        return reject(b, job, BRIDGE_INVALID, "validation_failed",
                      "expected a JSON object (one reading) or an array of "
                      "readings",
                      NULL);
    }
    if (json_is_array(doc) && json_array_size(doc) == 0) {
        json_decref(doc);
        return reject(b, job, BRIDGE_INVALID, "empty_body",
                      "the array contains no readings; send at least one",
                      NULL);
    }
    if (json_is_array(doc) && json_array_size(doc) > max_readings) {
        snprintf(message, sizeof(message),
                 "the array has %zu readings, over the limit of %llu "
                 "(http.max_readings_per_request); split the batch",
                 json_array_size(doc), (unsigned long long)max_readings);
        json_decref(doc);
        return reject(b, job, BRIDGE_TOO_LARGE, "too_many_readings", message,
                      NULL);
    }
    *out = doc;
    return 0;
}

/* Adds every reading of `doc` to `batch`. Returns 0, ING_ENOMEM, or the
 * result that rejects the job (the batch is all or nothing). */
static int fill_batch(bridge_t *b, bridge_job_t *job, pipeline_batch_t *batch,
                      json_t *doc)
{
    size_t count = json_is_array(doc) ? json_array_size(doc) : 1;
    size_t forbidden, invalid, found = 0;
    rawjson_span_t *spans;
    char message[160];
    json_t *errors;
    int result;

    /* Each reading is stored as its text in the payload, so that numbers
     * keep the form the device sent. */
    spans = malloc(count * sizeof(*spans));
    if (spans == NULL)
        return ING_ENOMEM;
    spans[0] = (rawjson_span_t){0, job->len};
    if (json_is_array(doc) &&
        (rawjson_array_elements(job->payload, job->len, spans, count,
                                &found) != 0 ||
         found != count)) {
        /* jansson accepted the payload, so this cannot happen. */
        free(spans);
        return ING_ENOMEM;
    }
    for (size_t i = 0; i < count; i++) {
        json_t *reading = json_is_array(doc) ? json_array_get(doc, i) : doc;

        if (pipeline_batch_add_raw(batch, reading,
                                   job->payload + spans[i].off,
                                   spans[i].len) < 0) {
            free(spans);
            return ING_ENOMEM;
        }
    }
    free(spans);
    forbidden = pipeline_batch_forbidden(batch);
    invalid = pipeline_batch_invalid(batch);
    if (forbidden == 0 && invalid == 0)
        return 0;
    errors = pipeline_batch_errors(batch);
    if (forbidden > 0) {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings name another device; nothing was "
                 "stored",
                 forbidden, count);
        result = reject(b, job, BRIDGE_FORBIDDEN, "device_mismatch", message,
                        errors);
    } else {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings failed validation; nothing was stored. "
                 "Fix them and publish again.",
                 invalid, count);
        result = reject(b, job, BRIDGE_INVALID, "validation_failed", message,
                        errors);
    }
    json_decref(errors);
    return result;
}

static void on_stored(pipeline_batch_t *batch, int status, void *arg);

/* Runs the job through the pipeline. Returns STORE_SUBMITTED when a batch
 * is in the spool, STORE_RETRY when the spool cannot take it now, or the
 * enum bridge_result that rejects it. */
static int try_store(bridge_t *b, bridge_job_t *job)
{
    pipeline_batch_t *batch;
    auth_device_t dev;
    json_t *doc = NULL;
    int rc;

    rc = find_device(b, job, &dev);
    if (rc == 0)
        rc = parse_payload(b, job, &doc);
    if (rc != 0)
        return rc;
    batch =
        pipeline_batch_new(b->pl, &dev, BRIDGE_PROTOCOL, "application/json");
    if (batch == NULL) {
        json_decref(doc);
        return STORE_RETRY;
    }
    rc = fill_batch(b, job, batch, doc);
    json_decref(doc);
    if (rc == 0)
        rc = pipeline_batch_submit(batch, on_stored, job);
    if (rc == 0) {
        b->submitted++;
        return STORE_SUBMITTED;
    }
    pipeline_batch_free(batch);
    if (rc == ING_ETOOBIG)
        return reject(b, job, BRIDGE_TOO_LARGE, "body_too_large",
                      "the readings do not fit one spool record", NULL);
    return rc > 0 ? rc : STORE_RETRY;
}

static void on_retry_timer(uv_timer_t *timer)
{
    bridge_t *b = timer->data;
    bridge_job_t *list = b->retries;

    b->retries = NULL;
    while (list != NULL) {
        bridge_job_t *job = list;

        list = job->next;
        job->next = NULL;
        bridge_ingest(b, job);
    }
}

/* Keeps the job unacknowledged and tries again later. The broker holds
 * back further messages once its in-flight window is used up. */
static void queue_retry(bridge_t *b, bridge_job_t *job, const char *reason)
{
    uint64_t wait = bridge_backoff_ms(job->retries, STORE_RETRY_MIN_MS,
                                      STORE_RETRY_MAX_MS, bridge_random(b));

    job->retries++;
    metrics_counter_add(b->store_retries, 1);
    log_write_limited("bridge-store-retry", 3, LOG_LEVEL_WARN,
                      "bridge message not stored; holding it unacknowledged",
                      "bridge=%s reason=%s retry_in_ms=%llu", b->cfg->name,
                      reason, (unsigned long long)wait);
    job->next = b->retries;
    b->retries = job;
    if (!uv_is_active((uv_handle_t *)&b->retry_timer))
        uv_timer_start(&b->retry_timer, on_retry_timer, wait, 0);
}

static void on_stored(pipeline_batch_t *batch, int status, void *arg)
{
    bridge_job_t *job = arg;
    bridge_t *b = job->bridge;

    b->submitted--;
    pipeline_batch_free(batch);
    if (b->abandoned)
        return;
    if (status == 0) {
        bridge_job_finish(b, job, BRIDGE_STORED);
        return;
    }
    queue_retry(b, job, ing_strerror(status));
}

void bridge_ingest(bridge_t *b, bridge_job_t *job)
{
    int rc;

    free(job->feedback);
    job->feedback = NULL;
    rc = try_store(b, job);
    if (rc == STORE_SUBMITTED)
        return;
    if (rc == STORE_RETRY) {
        queue_retry(b, job,
                    pipeline_spool_full(b->pipeline) ? "spool full"
                                                     : "storage failed");
        return;
    }
    bridge_job_finish(b, job, rc);
}
