/* Unit tests for the export and import of the device registry. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth/auth.h"
#include "auth/registry_io.h"
#include "core/errors.h"

struct fixture {
    char dir[64];
    registry_t *a; /* the registry that is exported */
    registry_t *b; /* the registry that imports */
    char errors[8192];
    int error_count;
    char omitted[256];
};

static registry_t *open_in(struct fixture *f, const char *name)
{
    char path[128];
    char err[256] = "";
    registry_t *r = NULL;

    snprintf(path, sizeof(path), "%s/%s", f->dir, name);
    if (registry_open(path, &r, err, sizeof(err)) != 0)
        fprintf(stderr, "registry_open %s: %s\n", path, err);
    return r;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_auth_registry_io.XXXXXX");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    f->a = open_in(f, "a.db");
    f->b = open_in(f, "b.db");
    if (f->a == NULL || f->b == NULL)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    struct dirent *entry;
    char file[512];
    DIR *dir;

    registry_close(f->a);
    registry_close(f->b);
    dir = opendir(f->dir);
    while (dir != NULL && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        snprintf(file, sizeof(file), "%s/%s", f->dir, entry->d_name);
        unlink(file);
    }
    if (dir != NULL)
        closedir(dir);
    rmdir(f->dir);
    free(f);
    return 0;
}

static void collect_error(const char *message, void *arg)
{
    struct fixture *f = arg;
    size_t len = strlen(f->errors);

    snprintf(f->errors + len, sizeof(f->errors) - len, "%s\n", message);
    f->error_count++;
}

static void collect_omitted(const char *id, void *arg)
{
    struct fixture *f = arg;
    size_t len = strlen(f->omitted);

    snprintf(f->omitted + len, sizeof(f->omitted) - len, "%s ", id);
}

static int only_default_types(const char *type, void *arg)
{
    (void)arg;
    return strcmp(type, "default") == 0 || strcmp(type, "meter") == 0;
}

/* Exports `r` and returns the text, owned by the caller. */
static char *export_text(struct fixture *f, registry_t *r, int secrets)
{
    registry_export_options_t opts = {
        .include_secrets = secrets,
        .on_secret_omitted = collect_omitted,
        .arg = f,
    };
    char err[256] = "";
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    int n;

    assert_non_null(out);
    n = registry_export(r, out, &opts, err, sizeof(err));
    fclose(out);
    if (n < 0)
        fail_msg("registry_export: %s", err);
    return text;
}

/* Imports `text` into `r`. Returns registry_import's result. */
static int import_text(struct fixture *f, registry_t *r, const char *text,
                       int replace, registry_import_counts_t *counts)
{
    registry_import_options_t opts = {
        .replace = replace,
        .type_known = only_default_types,
        .on_error = collect_error,
        .arg = f,
    };
    FILE *in = fmemopen((void *)text, strlen(text), "r");
    int rc;

    assert_non_null(in);
    f->errors[0] = '\0';
    f->error_count = 0;
    rc = registry_import(r, in, &opts, counts);
    fclose(in);
    return rc;
}

/* Returns a new PEM public key of `type` ("EC" on P-256 or "ED25519"). */
static char *public_pem(const char *type)
{
    EVP_PKEY *key = strcmp(type, "EC") == 0
                        ? EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")
                        : EVP_PKEY_Q_keygen(NULL, NULL, type);
    BIO *bio = BIO_new(BIO_s_mem());
    char *data = NULL;
    char *pem;
    long len;

    assert_non_null(key);
    assert_non_null(bio);
    assert_int_equal(PEM_write_bio_PUBKEY(bio, key), 1);
    len = BIO_get_mem_data(bio, &data);
    pem = strndup(data, (size_t)len);
    BIO_free(bio);
    EVP_PKEY_free(key);
    return pem;
}

