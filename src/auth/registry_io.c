/* The devices table as export and import see it, and the export itself. */
#include <jansson.h>
#include <openssl/crypto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth/auth_internal.h"
#include "auth/registry_io.h"
#include "auth/registry_io_internal.h"
#include "core/errors.h"

/* Columns whose JSON form is fixed by name. Every other column gets its
 * kind from its declared type. */
static const struct {
    const char *name;
    enum auth_io_kind kind;
    int nonnegative;
} known_columns[] = {
    {"id", AUTH_IO_TEXT, 0},
    {"type", AUTH_IO_TEXT, 0},
    {"enabled", AUTH_IO_BOOLEAN, 0},
    {"key_hash", AUTH_IO_HASH, 0},
    {"old_key_hash", AUTH_IO_HASH, 0},
    {"old_key_expires_ms", AUTH_IO_INTEGER, 1},
    {"created_ms", AUTH_IO_INTEGER, 1},
    {"key_rotated_ms", AUTH_IO_INTEGER, 1},
    {"cert_fingerprint", AUTH_IO_HASH, 0},
    {"jwt_alg", AUTH_IO_TEXT, 0},
    {"jwt_public_key", AUTH_IO_TEXT, 0},
    {"jwt_secret", AUTH_IO_SECRET, 0},
};

#define KNOWN_COUNT (sizeof(known_columns) / sizeof(known_columns[0]))

/* Prefix of the flow-control limit columns, which hold counts. */
#define LIMIT_PREFIX "limit_"

/* A string that grows as it is appended to. */
struct text {
    char *data;
    size_t len;
    size_t cap;
    int failed; /* an allocation failed, so `data` is incomplete */
};

static void text_append(struct text *t, const char *s, size_t n)
{
    if (t->failed)
        return;
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 128;
        char *data;

        while (t->len + n + 1 > cap)
            cap *= 2;
        data = realloc(t->data, cap);
        if (data == NULL) {
            t->failed = 1;
            return;
        }
        t->data = data;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
}

static void text_printf(struct text *t, const char *fmt, ...)
{
    char buf[64];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf)) {
        t->failed = 1;
        return;
    }
    text_append(t, buf, (size_t)n);
}

/* Appends `name` as a quoted SQL identifier, doubling any quote in it. */
static void text_identifier(struct text *t, const char *name)
{
    text_append(t, "\"", 1);
    for (const char *p = name; *p != '\0'; p++) {
        text_append(t, p, 1);
        if (*p == '"')
            text_append(t, p, 1);
    }
    text_append(t, "\"", 1);
}

/* Chooses the kind of a column that known_columns does not name, by the
 * affinity rules of SQLite (section 3.1 of its datatype documentation). */
static enum auth_io_kind kind_of_declared(const char *declared)
{
    char upper[64];
    size_t n = 0;

    for (; declared != NULL && declared[n] != '\0' && n + 1 < sizeof(upper);
         n++) {
        char c = declared[n];
        upper[n] = (c >= 'a' && c <= 'z') ? (char)(c - 'a' + 'A') : c;
    }
    upper[n] = '\0';
    if (strstr(upper, "INT") != NULL)
        return AUTH_IO_INTEGER;
    if (strstr(upper, "CHAR") != NULL || strstr(upper, "CLOB") != NULL ||
        strstr(upper, "TEXT") != NULL)
        return AUTH_IO_TEXT;
    if (n == 0 || strstr(upper, "BLOB") != NULL)
        return AUTH_IO_BLOB;
    if (strstr(upper, "REAL") != NULL || strstr(upper, "FLOA") != NULL ||
        strstr(upper, "DOUB") != NULL)
        return AUTH_IO_REAL;
    return AUTH_IO_ANY;
}

