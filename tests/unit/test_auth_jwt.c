/* Unit tests for JWT verification, credential dispatch and the
 * failed-authentication guard. Keys are generated at test time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/errors.h"

#define LEEWAY_S 5
#define MAX_LIFETIME_S 3600

struct fixture {
    char dir[64];
    char path[128];
    registry_t *reg;
    auth_t *auth;
    EVP_PKEY *rsa;
    EVP_PKEY *ec;
    EVP_PKEY *ed;
    EVP_PKEY *other_ed;
    uint8_t secret[AUTH_JWT_SECRET_LEN];
    char *rsa_pem;
};

/* Returns the PEM SubjectPublicKeyInfo of `key` in a new string. */
static char *public_pem(EVP_PKEY *key)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *data;
    long len;
    char *pem;

    assert_non_null(bio);
    assert_int_equal(PEM_write_bio_PUBKEY(bio, key), 1);
    len = BIO_get_mem_data(bio, &data);
    pem = strndup(data, (size_t)len);
    BIO_free(bio);
    assert_non_null(pem);
    return pem;
}

static void add_device(struct fixture *f, const char *id)
{
    char key[AUTH_KEY_LEN + 1];

    assert_int_equal(registry_device_add(f->reg, id, "gps", key), 0);
}

static void pin_key(struct fixture *f, const char *id, const char *alg,
                    EVP_PKEY *key)
{
    char *pem = public_pem(key);
    char err[160] = "";

    assert_int_equal(registry_device_set_jwt_key(f->reg, id, alg, pem, err,
                                                 sizeof(err)),
                     0);
    free(pem);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    char text[AUTH_JWT_SECRET_TEXT_LEN + 1];
    char err[256] = "";
    auth_options_t opts = {
        .jwt_leeway_s = LEEWAY_S,
        .jwt_max_lifetime_s = MAX_LIFETIME_S,
        .max_failures_per_minute = 3,
        .block_duration_ms = 60000,
        .guard_table_size = 16,
    };

    if (f == NULL)
        return -1;
    snprintf(f->dir, sizeof(f->dir), "/tmp/test_auth_jwt.XXXXXX");
    if (mkdtemp(f->dir) == NULL)
        return -1;
    snprintf(f->path, sizeof(f->path), "%s/registry.db", f->dir);
    if (registry_open(f->path, &f->reg, err, sizeof(err)) != 0)
        return -1;
    f->rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    f->ec = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    f->ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    f->other_ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    if (!f->rsa || !f->ec || !f->ed || !f->other_ed)
        return -1;
    f->rsa_pem = public_pem(f->rsa);
    add_device(f, "rs-1");
    add_device(f, "es-1");
    add_device(f, "ed-1");
    add_device(f, "hs-1");
    add_device(f, "plain-1");
    pin_key(f, "rs-1", "RS256", f->rsa);
    pin_key(f, "es-1", "ES256", f->ec);
    pin_key(f, "ed-1", "EdDSA", f->ed);
    if (registry_device_new_jwt_secret(f->reg, "hs-1", text) != 0)
        return -1;
    if (strlen(text) != AUTH_JWT_SECRET_TEXT_LEN ||
        auth_base64url_decode(text, strlen(text), f->secret,
                              sizeof(f->secret)) != AUTH_JWT_SECRET_LEN)
        return -1;
    if (auth_open(f->path, &f->auth, err, sizeof(err)) != 0) {
        fprintf(stderr, "auth_open: %s\n", err);
        return -1;
    }
    if (auth_set_options(f->auth, &opts) != 0)
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

    auth_close(f->auth);
    registry_close(f->reg);
    EVP_PKEY_free(f->rsa);
    EVP_PKEY_free(f->ec);
    EVP_PKEY_free(f->ed);
    EVP_PKEY_free(f->other_ed);
    free(f->rsa_pem);
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

static void append_b64(char *out, size_t cap, const void *data, size_t len)
{
    char buf[2048];

    assert_true((len * 4 + 2) / 3 < sizeof(buf));
    auth_base64url_encode(data, len, buf);
    assert_true(strlen(out) + strlen(buf) < cap);
    strcat(out, buf);
}

/* Signs `input` with `key` for `alg` and returns the JWS signature bytes
 * in `sig`. ES256 is converted from DER to r || s. */
static size_t sign_input(const char *alg, EVP_PKEY *key,
                         const uint8_t *secret, size_t secret_len,
                         const char *input, uint8_t *sig)
{
    size_t len = 1024;
    EVP_MD_CTX *ctx;
    unsigned int mac_len = 0;

    if (strcmp(alg, "HS256") == 0) {
        assert_non_null(HMAC(EVP_sha256(), secret, (int)secret_len,
                             (const uint8_t *)input, strlen(input), sig,
                             &mac_len));
        return mac_len;
    }
    ctx = EVP_MD_CTX_new();
    assert_non_null(ctx);
    assert_int_equal(
        EVP_DigestSignInit(ctx, NULL,
                           strcmp(alg, "EdDSA") == 0 ? NULL : EVP_sha256(),
                           NULL, key),
        1);
    assert_int_equal(EVP_DigestSign(ctx, sig, &len, (const uint8_t *)input,
                                    strlen(input)),
                     1);
    EVP_MD_CTX_free(ctx);
    if (strcmp(alg, "ES256") == 0) {
        const uint8_t *p = sig;
        ECDSA_SIG *ecdsa = d2i_ECDSA_SIG(NULL, &p, (long)len);
        const BIGNUM *r;
        const BIGNUM *s;

        assert_non_null(ecdsa);
        ECDSA_SIG_get0(ecdsa, &r, &s);
        assert_int_equal(BN_bn2binpad(r, sig, 32), 32);
        assert_int_equal(BN_bn2binpad(s, sig + 32, 32), 32);
        ECDSA_SIG_free(ecdsa);
        len = 64;
    }
    return len;
}

/* Builds a token from header and claims JSON. `alg` chooses how to sign,
 * independently of the header. */
static char *make_token(const char *header, const char *claims,
                        const char *alg, EVP_PKEY *key, const uint8_t *secret,
                        size_t secret_len)
{
    char *token = calloc(1, 8192);
    uint8_t sig[1024];
    size_t sig_len;

    assert_non_null(token);
    append_b64(token, 8192, header, strlen(header));
    strcat(token, ".");
    append_b64(token, 8192, claims, strlen(claims));
    sig_len = sign_input(alg, key, secret, secret_len, token, sig);
    strcat(token, ".");
    append_b64(token, 8192, sig, sig_len);
    return token;
}

static char *claims_text(char *buf, size_t cap, const char *sub, long exp_rel,
                         const char *extra)
{
    snprintf(buf, cap, "{\"sub\":\"%s\",\"exp\":%lld%s%s}", sub,
             (long long)time(NULL) + exp_rel, extra[0] ? "," : "", extra);
    return buf;
}

static const char *const rs_header = "{\"alg\":\"RS256\",\"typ\":\"JWT\"}";
static const char *const es_header = "{\"alg\":\"ES256\"}";
static const char *const ed_header = "{\"alg\":\"EdDSA\"}";
static const char *const hs_header = "{\"alg\":\"HS256\"}";

/* Checks `token` and returns the result, with the reason in `why`. */
static enum auth_result check(struct fixture *f, const char *token,
                              const char *claimed, auth_device_t *dev,
                              auth_failure_t *why, int64_t *exp)
{
    enum auth_method method = AUTH_METHOD_CERTIFICATE;

    memset(dev, 0, sizeof(*dev));
    return auth_check_credential(f->auth, token, strlen(token), claimed, dev,
                                 &method, exp, why);
}

static void expect_reason(struct fixture *f, char *token, const char *reason)
{
    auth_failure_t why = {0};
    auth_device_t dev;
    int64_t exp = -1;

    assert_int_equal(check(f, token, NULL, &dev, &why, &exp),
                     AUTH_UNKNOWN_KEY);
    assert_non_null(why.reason);
    assert_string_equal(why.reason, reason);
    assert_true(why.detail[0] != '\0');
    assert_int_equal(exp, 0);
    free(token);
}

static void jwt_valid_every_alg(void **state)
{
    struct fixture *f = *state;
    struct {
        const char *alg;
        const char *header;
        const char *sub;
        EVP_PKEY *key;
    } cases[] = {
        {"RS256", rs_header, "rs-1", f->rsa},
        {"ES256", es_header, "es-1", f->ec},
        {"EdDSA", ed_header, "ed-1", f->ed},
        {"HS256", hs_header, "hs-1", NULL},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        enum auth_method method = AUTH_METHOD_CERTIFICATE;
        auth_failure_t why = {0};
        auth_device_t dev = {0};
        char claims[256];
        int64_t exp = 0;
        long long want;
        char *token;

        claims_text(claims, sizeof(claims), cases[i].sub, 600, "");
        want = (long long)time(NULL) + 600;
        token = make_token(cases[i].header, claims, cases[i].alg,
                           cases[i].key, f->secret, sizeof(f->secret));
        assert_int_equal(auth_check_credential(f->auth, token, strlen(token),
                                               cases[i].sub, &dev, &method,
                                               &exp, &why),
                         AUTH_OK);
        assert_string_equal(dev.id, cases[i].sub);
        assert_string_equal(dev.type, "gps");
        assert_int_equal(method, AUTH_METHOD_JWT);
        /* The clock may tick between building and checking. */
        assert_in_range(exp, want - 1, want);
        free(token);
    }
}

static void jwt_tampered_payload_and_signature(void **state)
{
    struct fixture *f = *state;
    char claims[256];
    char *token;
    char *dot;

    claims_text(claims, sizeof(claims), "es-1", 600, "");
    token = make_token(es_header, claims, "ES256", f->ec, NULL, 0);
    /* Replace the claims with others signed by nobody. */
    {
        char forged[8192] = "";
        char *sig = strrchr(token, '.');
        char other[256];

        append_b64(forged, sizeof(forged), es_header, strlen(es_header));
        strcat(forged, ".");
        claims_text(other, sizeof(other), "es-1", 900, "");
        append_b64(forged, sizeof(forged), other, strlen(other));
        strcat(forged, sig);
        expect_reason(f, strdup(forged), "bad_signature");
    }
    /* Flip one signature character to another valid one. */
    dot = strrchr(token, '.');
    dot[5] = dot[5] == 'A' ? 'B' : 'A';
    expect_reason(f, token, "bad_signature");

    claims_text(claims, sizeof(claims), "hs-1", 600, "");
    token = make_token(hs_header, claims, "HS256", NULL,
                       (const uint8_t *)"wrong secret", 12);
    expect_reason(f, token, "bad_signature");
}

static void jwt_alg_none_rejected(void **state)
{
    struct fixture *f = *state;
    char token[1024] = "";
    char claims[256];
    const char *none = "{\"alg\":\"none\"}";

    claims_text(claims, sizeof(claims), "rs-1", 600, "");
    append_b64(token, sizeof(token), none, strlen(none));
    strcat(token, ".");
    append_b64(token, sizeof(token), claims, strlen(claims));
    strcat(token, ".");
    /* An unsecured JWS has an empty signature. */
    expect_reason(f, strdup(token), "malformed");
    strcat(token, "AAAA");
    expect_reason(f, strdup(token), "alg_not_allowed");
}

/* HS256 with the device's RSA public key as the HMAC secret: a classic
 * attack on verifiers that let the header pick the algorithm. */
static void jwt_alg_confusion_rejected(void **state)
{
    struct fixture *f = *state;
    char claims[256];

    claims_text(claims, sizeof(claims), "rs-1", 600, "");
    expect_reason(f,
                  make_token(hs_header, claims, "HS256", NULL,
                             (const uint8_t *)f->rsa_pem, strlen(f->rsa_pem)),
                  "alg_not_allowed");
    /* An RS256 token for an ES256 device, signed with an RSA key. */
    claims_text(claims, sizeof(claims), "es-1", 600, "");
    expect_reason(f, make_token(rs_header, claims, "RS256", f->rsa, NULL, 0),
                  "alg_not_allowed");
    /* Names are case-sensitive. */
    expect_reason(f,
                  make_token("{\"alg\":\"es256\"}", claims, "ES256", f->ec,
                             NULL, 0),
                  "alg_not_allowed");
}

/* The key comes from the registry entry of `sub`, never from `kid`. */
static void jwt_kid_ignored_for_key_choice(void **state)
{
    struct fixture *f = *state;
    char claims[256];
    auth_failure_t why;
    auth_device_t dev;
    char *token;

    claims_text(claims, sizeof(claims), "ed-1", 600, "");
    expect_reason(f,
                  make_token("{\"alg\":\"EdDSA\",\"kid\":\"other\"}", claims,
                             "EdDSA", f->other_ed, NULL, 0),
                  "bad_signature");
    token = make_token("{\"alg\":\"EdDSA\",\"kid\":\"other\"}", claims,
                       "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL), AUTH_OK);
    free(token);
}

static void jwt_registry_checks_key_type(void **state)
{
    struct fixture *f = *state;
    EVP_PKEY *small = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    EVP_PKEY *p384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    char *pem;
    char err[160];

    assert_non_null(small);
    assert_non_null(p384);
    pem = public_pem(f->rsa);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "ES256",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    assert_non_null(strstr(err, "P-256"));
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "EdDSA",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "HS256",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "none",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "nobody", "RS256",
                                                 pem, err, sizeof(err)),
                     ING_ENOTFOUND);
    free(pem);
    pem = public_pem(small);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "RS256",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    assert_non_null(strstr(err, "2048"));
    free(pem);
    pem = public_pem(p384);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "ES256",
                                                 pem, err, sizeof(err)),
                     ING_EINVAL);
    free(pem);
    assert_int_equal(registry_device_set_jwt_key(f->reg, "plain-1", "RS256",
                                                 "not a key", err,
                                                 sizeof(err)),
                     ING_EINVAL);
    EVP_PKEY_free(small);
    EVP_PKEY_free(p384);
}

