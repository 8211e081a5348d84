#include "app/app.h"

#include <errno.h>
#include <getopt.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "app/device_sync.h"
#include "auth/auth.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fsutil.h"

static void format_ms(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (ms <= 0) {
        snprintf(buf, len, "-");
        return;
    }
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void print_entry(const registry_entry_t *e, void *arg)
{
    char created[32], rotated[32], old_until[32];
    int64_t now_ms = (int64_t)time(NULL) * 1000;
    size_t *count = arg;

    format_ms(e->created_ms, created, sizeof(created));
    format_ms(e->key_rotated_ms, rotated, sizeof(rotated));
    if (e->old_key_expires_ms > now_ms)
        format_ms(e->old_key_expires_ms, old_until, sizeof(old_until));
    else
        snprintf(old_until, sizeof(old_until), "-");
    printf("%-32s %-16s %-9s %-21s %-21s %s\n", e->id, e->type,
           e->enabled ? "enabled" : "disabled", created, rotated, old_until);
    (*count)++;
}

static int open_registry(const config_t *cfg, registry_t **reg)
{
    char err[512];
    char *dir = strdup(cfg->registry.path);
    char *slash;

    if (dir == NULL)
        return 1;
    slash = strrchr(dir, '/');
    if (slash != NULL && slash != dir) {
        *slash = '\0';
        if (fs_mkdir_p(dir) != 0) {
            fprintf(stderr, "ingestd: cannot create folder %s: %s\n", dir,
                    strerror(errno));
            free(dir);
            return 1;
        }
    }
    free(dir);
    if (registry_open(cfg->registry.path, reg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 1;
    }
    return 0;
}

static int device_add(const config_t *cfg, registry_t *reg, const char *id,
                      const char *type)
{
    char key[AUTH_KEY_LEN + 1];
    int rc;

    if (type == NULL)
        type = cfg->default_device_type;
    if (config_device_type(cfg, type) == NULL) {
        fprintf(stderr,
                "ingestd: device type \"%s\" is not configured in %s; add it "
                "under device_types or pick a configured one\n",
                type, cfg->path);
        return 2;
    }
    rc = registry_device_add(reg, id, type, key);
    if (rc == ING_EEXIST) {
        fprintf(stderr,
                "ingestd: device \"%s\" already exists; use `device "
                "rotate-key %s` for a new key\n",
                id, id);
        return 1;
    }
    if (rc == ING_EINVAL) {
        fprintf(stderr,
                "ingestd: invalid device id \"%s\": use 1 to 128 characters "
                "from A-Z a-z 0-9 . _ : -\n",
                id);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: adding device \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("Added device \"%s\" of type \"%s\". Its API key is shown only "
           "once:\n%s\n",
           id, type, key);
    return 0;
}

static int device_rotate(const config_t *cfg, registry_t *reg, const char *id,
                         const char *grace)
{
    char key[AUTH_KEY_LEN + 1];
    uint64_t grace_ms = cfg->registry.key_grace_ms;
    int rc;

    if (grace != NULL && config_parse_duration_ms(grace, &grace_ms) != 0) {
        fprintf(stderr,
                "ingestd: invalid --grace \"%s\": expected a duration such as "
                "0s, 10m or 24h\n",
                grace);
        return 2;
    }
    rc = registry_device_rotate_key(reg, id, grace_ms, key);
    if (rc == ING_ENOTFOUND) {
        fprintf(stderr, "ingestd: device \"%s\" not found\n", id);
        return 1;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: rotating the key of \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("New API key for device \"%s\", shown only once (the previous key "
           "stays valid for %llu s):\n%s\n",
           id, (unsigned long long)(grace_ms / 1000), key);
    return 0;
}

static int device_set_enabled(registry_t *reg, const char *id, int enabled)
{
    int rc = registry_device_set_enabled(reg, id, enabled);

    if (rc == ING_ENOTFOUND) {
        fprintf(stderr, "ingestd: device \"%s\" not found\n", id);
        return 1;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: updating device \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("Device \"%s\" %s.\n", id, enabled ? "enabled" : "disabled");
    return 0;
}

/* Reports a failed registry change of device `id`. Returns the exit
 * status. */
static int change_failed(const char *what, const char *id, int rc)
{
    if (rc == ING_ENOTFOUND) {
        fprintf(stderr, "ingestd: device \"%s\" not found\n", id);
        return 1;
    }
    fprintf(stderr, "ingestd: %s of \"%s\" failed: %s\n", what, id,
            ing_strerror(rc));
    return 1;
}

/* Parses 64 hex digits, optionally separated by colons as `openssl x509
 * -fingerprint` prints them. Returns 0 or -1. */
static int parse_fingerprint(const char *text, unsigned char out[32])
{
    size_t n = 0;

    for (const char *p = text; *p != '\0';) {
        int hi, lo;

        if (*p == ':') {
            p++;
            continue;
        }
        hi = OPENSSL_hexchar2int((unsigned char)p[0]);
        lo = p[1] != '\0' ? OPENSSL_hexchar2int((unsigned char)p[1]) : -1;
        if (hi < 0 || lo < 0 || n == 32)
            return -1;
        out[n++] = (unsigned char)(hi << 4 | lo);
        p += 2;
    }
    return n == 32 ? 0 : -1;
}

/* Computes the SHA-256 fingerprint of the DER encoding of the first
 * certificate in the PEM file `path`. Returns 0 or -1 with a message
 * printed. */
static int certificate_fingerprint(const char *path, unsigned char out[32])
{
    unsigned int len = 0;
    X509 *cert = NULL;
    FILE *f = fopen(path, "r");
    int rc = -1;

    if (f == NULL) {
        fprintf(stderr, "ingestd: cannot open certificate %s: %s\n", path,
                strerror(errno));
        return -1;
    }
    cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (cert == NULL) {
        fprintf(stderr,
                "ingestd: %s holds no PEM certificate (expected -----BEGIN "
                "CERTIFICATE-----)\n",
                path);
        return -1;
    }
    if (X509_digest(cert, EVP_sha256(), out, &len) == 1 && len == 32)
        rc = 0;
    else
        fprintf(stderr, "ingestd: hashing certificate %s failed\n", path);
    X509_free(cert);
    return rc;
}

static void format_fingerprint(const unsigned char fp[32], char *buf)
{
    for (size_t i = 0; i < 32; i++)
        sprintf(buf + i * 3, "%02X%s", fp[i], i < 31 ? ":" : "");
}

static int device_set_cert(registry_t *reg, const char *id,
                           const char *fingerprint, const char *cert_path)
{
    unsigned char fp[32];
    char text[32 * 3];
    int rc;

    if ((fingerprint == NULL) == (cert_path == NULL)) {
        fprintf(stderr, "ingestd: device set-cert needs one of --fingerprint "
                        "HEX and --cert FILE.pem\n");
        return 2;
    }
    if (fingerprint != NULL && parse_fingerprint(fingerprint, fp) != 0) {
        fprintf(stderr,
                "ingestd: invalid --fingerprint \"%s\": expected the 64 hex "
                "digits of a SHA-256 hash, colons allowed\n",
                fingerprint);
        return 2;
    }
    if (cert_path != NULL && certificate_fingerprint(cert_path, fp) != 0)
        return 2;
    rc = registry_device_set_cert(reg, id, fp);
    if (rc != 0)
        return change_failed("pinning the certificate", id, rc);
    format_fingerprint(fp, text);
    printf("Device \"%s\" pinned to the client certificate with SHA-256 "
           "fingerprint\n%s\n",
           id, text);
    return 0;
}

static int device_clear_cert(registry_t *reg, const char *id)
{
    int rc = registry_device_set_cert(reg, id, NULL);

    if (rc != 0)
        return change_failed("removing the certificate pin", id, rc);
    printf("Device \"%s\" accepts any valid client certificate that names "
           "it.\n",
           id);
    return 0;
}

/* Reads the whole file `path` (at most 64 KiB) into a new string. */
static char *read_small_file(const char *path)
{
    FILE *f = fopen(path, "r");
    size_t cap = 64 * 1024;
    char *buf;
    size_t n;

    if (f == NULL) {
        fprintf(stderr, "ingestd: cannot open %s: %s\n", path,
                strerror(errno));
        return NULL;
    }
    buf = malloc(cap + 1);
    n = buf != NULL ? fread(buf, 1, cap + 1, f) : 0;
    fclose(f);
    if (buf == NULL || n > cap) {
        fprintf(stderr, "ingestd: %s is larger than 64 KiB\n", path);
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static int device_set_jwt_key(registry_t *reg, const char *id,
                              const char *alg, const char *key_path)
{
    char err[160] = "";
    char *pem;
    int rc;

    if (alg == NULL || key_path == NULL) {
        fprintf(stderr, "ingestd: device set-jwt-key needs --alg "
                        "RS256|ES256|EdDSA and --public-key FILE.pem\n");
        return 2;
    }
    pem = read_small_file(key_path);
    if (pem == NULL)
        return 2;
    rc = registry_device_set_jwt_key(reg, id, alg, pem, err, sizeof(err));
    free(pem);
    if (rc == ING_EINVAL) {
        fprintf(stderr, "ingestd: %s: %s\n", key_path, err);
        return 2;
    }
    if (rc != 0)
        return change_failed("setting the JWT key", id, rc);
    printf("Device \"%s\" accepts JWTs signed with %s by the key in %s.\n",
           id, alg, key_path);
    return 0;
}

static int device_new_jwt_secret(registry_t *reg, const char *id)
{
    char secret[AUTH_JWT_SECRET_TEXT_LEN + 1];
    int rc = registry_device_new_jwt_secret(reg, id, secret);

    if (rc != 0)
        return change_failed("creating the HS256 secret", id, rc);
    printf("New HS256 secret for device \"%s\", shown only once (base64url; "
           "the HMAC key is the 32 decoded bytes):\n%s\n",
           id, secret);
    OPENSSL_cleanse(secret, sizeof(secret));
    return 0;
}

static int device_clear_jwt(registry_t *reg, const char *id)
{
    int rc = registry_device_clear_jwt(reg, id);

    if (rc != 0)
        return change_failed("removing the JWT setting", id, rc);
    printf("Device \"%s\" no longer accepts JWTs.\n", id);
    return 0;
}

static void copy_limits(const registry_entry_t *e, void *arg)
{
    *(auth_limits_t *)arg = e->limits;
}

/* Prints the device's limit overrides for `device show`. */
static void print_limits(const auth_limits_t *l)
{
    static const char *const names[AUTH_LIMIT_COUNT] = {
        "readings_per_second", "burst", "bytes_per_second", "daily_readings"};

    for (int i = 0; i < AUTH_LIMIT_COUNT; i++) {
        printf("limit %-20s", names[i]);
        if (!(l->set & (1u << i)))
            printf("from the device type\n");
        else if (l->value[i] == 0)
            printf("unlimited\n");
        else
            printf("%llu\n", (unsigned long long)l->value[i]);
    }
}

/* Option values of `device set-limits`, NULL when not given. */
typedef struct limit_args {
    const char *value[AUTH_LIMIT_COUNT];
    int clear;
} limit_args_t;

/* Parses a limit given on the command line: a whole number, or a size
 * with a unit for bytes_per_second. Returns 0 or -1 after a message. */
static int parse_limit(int which, const char *text, uint64_t *out)
{
    static const char *const options[AUTH_LIMIT_COUNT] = {
        "--readings-per-second", "--burst", "--bytes-per-second",
        "--daily-readings"};
    char *end;

    if (which == AUTH_LIMIT_BYTES_PER_SECOND) {
        if (config_parse_size(text, out) == 0)
            return 0;
    } else if (text[0] >= '0' && text[0] <= '9') {
        errno = 0;
        *out = strtoull(text, &end, 10);
        if (errno == 0 && *end == '\0')
            return 0;
    }
    fprintf(stderr,
            "ingestd: %s: expected %s, got \"%s\"; 0 means unlimited\n",
            options[which],
            which == AUTH_LIMIT_BYTES_PER_SECOND
                ? "a size such as 4096 or 64KiB"
                : "a whole number",
            text);
    return -1;
}

/* Sets the limits given, keeping the other overrides unless --clear. */
static int device_set_limits(registry_t *reg, const char *id,
                             const limit_args_t *args)
{
    auth_limits_t limits = {0};
    int rc, given = 0;

    if (!args->clear) {
        rc = registry_device_get(reg, id, copy_limits, &limits);
        if (rc != 0)
            return change_failed("reading", id, rc);
    }
    for (int i = 0; i < AUTH_LIMIT_COUNT; i++) {
        if (args->value[i] == NULL)
            continue;
        if (parse_limit(i, args->value[i], &limits.value[i]) != 0)
            return 2;
        limits.set |= 1u << i;
        given = 1;
    }
    if (!given && !args->clear) {
        fprintf(stderr, "ingestd: device set-limits needs --clear or at "
                        "least one of --readings-per-second, --burst, "
                        "--bytes-per-second and --daily-readings\n");
        return 2;
    }
    rc = registry_device_set_limits(reg, id, &limits);
    if (rc != 0)
        return change_failed("setting the limits", id, rc);
    printf("Device \"%s\" limits updated; a running ingestd applies them "
           "at its next registry reload.\n",
           id);
    print_limits(&limits);
    return 0;
}

/* Prints one device for `device show`: never a secret or a key hash. */
static void show_entry(const registry_entry_t *e, void *arg)
{
    char created[32], rotated[32], old_until[32];
    char fp[32 * 3];

    (void)arg;
    format_ms(e->created_ms, created, sizeof(created));
    format_ms(e->key_rotated_ms, rotated, sizeof(rotated));
    format_ms(e->old_key_expires_ms, old_until, sizeof(old_until));
    printf("id:                  %s\n", e->id);
    printf("type:                %s\n", e->type);
    printf("status:              %s\n", e->enabled ? "enabled" : "disabled");
    printf("created:             %s\n", created);
    printf("key rotated:         %s\n", rotated);
    printf("old key valid until: %s\n", old_until);
    printf("api key:             yes\n");
    if (e->cert_fingerprint != NULL) {
        format_fingerprint(e->cert_fingerprint, fp);
        printf("certificate:         pinned, SHA-256 %s\n", fp);
    } else {
        printf("certificate:         not pinned\n");
    }
    printf("jwt:                 %s\n", e->jwt_alg ? e->jwt_alg : "no");
    print_limits(&e->limits);
}

static int device_show(registry_t *reg, const char *id)
{
    int rc = registry_device_get(reg, id, show_entry, NULL);

    if (rc != 0)
        return change_failed("reading", id, rc);
    return 0;
}

/* getopt_long values of the options without a short form. */
#define CLEAR_OPTION 1000
#define LIMIT_OPTION 1001
#define INCLUDE_SECRETS_OPTION 1010
#define REPLACE_OPTION 1011

static void device_usage(FILE *f)
{
    fprintf(f,
            "usage: ingestd device add ID [--type TYPE] -c FILE\n"
            "       ingestd device list -c FILE\n"
            "       ingestd device disable ID -c FILE\n"
            "       ingestd device enable ID -c FILE\n"
            "       ingestd device rotate-key ID [--grace DURATION] -c FILE\n"
            "       ingestd device show ID -c FILE\n"
            "       ingestd device set-cert ID (--fingerprint HEX | --cert "
            "FILE.pem) -c FILE\n"
            "       ingestd device clear-cert ID -c FILE\n"
            "       ingestd device set-jwt-key ID --alg RS256|ES256|EdDSA "
            "--public-key FILE.pem -c FILE\n"
            "       ingestd device new-jwt-secret ID -c FILE\n"
            "       ingestd device clear-jwt ID -c FILE\n"
            "       ingestd device set-limits ID [--readings-per-second N] "
            "[--burst N]\n"
            "           [--bytes-per-second SIZE] [--daily-readings N] "
            "[--clear] -c FILE\n"
            "       ingestd device export [--include-secrets] -c FILE "
            "> devices.jsonl\n"
            "       ingestd device import [--replace] FILE|- -c FILE\n");
}

int app_device(const char *config_path, int argc, char **argv)
{
    static const struct option opts[] = {
        {"type", required_argument, NULL, 't'},
        {"grace", required_argument, NULL, 'g'},
        {"fingerprint", required_argument, NULL, 'f'},
        {"cert", required_argument, NULL, 'C'},
        {"alg", required_argument, NULL, 'a'},
        {"public-key", required_argument, NULL, 'k'},
        {"readings-per-second", required_argument, NULL,
         LIMIT_OPTION + AUTH_LIMIT_READINGS_PER_SECOND},
        {"burst", required_argument, NULL, LIMIT_OPTION + AUTH_LIMIT_BURST},
        {"bytes-per-second", required_argument, NULL,
         LIMIT_OPTION + AUTH_LIMIT_BYTES_PER_SECOND},
        {"daily-readings", required_argument, NULL,
         LIMIT_OPTION + AUTH_LIMIT_DAILY_READINGS},
        {"clear", no_argument, NULL, CLEAR_OPTION},
        {"include-secrets", no_argument, NULL, INCLUDE_SECRETS_OPTION},
        {"replace", no_argument, NULL, REPLACE_OPTION},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *type = NULL, *grace = NULL, *sub, *id = NULL;
    const char *fingerprint = NULL, *cert = NULL, *alg = NULL, *key = NULL;
    limit_args_t limit_args = {0};
    int include_secrets = 0, replace = 0;
    char err[1024];
    config_t *cfg = NULL;
    registry_t *reg = NULL;
    int c, rc = 2;

    if (argc < 1) {
        device_usage(stderr);
        return 2;
    }
    sub = argv[0];
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:g:f:C:a:k:h", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            type = optarg;
            break;
        case 'g':
            grace = optarg;
            break;
        case 'f':
            fingerprint = optarg;
            break;
        case 'C':
            cert = optarg;
            break;
        case 'a':
            alg = optarg;
            break;
        case 'k':
            key = optarg;
            break;
        case CLEAR_OPTION:
            limit_args.clear = 1;
            break;
        case INCLUDE_SECRETS_OPTION:
            include_secrets = 1;
            break;
        case REPLACE_OPTION:
            replace = 1;
            break;
        case LIMIT_OPTION + AUTH_LIMIT_READINGS_PER_SECOND:
        case LIMIT_OPTION + AUTH_LIMIT_BURST:
        case LIMIT_OPTION + AUTH_LIMIT_BYTES_PER_SECOND:
        case LIMIT_OPTION + AUTH_LIMIT_DAILY_READINGS:
            limit_args.value[c - LIMIT_OPTION] = optarg;
            break;
        case 'h':
            device_usage(stdout);
            return 0;
        default:
            device_usage(stderr);
            return 2;
        }
    }
    if (optind < argc)
        id = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "ingestd: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    if (include_secrets && strcmp(sub, "export") != 0) {
        fprintf(stderr, "ingestd: --include-secrets applies only to device "
                        "export\n");
        return 2;
    }
    if (replace && strcmp(sub, "import") != 0) {
        fprintf(stderr, "ingestd: --replace applies only to device import\n");
        return 2;
    }
    if (strcmp(sub, "import") == 0 && id == NULL) {
        fprintf(stderr, "ingestd: device import needs a FILE, or - for "
                        "standard input\n");
        device_usage(stderr);
        return 2;
    }
    if (strcmp(sub, "export") == 0 && id != NULL) {
        fprintf(stderr, "ingestd: unexpected argument \"%s\"\n", id);
        return 2;
    }
    if (strcmp(sub, "list") != 0 && strcmp(sub, "export") != 0 &&
        id == NULL) {
        fprintf(stderr, "ingestd: device %s needs a device id\n", sub);
        device_usage(stderr);
        return 2;
    }
    if (config_load(config_path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 2;
    }
    if (open_registry(cfg, &reg) != 0) {
        rc = 1;
        goto done;
    }
    if (strcmp(sub, "add") == 0) {
        rc = device_add(cfg, reg, id, type);
    } else if (strcmp(sub, "list") == 0) {
        size_t count = 0;
        printf("%-32s %-16s %-9s %-21s %-21s %s\n", "ID", "TYPE", "STATUS",
               "CREATED", "KEY_ROTATED", "OLD_KEY_VALID_UNTIL");
        rc = registry_device_list(reg, print_entry, &count) == 0 ? 0 : 1;
    } else if (strcmp(sub, "disable") == 0) {
        rc = device_set_enabled(reg, id, 0);
    } else if (strcmp(sub, "enable") == 0) {
        rc = device_set_enabled(reg, id, 1);
    } else if (strcmp(sub, "rotate-key") == 0) {
        rc = device_rotate(cfg, reg, id, grace);
    } else if (strcmp(sub, "show") == 0) {
        rc = device_show(reg, id);
    } else if (strcmp(sub, "set-cert") == 0) {
        rc = device_set_cert(reg, id, fingerprint, cert);
    } else if (strcmp(sub, "clear-cert") == 0) {
        rc = device_clear_cert(reg, id);
    } else if (strcmp(sub, "set-jwt-key") == 0) {
        rc = device_set_jwt_key(reg, id, alg, key);
    } else if (strcmp(sub, "new-jwt-secret") == 0) {
        rc = device_new_jwt_secret(reg, id);
    } else if (strcmp(sub, "clear-jwt") == 0) {
        rc = device_clear_jwt(reg, id);
    } else if (strcmp(sub, "set-limits") == 0) {
        rc = device_set_limits(reg, id, &limit_args);
    } else if (strcmp(sub, "export") == 0) {
        rc = device_export(reg, include_secrets);
    } else if (strcmp(sub, "import") == 0) {
        rc = device_import(cfg, reg, id, replace);
    } else {
        fprintf(stderr, "ingestd: unknown device command \"%s\"\n", sub);
        device_usage(stderr);
        rc = 2;
    }

done:
    if (reg != NULL)
        registry_close(reg);
    config_free(cfg);
    return rc;
}