static void describe_column(struct auth_io_column *c, const char *declared)
{
    for (size_t i = 0; i < KNOWN_COUNT; i++) {
        if (strcmp(known_columns[i].name, c->name) == 0) {
            c->kind = known_columns[i].kind;
            c->nonnegative = known_columns[i].nonnegative;
            return;
        }
    }
    c->kind = kind_of_declared(declared);
    /* Limits are counts or rates, and a negative one has no meaning. */
    if (strncmp(c->name, LIMIT_PREFIX, strlen(LIMIT_PREFIX)) == 0 &&
        c->kind == AUTH_IO_INTEGER)
        c->nonnegative = 1;
}

/* Builds the SELECT, INSERT and UPDATE statements over every column. */
static int build_statements(struct auth_io_schema *s)
{
    struct text select = {0}, insert = {0}, update = {0};
    int rc = 0;

    text_printf(&select, "SELECT ");
    text_printf(&insert, "INSERT INTO devices (");
    text_printf(&update, "UPDATE devices SET ");
    for (size_t i = 0; i < s->count; i++) {
        const char *sep = i > 0 ? ", " : "";

        text_printf(&select, "%s", sep);
        text_identifier(&select, s->columns[i].name);
        text_printf(&insert, "%s", sep);
        text_identifier(&insert, s->columns[i].name);
        text_printf(&update, "%s", sep);
        text_identifier(&update, s->columns[i].name);
        text_printf(&update, " = ?%zu", i + 1);
    }
    text_printf(&select, " FROM devices");
    text_printf(&insert, ") VALUES (");
    for (size_t i = 0; i < s->count; i++)
        text_printf(&insert, "%s?%zu", i > 0 ? ", " : "", i + 1);
    text_printf(&insert, ")");
    text_printf(&update, " WHERE id = ?%zu", s->count + 1);
    if (select.failed || insert.failed || update.failed) {
        free(select.data);
        free(insert.data);
        free(update.data);
        rc = ING_ENOMEM;
    } else {
        s->select_sql = select.data;
        s->insert_sql = insert.data;
        s->update_sql = update.data;
    }
    return rc;
}

/* Appends one row of PRAGMA table_info to `s`. */
static int add_column(struct auth_io_schema *s, sqlite3_stmt *stmt)
{
    const char *name = (const char *)sqlite3_column_text(stmt, 1);
    const char *declared = (const char *)sqlite3_column_text(stmt, 2);
    struct auth_io_column *columns;
    struct auth_io_column *c;

    if (name == NULL)
        return ING_EDB;
    columns = realloc(s->columns, (s->count + 1) * sizeof(*columns));
    if (columns == NULL)
        return ING_ENOMEM;
    s->columns = columns;
    c = &s->columns[s->count];
    memset(c, 0, sizeof(*c));
    c->name = strdup(name);
    if (c->name == NULL)
        return ING_ENOMEM;
    s->count++;
    /* The primary key is NOT NULL in effect, whatever its declaration. */
    c->not_null =
        sqlite3_column_int(stmt, 3) != 0 || sqlite3_column_int(stmt, 5) != 0;
    describe_column(c, declared);
    return 0;
}

int auth_io_schema_read(sqlite3 *db, struct auth_io_schema *s)
{
    sqlite3_stmt *stmt = NULL;
    int rc = 0;
    int step;

    memset(s, 0, sizeof(*s));
    if (sqlite3_prepare_v2(db, "PRAGMA table_info(devices)", -1, &stmt,
                           NULL) != SQLITE_OK) {
        rc = ING_EDB;
        goto error;
    }
    while ((step = sqlite3_step(stmt)) == SQLITE_ROW) {
        rc = add_column(s, stmt);
        if (rc != 0)
            goto error;
    }
    if (step != SQLITE_DONE || auth_io_schema_find(s, "id") < 0) {
        rc = ING_EDB;
        goto error;
    }
    rc = build_statements(s);
    if (rc != 0)
        goto error;
    sqlite3_finalize(stmt);
    return 0;

error:
    sqlite3_finalize(stmt);
    auth_io_schema_free(s);
    return rc;
}

void auth_io_schema_free(struct auth_io_schema *s)
{
    for (size_t i = 0; i < s->count; i++)
        free(s->columns[i].name);
    free(s->columns);
    free(s->select_sql);
    free(s->insert_sql);
    free(s->update_sql);
    memset(s, 0, sizeof(*s));
}

