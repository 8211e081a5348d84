/* POST /v1/data: authenticates the device, parses the readings and hands
 * them to the pipeline as one batch.
 *
 * A batch is all or nothing. If any reading is unparsable, invalid or
 * names another device, nothing is stored and the response lists every
 * rejected reading. A device then never has to work out which part of a
 * request was kept.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/errors.h"
#include "http/http_internal.h"
#include "pipeline/rawjson.h"

/* Duplicate keys are rejected because readers disagree on which one
 * counts: {"device_id":"other","device_id":"me"} must not pass as "me". */
#define READING_PARSE_FLAGS JSON_REJECT_DUPLICATES

static void retry_after_header(const http_listener_t *l, char *buf,
                               size_t size)
{
    snprintf(buf, size, "Retry-After: %llu\r\n",
             (unsigned long long)l->limits.retry_after_s);
}

/* Checks the credential (an API key or a JWT) after the guard of failed
 * authentications. Returns 1 when the device may send. */
static int authenticate(http_conn_t *c, http_request_t *r)
{
    enum auth_result res = AUTH_UNKNOWN_KEY;
    auth_t *auth = c->listener->auth;
    auth_failure_t why = {"malformed", "the credential is too long"};
    char headers[320];
    char message[224];
    uint64_t wait_s;

    if (r->key_conflict) {
        http_request_reject(c, 400, "conflicting_credentials",
                            "the Authorization and X-API-Key headers carry "
                            "different credentials; send one credential",
                            NULL, HTTP_REJECT_AFTER_BODY, NULL);
        return 0;
    }
    if (r->key_len == 0 && !r->key_overflow) {
        http_request_reject(c, 401, "missing_credentials",
                            "no credential was sent; send an API key or a "
                            "JWT as \"Authorization: Bearer TOKEN\", or an "
                            "API key as \"X-API-Key: KEY\"",
                            "WWW-Authenticate: Bearer\r\n",
                            HTTP_REJECT_AFTER_BODY, NULL);
        return 0;
    }
    wait_s = auth_guard_check_peer(auth, c->peer);
    if (wait_s > 0) {
        snprintf(headers, sizeof(headers), "Retry-After: %llu\r\n",
                 (unsigned long long)wait_s);
        http_request_reject(c, 429, "too_many_auth_failures",
                            "too many failed authentications from this "
                            "address; retry after the Retry-After delay",
                            headers, HTTP_REJECT_AFTER_BODY, NULL);
        return 0;
    }
    if (!r->key_overflow)
        res = auth_check_credential(auth, r->key, r->key_len, NULL, &r->dev,
                                    NULL, NULL, &why);
    if (res == AUTH_UNKNOWN_KEY) {
        auth_guard_failed_peer(auth, c->peer);
        /* RFC 6750 section 3: the description is shown to developers. The
         * details are fixed strings without quotes or backslashes. */
        snprintf(headers, sizeof(headers),
                 "WWW-Authenticate: Bearer error=\"invalid_token\", "
                 "error_description=\"%s\"\r\n",
                 why.detail);
        snprintf(message, sizeof(message), "%s: %s", why.reason, why.detail);
        http_request_reject(c, 401, "invalid_credentials", message, headers,
                            HTTP_REJECT_AFTER_BODY, NULL);
        return 0;
    }
    r->have_dev = 1;
    if (res == AUTH_DISABLED) {
        http_request_reject(c, 403, "device_disabled",
                            "this device is disabled; ask the operator to "
                            "enable it",
                            NULL, HTTP_REJECT_AFTER_BODY, NULL);
        return 0;
    }
    return 1;
}

