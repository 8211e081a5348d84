/* JSON Web Token verification (RFC 7519) for compact JWS tokens
 * (RFC 7515), with the algorithms of RFC 7518 and RFC 8037 that a device
 * can be pinned to.
 *
 * The device is the `sub` claim. Its registry entry fixes the one
 * algorithm and key that verify its tokens. The header's alg is only
 * compared against that algorithm and never chooses a key, which rejects
 * "none" and HS256 tokens made with a public key as the secret.
 */
#include <jansson.h>
#include <math.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"

#define ES256_SIG_LEN 64 /* r || s, 32 bytes each */
#define ED25519_SIG_LEN 64
#define HS256_SIG_LEN 32
/* NumericDate values past 2^53 lose integer precision as a double. */
#define NUMERIC_DATE_MAX 9007199254740992.0

/* One token split at its two dots. */
struct jws_parts {
    const char *header;
    size_t header_len;
    const char *payload;
    size_t payload_len;
    const char *signature;
    size_t signature_len;
};

static int split_token(const char *token, size_t len, struct jws_parts *p)
{
    const char *dot1 = memchr(token, '.', len);
    const char *dot2;
    const char *end = token + len;

    if (dot1 == NULL)
        return -1;
    dot2 = memchr(dot1 + 1, '.', (size_t)(end - dot1 - 1));
    if (dot2 == NULL || memchr(dot2 + 1, '.', (size_t)(end - dot2 - 1)))
        return -1;
    p->header = token;
    p->header_len = (size_t)(dot1 - token);
    p->payload = dot1 + 1;
    p->payload_len = (size_t)(dot2 - dot1 - 1);
    p->signature = dot2 + 1;
    p->signature_len = (size_t)(end - dot2 - 1);
    if (p->header_len == 0 || p->payload_len == 0 || p->signature_len == 0)
        return -1;
    return 0;
}

/* Decodes one base64url part and parses it as a JSON object. Returns
 * NULL for invalid base64url, invalid JSON, duplicate names or a value
 * that is not an object. */
static json_t *decode_json_part(const char *part, size_t len)
{
    uint8_t *buf = malloc(len);
    json_t *value = NULL;
    long n;

    if (buf == NULL)
        return NULL;
    n = auth_base64url_decode(part, len, buf, len);
    if (n > 0)
        value = json_loadb((const char *)buf, (size_t)n,
                           JSON_REJECT_DUPLICATES, NULL);
    free(buf);
    if (value != NULL && !json_is_object(value)) {
        json_decref(value);
        value = NULL;
    }
    return value;
}

static int verify_hs256(const struct snapshot_device *d, const char *input,
                        size_t input_len, const uint8_t *sig, size_t sig_len)
{
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;

    if (sig_len != HS256_SIG_LEN)
        return 0;
    if (HMAC(EVP_sha256(), d->jwt_secret, (int)d->jwt_secret_len,
             (const uint8_t *)input, input_len, mac, &mac_len) == NULL ||
        mac_len != HS256_SIG_LEN)
        return 0;
    return CRYPTO_memcmp(mac, sig, HS256_SIG_LEN) == 0;
}

/* Converts a JWS ES256 signature (r || s, RFC 7518 section 3.4) to the
 * DER ECDSA-Sig-Value that OpenSSL verifies. Returns the DER length
 * stored in a new buffer `*der`, or -1. */
static int es256_to_der(const uint8_t *sig, uint8_t **der)
{
    ECDSA_SIG *ecdsa = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, ES256_SIG_LEN / 2, NULL);
    BIGNUM *s = BN_bin2bn(sig + ES256_SIG_LEN / 2, ES256_SIG_LEN / 2, NULL);
    int len = -1;

    *der = NULL;
    if (ecdsa == NULL || r == NULL || s == NULL ||
        ECDSA_SIG_set0(ecdsa, r, s) != 1) {
        BN_free(r);
        BN_free(s);
        goto done;
    }
    len = i2d_ECDSA_SIG(ecdsa, der);

done:
    ECDSA_SIG_free(ecdsa);
    return len;
}

