/* Import of devices from JSON Lines as registry_export writes them.
 *
 * The import runs in two passes. The first reads and checks every line
 * without touching the registry, and the second writes the devices in one
 * transaction. Checks that need the registry (a kept HS256 secret, a key
 * hash owned by a device the input leaves out) run inside the transaction
 * and roll it back.
 */
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

/* The value of one column, converted from JSON. */
struct value {
    int type; /* SQLITE_NULL, SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT or
                 SQLITE_BLOB */
    sqlite3_int64 integer;
    double real;
    uint8_t *data; /* text with a NUL after it, or blob bytes */
    size_t len;
};

enum row_action {
    ROW_ADD,
    ROW_UPDATE,
    ROW_UNCHANGED,
};

/* One device of the input. */
struct row {
    size_t line;
    struct value *values; /* one per schema column */
    /* HS256 without "jwt_secret": the secret stored in the registry is
     * kept. */
    int keep_secret;
    enum row_action action;
    int key_changed; /* an update gives the device a different key hash */
};

struct import {
    registry_t *r;
    const registry_import_options_t *opts;
    registry_import_counts_t *counts;
    struct auth_io_schema schema;
    struct row *rows;
    size_t row_count;
    size_t row_cap;
    struct row **by_id; /* rows sorted by id, for duplicates and --replace */
    /* Column indexes of the columns with checks of their own, or -1. */
    int id_col, type_col, key_col, old_key_col, old_expires_col;
    int alg_col, pem_col, secret_col;
};

/* Passes "line N: FIELD: REASON" to the error callback and counts it.
 * `line` 0 leaves out the line, and a NULL `field` the field. */
static void report(struct import *im, size_t line, const char *field,
                   const char *fmt, ...)
{
    char message[512];
    size_t n = 0;
    va_list ap;

    im->counts->errors++;
    if (im->counts->errors > REGISTRY_IMPORT_ERRORS_MAX)
        return;
    if (line > 0)
        n += (size_t)snprintf(message, sizeof(message), "line %zu: ", line);
    if (field != NULL && n < sizeof(message))
        n += (size_t)snprintf(message + n, sizeof(message) - n, "%s: ",
                              field);
    if (n < sizeof(message)) {
        va_start(ap, fmt);
        vsnprintf(message + n, sizeof(message) - n, fmt, ap);
        va_end(ap);
    }
    im->opts->on_error(message, im->opts->arg);
}

static void db_failed(struct import *im, const char *operation)
{
    report(im, 0, NULL, "registry %s: %s failed: %s", im->r->path, operation,
           sqlite3_errmsg(im->r->db));
}

/* Copies at most 64 bytes of `s` into `out` for a message, with every byte
 * outside printable ASCII replaced by '?'. */
static void printable(const char *s, char out[68])
{
    size_t n = 0;

    for (; s[n] != '\0' && n < 64; n++)
        out[n] = (s[n] >= 0x20 && s[n] < 0x7f) ? s[n] : '?';
    if (s[n] != '\0') {
        memcpy(out + n, "...", 3);
        n += 3;
    }
    out[n] = '\0';
}

static void value_clear(struct value *v)
{
    if (v->data != NULL) {
        OPENSSL_cleanse(v->data, v->len);
        free(v->data);
    }
    memset(v, 0, sizeof(*v));
    v->type = SQLITE_NULL;
}

static void row_free(struct row *row, size_t columns)
{
    if (row->values == NULL)
        return;
    for (size_t i = 0; i < columns; i++)
        value_clear(&row->values[i]);
    free(row->values);
    row->values = NULL;
}

/* Stores `len` bytes as the text or blob value `v`. Returns 0 or
 * ING_ENOMEM. */