static void api_check(http_conn_t *c, http_request_t *r)
{
    http_listener_t *l = c->listener;
    const llhttp_t *p = &c->parser;
    const char *param = http_key_in_url(r->url);
    char headers[64];
    char message[256];
    int cert;

    if (param != NULL) {
        snprintf(message, sizeof(message),
                 "the query parameter \"%s\" looks like an API key, and "
                 "keys in URLs end up in proxy and access logs; send the "
                 "key in an \"Authorization: Bearer\" or \"X-API-Key\" "
                 "header",
                 param);
        http_request_reject(c, 400, "key_in_url", message, NULL,
                            HTTP_REJECT_AFTER_BODY_CLOSE, NULL);
        return;
    }
    cert = http_cert_check(c, r);
    if (cert == HTTP_CERT_REJECTED)
        return;
    if (cert == HTTP_CERT_NONE && (!authenticate(c, r) ||
                                   !http_cert_matches(c, r)))
        return;
    if (!(p->flags & (F_CONTENT_LENGTH | F_CHUNKED))) {
        /* Without framing any body bytes would be read as the next
         * request, so the connection closes after the response. */
        http_request_reject(c, 411, "length_required",
                            "a request body needs Content-Length or "
                            "Transfer-Encoding: chunked",
                            NULL, HTTP_REJECT_AFTER_BODY_CLOSE,
                            "length_required");
        return;
    }
    if ((p->flags & F_CONTENT_LENGTH) &&
        p->content_length > l->limits.max_body_bytes) {
        http_request_reject(c, 413, "body_too_large",
                            "the request body is over the size limit; "
                            "send fewer readings per request",
                            NULL, HTTP_REJECT_NOW, "too_large");
        return;
    }
    r->ctype = r->has_content_type
                   ? http_content_type_parse(r->content_type)
                   : HTTP_CT_UNSUPPORTED;
    if (r->ctype == HTTP_CT_UNSUPPORTED) {
        http_request_reject(c, 415, "unsupported_media_type",
                            "the Content-Type is missing or not supported; "
                            "send " HTTP_SUPPORTED_TYPES
                            " with charset utf-8 or no charset",
                            NULL, HTTP_REJECT_AFTER_BODY, NULL);
        return;
    }
    if (pipeline_spool_full(pipeline_loop_pipeline(l->pl))) {
        pipeline_count_rejected("http", "spool_full");
        retry_after_header(l, headers, sizeof(headers));
        http_request_reject(c, 503, "spool_full",
                            "the server's storage is full; retry after the "
                            "Retry-After delay",
                            headers, HTTP_REJECT_NOW, "spool_full");
    }
}

/* Checks the reading count against max_readings_per_request and sends an
 * error when there are none or too many. Returns 1 when the count fits. */
static int count_ok(http_conn_t *c, size_t n)
{
    char message[160];

    if (n == 0) {
        http_conn_error(c, 400, "empty_body",
                        "the request contains no readings; send at least "
                        "one JSON object",
                        NULL);
        return 0;
    }
    if (n > c->listener->limits.max_readings) {
        snprintf(message, sizeof(message),
                 "the request contains %zu readings, the limit is %llu; "
                 "split it into smaller requests",
                 n, (unsigned long long)c->listener->limits.max_readings);
        http_conn_error(c, 413, "too_many_readings", message, NULL);
        return 0;
    }
    return 1;
}

/* Hands the Idempotency-Key header to the batch. Returns 1, or 0 after
 * responding. */
static int set_idempotency_key(http_conn_t *c, http_request_t *r,
                               pipeline_batch_t *b)
{
    char headers[64];
    int rc = ING_EINVAL;

    if (r->idempotency_key_count == 0)
        return 1;
    if (r->idempotency_key_count == 1 && !r->idempotency_key_invalid)
        rc = pipeline_batch_set_idempotency_key(b, r->idempotency_key,
                                                r->idempotency_key_len);
    if (rc == 0)
        return 1;
    if (rc == ING_EBUSY) {
        retry_after_header(c->listener, headers, sizeof(headers));
        http_conn_error(c, 409, "idempotency_key_in_progress",
                        "a request with this Idempotency-Key is still being "
                        "stored; retry after the Retry-After delay to get "
                        "its result",
                        headers);
    } else if (rc == ING_EINVAL) {
        http_conn_error(c, 400, "invalid_idempotency_key",
                        "send one Idempotency-Key header of 1 to 255 bytes "
                        "of UTF-8 without control characters",
                        NULL);
    } else {
        http_conn_error(c, 500, "out_of_memory",
                        "the server ran out of memory; retry later", NULL);
    }
    return 0;
}

