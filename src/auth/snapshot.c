/* In-memory snapshot of the registry that the running service authenticates
 * against.
 *
 * A snapshot is immutable once built. Readers pin the current one with a
 * reference count, and a reload builds a new snapshot and swaps the pointer,
 * so a request never waits for SQLite and never reads a half-built table.
 */
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/errors.h"
#include "core/log.h"

#define EMPTY_SLOT UINT32_MAX

/* One slot of the key hash table. Both the current key and the previous
 * key of a device get a slot. */
struct key_slot {
    uint8_t hash[AUTH_HASH_LEN];
    uint32_t device;    /* index into devices, EMPTY_SLOT when unused */
    int64_t expires_ms; /* 0 for a current key */
};

struct snapshot {
    atomic_size_t refs;
    size_t device_count;
    struct snapshot_device *devices;
    size_t slot_mask; /* slot count minus one, and the count is a power of 2 */
    struct key_slot *slots;
    /* Device indexes by id, for protocols where the broker authenticated
     * the device and only its id arrives. Same sizing as `slots`. */
    size_t id_mask;
    uint32_t *id_slots;
};

/* Keys collected while reading rows, before the table size is known. */
struct key_list {
    struct key_slot *keys;
    size_t count;
    size_t cap;
};

static void snapshot_free(struct snapshot *s)
{
    if (s == NULL)
        return;
    for (size_t d = 0; s->devices != NULL && d < s->device_count; d++) {
        EVP_PKEY_free(s->devices[d].jwt_key);
        if (s->devices[d].jwt_secret != NULL) {
            OPENSSL_cleanse(s->devices[d].jwt_secret,
                            s->devices[d].jwt_secret_len);
            free(s->devices[d].jwt_secret);
        }
    }
    free(s->devices);
    free(s->slots);
    free(s->id_slots);
    free(s);
}

struct snapshot *auth_snapshot_acquire(auth_t *a)
{
    struct snapshot *s;

    pthread_mutex_lock(&a->current_lock);
    s = a->current;
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    pthread_mutex_unlock(&a->current_lock);
    return s;
}

void auth_snapshot_release(struct snapshot *s)
{
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1)
        snapshot_free(s);
}

/* The first 8 bytes of a SHA-256 hash are uniformly distributed, so they
 * serve directly as the table hash. */
static size_t slot_start(const uint8_t hash[AUTH_HASH_LEN], size_t mask)
{
    uint64_t h;

    memcpy(&h, hash, sizeof(h));
    return (size_t)h & mask;
}

static int key_list_push(struct key_list *list, const void *hash,
                         uint32_t device, int64_t expires_ms)
{
    if (list->count == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 64;
        struct key_slot *keys = realloc(list->keys, cap * sizeof(*keys));
        if (keys == NULL)
            return ING_ENOMEM;
        list->keys = keys;
        list->cap = cap;
    }
    memcpy(list->keys[list->count].hash, hash, AUTH_HASH_LEN);
    list->keys[list->count].device = device;
    list->keys[list->count].expires_ms = expires_ms;
    list->count++;
    return 0;
}

/* Fills the open-addressing table of `s` from `list`. The table is at most
 * half full, so linear probing stays short. */
static int build_table(struct snapshot *s, const struct key_list *list)
{
    size_t slot_count = 16;

    while (slot_count < list->count * 2)
        slot_count *= 2;
    s->slots = malloc(slot_count * sizeof(*s->slots));
    if (s->slots == NULL)
        return ING_ENOMEM;
    s->slot_mask = slot_count - 1;
    for (size_t i = 0; i < slot_count; i++)
        s->slots[i].device = EMPTY_SLOT;
    for (size_t k = 0; k < list->count; k++) {
        size_t i = slot_start(list->keys[k].hash, s->slot_mask);
        while (s->slots[i].device != EMPTY_SLOT)
            i = (i + 1) & s->slot_mask;
        s->slots[i] = list->keys[k];
    }
    return 0;
}

/* FNV-1a, 64 bit. Device ids come from the registry, which only the
 * operator writes, so a keyed hash is not needed. */