static void jwt_time_claims(void **state)
{
    struct fixture *f = *state;
    long long now = (long long)time(NULL);
    auth_failure_t why;
    auth_device_t dev;
    char claims[256];
    char extra[128];
    char *token;

    claims_text(claims, sizeof(claims), "ed-1", -(LEEWAY_S + 10), "");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "expired");

    /* Expired by less than the leeway still passes. */
    claims_text(claims, sizeof(claims), "ed-1", -1, "");
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL), AUTH_OK);
    free(token);

    snprintf(extra, sizeof(extra), "\"nbf\":%lld", now + 60);
    claims_text(claims, sizeof(claims), "ed-1", 600, extra);
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "not_yet_valid");

    snprintf(extra, sizeof(extra), "\"iat\":%lld", now + 60);
    claims_text(claims, sizeof(claims), "ed-1", 600, extra);
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "iat_in_future");

    snprintf(extra, sizeof(extra), "\"iat\":%lld,\"nbf\":%lld", now - 10,
             now - 10);
    claims_text(claims, sizeof(claims), "ed-1", 600, extra);
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL), AUTH_OK);
    free(token);

    snprintf(extra, sizeof(extra), "\"iat\":\"yesterday\"");
    claims_text(claims, sizeof(claims), "ed-1", 600, extra);
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "invalid_claim");
}