static int value_set_bytes(struct value *v, int type, const void *data,
                           size_t len)
{
    v->data = malloc(len + 1);
    if (v->data == NULL)
        return ING_ENOMEM;
    if (len > 0)
        memcpy(v->data, data, len);
    v->data[len] = '\0';
    v->len = len;
    v->type = type;
    return 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes the hex string `text` into `v`. `want` is the byte count it
 * must have, or 0 for any. Returns 0, ING_ENOMEM, or ING_EINVAL with a
 * reason in `why`. */
static int decode_hex(const char *text, size_t len, size_t want,
                      struct value *v, char *why, size_t whylen)
{
    if (want > 0 && len != want * 2) {
        snprintf(why, whylen, "expected %zu hex digits, got %zu characters",
                 want * 2, len);
        return ING_EINVAL;
    }
    if (len % 2 != 0) {
        snprintf(why, whylen, "expected an even number of hex digits, got %zu",
                 len);
        return ING_EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        if (hex_digit(text[i]) < 0) {
            snprintf(why, whylen,
                     "character %zu is not a hex digit (expected 0-9, a-f)",
                     i + 1);
            return ING_EINVAL;
        }
    }
    v->data = malloc(len / 2 + 1);
    if (v->data == NULL)
        return ING_ENOMEM;
    for (size_t i = 0; i < len / 2; i++)
        v->data[i] =
            (uint8_t)(hex_digit(text[i * 2]) << 4 | hex_digit(text[i * 2 + 1]));
    v->len = len / 2;
    v->type = SQLITE_BLOB;
    return 0;
}

/* Decodes an HS256 secret in base64url into `v`. */
static int decode_secret(const char *text, size_t len, struct value *v,
                         char *why, size_t whylen)
{
    uint8_t raw[AUTH_JWT_SECRET_LEN];
    long n;
    int rc;

    /* ingestd creates every secret from 32 random bytes, and a shorter one
     * would weaken the HMAC. */
    n = auth_base64url_decode(text, len, raw, sizeof(raw));
    if (len != AUTH_JWT_SECRET_TEXT_LEN || n != AUTH_JWT_SECRET_LEN) {
        snprintf(why, whylen,
                 "expected %d base64url characters (the %d bytes of an HS256 "
                 "secret)",
                 AUTH_JWT_SECRET_TEXT_LEN, AUTH_JWT_SECRET_LEN);
        OPENSSL_cleanse(raw, sizeof(raw));
        return ING_EINVAL;
    }
    rc = value_set_bytes(v, SQLITE_BLOB, raw, sizeof(raw));
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}

static const char *kind_expectation(enum auth_io_kind kind)
{
    switch (kind) {
    case AUTH_IO_TEXT:
        return "expected a string";
    case AUTH_IO_INTEGER:
        return "expected an integer";
    case AUTH_IO_REAL:
        return "expected a number";
    case AUTH_IO_BOOLEAN:
        return "expected true or false";
    case AUTH_IO_HASH:
    case AUTH_IO_BLOB:
        return "expected a string of hex digits";
    case AUTH_IO_SECRET:
        return "expected a base64url string";
    default:
        return "expected a string or a number";
    }
}

/* Converts the JSON member `json` into the value of column `c`. Returns 0,
 * ING_ENOMEM, or ING_EINVAL with a reason in `why`. JSON null leaves the
 * value NULL. */
static int convert_member(const struct auth_io_column *c, json_t *json,
                          struct value *v, char *why, size_t whylen)
{
    const char *text = json_is_string(json) ? json_string_value(json) : NULL;
    size_t len = text != NULL ? json_string_length(json) : 0;

    if (json_is_null(json))
        return 0;
    if (text != NULL && strlen(text) != len) {
        snprintf(why, whylen, "contains a NUL character");
        return ING_EINVAL;
    }
    switch (c->kind) {
    case AUTH_IO_TEXT:
        if (text != NULL)
            return value_set_bytes(v, SQLITE_TEXT, text, len);
        break;
    case AUTH_IO_INTEGER:
        if (json_is_integer(json)) {
            v->type = SQLITE_INTEGER;
            v->integer = json_integer_value(json);
            if (c->nonnegative && v->integer < 0) {
                snprintf(why, whylen, "must be 0 or more, got %lld",
                         (long long)v->integer);
                return ING_EINVAL;
            }
            return 0;
        }
        break;
    case AUTH_IO_REAL:
        if (json_is_number(json)) {
            v->type = SQLITE_FLOAT;
            v->real = json_number_value(json);
            return 0;
        }
        break;
    case AUTH_IO_BOOLEAN:
        if (json_is_boolean(json)) {
            v->type = SQLITE_INTEGER;
            v->integer = json_is_true(json) ? 1 : 0;
            return 0;
        }
        break;
    case AUTH_IO_HASH:
    case AUTH_IO_BLOB:
        if (text != NULL)
            return decode_hex(text, len,
                              c->kind == AUTH_IO_HASH ? AUTH_HASH_LEN : 0, v,
                              why, whylen);
        break;
    case AUTH_IO_SECRET:
        if (text != NULL)
            return decode_secret(text, len, v, why, whylen);
        break;
    case AUTH_IO_ANY:
        if (text != NULL)
            return value_set_bytes(v, SQLITE_TEXT, text, len);
        if (json_is_integer(json)) {
            v->type = SQLITE_INTEGER;
            v->integer = json_integer_value(json);
            return 0;
        }
        if (json_is_real(json)) {
            v->type = SQLITE_FLOAT;
            v->real = json_real_value(json);
            return 0;
        }
        break;
    }
    snprintf(why, whylen, "%s", kind_expectation(c->kind));
    return ING_EINVAL;
}

static const char *text_of(const struct row *row, int col)
{
    if (col < 0 || row->values[col].type != SQLITE_TEXT)
        return NULL;
    return (const char *)row->values[col].data;
}

static int is_null(const struct row *row, int col)
{
    return col < 0 || row->values[col].type == SQLITE_NULL;
}

/* Checks the id and type of `row`. Returns the number of errors. */
static int check_names(struct import *im, const struct row *row)
{
    const char *id = text_of(row, im->id_col);
    const char *type = text_of(row, im->type_col);
    char shown[68];
    int errors = 0;

    if (id != NULL && !auth_device_id_valid(id)) {
        printable(id, shown);
        report(im, row->line, "id",
               "invalid device id \"%s\": use 1 to %d characters from A-Z "
               "a-z 0-9 . _ : -",
               shown, AUTH_DEVICE_ID_MAX);
        errors++;
    }
    if (type == NULL)
        return errors;
    printable(type, shown);
    if (!auth_type_name_valid(type)) {
        report(im, row->line, "type",
               "invalid type name \"%s\": use 1 to %d characters from A-Z "
               "a-z 0-9 . _ -",
               shown, AUTH_TYPE_MAX);
        errors++;
    } else if (im->opts->type_known != NULL &&
               !im->opts->type_known(type, im->opts->arg)) {
        report(im, row->line, "type",
               "device type \"%s\" is not configured; add it under "
               "device_types",
               shown);
        errors++;
    }
    return errors;
}

/* Checks that the previous key's hash and its expiry come together. */
static int check_old_key(struct import *im, const struct row *row)
{
    int has_hash = !is_null(row, im->old_key_col);
    int has_expiry = !is_null(row, im->old_expires_col);

    if (has_hash && !has_expiry && im->old_expires_col >= 0) {
        report(im, row->line, "old_key_expires_ms",
               "missing; old_key_hash needs the end of its grace period");
        return 1;
    }
    if (has_expiry && !has_hash) {
        report(im, row->line, "old_key_expires_ms",
               "set without old_key_hash");
        return 1;
    }
    return 0;
}

/* Checks that the JWT members fit the algorithm: a PEM public key that
 * parses and fits RS256, ES256 or EdDSA, a secret only for HS256, and
 * nothing without an algorithm. */
static int check_jwt(struct import *im, struct row *row)
{
    const char *alg_name = text_of(row, im->alg_col);
    const char *pem = text_of(row, im->pem_col);
    int has_secret = !is_null(row, im->secret_col);
    enum auth_jwt_alg alg;
    char why[160] = "";
    char shown[68];
    EVP_PKEY *key;

    if (alg_name == NULL) {
        if (pem != NULL || has_secret) {
            report(im, row->line, pem != NULL ? "jwt_public_key" : "jwt_secret",
                   "set without jwt_alg");
            return 1;
        }
        return 0;
    }
    alg = auth_jwt_alg_parse(alg_name);
    if (alg == AUTH_JWT_ALG_NONE) {
        printable(alg_name, shown);
        report(im, row->line, "jwt_alg",
               "unknown algorithm \"%s\": expected RS256, ES256, EdDSA or "
               "HS256",
               shown);
        return 1;
    }
    if (alg == AUTH_JWT_ALG_HS256) {
        if (pem != NULL) {
            report(im, row->line, "jwt_public_key",
                   "HS256 takes a jwt_secret, not a public key");
            return 1;
        }
        row->keep_secret = !has_secret;
        return 0;
    }
    if (has_secret) {
        report(im, row->line, "jwt_secret", "%s takes a public key, not a "
               "secret", alg_name);
        return 1;
    }
    if (pem == NULL) {
        report(im, row->line, "jwt_public_key", "missing; %s needs a PEM "
               "public key", alg_name);
        return 1;
    }
    key = auth_jwt_key_parse(pem, strlen(pem), alg, why, sizeof(why));
    if (key == NULL) {
        report(im, row->line, "jwt_public_key", "%s", why);
        return 1;
    }
    EVP_PKEY_free(key);
    return 0;
}

/* Checks schema_version. Returns 0 when the line is in a known format. */
static int check_version(struct import *im, size_t line, json_t *obj)
{
    json_t *version = json_object_get(obj, "schema_version");

    if (version == NULL) {
        report(im, line, "schema_version", "missing");
        return -1;
    }
    if (!json_is_integer(version)) {
        report(im, line, "schema_version", "expected an integer");
        return -1;
    }
    if (json_integer_value(version) != REGISTRY_EXPORT_VERSION) {
        report(im, line, "schema_version",
               "unsupported version %lld; this ingestd reads version %d",
               (long long)json_integer_value(version),
               REGISTRY_EXPORT_VERSION);
        return -1;
    }
    return 0;
}

/* Converts every member of `obj` into `row`. Returns the number of
 * errors, or ING_ENOMEM. */
static int convert_members(struct import *im, json_t *obj, struct row *row)
{
    const char *name;
    json_t *member;
    char why[160];
    int errors = 0;

    json_object_foreach(obj, name, member)
    {
        int col;
        int rc;

        if (strcmp(name, "schema_version") == 0)
            continue;
        col = auth_io_schema_find(&im->schema, name);
        if (col < 0) {
            char shown[68];

            printable(name, shown);
            report(im, row->line, shown,
                   "unknown field; the registry has no such column");
            errors++;
            continue;
        }
        rc = convert_member(&im->schema.columns[col], member,
                            &row->values[col], why, sizeof(why));
        if (rc == ING_ENOMEM)
            return rc;
        if (rc != 0) {
            report(im, row->line, name, "%s", why);
            errors++;
        }
    }
    for (size_t i = 0; i < im->schema.count; i++) {
        const char *column = im->schema.columns[i].name;

        /* A member that failed to convert was reported above. */
        if (!im->schema.columns[i].not_null)
            continue;
        member = json_object_get(obj, column);
        if (member == NULL) {
            report(im, row->line, column, "missing");
            errors++;
        } else if (json_is_null(member)) {
            report(im, row->line, column, "must not be null");
            errors++;
        }
    }
    return errors;
}

/* Parses and checks one line. Keeps the device when the line has no
 * error. Returns 0 or ING_ENOMEM. */
static int parse_line(struct import *im, size_t line, const char *text,
                      size_t len)
{
    json_error_t jerr;
    struct row row = {.line = line};
    json_t *obj;
    int errors;
    int rc = 0;

    obj = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (obj == NULL) {
        report(im, line, NULL, "invalid JSON at column %d: %s", jerr.column,
               jerr.text);
        return 0;
    }
    if (!json_is_object(obj)) {
        report(im, line, NULL, "expected a JSON object");
        goto done;
    }
    if (check_version(im, line, obj) != 0)
        goto done;
    row.values = calloc(im->schema.count, sizeof(*row.values));
    if (row.values == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    for (size_t i = 0; i < im->schema.count; i++)
        row.values[i].type = SQLITE_NULL;
    errors = convert_members(im, obj, &row);
    if (errors < 0) {
        rc = errors;
        goto done;
    }
    errors += check_names(im, &row);
    errors += check_old_key(im, &row);
    errors += check_jwt(im, &row);
    if (errors > 0)
        goto done;
    if (im->row_count == im->row_cap) {
        size_t cap = im->row_cap ? im->row_cap * 2 : 64;
        struct row *rows = realloc(im->rows, cap * sizeof(*rows));

        if (rows == NULL) {
            rc = ING_ENOMEM;
            goto done;
        }
        im->rows = rows;
        im->row_cap = cap;
    }
    im->rows[im->row_count++] = row;
    row.values = NULL;

done:
    row_free(&row, im->schema.count);
    json_decref(obj);
    return rc;
}

/* Reads one line of at most REGISTRY_IMPORT_LINE_MAX bytes into `buf`,
 * without its newline. A longer line is read to its end and reported by
 * `*too_long`. Returns 1 for a line, 0 at the end of the input, or
 * ING_EIO. */
static int read_line(FILE *in, char *buf, size_t *len, int *too_long)
{
    int c = EOF;
    size_t n = 0;

    *too_long = 0;
    while ((c = getc(in)) != EOF && c != '\n') {
        if (n < REGISTRY_IMPORT_LINE_MAX)
            buf[n++] = (char)c;
        else
            *too_long = 1;
    }
    if (ferror(in))
        return ING_EIO;
    if (c == EOF && n == 0 && !*too_long)
        return 0;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    buf[n] = '\0';
    *len = n;
    return 1;
}

static int is_blank(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (s[i] != ' ' && s[i] != '\t')
            return 0;
    }
    return 1;
}

/* Reads and checks every line of `in`. Returns 0, ING_EIO or ING_ENOMEM.
 * Errors in the input are only counted. */
static int read_input(struct import *im, FILE *in)
{
    char *buf = malloc(REGISTRY_IMPORT_LINE_MAX + 1);
    size_t line = 0;
    size_t devices = 0;
    int too_long;
    size_t len;
    int rc;

    if (buf == NULL)
        return ING_ENOMEM;
    while ((rc = read_line(in, buf, &len, &too_long)) == 1) {
        line++;
        if (too_long) {
            report(im, line, NULL, "longer than %d bytes",
                   REGISTRY_IMPORT_LINE_MAX);
            continue;
        }
        if (is_blank(buf, len))
            continue;
        if (++devices > REGISTRY_IMPORT_DEVICES_MAX) {
            report(im, line, NULL, "more than %d devices in one import",
                   REGISTRY_IMPORT_DEVICES_MAX);
            rc = 0;
            break;
        }
        rc = parse_line(im, line, buf, len);
        if (rc != 0)
            break;
    }
    if (rc == ING_EIO)
        report(im, 0, NULL, "reading the input failed");
    OPENSSL_cleanse(buf, REGISTRY_IMPORT_LINE_MAX + 1);
    free(buf);
    return rc;
}

static int id_col_for_sort;

static int compare_by_id(const void *a, const void *b)
{
    const struct row *ra = *(struct row *const *)a;
    const struct row *rb = *(struct row *const *)b;
    int c = strcmp((const char *)ra->values[id_col_for_sort].data,
                   (const char *)rb->values[id_col_for_sort].data);

    if (c != 0)
        return c;
    return ra->line < rb->line ? -1 : ra->line > rb->line;
}

static int key_col_for_sort;

static int compare_by_key(const void *a, const void *b)
{
    const struct row *ra = *(struct row *const *)a;
    const struct row *rb = *(struct row *const *)b;
    int c = memcmp(ra->values[key_col_for_sort].data,
                   rb->values[key_col_for_sort].data, AUTH_HASH_LEN);

    if (c != 0)
        return c;
    return ra->line < rb->line ? -1 : ra->line > rb->line;
}

/* Reports ids and key hashes that more than one line uses, and leaves
 * im->by_id sorted by id. Returns 0 or ING_ENOMEM. */
static int check_duplicates(struct import *im)
{
    struct row **by_key;
    char shown[68];

    im->by_id = calloc(im->row_count + 1, sizeof(*im->by_id));
    by_key = calloc(im->row_count + 1, sizeof(*by_key));
    if (im->by_id == NULL || by_key == NULL) {
        free(by_key);
        return ING_ENOMEM;
    }
    for (size_t i = 0; i < im->row_count; i++) {
        im->by_id[i] = &im->rows[i];
        by_key[i] = &im->rows[i];
    }
    /* qsort takes no context argument, and an import runs in one thread
     * of the command line, so the column index goes through a static. */
    id_col_for_sort = im->id_col;
    qsort(im->by_id, im->row_count, sizeof(*im->by_id), compare_by_id);
    for (size_t i = 1; i < im->row_count; i++) {
        if (strcmp(text_of(im->by_id[i], im->id_col),
                   text_of(im->by_id[i - 1], im->id_col)) != 0)
            continue;
        printable(text_of(im->by_id[i], im->id_col), shown);
        report(im, im->by_id[i]->line, "id",
               "device \"%s\" is also on line %zu", shown,
               im->by_id[i - 1]->line);
    }
    key_col_for_sort = im->key_col;
    qsort(by_key, im->row_count, sizeof(*by_key), compare_by_key);
    for (size_t i = 1; i < im->row_count; i++) {
        if (memcmp(by_key[i]->values[im->key_col].data,
                   by_key[i - 1]->values[im->key_col].data,
                   AUTH_HASH_LEN) != 0)
            continue;
        report(im, by_key[i]->line, "key_hash",
               "the same key hash as line %zu; each device needs its own "
               "key",
               by_key[i - 1]->line);
    }
    free(by_key);
    return 0;
}

/* Returns 1 when the input contains a device with id `id`. */
static int input_has_id(const struct import *im, const char *id)
{
    size_t lo = 0;
    size_t hi = im->row_count;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(id, text_of(im->by_id[mid], im->id_col));

        if (c == 0)
            return 1;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return 0;
}

/* Deletes the devices of the registry that the input does not contain,
 * for --replace. Returns 0 or ING_EDB. */
static int delete_missing(struct import *im)
{
    sqlite3_stmt *list = NULL;
    sqlite3_stmt *del = NULL;
    int rc = ING_EDB;
    int step;

    if (sqlite3_prepare_v2(im->r->db, "SELECT id FROM devices", -1, &list,
                           NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(im->r->db, "DELETE FROM devices WHERE id = ?1", -1,
                           &del, NULL) != SQLITE_OK) {
        db_failed(im, "preparing the delete");
        goto done;
    }
    /* Deleting rows that the SELECT already returned is safe in SQLite:
     * the statement does not revisit them. */
    while ((step = sqlite3_step(list)) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(list, 0);

        if (id != NULL && input_has_id(im, id))
            continue;
        /* An empty input is more likely a missing or truncated file than
         * a wish to delete every device. */
        if (im->row_count == 0) {
            report(im, 0, NULL,
                   "the input has no devices, and --replace would delete "
                   "every device; delete the registry file instead if that "
                   "is meant");
            rc = ING_EINVAL;
            goto done;
        }
        sqlite3_bind_text(del, 1, id, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(del) != SQLITE_DONE) {
            db_failed(im, "deleting a device");
            goto done;
        }
        sqlite3_reset(del);
        im->counts->deleted++;
    }
    if (step != SQLITE_DONE) {
        db_failed(im, "listing devices");
        goto done;
    }
    rc = 0;

done:
    sqlite3_finalize(list);
    sqlite3_finalize(del);
    return rc;
}

/* Returns 1 when `v` equals column `i` of the current row of `stmt`. */
static int value_equals(const struct value *v, sqlite3_stmt *stmt, int i)
{
    int type = sqlite3_column_type(stmt, i);

    if (type != v->type)
        return 0;
    switch (type) {
    case SQLITE_NULL:
        return 1;
    case SQLITE_INTEGER:
        return sqlite3_column_int64(stmt, i) == v->integer;
    case SQLITE_FLOAT:
        return sqlite3_column_double(stmt, i) == v->real;
    case SQLITE_TEXT:
        return (size_t)sqlite3_column_bytes(stmt, i) == v->len &&
               memcmp(sqlite3_column_text(stmt, i), v->data, v->len) == 0;
    default:
        return (size_t)sqlite3_column_bytes(stmt, i) == v->len &&
               (v->len == 0 ||
                memcmp(sqlite3_column_blob(stmt, i), v->data, v->len) == 0);
    }
}

/* Compares `row` with the stored device of the same id, whose columns are
 * the current row of `stmt`, and chooses its action. Takes the stored
 * secret for a row that keeps it. Returns 0, ING_ENOMEM, or ING_EINVAL
 * when the stored device has no secret to keep. */
static int compare_stored(struct import *im, struct row *row,
                          sqlite3_stmt *stmt)
{
    struct value *secret =
        im->secret_col >= 0 ? &row->values[im->secret_col] : NULL;
    int same = 1;

    if (row->keep_secret && secret != NULL &&
        sqlite3_column_type(stmt, im->secret_col) == SQLITE_BLOB) {
        int rc = value_set_bytes(
            secret, SQLITE_BLOB, sqlite3_column_blob(stmt, im->secret_col),
            (size_t)sqlite3_column_bytes(stmt, im->secret_col));
        if (rc != 0)
            return rc;
        row->keep_secret = 0;
    }
    if (row->keep_secret) {
        report(im, row->line, "jwt_secret",
               "missing for HS256, and device \"%s\" has no secret in this "
               "registry to keep; export with --include-secrets",
               text_of(row, im->id_col));
        return ING_EINVAL;
    }
    for (size_t i = 0; i < im->schema.count; i++) {
        if (!value_equals(&row->values[i], stmt, (int)i))
            same = 0;
    }
    row->key_changed = !value_equals(&row->values[im->key_col], stmt,
                                     im->key_col);
    row->action = same ? ROW_UNCHANGED : ROW_UPDATE;
    return 0;
}

/* Chooses the action of every row by reading the stored devices. Returns
 * 0, ING_ENOMEM, ING_EDB, or ING_EINVAL after reporting rows that keep a
 * secret the registry does not have. */
static int plan_rows(struct import *im)
{
    sqlite3_stmt *stmt = NULL;
    size_t len = strlen(im->schema.select_sql);
    char *sql = malloc(len + sizeof(" WHERE id = ?1"));
    int failed = 0;
    int rc = 0;

    if (sql == NULL)
        return ING_ENOMEM;
    memcpy(sql, im->schema.select_sql, len);
    memcpy(sql + len, " WHERE id = ?1", sizeof(" WHERE id = ?1"));
    if (sqlite3_prepare_v2(im->r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        db_failed(im, "reading a device");
        rc = ING_EDB;
        goto done;
    }
    for (size_t i = 0; i < im->row_count && rc == 0; i++) {
        struct row *row = &im->rows[i];
        int step;

        sqlite3_bind_text(stmt, 1, text_of(row, im->id_col), -1,
                          SQLITE_STATIC);
        step = sqlite3_step(stmt);
        if (step == SQLITE_ROW) {
            rc = compare_stored(im, row, stmt);
        } else if (step == SQLITE_DONE && row->keep_secret) {
            report(im, row->line, "jwt_secret",
                   "missing for HS256, and device \"%s\" is new here; "
                   "export with --include-secrets",
                   text_of(row, im->id_col));
            rc = ING_EINVAL;
        } else if (step == SQLITE_DONE) {
            row->action = ROW_ADD;
        } else {
            db_failed(im, "reading a device");
            rc = ING_EDB;
        }
        sqlite3_reset(stmt);
        /* Every missing secret is reported before the import stops. */
        if (rc == ING_EINVAL) {
            failed = 1;
            rc = 0;
        }
    }
    if (rc == 0 && failed)
        rc = ING_EINVAL;

done:
    sqlite3_finalize(stmt);
    free(sql);
    return rc;
}

static void bind_value(sqlite3_stmt *stmt, int index, const struct value *v)
{
    switch (v->type) {
    case SQLITE_INTEGER:
        sqlite3_bind_int64(stmt, index, v->integer);
        break;
    case SQLITE_FLOAT:
        sqlite3_bind_double(stmt, index, v->real);
        break;
    case SQLITE_TEXT:
        sqlite3_bind_text(stmt, index, (const char *)v->data, (int)v->len,
                          SQLITE_STATIC);
        break;
    case SQLITE_BLOB:
        sqlite3_bind_blob(stmt, index, v->data, (int)v->len, SQLITE_STATIC);
        break;
    default:
        sqlite3_bind_null(stmt, index);
        break;
    }
}

/* Gives each updated device whose key hash changes a temporary hash of its
 * own, so that two devices of the input can swap keys without breaking
 * the UNIQUE constraint on key_hash between their updates. The temporary
 * value is a zero byte, "import:" and the id, which no SHA-256 hash is in
 * practice. Returns 0 or ING_EDB. */
static int release_keys(struct import *im)
{
    static const char sql[] = "UPDATE devices SET key_hash ="
                              " CAST(X'00' || 'import:' || id AS BLOB)"
                              " WHERE id = ?1";
    sqlite3_stmt *stmt = NULL;
    int rc = 0;

    if (sqlite3_prepare_v2(im->r->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        db_failed(im, "preparing the key update");
        return ING_EDB;
    }
    for (size_t i = 0; i < im->row_count; i++) {
        const struct row *row = &im->rows[i];

        if (row->action != ROW_UPDATE || !row->key_changed)
            continue;
        sqlite3_bind_text(stmt, 1, text_of(row, im->id_col), -1,
                          SQLITE_STATIC);
        if (sqlite3_step(stmt) != SQLITE_DONE) {
            db_failed(im, "updating a key hash");
            rc = ING_EDB;
            break;
        }
        sqlite3_reset(stmt);
    }
    sqlite3_finalize(stmt);
    return rc;
}

/* Reports that the key hash of `row` belongs to a device that the input
 * does not contain. */
static void report_key_owner(struct import *im, const struct row *row)
{
    sqlite3_stmt *stmt = NULL;
    const struct value *key = &row->values[im->key_col];
    const char *owner = NULL;
    char shown[68] = "?";

    if (sqlite3_prepare_v2(im->r->db, "SELECT id FROM devices"
                           " WHERE key_hash = ?1", -1, &stmt,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_blob(stmt, 1, key->data, (int)key->len, SQLITE_STATIC);
        if (sqlite3_step(stmt) == SQLITE_ROW)
            owner = (const char *)sqlite3_column_text(stmt, 0);
        if (owner != NULL)
            printable(owner, shown);
    }
    report(im, row->line, "key_hash",
           "already the key of device \"%s\", which the input does not "
           "contain; import with --replace to delete it",
           shown);
    sqlite3_finalize(stmt);
}

/* Inserts the new devices and updates the changed ones. Returns 0,
 * ING_EDB, or ING_EINVAL when a key hash belongs to another device. */
static int write_rows(struct import *im)
{
    sqlite3_stmt *insert = NULL;
    sqlite3_stmt *update = NULL;
    int rc = 0;

    if (sqlite3_prepare_v2(im->r->db, im->schema.insert_sql, -1, &insert,
                           NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(im->r->db, im->schema.update_sql, -1, &update,
                           NULL) != SQLITE_OK) {
        db_failed(im, "preparing the device writes");
        rc = ING_EDB;
        goto done;
    }
    for (size_t i = 0; i < im->row_count && rc == 0; i++) {
        struct row *row = &im->rows[i];
        sqlite3_stmt *stmt = row->action == ROW_ADD ? insert : update;
        int step;

        if (row->action == ROW_UNCHANGED) {
            im->counts->unchanged++;
            continue;
        }
        for (size_t c = 0; c < im->schema.count; c++)
            bind_value(stmt, (int)c + 1, &row->values[c]);
        if (row->action == ROW_UPDATE)
            bind_value(stmt, (int)im->schema.count + 1,
                       &row->values[im->id_col]);
        step = sqlite3_step(stmt);
        if (step == SQLITE_CONSTRAINT_UNIQUE) {
            report_key_owner(im, row);
            rc = ING_EINVAL;
        } else if (step != SQLITE_DONE) {
            db_failed(im, "writing a device");
            rc = ING_EDB;
        } else if (row->action == ROW_ADD) {
            im->counts->added++;
        } else {
            im->counts->updated++;
        }
        sqlite3_reset(stmt);
        /* The bound values point into the row, and must not outlive it. */
        sqlite3_clear_bindings(stmt);
    }

done:
    sqlite3_finalize(insert);
    sqlite3_finalize(update);
    return rc;
}

/* Changes the registry in one transaction. Returns 0, ING_EINVAL, ING_EDB
 * or ING_ENOMEM, and on failure leaves the registry as it was. */
static int apply(struct import *im)
{
    int rc;

    /* IMMEDIATE takes the write lock at once, so the stored devices that
     * plan_rows compares with cannot change before the writes. */
    if (sqlite3_exec(im->r->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) !=
        SQLITE_OK) {
        db_failed(im, "locking the registry");
        return ING_EDB;
    }
    rc = im->opts->replace ? delete_missing(im) : 0;
    if (rc == 0)
        rc = plan_rows(im);
    if (rc == 0)
        rc = release_keys(im);
    if (rc == 0)
        rc = write_rows(im);
    if (rc == 0 &&
        sqlite3_exec(im->r->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        db_failed(im, "committing the import");
        rc = ING_EDB;
    }
    if (rc != 0)
        sqlite3_exec(im->r->db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

static void find_columns(struct import *im)
{
    const struct auth_io_schema *s = &im->schema;

    im->id_col = auth_io_schema_find(s, "id");
    im->type_col = auth_io_schema_find(s, "type");
    im->key_col = auth_io_schema_find(s, "key_hash");
    im->old_key_col = auth_io_schema_find(s, "old_key_hash");
    im->old_expires_col = auth_io_schema_find(s, "old_key_expires_ms");
    im->alg_col = auth_io_schema_find(s, "jwt_alg");
    im->pem_col = auth_io_schema_find(s, "jwt_public_key");
    im->secret_col = auth_io_schema_find(s, "jwt_secret");
}

int registry_import(registry_t *r, FILE *in,
                    const registry_import_options_t *opts,
                    registry_import_counts_t *counts)
{
    struct import im = {.r = r, .opts = opts, .counts = counts};
    char message[128];
    int rc;

    memset(counts, 0, sizeof(*counts));
    rc = auth_io_schema_read(r->db, &im.schema);
    if (rc != 0) {
        db_failed(&im, "reading its columns");
        return rc;
    }
    find_columns(&im);
    if (im.type_col < 0 || im.key_col < 0) {
        report(&im, 0, NULL, "registry %s has no type or key_hash column",
               r->path);
        rc = ING_EDB;
        goto done;
    }
    rc = read_input(&im, in);
    if (rc == 0)
        rc = check_duplicates(&im);
    if (rc == 0 && counts->errors > 0)
        rc = ING_EINVAL;
    if (rc == 0)
        rc = apply(&im);

done:
    if (rc == ING_ENOMEM)
        report(&im, 0, NULL, "out of memory");
    if (counts->errors > REGISTRY_IMPORT_ERRORS_MAX) {
        snprintf(message, sizeof(message), "%zu more errors not shown",
                 counts->errors - REGISTRY_IMPORT_ERRORS_MAX);
        opts->on_error(message, opts->arg);
    }
    if (rc != 0) {
        counts->added = 0;
        counts->updated = 0;
        counts->unchanged = 0;
        counts->deleted = 0;
    }
    for (size_t i = 0; i < im.row_count; i++)
        row_free(&im.rows[i], im.schema.count);
    free(im.rows);
    free(im.by_id);
    auth_io_schema_free(&im.schema);
    return rc;
}