static size_t id_hash(const char *id)
{
    uint64_t h = UINT64_C(14695981039346656037);

    for (; *id; id++) {
        h ^= (unsigned char)*id;
        h *= UINT64_C(1099511628211);
    }
    return (size_t)h;
}

/* Fills the id table of `s`, at most half full like the key table. */
static int build_id_table(struct snapshot *s)
{
    size_t slot_count = 16;

    while (slot_count < s->device_count * 2)
        slot_count *= 2;
    s->id_slots = malloc(slot_count * sizeof(*s->id_slots));
    if (s->id_slots == NULL)
        return ING_ENOMEM;
    s->id_mask = slot_count - 1;
    for (size_t i = 0; i < slot_count; i++)
        s->id_slots[i] = EMPTY_SLOT;
    for (size_t d = 0; d < s->device_count; d++) {
        size_t i = id_hash(s->devices[d].id) & s->id_mask;

        while (s->id_slots[i] != EMPTY_SLOT)
            i = (i + 1) & s->id_mask;
        s->id_slots[i] = (uint32_t)d;
    }
    return 0;
}

/* Copies the pinned certificate fingerprint and the JWT verification key
 * of a row into `dev`. A JWT key that fails to parse, or does not fit its
 * algorithm, is logged and left out, so the device keeps its other
 * methods. */
static void load_credentials(auth_t *a, sqlite3_stmt *stmt,
                             struct snapshot_device *dev)
{
    const char *alg_name = (const char *)sqlite3_column_text(stmt, 7);
    char quoted[512];
    char err[160] = "";

    if (sqlite3_column_type(stmt, 6) == SQLITE_BLOB &&
        sqlite3_column_bytes(stmt, 6) == AUTH_FINGERPRINT_LEN) {
        memcpy(dev->fingerprint, sqlite3_column_blob(stmt, 6),
               AUTH_FINGERPRINT_LEN);
        dev->has_fingerprint = 1;
    }
    if (alg_name == NULL)
        return;
    dev->jwt_alg = auth_jwt_alg_parse(alg_name);
    if (dev->jwt_alg == AUTH_JWT_ALG_HS256) {
        int len = sqlite3_column_bytes(stmt, 9);

        if (sqlite3_column_type(stmt, 9) == SQLITE_BLOB && len > 0) {
            dev->jwt_secret = malloc((size_t)len);
            if (dev->jwt_secret != NULL) {
                memcpy(dev->jwt_secret, sqlite3_column_blob(stmt, 9),
                       (size_t)len);
                dev->jwt_secret_len = (size_t)len;
                return;
            }
            snprintf(err, sizeof(err), "out of memory");
        } else {
            snprintf(err, sizeof(err), "HS256 without a secret");
        }
    } else if (dev->jwt_alg != AUTH_JWT_ALG_NONE) {
        const char *pem = (const char *)sqlite3_column_text(stmt, 8);

        if (pem != NULL) {
            dev->jwt_key = auth_jwt_key_parse(
                pem, (size_t)sqlite3_column_bytes(stmt, 8), dev->jwt_alg, err,
                sizeof(err));
            if (dev->jwt_key != NULL)
                return;
        } else {
            snprintf(err, sizeof(err), "no public key");
        }
    } else {
        snprintf(err, sizeof(err), "unknown algorithm");
    }
    dev->jwt_alg = AUTH_JWT_ALG_NONE;
    log_warn("registry JWT key skipped", "path=%s id=%s error=%s",
             log_quote(quoted, sizeof(quoted), a->path), dev->id, err);
}

/* Copies one row into the next device of `s` and its keys into `list`.
 * Returns 0, 1 when the row is skipped, or ING_ENOMEM. */
static int add_row(auth_t *a, sqlite3_stmt *stmt, struct snapshot *s,
                   struct key_list *list, int64_t now)
{
    const char *id = (const char *)sqlite3_column_text(stmt, 0);
    const char *type = (const char *)sqlite3_column_text(stmt, 1);
    struct snapshot_device *dev;
    uint32_t index = (uint32_t)s->device_count;
    char quoted[512];
    int rc;

