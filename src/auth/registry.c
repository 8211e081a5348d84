/* Device registry changes made by the `ingestd device` commands. */
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/errors.h"
#include "core/ids.h"
#include "core/log.h"

_Static_assert((AUTH_JWT_SECRET_LEN * 4 + 2) / 3 == AUTH_JWT_SECRET_TEXT_LEN,
               "AUTH_JWT_SECRET_TEXT_LEN must match the encoded secret");

/* Logs the last SQLite error of `r` and returns ING_EDB. */
static int query_failed(registry_t *r, const char *query)
{
    char path[512];
    char error[512];

    log_error("registry query failed", "path=%s query=%s error=%s",
              log_quote(path, sizeof(path), r->path), query,
              log_quote(error, sizeof(error), sqlite3_errmsg(r->db)));
    return ING_EDB;
}

/* Fails with a message naming the folder when the folder of `path` is
 * missing, because SQLite would only report "unable to open database file".
 * Creating the folder is left to the caller, which chooses its owner and
 * mode. */
static int check_parent_folder(const char *path, char *err, size_t errlen)
{
    const char *slash = strrchr(path, '/');
    struct stat st;
    char *folder;
    int rc = 0;

    if (slash == NULL)
        return 0;
    if (slash == path)
        return 0;
    folder = strndup(path, (size_t)(slash - path));
    if (folder == NULL)
        return ING_ENOMEM;
    if (stat(folder, &st) != 0) {
        snprintf(err, errlen, "registry folder %s is not accessible: %s",
                 folder, strerror(errno));
        rc = ING_EDB;
    } else if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "registry folder %s is not a directory", folder);
        rc = ING_EDB;
    }
    free(folder);
    return rc;
}

/* Switches the database to WAL, so that the service keeps reading while a
 * command writes. Some file systems cannot share WAL memory. There the
 * registry keeps rollback journaling, which works but waits on locks more. */
static void enable_wal(sqlite3 *db, const char *path)
{
    sqlite3_stmt *stmt = NULL;
    const char *mode = NULL;
    char quoted[512];

    if (sqlite3_prepare_v2(db, "PRAGMA journal_mode = WAL", -1, &stmt, NULL) ==
            SQLITE_OK &&
        sqlite3_step(stmt) == SQLITE_ROW)
        mode = (const char *)sqlite3_column_text(stmt, 0);
    if (mode == NULL || strcmp(mode, "wal") != 0)
        log_warn("registry WAL mode unavailable", "path=%s journal_mode=%s",
                 log_quote(quoted, sizeof(quoted), path),
                 mode ? mode : "unknown");
    sqlite3_finalize(stmt);
}

/* Creates `path` with mode 0600 when it does not exist yet. SQLite would
 * create it with the umask, and the registry stores HS256 secrets. SQLite
 * gives the -wal and -shm files the mode of the database file. */
static int create_private_file(const char *path, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);

    if (fd >= 0) {
        close(fd);
        return 0;
    }
    if (errno == EEXIST)
        return 0;
    snprintf(err, errlen, "registry %s: create failed: %s", path,
             strerror(errno));
    return ING_EDB;
}

int registry_open(const char *path, registry_t **out, char *err, size_t errlen)
{
    registry_t *r;
    int rc;

    *out = NULL;
    rc = check_parent_folder(path, err, errlen);
    if (rc == 0)
        rc = create_private_file(path, err, errlen);
    if (rc != 0)
        return rc;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        return ING_ENOMEM;
    r->path = strdup(path);
    if (r->path == NULL) {
        rc = ING_ENOMEM;
        goto error;
    }
    if (sqlite3_open_v2(path, &r->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE,
                        NULL) != SQLITE_OK) {
        snprintf(err, errlen, "registry %s: open failed: %s", path,
                 r->db ? sqlite3_errmsg(r->db) : "out of memory");
        rc = ING_EDB;
        goto error;
    }
    sqlite3_extended_result_codes(r->db, 1);
    sqlite3_busy_timeout(r->db, AUTH_BUSY_TIMEOUT_MS);
    enable_wal(r->db, path);
    rc = auth_schema_migrate(r->db, path, err, errlen);
    if (rc != 0)
        goto error;
    *out = r;
    return 0;

error:
    registry_close(r);
    return rc;
}

