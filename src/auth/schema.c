/* Registry schema and its migrations.
 *
 * PRAGMA user_version is the number of migrations applied. To change the
 * schema, append a step to `migrations` and never edit a released one, so
 * that every older database walks the same path to the latest version.
 */
#include <stdio.h>

#include "auth/auth_internal.h"
#include "core/errors.h"

static const char *const migrations[] = {
    /* Version 1: devices with their current key and, after rotate-key, the
     * previous key until old_key_expires_ms. Keys are stored only as
     * SHA-256 hashes. */
    "CREATE TABLE devices ("
    " id TEXT PRIMARY KEY,"
    " type TEXT NOT NULL,"
    " enabled INTEGER NOT NULL,"
    " key_hash BLOB NOT NULL UNIQUE,"
    " old_key_hash BLOB,"
    " old_key_expires_ms INTEGER,"
    " created_ms INTEGER,"
    " key_rotated_ms INTEGER"
    ")",
    /* Version 2: credentials beyond API keys. cert_fingerprint pins a TLS
     * client certificate by the SHA-256 of its DER encoding. jwt_alg names
     * the one JWS algorithm the device may sign with, and jwt_public_key
     * (PEM, for RS256, ES256 and EdDSA) or jwt_secret (raw bytes, for HS256)
     * verifies it. Each is NULL when the method is not configured. */
    "ALTER TABLE devices ADD COLUMN cert_fingerprint BLOB;"
    "ALTER TABLE devices ADD COLUMN jwt_alg TEXT;"
    "ALTER TABLE devices ADD COLUMN jwt_public_key TEXT;"
    "ALTER TABLE devices ADD COLUMN jwt_secret BLOB",
    /* Version 3: flow-control limits of one device, overriding those of
     * its device type. NULL follows the type, and 0 means unlimited. */
    "ALTER TABLE devices ADD COLUMN limit_readings_per_second INTEGER;"
    "ALTER TABLE devices ADD COLUMN limit_burst INTEGER;"
    "ALTER TABLE devices ADD COLUMN limit_bytes_per_second INTEGER;"
    "ALTER TABLE devices ADD COLUMN limit_daily_readings INTEGER",
};

#define MIGRATION_COUNT ((int)(sizeof(migrations) / sizeof(migrations[0])))

int auth_schema_version(void)
{
    return MIGRATION_COUNT;
}

int auth_schema_read_version(sqlite3 *db, int *version)
{
    sqlite3_stmt *stmt = NULL;
    int rc = ING_EDB;

    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, NULL) !=
        SQLITE_OK)
        goto done;
    if (sqlite3_step(stmt) != SQLITE_ROW)
        goto done;
    *version = sqlite3_column_int(stmt, 0);
    rc = 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

static int apply_migrations(sqlite3 *db, int from, const char *path, char *err,
                            size_t errlen)
{
    char sql[64];

    for (int v = from; v < MIGRATION_COUNT; v++) {
        if (sqlite3_exec(db, migrations[v], NULL, NULL, NULL) != SQLITE_OK) {
            snprintf(err, errlen,
                     "registry %s: migration to schema version %d failed: %s",
                     path, v + 1, sqlite3_errmsg(db));
            return ING_EDB;
        }
    }
    /* PRAGMA takes no bound parameters, so the number is formatted in. */
    snprintf(sql, sizeof(sql), "PRAGMA user_version = %d", MIGRATION_COUNT);
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "registry %s: setting user_version failed: %s",
                 path, sqlite3_errmsg(db));
        return ING_EDB;
    }
    return 0;
}

int auth_schema_migrate(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    int version = 0;
    int rc;

    /* BEGIN IMMEDIATE takes the write lock before the version is read, so
     * two processes opening an old database migrate it once. */
    if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "registry %s: locking for migration failed: %s",
                 path, sqlite3_errmsg(db));
        return ING_EDB;
    }
    if (auth_schema_read_version(db, &version) != 0) {
        snprintf(err, errlen, "registry %s: reading user_version failed: %s",
                 path, sqlite3_errmsg(db));
        rc = ING_EDB;
        goto error;
    }
    if (version > MIGRATION_COUNT) {
        snprintf(err, errlen,
                 "registry %s: schema version %d is newer than this ingestd "
                 "supports (%d); use a newer ingestd",
                 path, version, MIGRATION_COUNT);
        rc = ING_EDB;
        goto error;
    }
    if (version == MIGRATION_COUNT) {
        sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
        return 0;
    }
    rc = apply_migrations(db, version, path, err, errlen);
    if (rc != 0)
        goto error;
    if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "registry %s: committing migration failed: %s",
                 path, sqlite3_errmsg(db));
        rc = ING_EDB;
        goto error;
    }
    return 0;

error:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}