static int verify_public_key(const struct snapshot_device *d,
                             const char *input, size_t input_len,
                             const uint8_t *sig, size_t sig_len)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    const EVP_MD *md = EVP_sha256();
    uint8_t *der = NULL;
    int ok = 0;

    if (ctx == NULL)
        return 0;
    switch (d->jwt_alg) {
    case AUTH_JWT_ALG_RS256:
        if (sig_len != (size_t)EVP_PKEY_get_size(d->jwt_key))
            goto done;
        break;
    case AUTH_JWT_ALG_ES256: {
        int der_len;

        if (sig_len != ES256_SIG_LEN)
            goto done;
        der_len = es256_to_der(sig, &der);
        if (der_len <= 0)
            goto done;
        sig = der;
        sig_len = (size_t)der_len;
        break;
    }
    case AUTH_JWT_ALG_EDDSA:
        /* Ed25519 hashes internally and takes no digest. */
        if (sig_len != ED25519_SIG_LEN)
            goto done;
        md = NULL;
        break;
    default:
        goto done;
    }
    /* RSA keys default to PKCS #1 v1.5 padding, which RS256 uses. */
    if (EVP_DigestVerifyInit(ctx, NULL, md, NULL, d->jwt_key) != 1)
        goto done;
    ok = EVP_DigestVerify(ctx, sig, sig_len, (const uint8_t *)input,
                          input_len) == 1;

done:
    OPENSSL_free(der);
    EVP_MD_CTX_free(ctx);
    return ok;
}

/* Checks the signature over "header.payload". */
static int verify_signature(const struct snapshot_device *d,
                            const struct jws_parts *p)
{
    uint8_t sig[1024];
    size_t input_len = p->header_len + 1 + p->payload_len;
    long sig_len;

    sig_len = auth_base64url_decode(p->signature, p->signature_len, sig,
                                    sizeof(sig));
    if (sig_len <= 0)
        return 0;
    if (d->jwt_alg == AUTH_JWT_ALG_HS256)
        return verify_hs256(d, p->header, input_len, sig, (size_t)sig_len);
    return verify_public_key(d, p->header, input_len, sig, (size_t)sig_len);
}

/* Reads a NumericDate claim. Returns 1 and stores it, 0 when the claim is
 * absent, or -1 when it is not a number in range. */
static int numeric_date(json_t *claims, const char *name, double *out)
{
    json_t *v = json_object_get(claims, name);
    double d;

    if (v == NULL)
        return 0;
    if (!json_is_number(v))
        return -1;
    d = json_number_value(v);
    if (!isfinite(d) || d < 0 || d > NUMERIC_DATE_MAX)
        return -1;
    *out = d;
    return 1;
}

static int audience_matches(json_t *claims, const char *audience)
{
    json_t *aud = json_object_get(claims, "aud");
    json_t *item;
    size_t i;

    if (json_is_string(aud))
        return strcmp(json_string_value(aud), audience) == 0;
    json_array_foreach(aud, i, item)
    {
        if (json_is_string(item) &&
            strcmp(json_string_value(item), audience) == 0)
            return 1;
    }
    return 0;
}

/* Checks exp, nbf, iat, the lifetime cap, aud and iss. Returns 0 and
 * stores exp, or -1 with `why` set. */
static int check_claims(const struct auth_jwt_rules *rules, json_t *claims,
                        int64_t now, int64_t *expires_at, auth_failure_t *why)
{
    double leeway = (double)rules->leeway_s;
    double exp = 0;
    double nbf = 0;
    double iat = 0;
    double start;
    int has_iat;
    json_t *iss;

    switch (numeric_date(claims, "exp", &exp)) {
    case 0:
        auth_set_failure(why, "missing_exp", "the token has no exp claim");
        return -1;
    case -1:
        auth_set_failure(why, "invalid_claim", "exp is not a NumericDate");
        return -1;
    }
    if ((double)now >= exp + leeway) {
        auth_set_failure(why, "expired", "the token has expired");
        return -1;
    }
    switch (numeric_date(claims, "nbf", &nbf)) {
    case -1:
        auth_set_failure(why, "invalid_claim", "nbf is not a NumericDate");
        return -1;
    case 1:
        if ((double)now + leeway < nbf) {
            auth_set_failure(why, "not_yet_valid",
                             "the token is not valid yet (nbf)");
            return -1;
        }
    }
    has_iat = numeric_date(claims, "iat", &iat);
    if (has_iat < 0) {
        auth_set_failure(why, "invalid_claim", "iat is not a NumericDate");
        return -1;
    }
    if (has_iat && iat > (double)now + leeway) {
        auth_set_failure(why, "iat_in_future",
                         "the token was issued in the future (iat)");
        return -1;
    }
    start = has_iat ? iat : (double)now;
    if (exp - start > (double)rules->max_lifetime_s) {
        auth_set_failure(why, "lifetime_too_long",
                         "exp is too far after iat; issue shorter-lived "
                         "tokens");
        return -1;
    }
    if (rules->audience != NULL && !audience_matches(claims, rules->audience)) {
        auth_set_failure(why, "wrong_audience",
                         "the token's aud does not name this service");
        return -1;
    }
    iss = json_object_get(claims, "iss");
    if (rules->issuer != NULL &&
        (!json_is_string(iss) ||
         strcmp(json_string_value(iss), rules->issuer) != 0)) {
        auth_set_failure(why, "wrong_issuer",
                         "the token's iss is not the accepted issuer");
        return -1;
    }
    *expires_at = (int64_t)floor(exp);
    return 0;
}

