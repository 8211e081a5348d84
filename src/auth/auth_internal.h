/* Helpers shared by the registry and the snapshot code of the auth module.
 * Not part of the module interface.
 */
#ifndef INGESTD_AUTH_AUTH_INTERNAL_H
#define INGESTD_AUTH_AUTH_INTERNAL_H

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
