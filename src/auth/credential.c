/* Credential checks beyond plain API keys: TLS client certificates, and
 * the dispatch between API keys and JWT. */
#include <openssl/crypto.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/errors.h"
#include "core/metrics.h"

static const char *const method_labels[] = {"api_key", "jwt", "certificate"};

/* Counts one outcome in ingestd_auth_results_total. The reasons are a
 * fixed set of static strings, so the series stay few. Successes, the
 * common case, reuse a cached series instead of a registry lookup. */
static void count_result(enum auth_method method, enum auth_result result,
                         const auth_failure_t *why)
{
    static _Atomic(metrics_counter_t *) ok_series[3];
    static const char help[] =
        "Authentication attempts by method, result and reason";
    metrics_counter_t *c;
    char labels[160];

    if (result == AUTH_OK) {
        c = atomic_load_explicit(&ok_series[method], memory_order_acquire);
        if (c == NULL) {
            snprintf(labels, sizeof(labels),
                     "method=\"%s\",result=\"ok\",reason=\"\"",
                     method_labels[method]);
            c = metrics_counter("ingestd_auth_results_total", help, labels);
            atomic_store_explicit(&ok_series[method], c,
                                  memory_order_release);
        }
    } else {
        snprintf(labels, sizeof(labels),
                 "method=\"%s\",result=\"%s\",reason=\"%s\"",
                 method_labels[method],
                 result == AUTH_DISABLED ? "disabled" : "rejected",
                 why->reason != NULL ? why->reason : "unknown");
        c = metrics_counter("ingestd_auth_results_total", help, labels);
    }
    metrics_counter_add(c, 1);
}

void auth_set_failure(auth_failure_t *why, const char *reason,
                      const char *detail)
{
    if (why == NULL)
        return;
    why->reason = reason;
    snprintf(why->detail, sizeof(why->detail), "%s", detail);
}

static void copy_device(auth_device_t *dev, const struct snapshot_device *d)
{
    memcpy(dev->id, d->id, sizeof(dev->id));
    memcpy(dev->type, d->type, sizeof(dev->type));
    dev->limits = d->limits;
}

static enum auth_result check_certificate(auth_t *a, const char *device_id,
                                          const unsigned char *fingerprint,
                                          auth_device_t *dev,
                                          auth_failure_t *why)
{
    enum auth_result result = AUTH_UNKNOWN_DEVICE;
    const struct snapshot_device *d;
    struct snapshot *s;

    auth_set_failure(why, NULL, "");
    if (!auth_device_id_valid(device_id)) {
        auth_set_failure(why, "unknown_device",
                    "the certificate names no valid device id");
        return AUTH_UNKNOWN_DEVICE;
    }
    s = auth_snapshot_acquire(a);
    d = auth_snapshot_find(s, device_id);
    if (d == NULL) {
        auth_set_failure(why, "unknown_device",
                    "no device has the id in the certificate");
        goto done;
    }
    /* The pin is checked before the enabled flag, so that a client with a
     * certificate that is not pinned learns nothing about the device. */
    if (d->has_fingerprint &&
        CRYPTO_memcmp(d->fingerprint, fingerprint, AUTH_FINGERPRINT_LEN) !=
            0) {
        auth_set_failure(why, "fingerprint_mismatch",
                    "the certificate is not the one pinned for this device");
        goto done;
    }
    copy_device(dev, d);
    if (!d->enabled) {
        auth_set_failure(why, "disabled", "the device is disabled");
        result = AUTH_DISABLED;
        goto done;
    }
    result = AUTH_OK;

done:
    auth_snapshot_release(s);
    return result;
}

enum auth_result auth_check_certificate(auth_t *a, const char *device_id,
                                        const unsigned char fingerprint[32],
                                        auth_device_t *dev,
                                        auth_failure_t *why)
{
    auth_failure_t local;
    enum auth_result result;

    if (why == NULL)
        why = &local;
    result = check_certificate(a, device_id, fingerprint, dev, why);
    count_result(AUTH_METHOD_CERTIFICATE, result, why);
    return result;
}

