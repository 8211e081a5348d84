/* Helpers shared by the registry and the snapshot code of the auth module.
 * Not part of the module interface.
 */
#ifndef INGESTD_AUTH_AUTH_INTERNAL_H
#define INGESTD_AUTH_AUTH_INTERNAL_H

#include <openssl/evp.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stddef.h>
#include <stdint.h>

#include "auth/auth.h"

#define AUTH_HASH_LEN 32 /* SHA-256 digest size in bytes */
#define AUTH_KEY_PREFIX "ik_"
#define AUTH_KEY_PREFIX_LEN 3
#define AUTH_KEY_RANDOM_LEN 32 /* random bytes behind each key */

/* How long a connection waits for another process's lock, in ms. The CLI
 * and the running service share the database. */
#define AUTH_BUSY_TIMEOUT_MS 5000

#define AUTH_FINGERPRINT_LEN 32 /* SHA-256 of a certificate's DER */
#define AUTH_JWT_SECRET_LEN 32   /* random bytes of an HS256 secret */

/* JWS algorithms a device can be pinned to. */
enum auth_jwt_alg {
    AUTH_JWT_ALG_NONE = 0, /* JWT not configured */
    AUTH_JWT_ALG_RS256,
    AUTH_JWT_ALG_ES256,
    AUTH_JWT_ALG_EDDSA,
    AUTH_JWT_ALG_HS256,
};

/* A device in a snapshot. Immutable while the snapshot lives, which owns
 * `jwt_key` and `jwt_secret`. */
struct snapshot_device {
    char id[AUTH_DEVICE_ID_MAX + 1];
    char type[AUTH_TYPE_MAX + 1];
    int enabled;
    int has_fingerprint;
    uint8_t fingerprint[AUTH_FINGERPRINT_LEN];
    enum auth_jwt_alg jwt_alg;
    EVP_PKEY *jwt_key;   /* RS256, ES256 and EdDSA, else NULL */
    uint8_t *jwt_secret; /* HS256, else NULL */
    size_t jwt_secret_len;
    auth_limits_t limits;
};

/* The registry columns of auth_limits_t, in enum auth_limit order. */
#define AUTH_LIMIT_COLUMNS                                                     \
    "limit_readings_per_second, limit_burst, limit_bytes_per_second,"          \
    " limit_daily_readings"

/* A writable registry connection, shared by registry.c and the export and
 * import in registry_io.c. */
struct registry {
    sqlite3 *db;
    char *path;
};

/* Reads AUTH_LIMIT_COLUMNS from `stmt` starting at column `first`. */
void auth_limits_read(sqlite3_stmt *stmt, int first, auth_limits_t *out);

struct snapshot;

/* Takes a reference on the current snapshot, which stays valid and
 * unchanged until auth_snapshot_release. */
struct snapshot *auth_snapshot_acquire(auth_t *a);
void auth_snapshot_release(struct snapshot *s);

/* Finds a device by id in `s`. Returns NULL when no device has this id. */
const struct snapshot_device *auth_snapshot_find(const struct snapshot *s,
                                                 const char *id);

/* Returns the JWS name of `alg` ("RS256"), or "none" for
 * AUTH_JWT_ALG_NONE. */
const char *auth_jwt_alg_name(enum auth_jwt_alg alg);

/* Parses a JWS algorithm name. Returns AUTH_JWT_ALG_NONE for a name that
 * is not one of RS256, ES256, EdDSA and HS256. */
enum auth_jwt_alg auth_jwt_alg_parse(const char *name);

/* Parses a PEM public key for `alg`, which must be RS256, ES256 or EdDSA,
 * and checks that the key fits it: RSA of at least 2048 bits for RS256, EC
 * on P-256 for ES256, Ed25519 for EdDSA. Returns the key, owned by the
 * caller, or NULL with a reason in `err`. */
EVP_PKEY *auth_jwt_key_parse(const char *pem, size_t len,
                             enum auth_jwt_alg alg, char *err, size_t errlen);

/* Encodes `len` bytes as base64url without padding (RFC 4648 section 5).
 * `out` needs room for (len * 4 + 2) / 3 characters and the NUL. */
void auth_base64url_encode(const uint8_t *in, size_t len, char *out);

/* Decodes strict base64url: no padding, no white space, and the unused
 * low bits of the last character must be zero. Writes at most `cap` bytes.
 * Returns the decoded length, or -1 for invalid input or a small buffer. */
long auth_base64url_decode(const char *in, size_t len, uint8_t *out,
                           size_t cap);

#define AUTH_DEFAULT_LEEWAY_S 30
#define AUTH_DEFAULT_MAX_LIFETIME_S (24 * 3600)
#define AUTH_DEFAULT_MAX_FAILURES 10
#define AUTH_DEFAULT_BLOCK_MS 60000
#define AUTH_DEFAULT_GUARD_SIZE 4096

/* JWT claim rules, set by auth_set_options. */
struct auth_jwt_rules {
    int64_t leeway_s;
    int64_t max_lifetime_s;
    char *audience; /* NULL: aud not checked */
    char *issuer;   /* NULL: iss not checked */
};

struct auth_guard;

struct auth {
    /* Guards only the `current` pointer and taking a reference on it. */
    pthread_mutex_t current_lock;
    struct snapshot *current;
    /* Serializes reloads, which share the one SQLite connection. */
    pthread_mutex_t reload_lock;
    sqlite3 *db;
    char *path;
    int64_t data_version; /* PRAGMA data_version at the last load */
    struct auth_jwt_rules jwt;
    struct auth_guard *guard;
};

/* Creates a failed-authentication table for `size` addresses (at least
 * 16). Returns NULL when out of memory. */
struct auth_guard *auth_guard_create(uint64_t max_failures,
                                     uint64_t block_ms, size_t size);
void auth_guard_destroy(struct auth_guard *g);

/* Verifies the JWT `token` of `len` bytes (at most AUTH_CREDENTIAL_MAX)
 * for auth_check_credential, with the same arguments and results. */
enum auth_result auth_jwt_check(auth_t *a, const char *token, size_t len,
                                const char *claimed_id, auth_device_t *dev,
                                int64_t *expires_at, auth_failure_t *why);

/* Records why a check failed. `why` may be NULL. */
void auth_set_failure(auth_failure_t *why, const char *reason,
                      const char *detail);

/* Returns 1 if `type` is a valid device type name: 1 to 64 characters from
 * [A-Za-z0-9_.-]. */
int auth_type_name_valid(const char *type);

/* Writes a new random API key and its SHA-256 hash.
 * Returns 0 or ING_EIO when the random source fails. */
int auth_key_generate(char key[AUTH_KEY_LEN + 1], uint8_t hash[AUTH_HASH_LEN]);

/* Computes the SHA-256 hash of `len` bytes of `key`. Returns 0 or ING_EIO. */
int auth_key_hash(const char *key, size_t len, uint8_t hash[AUTH_HASH_LEN]);

/* Returns the wall-clock time in milliseconds since the Unix epoch. Stored
 * timestamps use this clock because several processes compare them. */
int64_t auth_now_ms(void);

/* Latest schema version, stored in PRAGMA user_version. */
int auth_schema_version(void);

/* Brings the schema of a writable connection up to auth_schema_version().
 * Returns 0, or ING_EDB with a message in `err`. */
int auth_schema_migrate(sqlite3 *db, const char *path, char *err,
                        size_t errlen);

/* Reads PRAGMA user_version into `version`. Returns 0 or ING_EDB. */
int auth_schema_read_version(sqlite3 *db, int *version);

#endif