static void jwt_lifetime_capped(void **state)
{
    struct fixture *f = *state;
    long long now = (long long)time(NULL);
    char claims[256];
    char extra[64];

    snprintf(extra, sizeof(extra), "\"iat\":%lld", now);
    claims_text(claims, sizeof(claims), "es-1", MAX_LIFETIME_S + 60, extra);
    expect_reason(f, make_token(es_header, claims, "ES256", f->ec, NULL, 0),
                  "lifetime_too_long");
    /* Without iat the lifetime counts from now. */
    claims_text(claims, sizeof(claims), "es-1", MAX_LIFETIME_S + 60, "");
    expect_reason(f, make_token(es_header, claims, "ES256", f->ec, NULL, 0),
                  "lifetime_too_long");
    /* An old iat makes even a near exp too long. */
    snprintf(extra, sizeof(extra), "\"iat\":%lld", now - 2 * MAX_LIFETIME_S);
    claims_text(claims, sizeof(claims), "es-1", 60, extra);
    expect_reason(f, make_token(es_header, claims, "ES256", f->ec, NULL, 0),
                  "lifetime_too_long");
}

static void jwt_missing_exp(void **state)
{
    struct fixture *f = *state;

    expect_reason(f,
                  make_token(hs_header, "{\"sub\":\"hs-1\"}", "HS256", NULL,
                             f->secret, sizeof(f->secret)),
                  "missing_exp");
    expect_reason(f,
                  make_token(hs_header, "{\"sub\":\"hs-1\",\"exp\":null}",
                             "HS256", NULL, f->secret, sizeof(f->secret)),
                  "invalid_claim");
}