/* Checks an API key, which names its device through the key itself. */
static enum auth_result check_api_key(auth_t *a, const char *key, size_t len,
                                      const char *claimed_id,
                                      auth_device_t *dev, auth_failure_t *why)
{
    enum auth_result result = auth_check_key(a, key, len, dev);

    if (result == AUTH_UNKNOWN_KEY) {
        auth_set_failure(why, "unknown_key", "the API key is not valid");
        return result;
    }
    if (claimed_id != NULL && strcmp(claimed_id, dev->id) != 0) {
        auth_set_failure(why, "device_mismatch",
                         "the API key belongs to another device");
        return AUTH_UNKNOWN_KEY;
    }
    if (result == AUTH_DISABLED)
        auth_set_failure(why, "disabled", "the device is disabled");
    return result;
}

/* Returns 1 if `cred` has the shape of a compact JWS: exactly two dots. */
static int looks_like_jwt(const char *cred, size_t len)
{
    size_t dots = 0;

    for (size_t i = 0; i < len; i++)
        dots += cred[i] == '.';
    return dots == 2;
}

enum auth_result auth_check_credential(auth_t *a, const char *cred,
                                       size_t len, const char *claimed_id,
                                       auth_device_t *dev,
                                       enum auth_method *method,
                                       int64_t *expires_at,
                                       auth_failure_t *why)
{
    enum auth_method used = AUTH_METHOD_API_KEY;
    enum auth_result result;
    auth_failure_t local;
    int64_t exp = 0;

    if (why == NULL)
        why = &local;
    auth_set_failure(why, NULL, "");
    if (len >= AUTH_KEY_PREFIX_LEN &&
        memcmp(cred, AUTH_KEY_PREFIX, AUTH_KEY_PREFIX_LEN) == 0) {
        result = check_api_key(a, cred, len, claimed_id, dev, why);
    } else if (len <= AUTH_CREDENTIAL_MAX && looks_like_jwt(cred, len)) {
        used = AUTH_METHOD_JWT;
        result = auth_jwt_check(a, cred, len, claimed_id, dev, &exp, why);
    } else {
        auth_set_failure(why, "malformed",
                         len > AUTH_CREDENTIAL_MAX
                             ? "the credential is too long"
                             : "the credential is neither an API key nor "
                               "a JWT");
        result = AUTH_UNKNOWN_KEY;
    }
    if (method != NULL)
        *method = used;
    if (expires_at != NULL)
        *expires_at = result == AUTH_OK ? exp : 0;
    count_result(used, result, why);
    return result;
}

int auth_set_options(auth_t *a, const auth_options_t *opts)
{
    struct auth_guard *guard;
    char *audience = NULL;
    char *issuer = NULL;

    if (opts->jwt_audience != NULL)
        audience = strdup(opts->jwt_audience);
    if (opts->jwt_issuer != NULL)
        issuer = strdup(opts->jwt_issuer);
    guard = auth_guard_create(opts->max_failures_per_minute,
                              opts->block_duration_ms,
                              opts->guard_table_size);
    if (guard == NULL || (opts->jwt_audience != NULL && audience == NULL) ||
        (opts->jwt_issuer != NULL && issuer == NULL)) {
        auth_guard_destroy(guard);
        free(audience);
        free(issuer);
        return ING_ENOMEM;
    }
    auth_guard_destroy(a->guard);
    a->guard = guard;
    free(a->jwt.audience);
    free(a->jwt.issuer);
    a->jwt.audience = audience;
    a->jwt.issuer = issuer;
    a->jwt.leeway_s = opts->jwt_leeway_s;
    a->jwt.max_lifetime_s = opts->jwt_max_lifetime_s;
    return 0;
}