    /* Rows come from a file that anyone with write access can edit, so a
     * bad row is skipped instead of failing the whole reload. */
    if (!auth_device_id_valid(id) || !auth_type_name_valid(type) ||
        sqlite3_column_bytes(stmt, 3) != AUTH_HASH_LEN) {
        log_warn("registry row skipped", "path=%s id=%s",
                 log_quote(quoted, sizeof(quoted), a->path),
                 id && auth_device_id_valid(id) ? id : "invalid");
        return 1;
    }
    dev = &s->devices[index];
    snprintf(dev->id, sizeof(dev->id), "%s", id);
    snprintf(dev->type, sizeof(dev->type), "%s", type);
    dev->enabled = sqlite3_column_int(stmt, 2) != 0;
    rc = key_list_push(list, sqlite3_column_blob(stmt, 3), index, 0);
    if (rc != 0)
        return rc;
    /* A previous key that has already expired is left out. Keys that expire
     * later are checked again at lookup time. */
    if (sqlite3_column_type(stmt, 4) == SQLITE_BLOB &&
        sqlite3_column_bytes(stmt, 4) == AUTH_HASH_LEN &&
        sqlite3_column_int64(stmt, 5) > now) {
        rc = key_list_push(list, sqlite3_column_blob(stmt, 4), index,
                           sqlite3_column_int64(stmt, 5));
        if (rc != 0)
            return rc;
    }
    load_credentials(a, stmt, dev);
    auth_limits_read(stmt, 10, &dev->limits);
    s->device_count++;
    return 0;
}

static int read_int_pragma(sqlite3 *db, const char *sql, int64_t *value)
{
    sqlite3_stmt *stmt = NULL;
    int rc = ING_EDB;

    if (sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) != SQLITE_OK)
        goto done;
    if (sqlite3_step(stmt) != SQLITE_ROW)
        goto done;
    *value = sqlite3_column_int64(stmt, 0);
    rc = 0;

done:
    sqlite3_finalize(stmt);
    return rc;
}

static int query_failed(auth_t *a, const char *query)
{
    char path[512];
    char error[512];

    log_error("registry query failed", "path=%s query=%s error=%s",
              log_quote(path, sizeof(path), a->path), query,
              log_quote(error, sizeof(error), sqlite3_errmsg(a->db)));
    return ING_EDB;
}