void registry_close(registry_t *r)
{
    if (r == NULL)
        return;
    sqlite3_close(r->db);
    free(r->path);
    free(r);
}

int registry_device_add(registry_t *r, const char *id, const char *type,
                        char key[AUTH_KEY_LEN + 1])
{
    static const char sql[] =
        "INSERT INTO devices (id, type, enabled, key_hash, created_ms)"
        " VALUES (?1, ?2, 1, ?3, ?4)";
    sqlite3_stmt *stmt = NULL;
    uint8_t hash[AUTH_HASH_LEN];
    int rc;

    if (!auth_device_id_valid(id) || !auth_type_name_valid(type))
        return ING_EINVAL;
    rc = auth_key_generate(key, hash);
    if (rc != 0)
        goto done;
    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "insert device");
        goto done;
    }
    sqlite3_bind_text(stmt, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 2, type, -1, SQLITE_STATIC);
    sqlite3_bind_blob(stmt, 3, hash, sizeof(hash), SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 4, auth_now_ms());
    rc = sqlite3_step(stmt);
    if (rc == SQLITE_DONE)
        rc = 0;
    else if (rc == SQLITE_CONSTRAINT_PRIMARYKEY)
        rc = ING_EEXIST;
    else
        rc = query_failed(r, "insert device");

done:
    sqlite3_finalize(stmt);
    if (rc != 0)
        OPENSSL_cleanse(key, AUTH_KEY_LEN + 1);
    return rc;
}

#define ENTRY_COLUMNS                                                          \
    "SELECT id, type, enabled, created_ms, key_rotated_ms,"                    \
    " old_key_hash IS NOT NULL, old_key_expires_ms, cert_fingerprint,"         \
    " jwt_alg, " AUTH_LIMIT_COLUMNS " FROM devices"

/* Calls `fn` for each row of `stmt`, a query on ENTRY_COLUMNS. Returns the
 * number of rows, or ING_EDB. */
static int for_each_entry(registry_t *r, sqlite3_stmt *stmt,
                          void (*fn)(const registry_entry_t *e, void *arg),
                          void *arg)
{
    int64_t now = auth_now_ms();
    int rows = 0;
    int rc;

    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        registry_entry_t e;

        e.id = (const char *)sqlite3_column_text(stmt, 0);
        e.type = (const char *)sqlite3_column_text(stmt, 1);
        e.enabled = sqlite3_column_int(stmt, 2) != 0;
        e.created_ms = sqlite3_column_int64(stmt, 3);
        e.key_rotated_ms = sqlite3_column_int64(stmt, 4);
        e.old_key_expires_ms = 0;
        /* A previous key whose grace period has ended no longer works, so
         * it is reported like no previous key. */
        if (sqlite3_column_int(stmt, 5) && sqlite3_column_int64(stmt, 6) > now)
            e.old_key_expires_ms = sqlite3_column_int64(stmt, 6);
        e.cert_fingerprint = NULL;
        if (sqlite3_column_bytes(stmt, 7) == AUTH_FINGERPRINT_LEN)
            e.cert_fingerprint = sqlite3_column_blob(stmt, 7);
        e.jwt_alg = (const char *)sqlite3_column_text(stmt, 8);
        auth_limits_read(stmt, 9, &e.limits);
        if (e.id == NULL || e.type == NULL)
            return query_failed(r, "read devices");
        fn(&e, arg);
        rows++;
    }
    if (rc != SQLITE_DONE)
        return query_failed(r, "read devices");
    return rows;
}

int registry_device_list(registry_t *r,
                         void (*fn)(const registry_entry_t *e, void *arg),
                         void *arg)
{
    static const char sql[] = ENTRY_COLUMNS " ORDER BY id";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "list devices");
        goto done;
    }
    rc = for_each_entry(r, stmt, fn, arg);
    if (rc > 0)
        rc = 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