static void jwt_audience_and_issuer(void **state)
{
    struct fixture *f = *state;
    auth_options_t opts = {
        .jwt_leeway_s = LEEWAY_S,
        .jwt_max_lifetime_s = MAX_LIFETIME_S,
        .jwt_audience = "ingestd",
        .jwt_issuer = "factory",
        .max_failures_per_minute = 3,
        .block_duration_ms = 60000,
        .guard_table_size = 16,
    };
    auth_failure_t why;
    auth_device_t dev;
    char claims[256];
    char *token;

    assert_int_equal(auth_set_options(f->auth, &opts), 0);
    claims_text(claims, sizeof(claims), "ed-1", 600, "\"iss\":\"factory\"");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "wrong_audience");
    claims_text(claims, sizeof(claims), "ed-1", 600,
                "\"aud\":\"other\",\"iss\":\"factory\"");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "wrong_audience");
    claims_text(claims, sizeof(claims), "ed-1", 600,
                "\"aud\":\"ingestd\",\"iss\":\"someone\"");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "wrong_issuer");
    claims_text(claims, sizeof(claims), "ed-1", 600, "\"aud\":\"ingestd\"");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "wrong_issuer");
    claims_text(claims, sizeof(claims), "ed-1", 600,
                "\"aud\":[\"x\",\"ingestd\"],\"iss\":\"factory\"");
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL), AUTH_OK);
    free(token);
}