static pipeline_batch_t *new_batch(http_conn_t *c, http_request_t *r)
{
    pipeline_batch_t *b = pipeline_batch_new(
        c->listener->pl, &r->dev, "http",
        r->ctype == HTTP_CT_JSON ? "application/json"
                                 : "application/x-ndjson");

    if (b == NULL) {
        http_conn_error(c, 500, "out_of_memory",
                        "the server ran out of memory; retry later", NULL);
        return NULL;
    }
    if (!set_idempotency_key(c, r, b)) {
        pipeline_batch_free(b);
        return NULL;
    }
    return b;
}

/* Adds one parsed value, which must be an object, with `raw`, the JSON
 * text it was parsed from. Returns 0 or ING_ENOMEM. */
static int add_value(http_request_t *r, pipeline_batch_t *b,
                     const json_t *value, const char *raw, size_t raw_len)
{
    if (!json_is_object(value)) {
        pipeline_batch_add_unparsable(b, "must be an object");
        r->unparsable++;
        return 0;
    }
    return pipeline_batch_add_raw(b, value, raw, raw_len) < 0 ? ING_ENOMEM
                                                              : 0;
}

/* Finds the text of each of the `n` elements of the array in the body, so
 * that each reading is stored as sent. Returns a malloc'd array, or NULL
 * after responding. */
static rawjson_span_t *split_array(http_conn_t *c, http_request_t *r,
                                   size_t n)
{
    rawjson_span_t *spans = malloc(n * sizeof(*spans));
    size_t found = 0;

    if (spans != NULL &&
        rawjson_array_elements(r->body, r->body_len, spans, n, &found) == 0 &&
        found == n)
        return spans;
    /* jansson accepted the body, so only memory can be missing here. */
    free(spans);
    http_conn_error(c, 500, "out_of_memory",
                    "the server ran out of memory; retry later", NULL);
    return NULL;
}

/* Parses an application/json body. Returns the filled batch, or NULL
 * after responding. */
static pipeline_batch_t *add_json(http_conn_t *c, http_request_t *r)
{
    json_error_t error;
    json_t *root = json_loadb(r->body, r->body_len, READING_PARSE_FLAGS,
                              &error);
    pipeline_batch_t *b = NULL;
    rawjson_span_t *spans = NULL;
    char message[256];
    size_t n;

    if (root == NULL) {
        snprintf(message, sizeof(message),
                 "invalid JSON at line %d column %d: %s", error.line,
                 error.column, error.text);
        http_conn_error(c, 400, "invalid_json", message, NULL);
        return NULL;
    }
    n = json_is_array(root) ? json_array_size(root) : 1;
    if (!count_ok(c, n) || (b = new_batch(c, r)) == NULL)
        goto done;
    if (json_is_array(root) && (spans = split_array(c, r, n)) == NULL) {
        pipeline_batch_free(b);
        b = NULL;
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_is_array(root) ? json_array_get(root, i) : root;
        const char *raw = spans ? r->body + spans[i].off : r->body;
        size_t raw_len = spans ? spans[i].len : r->body_len;

        if (add_value(r, b, v, raw, raw_len) != 0) {
            pipeline_batch_free(b);
            b = NULL;
            http_conn_error(c, 500, "out_of_memory",
                            "the server ran out of memory; retry later",
                            NULL);
            break;
        }
    }
done:
    free(spans);
    json_decref(root);
    return b;
}

/* Adds one NDJSON line, recording a parse error as an unparsable reading
 * of that index. */