int auth_io_schema_find(const struct auth_io_schema *s, const char *name)
{
    for (size_t i = 0; i < s->count; i++) {
        if (strcmp(s->columns[i].name, name) == 0)
            return (int)i;
    }
    return -1;
}

void auth_io_hex_encode(const uint8_t *in, size_t len, char *out)
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < len; i++) {
        out[i * 2] = digits[in[i] >> 4];
        out[i * 2 + 1] = digits[in[i] & 0x0f];
    }
    out[len * 2] = '\0';
}

static const char *storage_name(int type)
{
    switch (type) {
    case SQLITE_INTEGER:
        return "an integer";
    case SQLITE_FLOAT:
        return "a real number";
    case SQLITE_TEXT:
        return "text";
    case SQLITE_BLOB:
        return "a blob";
    default:
        return "NULL";
    }
}

/* Returns a JSON string of the blob in column `i`, in hex or, for a
 * secret, in base64url. */
static json_t *blob_value(sqlite3_stmt *stmt, int i, int base64url)
{
    const uint8_t *data = sqlite3_column_blob(stmt, i);
    size_t len = (size_t)sqlite3_column_bytes(stmt, i);
    json_t *value;
    char *text;

    text = malloc(len * 2 + 1);
    if (text == NULL)
        return NULL;
    if (len == 0)
        text[0] = '\0';
    else if (base64url)
        auth_base64url_encode(data, len, text);
    else
        auth_io_hex_encode(data, len, text);
    value = json_string(text);
    OPENSSL_cleanse(text, len * 2 + 1);
    free(text);
    return value;
}

/* Returns the JSON value of column `i` of the current row, or NULL with a
 * reason in `err` when the stored value does not fit the column's kind. */
static json_t *column_value(sqlite3_stmt *stmt, int i,
                            const struct auth_io_column *c, char *err,
                            size_t errlen)
{
    int type = sqlite3_column_type(stmt, i);
    int want = SQLITE_NULL;

    switch (c->kind) {
    case AUTH_IO_TEXT:
        want = SQLITE_TEXT;
        break;
    case AUTH_IO_INTEGER:
    case AUTH_IO_BOOLEAN:
        want = SQLITE_INTEGER;
        break;
    case AUTH_IO_REAL:
        /* SQLite stores a whole REAL value as an integer on disk, and
         * gives it back as a float. */
        want = SQLITE_FLOAT;
        break;
    case AUTH_IO_HASH:
    case AUTH_IO_BLOB:
    case AUTH_IO_SECRET:
        want = SQLITE_BLOB;
        break;
    case AUTH_IO_ANY:
        want = type;
        if (type == SQLITE_BLOB) {
            snprintf(err, errlen,
                     "column %s holds a blob, expected text or a number",
                     c->name);
            return NULL;
        }
        break;
    }
    if (type != want) {
        snprintf(err, errlen, "column %s holds %s, expected %s", c->name,
                 storage_name(type), storage_name(want));
        return NULL;
    }
    switch (type) {
    case SQLITE_TEXT:
        return json_stringn((const char *)sqlite3_column_text(stmt, i),
                            (size_t)sqlite3_column_bytes(stmt, i));
    case SQLITE_INTEGER:
        if (c->kind == AUTH_IO_BOOLEAN)
            return json_boolean(sqlite3_column_int64(stmt, i) != 0);
        return json_integer(sqlite3_column_int64(stmt, i));
    case SQLITE_FLOAT:
        return json_real(sqlite3_column_double(stmt, i));
    default:
        return blob_value(stmt, i, c->kind == AUTH_IO_SECRET);
    }
}

/* Builds the JSON object of the current row. Returns it, or NULL with a
 * message in `err`. */