static void jwt_subject_rules(void **state)
{
    struct fixture *f = *state;
    auth_failure_t why = {0};
    auth_device_t dev;
    char claims[256];
    char *token;

    claims_text(claims, sizeof(claims), "ed-1", 600, "");
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, "es-1", &dev, &why, NULL),
                     AUTH_UNKNOWN_KEY);
    assert_string_equal(why.reason, "device_mismatch");
    free(token);

    expect_reason(f,
                  make_token(ed_header, "{\"exp\":9999999999}", "EdDSA",
                             f->ed, NULL, 0),
                  "missing_sub");
    claims_text(claims, sizeof(claims), "nobody", 600, "");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "unknown_device");
    claims_text(claims, sizeof(claims), "plain-1", 600, "");
    expect_reason(f, make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0),
                  "jwt_not_configured");
}

static void jwt_malformed_tokens(void **state)
{
    struct fixture *f = *state;
    char claims[256];
    char *token;
    char *big;

    expect_reason(f, strdup("a.b.c"), "malformed");
    expect_reason(f, strdup("eyJhbGciOiJFZERTQSJ9..AAAA"), "malformed");
    expect_reason(f, strdup("eyJhbGciOiJFZERTQSJ9.e*J9.AAAA"), "malformed");
    /* Padding is not part of base64url in JWS. */
    expect_reason(f, strdup("eyJhbGciOiJFZERTQSJ9.e30=.AAAA"), "malformed");
    expect_reason(f, strdup("not-a-credential"), "malformed");

    /* A JSON array, and an object with a duplicate name. */
    expect_reason(f, make_token(ed_header, "[1]", "EdDSA", f->ed, NULL, 0),
                  "malformed");
    expect_reason(f,
                  make_token(ed_header,
                             "{\"sub\":\"ed-1\",\"sub\":\"es-1\","
                             "\"exp\":9999999999}",
                             "EdDSA", f->ed, NULL, 0),
                  "malformed");
    claims_text(claims, sizeof(claims), "ed-1", 600, "");
    expect_reason(f,
                  make_token("{\"alg\":\"EdDSA\",\"crit\":[\"x\"]}", claims,
                             "EdDSA", f->ed, NULL, 0),
                  "unsupported_header");
    expect_reason(f,
                  make_token("{\"alg\":\"EdDSA\",\"typ\":\"JOSE+JSON\"}",
                             claims, "EdDSA", f->ed, NULL, 0),
                  "malformed");

    /* A token over AUTH_CREDENTIAL_MAX is rejected before decoding. */
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    big = malloc(AUTH_CREDENTIAL_MAX + 100);
    assert_non_null(big);
    memset(big, 'A', AUTH_CREDENTIAL_MAX + 99);
    big[AUTH_CREDENTIAL_MAX + 99] = '\0';
    memcpy(big, token, strlen(token));
    free(token);
    expect_reason(f, big, "malformed");
}