/* Fills `a` with one device for each credential the registry stores. */
static void add_devices(struct fixture *f)
{
    static const unsigned char fp[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    auth_limits_t limits = {.set = 1u << AUTH_LIMIT_BURST,
                            .value = {[AUTH_LIMIT_BURST] = 7}};
    char key[AUTH_KEY_LEN + 1];
    char secret[AUTH_JWT_SECRET_TEXT_LEN + 1];
    char err[160] = "";
    char *pem = public_pem("EC");

    assert_int_equal(registry_device_add(f->a, "api-1", "default", key), 0);
    assert_int_equal(registry_device_rotate_key(f->a, "api-1", 3600000, key),
                     0);
    assert_int_equal(registry_device_set_limits(f->a, "api-1", &limits), 0);
    assert_int_equal(registry_device_add(f->a, "cert-1", "meter", key), 0);
    assert_int_equal(registry_device_set_cert(f->a, "cert-1", fp), 0);
    assert_int_equal(registry_device_add(f->a, "es-1", "default", key), 0);
    assert_int_equal(registry_device_set_jwt_key(f->a, "es-1", "ES256", pem,
                                                 err, sizeof(err)),
                     0);
    assert_int_equal(registry_device_add(f->a, "hs-1", "default", key), 0);
    assert_int_equal(registry_device_new_jwt_secret(f->a, "hs-1", secret), 0);
    assert_int_equal(registry_device_add(f->a, "off-1", "default", key), 0);
    assert_int_equal(registry_device_set_enabled(f->a, "off-1", 0), 0);
    free(pem);
}

static void registry_io_round_trip(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char *first, *second;

    add_devices(f);
    first = export_text(f, f->a, 1);
    assert_string_equal(f->omitted, "");
    assert_int_equal(import_text(f, f->b, first, 0, &counts), 0);
    assert_string_equal(f->errors, "");
    assert_int_equal(counts.added, 5);
    assert_int_equal(counts.updated, 0);
    assert_int_equal(counts.unchanged, 0);
    second = export_text(f, f->b, 1);
    assert_string_equal(second, first);
    assert_non_null(strstr(first, "\"limit_burst\":7"));
    assert_non_null(strstr(first, "\"cert_fingerprint\":\"0102030405"));
    assert_non_null(strstr(first, "\"old_key_hash\":\""));
    assert_non_null(strstr(first, "\"enabled\":false"));
    free(first);
    free(second);
}

static void registry_io_import_twice_unchanged(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char *text;

    add_devices(f);
    text = export_text(f, f->a, 1);
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(counts.added, 0);
    assert_int_equal(counts.updated, 0);
    assert_int_equal(counts.unchanged, 5);
    assert_int_equal(counts.deleted, 0);
    free(text);
}

static void registry_io_export_omits_secret(void **state)
{
    struct fixture *f = *state;
    char *text;

    add_devices(f);
    text = export_text(f, f->a, 0);
    assert_string_equal(f->omitted, "hs-1 ");
    assert_null(strstr(text, "jwt_secret"));
    assert_non_null(strstr(text, "\"jwt_alg\":\"HS256\""));
    free(text);
}

static void registry_io_keeps_stored_secret(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char *with, *without, *after;

    add_devices(f);
    with = export_text(f, f->a, 1);
    without = export_text(f, f->a, 0);
    /* A new device cannot get its secret from nowhere. */
    assert_int_equal(import_text(f, f->b, without, 0, &counts),
                     ING_EINVAL);
    assert_non_null(strstr(f->errors, "line 4: jwt_secret: missing for "
                                      "HS256"));
    assert_int_equal(import_text(f, f->b, with, 0, &counts), 0);
    /* Once it has one, an export without secrets keeps it. */
    assert_int_equal(import_text(f, f->b, without, 0, &counts), 0);
    assert_int_equal(counts.unchanged, 5);
    after = export_text(f, f->b, 1);
    assert_string_equal(after, with);
    free(with);
    free(without);
    free(after);
}

static void registry_io_replace_deletes(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char key[AUTH_KEY_LEN + 1];
    char *text;

    add_devices(f);
    text = export_text(f, f->a, 1);
    assert_int_equal(registry_device_add(f->b, "extra-1", "default", key), 0);
    assert_int_equal(registry_device_add(f->b, "extra-2", "default", key), 0);
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(counts.deleted, 0);
    assert_int_equal(import_text(f, f->b, text, 1, &counts), 0);
    assert_int_equal(counts.deleted, 2);
    assert_int_equal(counts.unchanged, 5);
    assert_int_equal(registry_device_set_enabled(f->b, "extra-1", 1),
                     ING_ENOTFOUND);
    free(text);
}

static void registry_io_replace_empty_rejected(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char key[AUTH_KEY_LEN + 1];

    /* With nothing to delete, an empty input is harmless. */
    assert_int_equal(import_text(f, f->b, "", 1, &counts), 0);
    assert_int_equal(registry_device_add(f->b, "keep-1", "default", key), 0);
    assert_int_equal(import_text(f, f->b, "\n", 1, &counts), ING_EINVAL);
    assert_non_null(strstr(f->errors, "the input has no devices"));
    assert_int_equal(registry_device_set_enabled(f->b, "keep-1", 1), 0);
}

/* Returns an import line for device `id` with key hash `hex` and `extra`
 * members. */
static void make_line(char *buf, size_t len, const char *id, const char *hex,
                      const char *extra)
{
    snprintf(buf, len,
             "{\"schema_version\":1,\"id\":\"%s\",\"type\":\"default\","
             "\"enabled\":true,\"key_hash\":\"%s\"%s}\n",
             id, hex, extra);
}

#define HASH_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define HASH_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"   \
               "bbbb"
#define HASH_G "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"   \
               "aaag"

static void registry_io_swaps_keys(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char text[1024];
    size_t n;

    make_line(text, sizeof(text), "d1", HASH_A, "");
    n = strlen(text);
    make_line(text + n, sizeof(text) - n, "d2", HASH_B, "");
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(counts.added, 2);
    make_line(text, sizeof(text), "d1", HASH_B, "");
    n = strlen(text);
    make_line(text + n, sizeof(text) - n, "d2", HASH_A, "");
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_string_equal(f->errors, "");
    assert_int_equal(counts.updated, 2);
}

static void registry_io_key_of_other_device(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char text[1024];

    make_line(text, sizeof(text), "old-1", HASH_A, "");
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    make_line(text, sizeof(text), "new-1", HASH_A, "");
    assert_int_equal(import_text(f, f->b, text, 0, &counts), ING_EINVAL);
    assert_string_equal(f->errors,
                        "line 1: key_hash: already the key of device "
                        "\"old-1\", which the input does not contain; import "
                        "with --replace to delete it\n");
    assert_int_equal(counts.added, 0);
    /* With --replace the old device goes and the new one takes the key. */
    assert_int_equal(import_text(f, f->b, text, 1, &counts), 0);
    assert_int_equal(counts.added, 1);
    assert_int_equal(counts.deleted, 1);
}

/* One invalid line after a valid one, and the error it must produce. */
static const struct {
    const char *line;
    const char *error;
} invalid_lines[] = {
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"abc\"}",
     "line 2: key_hash: expected 64 hex digits, got 3 characters"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"cert_fingerprint\":\"zz" HASH_A
     "\"}",
     "line 2: cert_fingerprint: expected 64 hex digits, got 66 characters"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_G "\"}",
     "line 2: key_hash: character 64 is not a hex digit"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"nosuch\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\"}",
     "line 2: type: device type \"nosuch\" is not configured"},
    {"{\"schema_version\":1,\"id\":\"a b\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\"}",
     "line 2: id: invalid device id \"a b\""},
    {"{\"schema_version\":1,\"id\":\"d1\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\"}",
     "line 2: id: device \"d1\" is also on line 1"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_A "\"}",
     "line 2: key_hash: the same key hash as line 1"},
    {"{\"schema_version\":2,\"id\":\"x\"}",
     "line 2: schema_version: unsupported version 2; this ingestd reads "
     "version 1"},
    {"{\"id\":\"x\"}", "line 2: schema_version: missing"},
    {"{\"schema_version\":1,\"id\":\"x\",", "line 2: invalid JSON"},
    {"[1]", "line 2: expected a JSON object"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "1,\"key_hash\":\"" HASH_B "\"}",
     "line 2: enabled: expected true or false"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\","
     "\"key_hash\":\"" HASH_B "\"}",
     "line 2: enabled: missing"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"colour\":\"red\"}",
     "line 2: colour: unknown field"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"limit_burst\":-1}",
     "line 2: limit_burst: must be 0 or more, got -1"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"jwt_alg\":\"ES256\","
     "\"jwt_public_key\":\"-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END "
     "PUBLIC KEY-----\\n\"}",
     "line 2: jwt_public_key: not a PEM public key"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"jwt_alg\":\"ES256\"}",
     "line 2: jwt_public_key: missing; ES256 needs a PEM public key"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"jwt_alg\":\"HS512\"}",
     "line 2: jwt_alg: unknown algorithm \"HS512\""},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"jwt_alg\":\"HS256\","
     "\"jwt_secret\":\"c2hvcnQ\"}",
     "line 2: jwt_secret: expected 43 base64url characters"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"old_key_hash\":\"" HASH_A "\"}",
     "line 2: old_key_expires_ms: missing"},
    {"{\"schema_version\":1,\"id\":\"x\",\"type\":\"default\",\"enabled\":"
     "true,\"key_hash\":\"" HASH_B "\",\"id\":\"y\"}",
     "line 2: invalid JSON"},
};