static json_t *row_object(const struct auth_io_schema *s, sqlite3_stmt *stmt,
                          const registry_export_options_t *opts, char *err,
                          size_t errlen)
{
    const char *id = (const char *)sqlite3_column_text(stmt, 0);
    json_t *obj = json_object();
    char reason[160];

    if (obj == NULL ||
        json_object_set_new(obj, "schema_version",
                            json_integer(REGISTRY_EXPORT_VERSION)) != 0)
        goto nomem;
    for (size_t i = 0; i < s->count; i++) {
        const struct auth_io_column *c = &s->columns[i];
        json_t *value;

        reason[0] = '\0';
        if (sqlite3_column_type(stmt, (int)i) == SQLITE_NULL)
            continue;
        if (c->kind == AUTH_IO_SECRET && !opts->include_secrets) {
            if (opts->on_secret_omitted != NULL)
                opts->on_secret_omitted(id, opts->arg);
            continue;
        }
        value = column_value(stmt, (int)i, c, reason, sizeof(reason));
        if (value == NULL && reason[0] != '\0') {
            snprintf(err, errlen, "device \"%s\": %s", id ? id : "?", reason);
            json_decref(obj);
            return NULL;
        }
        if (json_object_set_new(obj, c->name, value) != 0)
            goto nomem;
    }
    return obj;

nomem:
    snprintf(err, errlen, "out of memory");
    json_decref(obj);
    return NULL;
}

/* Writes `obj` as one line. Returns 0, ING_ENOMEM or ING_EIO. */
static int write_line(FILE *out, json_t *obj)
{
    char *line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    int rc = 0;

    if (line == NULL)
        return ING_ENOMEM;
    if (fputs(line, out) == EOF || fputc('\n', out) == EOF)
        rc = ING_EIO;
    /* The line may carry an HS256 secret. */
    OPENSSL_cleanse(line, strlen(line));
    free(line);
    return rc;
}

int registry_export(registry_t *r, FILE *out,
                    const registry_export_options_t *opts, char *err,
                    size_t errlen)
{
    struct auth_io_schema schema;
    sqlite3_stmt *stmt = NULL;
    struct text sql = {0};
    int count = 0;
    int rc;
    int step;

    err[0] = '\0';
    rc = auth_io_schema_read(r->db, &schema);
    if (rc != 0) {
        snprintf(err, errlen, "registry %s: reading its columns failed: %s",
                 r->path, rc == ING_EDB ? sqlite3_errmsg(r->db) : "no memory");
        return rc;
    }
    /* Column 0 must be the id, which row_object names in its messages. */
    if (strcmp(schema.columns[0].name, "id") != 0) {
        snprintf(err, errlen, "registry %s: the first column is not id",
                 r->path);
        rc = ING_EDB;
        goto done;
    }
    text_append(&sql, schema.select_sql, strlen(schema.select_sql));
    text_printf(&sql, " ORDER BY id");
    if (sql.failed) {
        rc = ING_ENOMEM;
        goto done;
    }
    if (sqlite3_prepare_v2(r->db, sql.data, -1, &stmt, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "registry %s: reading devices failed: %s",
                 r->path, sqlite3_errmsg(r->db));
        rc = ING_EDB;
        goto done;
    }
    while ((step = sqlite3_step(stmt)) == SQLITE_ROW) {
        json_t *obj = row_object(&schema, stmt, opts, err, errlen);

        if (obj == NULL) {
            rc = ING_EDB;
            goto done;
        }
        rc = write_line(out, obj);
        json_decref(obj);
        if (rc != 0)
            goto done;
        count++;
    }
    if (step != SQLITE_DONE) {
        snprintf(err, errlen, "registry %s: reading devices failed: %s",
                 r->path, sqlite3_errmsg(r->db));
        rc = ING_EDB;
        goto done;
    }
    if (fflush(out) != 0 || ferror(out))
        rc = ING_EIO;

done:
    if (rc == ING_EIO && err[0] == '\0')
        snprintf(err, errlen, "writing the export failed");
    if (rc == ING_ENOMEM && err[0] == '\0')
        snprintf(err, errlen, "out of memory");
    sqlite3_finalize(stmt);
    free(sql.data);
    auth_io_schema_free(&schema);
    return rc != 0 ? rc : count;
}