int registry_device_get(registry_t *r, const char *id,
                        void (*fn)(const registry_entry_t *e, void *arg),
                        void *arg)
{
    static const char sql[] = ENTRY_COLUMNS " WHERE id = ?1";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "get device");
        goto done;
    }
    sqlite3_bind_text(stmt, 1, id, -1, SQLITE_STATIC);
    rc = for_each_entry(r, stmt, fn, arg);
    if (rc == 0)
        rc = ING_ENOTFOUND;
    else if (rc > 0)
        rc = 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

int registry_device_set_enabled(registry_t *r, const char *id, int enabled)
{
    static const char sql[] = "UPDATE devices SET enabled = ?1 WHERE id = ?2";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "set enabled");
        goto done;
    }
    sqlite3_bind_int(stmt, 1, enabled ? 1 : 0);
    sqlite3_bind_text(stmt, 2, id, -1, SQLITE_STATIC);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
        rc = query_failed(r, "set enabled");
        goto done;
    }
    rc = sqlite3_changes(r->db) == 0 ? ING_ENOTFOUND : 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

int registry_device_rotate_key(registry_t *r, const char *id, uint64_t grace_ms,
                               char key[AUTH_KEY_LEN + 1])
{
    /* SQLite evaluates every SET expression against the row before the
     * update, so old_key_hash receives the key hash being replaced. */
    static const char keep_old_sql[] =
        "UPDATE devices SET old_key_hash = key_hash,"
        " old_key_expires_ms = ?3, key_hash = ?1, key_rotated_ms = ?2"
        " WHERE id = ?4";
    static const char revoke_old_sql[] =
        "UPDATE devices SET old_key_hash = NULL,"
        " old_key_expires_ms = NULL, key_hash = ?1, key_rotated_ms = ?2"
        " WHERE id = ?4";
    sqlite3_stmt *stmt = NULL;
    uint8_t hash[AUTH_HASH_LEN];
    int64_t now = auth_now_ms();
    int64_t expires_ms;
    int rc;

    rc = auth_key_generate(key, hash);
    if (rc != 0)
        goto done;
    if (sqlite3_prepare_v2(r->db, grace_ms > 0 ? keep_old_sql : revoke_old_sql,
                           -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "rotate key");
        goto done;
    }
    /* A grace period past the end of int64 milliseconds means "never". */
    if (grace_ms > (uint64_t)(INT64_MAX - now))
        expires_ms = INT64_MAX;
    else
        expires_ms = now + (int64_t)grace_ms;
    sqlite3_bind_blob(stmt, 1, hash, sizeof(hash), SQLITE_STATIC);
    sqlite3_bind_int64(stmt, 2, now);
    if (grace_ms > 0)
        sqlite3_bind_int64(stmt, 3, expires_ms);
    sqlite3_bind_text(stmt, 4, id, -1, SQLITE_STATIC);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
        rc = query_failed(r, "rotate key");
        goto done;
    }
    rc = sqlite3_changes(r->db) == 0 ? ING_ENOTFOUND : 0;

done:
    sqlite3_finalize(stmt);
    if (rc != 0)
        OPENSSL_cleanse(key, AUTH_KEY_LEN + 1);
    return rc;
}

void auth_limits_read(sqlite3_stmt *stmt, int first, auth_limits_t *out)
{
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < AUTH_LIMIT_COUNT; i++) {
        sqlite3_int64 v;

        if (sqlite3_column_type(stmt, first + i) != SQLITE_INTEGER)
            continue;
        /* A negative value can only come from editing the file by hand,
         * and is read as no override. */
        v = sqlite3_column_int64(stmt, first + i);
        if (v < 0)
            continue;
        out->set |= 1u << i;
        out->value[i] = (uint64_t)v;
    }
}

int registry_device_set_limits(registry_t *r, const char *id,
                               const auth_limits_t *limits)
{
    static const char sql[] =
        "UPDATE devices SET limit_readings_per_second = ?1,"
        " limit_burst = ?2, limit_bytes_per_second = ?3,"
        " limit_daily_readings = ?4 WHERE id = ?5";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "set limits");
        goto done;
    }
    for (int i = 0; i < AUTH_LIMIT_COUNT; i++) {
        if (limits->set & (1u << i))
            sqlite3_bind_int64(stmt, i + 1, (sqlite3_int64)limits->value[i]);
        else
            sqlite3_bind_null(stmt, i + 1);
    }
    sqlite3_bind_text(stmt, 5, id, -1, SQLITE_STATIC);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
        rc = query_failed(r, "set limits");
        goto done;
    }
    rc = sqlite3_changes(r->db) == 0 ? ING_ENOTFOUND : 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