static void registry_io_rejects_invalid_lines(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char text[2048];

    for (size_t i = 0; i < sizeof(invalid_lines) / sizeof(invalid_lines[0]);
         i++) {
        char *exported;
        size_t n;

        make_line(text, sizeof(text), "d1", HASH_A, "");
        n = strlen(text);
        snprintf(text + n, sizeof(text) - n, "%s\n", invalid_lines[i].line);
        assert_int_equal(import_text(f, f->b, text, 0, &counts), ING_EINVAL);
        if (strstr(f->errors, invalid_lines[i].error) == NULL)
            fail_msg("case %zu: expected \"%s\" in:\n%s", i,
                     invalid_lines[i].error, f->errors);
        assert_int_equal(f->error_count, 1);
        assert_int_equal(counts.added, 0);
        /* Nothing was imported, not even the valid first line. */
        exported = export_text(f, f->b, 1);
        assert_string_equal(exported, "");
        free(exported);
    }
}

static void registry_io_rejects_wrong_key_type(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char *pem = public_pem("ED25519");
    char *escaped = calloc(1, strlen(pem) * 2 + 1);
    char extra[1024];
    char text[2048];
    size_t n = 0;

    for (const char *p = pem; *p != '\0'; p++) {
        if (*p == '\n') {
            escaped[n++] = '\\';
            escaped[n++] = 'n';
        } else {
            escaped[n++] = *p;
        }
    }
    snprintf(extra, sizeof(extra),
             ",\"jwt_alg\":\"ES256\",\"jwt_public_key\":\"%s\"", escaped);
    make_line(text, sizeof(text), "d1", HASH_A, extra);
    assert_int_equal(import_text(f, f->b, text, 0, &counts), ING_EINVAL);
    assert_string_equal(f->errors, "line 1: jwt_public_key: ES256 needs an "
                                   "EC public key on P-256\n");
    snprintf(extra, sizeof(extra),
             ",\"jwt_alg\":\"EdDSA\",\"jwt_public_key\":\"%s\"", escaped);
    make_line(text, sizeof(text), "d1", HASH_A, extra);
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(counts.added, 1);
    free(escaped);
    free(pem);
}

