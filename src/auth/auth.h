/* Device registry and API key authentication.
 *
 * The registry is an SQLite database, changed by the `ingestd device`
 * commands. API keys are 32 random bytes shown once as "ik_" followed by
 * 43 base64url characters; only their SHA-256 hash is stored. After
 * rotate-key the previous key keeps working until its grace period ends.
 *
 * The running service authenticates from an in-memory snapshot of the
 * registry, rebuilt by auth_reload (on SIGHUP, and when polling sees that
 * another process changed the database).
 */
#ifndef INGESTD_AUTH_AUTH_H
#define INGESTD_AUTH_AUTH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define AUTH_DEVICE_ID_MAX 128 /* bytes, without the NUL */
#define AUTH_TYPE_MAX 64
#define AUTH_KEY_LEN 46 /* "ik_" + 43 characters, without the NUL */

/* Flow-control limits that the registry sets for one device, overriding
 * those of its device type (docs/flow-control.md). */
enum auth_limit {
    AUTH_LIMIT_READINGS_PER_SECOND = 0,
    AUTH_LIMIT_BURST = 1,
    AUTH_LIMIT_BYTES_PER_SECOND = 2,
    AUTH_LIMIT_DAILY_READINGS = 3,
    AUTH_LIMIT_COUNT = 4,
};

typedef struct auth_limits {
    unsigned set; /* bit (1u << enum auth_limit) for each override */
    uint64_t value[AUTH_LIMIT_COUNT]; /* 0 = unlimited */
} auth_limits_t;

/* A device as the pipeline needs it, copied out of the snapshot. */
typedef struct auth_device {
    char id[AUTH_DEVICE_ID_MAX + 1];
    char type[AUTH_TYPE_MAX + 1];
    auth_limits_t limits;
} auth_device_t;

enum auth_result {
    AUTH_OK = 0,
    AUTH_UNKNOWN_KEY = 1, /* no device has this key, or its grace ended */
    AUTH_DISABLED = 2,    /* the key is valid, the device is disabled */
    /* auth_lookup_device: no device has this id. */
    AUTH_UNKNOWN_DEVICE = AUTH_UNKNOWN_KEY,
};

/* Returns 1 if `id` is a valid device id: 1 to 128 characters from
 * [A-Za-z0-9._:-]. The same rule keeps ids safe in MQTT topics and paths. */
int auth_device_id_valid(const char *id);

/* --- Registry database, used by the command line --- */

typedef struct registry registry_t;

typedef struct registry_entry {
    const char *id;
    const char *type;
    int enabled;
    int64_t created_ms;
    int64_t key_rotated_ms;     /* 0 when the key was never rotated */
    int64_t old_key_expires_ms; /* 0 when no previous key is in grace */
    /* SHA-256 of the pinned client certificate (32 bytes), or NULL. */
    const unsigned char *cert_fingerprint;
    const char *jwt_alg; /* "RS256", "ES256", "EdDSA", "HS256" or NULL */
    auth_limits_t limits; /* overrides of the device type's limits */
} registry_entry_t;

/* Opens (creating if needed) the registry at `path` and migrates its schema.
 * A new file is created with mode 0600, because it stores HS256 secrets.
 * The folder of `path` must exist. Returns 0, ING_ENOMEM, or ING_EDB with a
 * message in `err`. */
int registry_open(const char *path, registry_t **out, char *err,
                  size_t errlen);
void registry_close(registry_t *r);

/* Adds a device and writes its new API key into `key`.
 * Returns 0, ING_EINVAL for an invalid id or type, ING_EEXIST, ING_EDB, or
 * ING_EIO when the random source fails. */
int registry_device_add(registry_t *r, const char *id, const char *type,
                        char key[AUTH_KEY_LEN + 1]);

/* Calls `fn` for each device, ordered by id. Returns 0 or ING_EDB. */
int registry_device_list(registry_t *r,
                         void (*fn)(const registry_entry_t *e, void *arg),
                         void *arg);

/* Returns 0, ING_ENOTFOUND or ING_EDB. */
int registry_device_set_enabled(registry_t *r, const char *id, int enabled);

/* Gives the device a new key, written into `key`. The current key stays
 * valid for `grace_ms` more milliseconds (0 revokes it at once). A key from
 * an earlier rotation that is still in grace is revoked.
 * Returns 0, ING_ENOTFOUND, ING_EDB, or ING_EIO when the random source
 * fails. */