/* Parses the header and returns its alg, or NULL with `why` set. The
 * returned string lives as long as `header`. */
static const char *header_alg(json_t *header, auth_failure_t *why)
{
    json_t *alg = json_object_get(header, "alg");
    json_t *typ = json_object_get(header, "typ");

    if (!json_is_string(alg)) {
        auth_set_failure(why, "malformed", "the token header has no alg");
        return NULL;
    }
    /* No header extension is understood, so a token that marks one as
     * critical must be rejected (RFC 7515 section 4.1.11). */
    if (json_object_get(header, "crit") != NULL) {
        auth_set_failure(why, "unsupported_header",
                         "the token header has crit, which is not supported");
        return NULL;
    }
    if (typ != NULL && (!json_is_string(typ) ||
                        strcasecmp(json_string_value(typ), "JWT") != 0)) {
        auth_set_failure(why, "malformed", "the token typ is not JWT");
        return NULL;
    }
    return json_string_value(alg);
}

enum auth_result auth_jwt_check(auth_t *a, const char *token, size_t len,
                                const char *claimed_id, auth_device_t *dev,
                                int64_t *expires_at, auth_failure_t *why)
{
    enum auth_result result = AUTH_UNKNOWN_KEY;
    const struct snapshot_device *d;
    struct snapshot *s = NULL;
    json_t *header = NULL;
    json_t *claims = NULL;
    struct jws_parts parts;
    const char *alg;
    const char *sub;
    int64_t exp = 0;

    if (len > AUTH_CREDENTIAL_MAX) {
        auth_set_failure(why, "malformed", "the token is too long");
        return AUTH_UNKNOWN_KEY;
    }
    if (split_token(token, len, &parts) != 0) {
        auth_set_failure(why, "malformed",
                         "the token is not three base64url parts");
        return AUTH_UNKNOWN_KEY;
    }
    header = decode_json_part(parts.header, parts.header_len);
    claims = decode_json_part(parts.payload, parts.payload_len);
    if (header == NULL || claims == NULL) {
        auth_set_failure(why, "malformed",
                         "the token header or claims are not base64url "
                         "JSON objects");
        goto done;
    }
    alg = header_alg(header, why);
    if (alg == NULL)
        goto done;
    sub = json_string_value(json_object_get(claims, "sub"));
    if (sub == NULL) {
        auth_set_failure(why, "missing_sub", "the token has no sub claim");
        goto done;
    }
    if (claimed_id != NULL && strcmp(claimed_id, sub) != 0) {
        auth_set_failure(why, "device_mismatch",
                         "the token's sub is not the device named by the "
                         "client");
        goto done;
    }
    s = auth_snapshot_acquire(a);
    d = auth_device_id_valid(sub) ? auth_snapshot_find(s, sub) : NULL;
    if (d == NULL) {
        auth_set_failure(why, "unknown_device", "no device has the token's sub");
        goto done;
    }
    if (d->jwt_alg == AUTH_JWT_ALG_NONE) {
        auth_set_failure(why, "jwt_not_configured",
                         "the device has no JWT key");
        goto done;
    }
    if (auth_jwt_alg_parse(alg) != d->jwt_alg) {
        auth_set_failure(why, "alg_not_allowed",
                         "the token's alg is not the one set for the device");
        goto done;
    }
    if (!verify_signature(d, &parts)) {
        auth_set_failure(why, "bad_signature",
                         "the token signature does not verify");
        goto done;
    }
    if (check_claims(&a->jwt, claims, (int64_t)time(NULL), &exp, why) != 0)
        goto done;
    memcpy(dev->id, d->id, sizeof(dev->id));
    memcpy(dev->type, d->type, sizeof(dev->type));
    dev->limits = d->limits;
    if (!d->enabled) {
        auth_set_failure(why, "disabled", "the device is disabled");
        result = AUTH_DISABLED;
        goto done;
    }
    *expires_at = exp;
    result = AUTH_OK;

done:
    if (s != NULL)
        auth_snapshot_release(s);
    json_decref(header);
    json_decref(claims);
    return result;
}