static void jwt_disabled_device(void **state)
{
    struct fixture *f = *state;
    auth_failure_t why;
    auth_device_t dev;
    char claims[256];
    char *token;

    assert_int_equal(registry_device_set_enabled(f->reg, "ed-1", 0), 0);
    assert_int_equal(auth_reload(f->auth), 0);
    claims_text(claims, sizeof(claims), "ed-1", 600, "");
    token = make_token(ed_header, claims, "EdDSA", f->ed, NULL, 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL), AUTH_DISABLED);
    assert_string_equal(why.reason, "disabled");
    assert_string_equal(dev.id, "ed-1");
    free(token);
}

static void jwt_clear_and_new_secret(void **state)
{
    struct fixture *f = *state;
    char text[AUTH_JWT_SECRET_TEXT_LEN + 1];
    auth_failure_t why;
    auth_device_t dev;
    char claims[256];
    char *token;

    claims_text(claims, sizeof(claims), "hs-1", 600, "");
    token = make_token(hs_header, claims, "HS256", NULL, f->secret,
                       sizeof(f->secret));
    assert_int_equal(registry_device_new_jwt_secret(f->reg, "hs-1", text), 0);
    assert_int_equal(auth_reload(f->auth), 0);
    /* The old secret stops working at the reload. */
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL),
                     AUTH_UNKNOWN_KEY);
    assert_string_equal(why.reason, "bad_signature");
    assert_int_equal(registry_device_clear_jwt(f->reg, "hs-1"), 0);
    assert_int_equal(registry_device_clear_jwt(f->reg, "nobody"),
                     ING_ENOTFOUND);
    assert_int_equal(auth_reload(f->auth), 0);
    assert_int_equal(check(f, token, NULL, &dev, &why, NULL),
                     AUTH_UNKNOWN_KEY);
    assert_string_equal(why.reason, "jwt_not_configured");
    free(token);
}