int registry_device_set_cert(registry_t *r, const char *id,
                             const unsigned char fingerprint[32])
{
    static const char sql[] =
        "UPDATE devices SET cert_fingerprint = ?1 WHERE id = ?2";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "set certificate");
        goto done;
    }
    if (fingerprint != NULL)
        sqlite3_bind_blob(stmt, 1, fingerprint, AUTH_FINGERPRINT_LEN,
                          SQLITE_STATIC);
    else
        sqlite3_bind_null(stmt, 1);
    sqlite3_bind_text(stmt, 2, id, -1, SQLITE_STATIC);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
        rc = query_failed(r, "set certificate");
        goto done;
    }
    rc = sqlite3_changes(r->db) == 0 ? ING_ENOTFOUND : 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

/* Runs an UPDATE of the JWT columns: ?1 alg, ?2 public key, ?3 secret,
 * ?4 id. A NULL value clears its column. */
static int update_jwt(registry_t *r, const char *id, const char *alg,
                      const char *pem, const uint8_t *secret,
                      size_t secret_len)
{
    static const char sql[] =
        "UPDATE devices SET jwt_alg = ?1, jwt_public_key = ?2,"
        " jwt_secret = ?3 WHERE id = ?4";
    sqlite3_stmt *stmt = NULL;
    int rc;

    if (sqlite3_prepare_v2(r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(r, "set JWT");
        goto done;
    }
    sqlite3_bind_text(stmt, 1, alg, -1, SQLITE_STATIC);
    sqlite3_bind_text(stmt, 2, pem, -1, SQLITE_STATIC);
    if (secret != NULL)
        sqlite3_bind_blob(stmt, 3, secret, (int)secret_len, SQLITE_STATIC);
    else
        sqlite3_bind_null(stmt, 3);
    sqlite3_bind_text(stmt, 4, id, -1, SQLITE_STATIC);
    if (sqlite3_step(stmt) != SQLITE_DONE) {
        rc = query_failed(r, "set JWT");
        goto done;
    }
    rc = sqlite3_changes(r->db) == 0 ? ING_ENOTFOUND : 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

int registry_device_set_jwt_key(registry_t *r, const char *id,
                                const char *alg, const char *pem, char *err,
                                size_t errlen)
{
    enum auth_jwt_alg parsed = auth_jwt_alg_parse(alg);
    EVP_PKEY *key;

    if (parsed == AUTH_JWT_ALG_NONE || parsed == AUTH_JWT_ALG_HS256) {
        snprintf(err, errlen,
                 "invalid algorithm \"%s\": expected RS256, ES256 or EdDSA "
                 "(HS256 takes a secret from new-jwt-secret)",
                 alg);
        return ING_EINVAL;
    }
    /* The key is checked here so that a bad file fails the command instead
     * of being skipped at the next reload. */
    key = auth_jwt_key_parse(pem, strlen(pem), parsed, err, errlen);
    if (key == NULL)
        return ING_EINVAL;
    EVP_PKEY_free(key);
    return update_jwt(r, id, auth_jwt_alg_name(parsed), pem, NULL, 0);
}

int registry_device_new_jwt_secret(registry_t *r, const char *id,
                                   char secret[AUTH_JWT_SECRET_TEXT_LEN + 1])
{
    uint8_t raw[AUTH_JWT_SECRET_LEN];
    int rc;

    rc = ids_random_bytes(raw, sizeof(raw));
    if (rc != 0)
        goto done;
    rc = update_jwt(r, id, "HS256", NULL, raw, sizeof(raw));
    if (rc == 0)
        auth_base64url_encode(raw, sizeof(raw), secret);

done:
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}

int registry_device_clear_jwt(registry_t *r, const char *id)
{
    return update_jwt(r, id, NULL, NULL, NULL, 0);
}