/* Reads all devices into a new snapshot. The caller holds reload_lock. */
static int snapshot_build(auth_t *a, struct snapshot **out)
{
    static const char sql[] =
        "SELECT id, type, enabled, key_hash, old_key_hash,"
        " old_key_expires_ms, cert_fingerprint, jwt_alg, jwt_public_key,"
        " jwt_secret, " AUTH_LIMIT_COLUMNS " FROM devices";
    struct key_list list = {0};
    struct snapshot *s = NULL;
    sqlite3_stmt *stmt = NULL;
    int64_t now = auth_now_ms();
    int64_t count = 0;
    int rc;

    /* A single read transaction makes the count and the rows agree even
     * when a command commits in between. */
    if (sqlite3_exec(a->db, "BEGIN", NULL, NULL, NULL) != SQLITE_OK) {
        rc = query_failed(a, "begin");
        goto done;
    }
    if (read_int_pragma(a->db, "SELECT count(*) FROM devices", &count) != 0 ||
        count < 0 || count >= EMPTY_SLOT) {
        rc = query_failed(a, "count devices");
        goto done;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    /* One extra element keeps calloc from returning NULL for count 0. */
    s->devices = calloc((size_t)count + 1, sizeof(*s->devices));
    if (s->devices == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    if (sqlite3_prepare_v2(a->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        rc = query_failed(a, "load devices");
        goto done;
    }
    for (;;) {
        int step = sqlite3_step(stmt);

        if (step == SQLITE_DONE)
            break;
        if (step != SQLITE_ROW) {
            rc = query_failed(a, "load devices");
            goto done;
        }
        /* The transaction keeps the row count fixed. This check only
         * guards the array bounds. */
        if (s->device_count == (size_t)count)
            break;
        rc = add_row(a, stmt, s, &list, now);
        if (rc < 0)
            goto done;
    }
    rc = build_table(s, &list);
    if (rc == 0)
        rc = build_id_table(s);
    if (rc != 0)
        goto done;
    atomic_init(&s->refs, 1);
    *out = s;
    s = NULL;

done:
    sqlite3_finalize(stmt);
    sqlite3_exec(a->db, "COMMIT", NULL, NULL, NULL);
    free(list.keys);
    snapshot_free(s);
    return rc;
}

/* Builds a snapshot and makes it current. The caller holds reload_lock. */
static int reload_locked(auth_t *a)
{
    struct snapshot *fresh = NULL;
    struct snapshot *old;
    int64_t version;
    char quoted[512];
    int rc;

    /* The version is read before the rows, so a commit that lands in
     * between causes one extra reload instead of a missed one. */
    if (read_int_pragma(a->db, "PRAGMA data_version", &version) != 0)
        return query_failed(a, "data_version");
    rc = snapshot_build(a, &fresh);
    if (rc != 0)
        return rc;
    a->data_version = version;

    pthread_mutex_lock(&a->current_lock);
    old = a->current;
    a->current = fresh;
    pthread_mutex_unlock(&a->current_lock);
    if (old != NULL)
        auth_snapshot_release(old);

    /* Debug level, because the service logs each reload it triggers. */
    log_debug("registry loaded", "path=%s devices=%zu",
              log_quote(quoted, sizeof(quoted), a->path), fresh->device_count);
    return 0;
}

/* Opens `path` read-only and checks that its schema is the one this build
 * reads. */
static int open_database(auth_t *a, const char *path, char *err, size_t errlen)
{
    int version = 0;

    /* SQLite reports a missing file only as "unable to open database
     * file", so name the cause first. */
    if (access(path, F_OK) != 0) {
        snprintf(err, errlen,
                 "registry %s does not exist; add a device with "
                 "`ingestd device add` to create it",
                 path);
        return ING_EDB;
    }
    if (sqlite3_open_v2(path, &a->db, SQLITE_OPEN_READONLY, NULL) !=
        SQLITE_OK) {
        snprintf(err, errlen, "registry %s: open failed: %s", path,
                 a->db ? sqlite3_errmsg(a->db) : "out of memory");
        return ING_EDB;
    }
    sqlite3_busy_timeout(a->db, AUTH_BUSY_TIMEOUT_MS);
    if (auth_schema_read_version(a->db, &version) != 0) {
        snprintf(err, errlen, "registry %s: reading user_version failed: %s",
                 path, sqlite3_errmsg(a->db));
        return ING_EDB;
    }
    if (version != auth_schema_version()) {
        /* The service opens the registry read-only, so only a command that
         * opens it for writing can migrate an older schema. */
        snprintf(err, errlen,
                 "registry %s: schema version %d, expected %d; run "
                 "`ingestd device list` with this ingestd to upgrade it",
                 path, version, auth_schema_version());
        return ING_EDB;
    }
    return 0;
}

int auth_open(const char *path, auth_t **out, char *err, size_t errlen)
{
    auth_t *a;
    int rc;

    *out = NULL;
    a = calloc(1, sizeof(*a));
    if (a == NULL)
        return ING_ENOMEM;
    pthread_mutex_init(&a->current_lock, NULL);
    pthread_mutex_init(&a->reload_lock, NULL);
    a->jwt.leeway_s = AUTH_DEFAULT_LEEWAY_S;
    a->jwt.max_lifetime_s = AUTH_DEFAULT_MAX_LIFETIME_S;
    a->path = strdup(path);
    a->guard = auth_guard_create(AUTH_DEFAULT_MAX_FAILURES,
                                 AUTH_DEFAULT_BLOCK_MS,
                                 AUTH_DEFAULT_GUARD_SIZE);
    if (a->path == NULL || a->guard == NULL) {
        rc = ING_ENOMEM;
        goto error;
    }
    rc = open_database(a, path, err, errlen);
    if (rc != 0)
        goto error;
    rc = reload_locked(a);
    if (rc != 0) {
        snprintf(err, errlen, "registry %s: loading devices failed: %s", path,
                 rc == ING_EDB ? sqlite3_errmsg(a->db) : ing_strerror(rc));
        goto error;
    }
    *out = a;
    return 0;

error:
    auth_close(a);
    return rc;
}

int auth_reload(auth_t *a)
{
    int rc;

    pthread_mutex_lock(&a->reload_lock);
    rc = reload_locked(a);
    pthread_mutex_unlock(&a->reload_lock);
    return rc;
}

int auth_reload_if_changed(auth_t *a)
{
    int64_t version;
    int rc;

    pthread_mutex_lock(&a->reload_lock);
    /* data_version changes only for commits made through other
     * connections, which are exactly the changes this process has not
     * loaded yet. */
    if (read_int_pragma(a->db, "PRAGMA data_version", &version) != 0) {
        rc = query_failed(a, "data_version");
        goto done;
    }
    if (version == a->data_version) {
        rc = 0;
        goto done;
    }
    rc = reload_locked(a);
    if (rc == 0)
        rc = 1;

done:
    pthread_mutex_unlock(&a->reload_lock);
    return rc;
}

enum auth_result auth_check_key(auth_t *a, const char *key, size_t len,
                                auth_device_t *dev)
{
    enum auth_result result = AUTH_UNKNOWN_KEY;
    uint8_t hash[AUTH_HASH_LEN];
    struct snapshot *s;
    size_t i;

    /* The key format is public, so rejecting a malformed key early reveals
     * nothing about stored keys. */
    if (len != AUTH_KEY_LEN ||
        memcmp(key, AUTH_KEY_PREFIX, AUTH_KEY_PREFIX_LEN) != 0)
        return AUTH_UNKNOWN_KEY;
    if (auth_key_hash(key, len, hash) != 0)
        return AUTH_UNKNOWN_KEY;

    s = auth_snapshot_acquire(a);
    for (i = slot_start(hash, s->slot_mask); s->slots[i].device != EMPTY_SLOT;
         i = (i + 1) & s->slot_mask) {
        const struct key_slot *slot = &s->slots[i];
        const struct snapshot_device *d;

        if (CRYPTO_memcmp(slot->hash, hash, AUTH_HASH_LEN) != 0)
            continue;
        if (slot->expires_ms != 0 && auth_now_ms() >= slot->expires_ms)
            break;
        d = &s->devices[slot->device];
        memcpy(dev->id, d->id, sizeof(dev->id));
        memcpy(dev->type, d->type, sizeof(dev->type));
        dev->limits = d->limits;
        result = d->enabled ? AUTH_OK : AUTH_DISABLED;
        break;
    }
    auth_snapshot_release(s);
    return result;
}

const struct snapshot_device *auth_snapshot_find(const struct snapshot *s,
                                                 const char *id)
{
    for (size_t i = id_hash(id) & s->id_mask; s->id_slots[i] != EMPTY_SLOT;
         i = (i + 1) & s->id_mask) {
        const struct snapshot_device *d = &s->devices[s->id_slots[i]];

        if (strcmp(d->id, id) == 0)
            return d;
    }
    return NULL;
}

enum auth_result auth_lookup_device(auth_t *a, const char *id,
                                    auth_device_t *dev)
{
    enum auth_result result = AUTH_UNKNOWN_DEVICE;
    const struct snapshot_device *d;
    struct snapshot *s;

    if (!auth_device_id_valid(id))
        return AUTH_UNKNOWN_DEVICE;
    s = auth_snapshot_acquire(a);
    d = auth_snapshot_find(s, id);
    if (d != NULL) {
        memcpy(dev->id, d->id, sizeof(dev->id));
        memcpy(dev->type, d->type, sizeof(dev->type));
        dev->limits = d->limits;
        result = d->enabled ? AUTH_OK : AUTH_DISABLED;
    }
    auth_snapshot_release(s);
    return result;
}

size_t auth_device_count(auth_t *a)
{
    struct snapshot *s = auth_snapshot_acquire(a);
    size_t count = s->device_count;

    auth_snapshot_release(s);
    return count;
}

void auth_close(auth_t *a)
{
    if (a == NULL)
        return;
    if (a->current != NULL)
        auth_snapshot_release(a->current);
    sqlite3_close(a->db);
    pthread_mutex_destroy(&a->current_lock);
    pthread_mutex_destroy(&a->reload_lock);
    auth_guard_destroy(a->guard);
    free(a->jwt.audience);
    free(a->jwt.issuer);
    free(a->path);
    free(a);
}