static void credential_api_key_path(void **state)
{
    struct fixture *f = *state;
    char key[AUTH_KEY_LEN + 1];
    enum auth_method method = AUTH_METHOD_JWT;
    auth_failure_t why;
    auth_device_t dev;
    int64_t exp = -1;

    assert_int_equal(registry_device_add(f->reg, "key-1", "gps", key), 0);
    assert_int_equal(auth_reload(f->auth), 0);
    assert_int_equal(auth_check_credential(f->auth, key, strlen(key), NULL,
                                           &dev, &method, &exp, &why),
                     AUTH_OK);
    assert_int_equal(method, AUTH_METHOD_API_KEY);
    assert_int_equal(exp, 0);
    assert_string_equal(dev.id, "key-1");
    assert_int_equal(auth_check_credential(f->auth, key, strlen(key), "key-2",
                                           &dev, &method, &exp, &why),
                     AUTH_UNKNOWN_KEY);
    assert_string_equal(why.reason, "device_mismatch");
    key[10] = key[10] == 'A' ? 'B' : 'A';
    assert_int_equal(auth_check_credential(f->auth, key, strlen(key), NULL,
                                           &dev, &method, &exp, &why),
                     AUTH_UNKNOWN_KEY);
    assert_string_equal(why.reason, "unknown_key");
}

static void base64url_strict(void **state)
{
    uint8_t out[16];

    (void)state;
    assert_int_equal(auth_base64url_decode("", 0, out, sizeof(out)), 0);
    assert_int_equal(auth_base64url_decode("AQ", 2, out, sizeof(out)), 1);
    assert_int_equal(out[0], 1);
    assert_int_equal(auth_base64url_decode("-_8", 3, out, sizeof(out)), 2);
    assert_int_equal(out[0], 0xfb);
    assert_int_equal(out[1], 0xff);
    /* Nonzero unused bits, a lone character, padding and '+' or '/'. */
    assert_int_equal(auth_base64url_decode("AR", 2, out, sizeof(out)), -1);
    assert_int_equal(auth_base64url_decode("A", 1, out, sizeof(out)), -1);
    assert_int_equal(auth_base64url_decode("AQ==", 4, out, sizeof(out)), -1);
    assert_int_equal(auth_base64url_decode("+/8", 3, out, sizeof(out)), -1);
    assert_int_equal(auth_base64url_decode("AAAAAA", 6, out, 2), -1);
}

static struct sockaddr_in v4(const char *text)
{
    struct sockaddr_in a = {.sin_family = AF_INET};

    assert_int_equal(inet_pton(AF_INET, text, &a.sin_addr), 1);
    return a;
}

static struct sockaddr_in6 v6(const char *text)
{
    struct sockaddr_in6 a = {.sin6_family = AF_INET6};

    assert_int_equal(inet_pton(AF_INET6, text, &a.sin6_addr), 1);
    return a;
}

#define SA(x) ((const struct sockaddr *)&(x))

static void guard_blocks_after_limit(void **state)
{
    struct fixture *f = *state;
    struct sockaddr_in a = v4("192.0.2.1");
    struct sockaddr_in b = v4("192.0.2.2");
    struct sockaddr_in6 mapped = v6("::ffff:192.0.2.1");
    uint64_t wait;

    /* The fixture allows 3 failures a minute. */
    assert_int_equal(auth_guard_check(f->auth, SA(a)), 0);
    auth_guard_failed(f->auth, SA(a));
    auth_guard_failed(f->auth, SA(a));
    assert_int_equal(auth_guard_check(f->auth, SA(a)), 0);
    auth_guard_failed(f->auth, SA(a));
    wait = auth_guard_check(f->auth, SA(a));
    assert_in_range(wait, 59, 60);
    /* An IPv4-mapped IPv6 address is the same host. */
    assert_in_range(auth_guard_check(f->auth, SA(mapped)), 59, 60);
    assert_int_equal(auth_guard_check(f->auth, SA(b)), 0);
    assert_int_equal(auth_guard_entries(f->auth), 1);
}

static void guard_ipv6_counts_prefix(void **state)
{
    struct fixture *f = *state;
    struct sockaddr_in6 a = v6("2001:db8:1:2::1");
    struct sockaddr_in6 b = v6("2001:db8:1:2:ffff::9");
    struct sockaddr_in6 other = v6("2001:db8:1:3::1");

    auth_guard_failed(f->auth, SA(a));
    auth_guard_failed(f->auth, SA(b));
    auth_guard_failed(f->auth, SA(a));
    assert_true(auth_guard_check(f->auth, SA(b)) > 0);
    assert_int_equal(auth_guard_check(f->auth, SA(other)), 0);
}

