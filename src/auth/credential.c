/* Credential checks beyond plain API keys: TLS client certificates, and
 * the dispatch between API keys and JWT. */
#include <openssl/crypto.h>
#include <stdio.h>
#include <string.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"

/* Records why a check failed. `why` may be NULL. */
static void set_failure(auth_failure_t *why, const char *reason,
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
}

enum auth_result auth_check_certificate(auth_t *a, const char *device_id,
                                        const unsigned char fingerprint[32],
                                        auth_device_t *dev,
                                        auth_failure_t *why)
{
    enum auth_result result = AUTH_UNKNOWN_DEVICE;
    const struct snapshot_device *d;
    struct snapshot *s;

    set_failure(why, NULL, "");
    if (!auth_device_id_valid(device_id)) {
        set_failure(why, "unknown_device",
                    "the certificate names no valid device id");
        return AUTH_UNKNOWN_DEVICE;
    }
    s = auth_snapshot_acquire(a);
    d = auth_snapshot_find(s, device_id);
    if (d == NULL) {
        set_failure(why, "unknown_device",
                    "no device has the id in the certificate");
        goto done;
    }
    /* The pin is checked before the enabled flag, so that a client with a
     * certificate that is not pinned learns nothing about the device. */
    if (d->has_fingerprint &&
        CRYPTO_memcmp(d->fingerprint, fingerprint, AUTH_FINGERPRINT_LEN) !=
            0) {
        set_failure(why, "fingerprint_mismatch",
                    "the certificate is not the one pinned for this device");
        goto done;
    }
    copy_device(dev, d);
    if (!d->enabled) {
        set_failure(why, "disabled", "the device is disabled");
        result = AUTH_DISABLED;
        goto done;
    }
    result = AUTH_OK;

done:
    auth_snapshot_release(s);
    return result;
}