int registry_device_rotate_key(registry_t *r, const char *id,
                               uint64_t grace_ms, char key[AUTH_KEY_LEN + 1]);

/* Pins the device to the TLS client certificate whose DER encoding has the
 * SHA-256 `fingerprint`, or removes the pin when `fingerprint` is NULL.
 * Returns 0, ING_ENOTFOUND or ING_EDB. */
int registry_device_set_cert(registry_t *r, const char *id,
                             const unsigned char fingerprint[32]);

/* Length of an HS256 secret as printed: 32 random bytes in base64url. */
#define AUTH_JWT_SECRET_TEXT_LEN 43

/* Pins the device to JWT algorithm `alg` ("RS256", "ES256" or "EdDSA")
 * with the PEM public key `pem`, replacing any JWT setting it had. The key
 * must fit the algorithm: RSA of at least 2048 bits, EC on P-256 or
 * Ed25519. Returns 0, ING_EINVAL with a message in `err`, ING_ENOTFOUND or
 * ING_EDB. */
int registry_device_set_jwt_key(registry_t *r, const char *id,
                                const char *alg, const char *pem, char *err,
                                size_t errlen);

/* Gives the device a new random HS256 secret, replacing any JWT setting it
 * had, and writes it in base64url into `secret`. The HMAC key is the 32
 * decoded bytes. The registry stores the secret as it is, so the file must
 * stay readable only by ingestd. Returns 0, ING_ENOTFOUND, ING_EDB, or
 * ING_EIO when the random source fails. */
int registry_device_new_jwt_secret(registry_t *r, const char *id,
                                   char secret[AUTH_JWT_SECRET_TEXT_LEN + 1]);

/* Removes the device's JWT algorithm, key and secret.
 * Returns 0, ING_ENOTFOUND or ING_EDB. */
int registry_device_clear_jwt(registry_t *r, const char *id);

/* Replaces the device's limit overrides with `limits`: each limit whose
 * bit is clear in limits->set follows the device type again. Returns 0,
 * ING_ENOTFOUND or ING_EDB. */
int registry_device_set_limits(registry_t *r, const char *id,
                               const auth_limits_t *limits);

/* Calls `fn` for the device `id`. Returns 0, ING_ENOTFOUND or ING_EDB. */
int registry_device_get(registry_t *r, const char *id,
                        void (*fn)(const registry_entry_t *e, void *arg),
                        void *arg);

/* --- Snapshot used by the running service --- */

typedef struct auth auth_t;

/* Opens the registry at `path` read-only and loads a first snapshot.
 * Returns 0, ING_ENOMEM, or ING_EDB with a message in `err`. */
int auth_open(const char *path, auth_t **out, char *err, size_t errlen);

/* Rebuilds the snapshot from the database. On failure the previous
 * snapshot stays in use. Returns 0 or ING_EDB. Thread-safe. */
int auth_reload(auth_t *a);

/* Rebuilds the snapshot only when the database changed since the last
 * load. Returns 1 if it reloaded, 0 if nothing changed, or ING_EDB. */
int auth_reload_if_changed(auth_t *a);

/* Authenticates an API key. On AUTH_OK and AUTH_DISABLED fills `dev`.
 * Thread-safe. A reader holds a mutex only to take a reference on the
 * current snapshot, so a reload never blocks it longer than a pointer swap. */
enum auth_result auth_check_key(auth_t *a, const char *key, size_t len,
                                auth_device_t *dev);

/* Looks up a device by its id, for adapters whose peer already
 * authenticated the device (the MQTT bridge trusts the broker's login and
 * takes the id from the topic). Returns AUTH_OK or AUTH_DISABLED and fills
 * `dev`, or AUTH_UNKNOWN_DEVICE when no device has this id, also for an
 * invalid id. Thread-safe, like auth_check_key. */
enum auth_result auth_lookup_device(auth_t *a, const char *id,
                                    auth_device_t *dev);

/* --- Credentials beyond API keys (TLS client certificates and JWT) --- */

enum auth_method {
    AUTH_METHOD_API_KEY = 0,
    AUTH_METHOD_JWT = 1,
    AUTH_METHOD_CERTIFICATE = 2,
};

/* Why a credential was rejected, for logs, metrics labels and responses.
 * Static strings such as "expired", "bad_signature", "wrong_audience",
 * "alg_not_allowed", "unknown_device", "disabled", "fingerprint_mismatch". */
typedef struct auth_failure {
    const char *reason;
    char detail[160]; /* a sentence for the client, never a secret */
} auth_failure_t;