static int add_line(http_request_t *r, pipeline_batch_t *b, const char *line,
                    size_t len)
{
    json_error_t error;
    json_t *value = json_loadb(line, len, READING_PARSE_FLAGS, &error);
    char reason[256];
    int rc;

    if (value == NULL) {
        snprintf(reason, sizeof(reason), "invalid JSON at column %d: %s",
                 error.column, error.text);
        pipeline_batch_add_unparsable(b, reason);
        r->unparsable++;
        return 0;
    }
    rc = add_value(r, b, value, line, len);
    json_decref(value);
    return rc;
}

/* Parses an NDJSON body. Returns the filled batch, or NULL after
 * responding. */
static pipeline_batch_t *add_ndjson(http_conn_t *c, http_request_t *r)
{
    const char *line;
    size_t len, off = 0, n = 0;
    pipeline_batch_t *b;

    while (http_ndjson_next(r->body, r->body_len, &off, &line, &len))
        n++;
    if (!count_ok(c, n) || (b = new_batch(c, r)) == NULL)
        return NULL;
    off = 0;
    while (http_ndjson_next(r->body, r->body_len, &off, &line, &len)) {
        if (add_line(r, b, line, len) != 0) {
            pipeline_batch_free(b);
            http_conn_error(c, 500, "out_of_memory",
                            "the server ran out of memory; retry later",
                            NULL);
            return NULL;
        }
    }
    return b;
}

/* Responds 403 or 400 to a batch with rejected readings. */
static void reject_batch(http_conn_t *c, http_request_t *r,
                         pipeline_batch_t *b)
{
    json_t *errors = pipeline_batch_errors(b);
    size_t total = pipeline_batch_count(b);
    size_t forbidden = pipeline_batch_forbidden(b);
    size_t invalid = pipeline_batch_invalid(b);
    http_response_t resp = {0};
    char message[256];
    int rc;

    /* The pipeline counts unparsable readings as invalid. */
    http_metrics_readings(HTTP_READING_FORBIDDEN, forbidden);
    http_metrics_readings(HTTP_READING_UNPARSABLE, r->unparsable);
    http_metrics_readings(HTTP_READING_INVALID, invalid - r->unparsable);
    if (forbidden > 0) {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings name another device in device_id; a "
                 "device may only send its own readings. Nothing was "
                 "stored.",
                 forbidden, total);
        rc = http_response_error(&resp, 403, "device_mismatch", message, NULL,
                                 errors);
    } else {
        snprintf(message, sizeof(message),
                 "%zu of %zu readings failed validation; nothing was "
                 "stored. Fix them and resend the request.",
                 invalid, total);
        rc = http_response_error(&resp, 400, "validation_failed", message,
                                 NULL, errors);
    }
    json_decref(errors);
    if (rc != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_respond(c, &resp);
}

