/* JWS algorithm names and the public keys a device can be pinned to. */
#include <limits.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdio.h>
#include <string.h>

#include "auth/auth_internal.h"

#define RSA_MIN_BITS 2048

static const struct {
    enum auth_jwt_alg alg;
    const char *name;
} alg_names[] = {
    {AUTH_JWT_ALG_RS256, "RS256"},
    {AUTH_JWT_ALG_ES256, "ES256"},
    {AUTH_JWT_ALG_EDDSA, "EdDSA"},
    {AUTH_JWT_ALG_HS256, "HS256"},
};

#define ALG_COUNT (sizeof(alg_names) / sizeof(alg_names[0]))

const char *auth_jwt_alg_name(enum auth_jwt_alg alg)
{
    for (size_t i = 0; i < ALG_COUNT; i++) {
        if (alg_names[i].alg == alg)
            return alg_names[i].name;
    }
    return "none";
}

enum auth_jwt_alg auth_jwt_alg_parse(const char *name)
{
    /* JWS algorithm names are case-sensitive (RFC 7515 section 4.1.1). */
    for (size_t i = 0; name != NULL && i < ALG_COUNT; i++) {
        if (strcmp(alg_names[i].name, name) == 0)
            return alg_names[i].alg;
    }
    return AUTH_JWT_ALG_NONE;
}

/* Returns 1 if `key` is an EC key on P-256. */
static int is_p256(EVP_PKEY *key)
{
    char group[64];
    size_t len = 0;

    if (EVP_PKEY_get_base_id(key) != EVP_PKEY_EC)
        return 0;
    if (EVP_PKEY_get_group_name(key, group, sizeof(group), &len) != 1)
        return 0;
    return strcmp(group, "prime256v1") == 0 || strcmp(group, "P-256") == 0;
}

EVP_PKEY *auth_jwt_key_parse(const char *pem, size_t len,
                             enum auth_jwt_alg alg, char *err, size_t errlen)
{
    EVP_PKEY *key = NULL;
    BIO *bio;

    if (len > INT_MAX) {
        snprintf(err, errlen, "public key is too large");
        return NULL;
    }
    bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    key = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
    BIO_free(bio);
    if (key == NULL) {
        snprintf(err, errlen,
                 "not a PEM public key (expected -----BEGIN PUBLIC KEY-----)");
        return NULL;
    }
    switch (alg) {
    case AUTH_JWT_ALG_RS256:
        if (EVP_PKEY_get_base_id(key) != EVP_PKEY_RSA) {
            snprintf(err, errlen, "RS256 needs an RSA public key");
            goto error;
        }
        if (EVP_PKEY_get_bits(key) < RSA_MIN_BITS) {
            snprintf(err, errlen,
                     "RSA key has %d bits; RS256 needs at least %d",
                     EVP_PKEY_get_bits(key), RSA_MIN_BITS);
            goto error;
        }
        break;
    case AUTH_JWT_ALG_ES256:
        if (!is_p256(key)) {
            snprintf(err, errlen, "ES256 needs an EC public key on P-256");
            goto error;
        }
        break;
    case AUTH_JWT_ALG_EDDSA:
        if (EVP_PKEY_get_base_id(key) != EVP_PKEY_ED25519) {
            snprintf(err, errlen, "EdDSA needs an Ed25519 public key");
            goto error;
        }
        break;
    default:
        snprintf(err, errlen, "%s takes no public key",
                 auth_jwt_alg_name(alg));
        goto error;
    }
    return key;

error:
    EVP_PKEY_free(key);
    return NULL;
}