/* Authenticates a bearer credential as sent in HTTP Authorization,
 * X-API-Key, the WebSocket auth message or the MQTT password: an API key
 * ("ik_...") or a JWT (three base64url parts). `claimed_id` is the device
 * id the protocol names separately (MQTT username), or NULL; when set, it
 * must match the credential's device. On success fills `dev`, stores the
 * method in `*method` and, for a JWT, its expiry (Unix seconds, 0 if none)
 * in `*expires_at`. Returns AUTH_OK, AUTH_UNKNOWN_KEY (any invalid
 * credential; `why` says which check failed) or AUTH_DISABLED.
 * `method`, `expires_at` and `why` may be NULL. Counts the outcome in
 * ingestd_auth_results_total. Thread-safe. See docs/authentication.md for
 * the JWT rules. */
enum auth_result auth_check_credential(auth_t *a, const char *cred,
                                       size_t len, const char *claimed_id,
                                       auth_device_t *dev,
                                       enum auth_method *method,
                                       int64_t *expires_at,
                                       auth_failure_t *why);

/* Authenticates a verified TLS client certificate: `device_id` is the
 * identity taken from it (subject CN, SAN URI or DNS name, as configured),
 * `fingerprint` its SHA-256 over the DER encoding. The device must exist
 * and be enabled, and when it is pinned to a fingerprint, match it.
 * Returns AUTH_OK, AUTH_UNKNOWN_DEVICE or AUTH_DISABLED, with `why` set on
 * failure. */
enum auth_result auth_check_certificate(auth_t *a, const char *device_id,
                                        const unsigned char fingerprint[32],
                                        auth_device_t *dev,
                                        auth_failure_t *why);

/* Longest credential auth_check_credential accepts, in bytes. */
#define AUTH_CREDENTIAL_MAX 8192

/* JWT rules and failed-authentication limits, from the jwt.* and auth.*
 * configuration keys. */
typedef struct auth_options {
    int64_t jwt_leeway_s;       /* clock skew allowed on exp, nbf and iat */
    int64_t jwt_max_lifetime_s; /* cap on exp - iat, or exp - now */
    const char *jwt_audience;   /* required aud, or NULL */
    const char *jwt_issuer;     /* required iss, or NULL */
    uint64_t max_failures_per_minute; /* per address; 0 turns it off */
    uint64_t block_duration_ms;
    size_t guard_table_size; /* addresses tracked, at least 16 */
} auth_options_t;

/* Applies `opts` (copied). Call it after auth_open and before any check:
 * it is not synchronized with running checks. Until then auth_open's
 * defaults apply: leeway 30 s, lifetime 24 h, no aud or iss check, 10
 * failures a minute, 60 s blocks, 4096 addresses.
 * Returns 0 or ING_ENOMEM. */
int auth_set_options(auth_t *a, const auth_options_t *opts);

/* --- Failed-authentication limits per source address ---
 *
 * Failures are counted per address (IPv4 /32, IPv6 /64 prefix; an
 * IPv4-mapped IPv6 address counts as its IPv4 address) in a table shared
 * by all workers of this process, so the limits hold per instance. The
 * count restarts one minute after an address's first counted failure.
 * When it reaches max_failures_per_minute, the address is blocked for
 * block_duration. A success does not clear the count, so that a client
 * holding one valid credential cannot interleave it to keep guessing. When
 * the table is full, the address seen least recently is forgotten. */

/* Returns 0 when `addr` may try to authenticate, or the seconds left of
 * its block (at least 1), counting ingestd_auth_blocked_total. Adapters
 * call it before checking a credential and reject a blocked address
 * without checking it. Thread-safe. */
uint64_t auth_guard_check(auth_t *a, const struct sockaddr *addr);

/* Counts a failed authentication from `addr`, blocking the address when it
 * reaches the limit. Thread-safe. */
void auth_guard_failed(auth_t *a, const struct sockaddr *addr);

/* auth_guard_check and auth_guard_failed for a peer written as "ip:port"
 * or "[ipv6]:port", as connections record it. A peer that does not parse
 * is never blocked or counted. */
uint64_t auth_guard_check_peer(auth_t *a, const char *peer);
void auth_guard_failed_peer(auth_t *a, const char *peer);

/* Number of addresses the guard table tracks now. */
size_t auth_guard_entries(auth_t *a);

/* Number of devices in the current snapshot. */
size_t auth_device_count(auth_t *a);

void auth_close(auth_t *a);

#endif