/* The fixture's table holds 16 addresses. Filling it forgets the address
 * that failed least recently, and its count starts over. */
static void guard_evicts_least_recent(void **state)
{
    struct fixture *f = *state;
    struct sockaddr_in first = v4("198.51.100.1");
    struct sockaddr_in recent = v4("198.51.100.2");
    char text[32];

    auth_guard_failed(f->auth, SA(first));
    auth_guard_failed(f->auth, SA(first));
    auth_guard_failed(f->auth, SA(recent));
    auth_guard_failed(f->auth, SA(recent));
    for (int i = 0; i < 15; i++) {
        struct sockaddr_in x;

        snprintf(text, sizeof(text), "203.0.113.%d", i + 1);
        x = v4(text);
        auth_guard_failed(f->auth, SA(x));
        /* A check does not refresh an entry, but a failure does. */
        if (i == 10)
            auth_guard_check(f->auth, SA(recent));
        if (i == 12)
            auth_guard_failed(f->auth, SA(recent));
    }
    assert_int_equal(auth_guard_entries(f->auth), 16);
    /* `recent` reached 3 failures and is blocked; `first` was evicted, so
     * its earlier two failures are gone. */
    assert_true(auth_guard_check(f->auth, SA(recent)) > 0);
    auth_guard_failed(f->auth, SA(first));
    assert_int_equal(auth_guard_check(f->auth, SA(first)), 0);
    assert_int_equal(auth_guard_entries(f->auth), 16);
}

static void guard_off_and_unix_sockets(void **state)
{
    struct fixture *f = *state;
    auth_options_t opts = {
        .jwt_leeway_s = LEEWAY_S,
        .jwt_max_lifetime_s = MAX_LIFETIME_S,
        .max_failures_per_minute = 0,
        .block_duration_ms = 60000,
        .guard_table_size = 16,
    };
    struct sockaddr_in a = v4("192.0.2.1");
    struct sockaddr unix_addr = {.sa_family = AF_UNIX};

    for (int i = 0; i < 5; i++)
        auth_guard_failed(f->auth, &unix_addr);
    assert_int_equal(auth_guard_check(f->auth, &unix_addr), 0);
    assert_int_equal(auth_set_options(f->auth, &opts), 0);
    for (int i = 0; i < 5; i++)
        auth_guard_failed(f->auth, SA(a));
    assert_int_equal(auth_guard_check(f->auth, SA(a)), 0);
    assert_int_equal(auth_guard_entries(f->auth), 0);
}

#define FIXTURE_TEST(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(base64url_strict),
        FIXTURE_TEST(jwt_valid_every_alg),
        FIXTURE_TEST(jwt_tampered_payload_and_signature),
        FIXTURE_TEST(jwt_alg_none_rejected),
        FIXTURE_TEST(jwt_alg_confusion_rejected),
        FIXTURE_TEST(jwt_kid_ignored_for_key_choice),
        FIXTURE_TEST(jwt_registry_checks_key_type),
        FIXTURE_TEST(jwt_time_claims),
        FIXTURE_TEST(jwt_lifetime_capped),
        FIXTURE_TEST(jwt_missing_exp),
        FIXTURE_TEST(jwt_audience_and_issuer),
        FIXTURE_TEST(jwt_subject_rules),
        FIXTURE_TEST(jwt_malformed_tokens),
        FIXTURE_TEST(jwt_disabled_device),
        FIXTURE_TEST(jwt_clear_and_new_secret),
        FIXTURE_TEST(credential_api_key_path),
        FIXTURE_TEST(guard_blocks_after_limit),
        FIXTURE_TEST(guard_ipv6_counts_prefix),
        FIXTURE_TEST(guard_evicts_least_recent),
        FIXTURE_TEST(guard_off_and_unix_sockets),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