static void registry_io_rejects_long_line(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    size_t len = REGISTRY_IMPORT_LINE_MAX + 10;
    char *text = malloc(len + 2);

    memset(text, ' ', len);
    text[len] = '\n';
    text[len + 1] = '\0';
    assert_int_equal(import_text(f, f->b, text, 0, &counts), ING_EINVAL);
    assert_string_equal(f->errors, "line 1: longer than 65536 bytes\n");
    free(text);
}

static void registry_io_skips_blank_lines(void **state)
{
    struct fixture *f = *state;
    registry_import_counts_t counts;
    char text[1024] = "\n  \n";
    size_t n = strlen(text);

    make_line(text + n, sizeof(text) - n, "d1", HASH_A, "");
    n = strlen(text);
    snprintf(text + n, sizeof(text) - n, "\r\n\n");
    assert_int_equal(import_text(f, f->b, text, 0, &counts), 0);
    assert_int_equal(counts.added, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(registry_io_round_trip, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(registry_io_import_twice_unchanged,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_export_omits_secret,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_keeps_stored_secret,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_replace_deletes, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(registry_io_replace_empty_rejected,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_swaps_keys, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(registry_io_key_of_other_device,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_rejects_invalid_lines,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_rejects_wrong_key_type,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(registry_io_rejects_long_line, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(registry_io_skips_blank_lines, setup,
                                        teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