static void respond_accepted(http_conn_t *c, pipeline_batch_t *b)
{
    size_t n = pipeline_batch_accepted(b);
    json_t *ids = json_array();
    json_t *body = json_object();
    http_response_t resp = {0};
    int rc = -1;

    if (ids == NULL || body == NULL)
        goto done;
    for (size_t i = 0; i < n; i++)
        json_array_append_new(ids, json_string(pipeline_batch_id(b, i)));
    json_object_set_new(body, "accepted", json_integer((json_int_t)n));
    json_object_set(body, "ids", ids);
    rc = http_response_json(&resp, 202, body);
done:
    json_decref(ids);
    json_decref(body);
    http_metrics_readings(HTTP_READING_ACCEPTED, n);
    if (rc != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_respond(c, &resp);
}

/* Responds to a batch that was not stored: 503 when retrying later can help,
 * 413 when the batch can never fit, 500 otherwise. */
static void respond_failed(http_conn_t *c, int status)
{
    char headers[64];

    retry_after_header(c->listener, headers, sizeof(headers));
    switch (status) {
    case ING_EFULL:
        http_conn_error(c, 503, "spool_full",
                        "the server's storage is full; the readings were "
                        "not stored, retry after the Retry-After delay",
                        headers);
        break;
    case ING_ESHUTDOWN:
        http_conn_error(c, 503, "shutting_down",
                        "the server is shutting down; the readings were "
                        "not stored, retry after the Retry-After delay",
                        headers);
        break;
    case ING_EBUSY:
        http_conn_error(c, 409, "idempotency_key_in_progress",
                        "a reading's idempotency key belongs to a request "
                        "that is still being stored; nothing was stored, "
                        "retry after the Retry-After delay",
                        headers);
        break;
    case ING_ETOOBIG:
        http_conn_error(c, 413, "body_too_large",
                        "the batch is too large to store as one unit; "
                        "send fewer readings per request",
                        NULL);
        break;
    default:
        http_conn_error(c, 500, "storage_failed",
                        "storage failed; the readings were not stored, "
                        "retry",
                        NULL);
        break;
    }
}

static void on_batch_done(pipeline_batch_t *b, int status, void *arg)
{
    http_conn_t *c = arg;

    /* The connection may have closed while the batch was pending; then
     * no client waits for the response. */
    if (http_conn_release(c)) {
        c->req.batch = NULL;
        if (status == 0)
            respond_accepted(c, b);
        else
            respond_failed(c, status);
    }
    pipeline_batch_free(b);
}

/* Responds 429 to a batch over the device's rate limit (ING_ERATE) or
 * daily quota (ING_EQUOTA), with the seconds until it may pass. */
static void respond_limited(http_conn_t *c, int status, uint64_t wait_ms)
{
    char headers[64];

    snprintf(headers, sizeof(headers), "Retry-After: %llu\r\n",
             (unsigned long long)((wait_ms + 999) / 1000));
    if (status == ING_ERATE)
        http_conn_error(c, 429, "rate_limited",
                        "the device sends faster than its rate limit; the "
                        "readings were not stored, retry after the "
                        "Retry-After delay",
                        headers);
    else
        http_conn_error(c, 429, "quota_exceeded",
                        "the device used up its daily quota of readings; "
                        "the readings were not stored, retry after the "
                        "Retry-After delay (midnight UTC)",
                        headers);
}

static void submit(http_conn_t *c, http_request_t *r, pipeline_batch_t *b)
{
    uint64_t wait_ms;
    int rc;

    r->batch = b;
    http_conn_hold(c);
    rc = pipeline_batch_submit(b, on_batch_done, c);
    if (rc == 0)
        return;
    http_conn_release(c);
    r->batch = NULL;
    wait_ms = pipeline_batch_retry_after_ms(b);
    pipeline_batch_free(b);
    if (rc == ING_ERATE || rc == ING_EQUOTA)
        respond_limited(c, rc, wait_ms);
    else
        respond_failed(c, rc);
}

static void api_handle(http_conn_t *c, http_request_t *r)
{
    pipeline_batch_t *b;

    if (r->body_len == 0) {
        http_conn_error(c, 400, "empty_body",
                        "the request body is empty; send at least one "
                        "JSON object",
                        NULL);
        return;
    }
    b = r->ctype == HTTP_CT_JSON ? add_json(c, r) : add_ndjson(c, r);
    if (b == NULL)
        return;
    if (pipeline_batch_invalid(b) > 0 || pipeline_batch_forbidden(b) > 0) {
        reject_batch(c, r, b);
        pipeline_batch_free(b);
        return;
    }
    submit(c, r, b);
}

const http_route_t http_api_routes[] = {
    {"/v1/data", "POST", api_check, api_handle},
    {"/v1/ws", "GET", http_ws_check, http_ws_handle},
    {"/mqtt", "GET", http_mqtt_check, http_mqtt_handle},
};
const size_t http_api_route_count =
    sizeof(http_api_routes) / sizeof(http_api_routes[0]);
