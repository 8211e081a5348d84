/* API key generation and hashing, and the naming rules for ids and types. */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>
#include <time.h>

#include "auth/auth.h"
#include "auth/auth_internal.h"
#include "core/errors.h"
#include "core/ids.h"

_Static_assert(AUTH_KEY_PREFIX_LEN + (AUTH_KEY_RANDOM_LEN * 4 + 2) / 3 ==
                   AUTH_KEY_LEN,
               "AUTH_KEY_LEN must match the prefix and the encoded bytes");

static const char base64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

void auth_base64url_encode(const uint8_t *in, size_t len, char *out)
{
    size_t i = 0;
    size_t n = 0;
    uint32_t bits;

    for (; i + 3 <= len; i += 3) {
        bits = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[n++] = base64url_alphabet[(bits >> 18) & 0x3f];
        out[n++] = base64url_alphabet[(bits >> 12) & 0x3f];
        out[n++] = base64url_alphabet[(bits >> 6) & 0x3f];
        out[n++] = base64url_alphabet[bits & 0x3f];
    }
    if (len - i == 1) {
        bits = (uint32_t)in[i] << 16;
        out[n++] = base64url_alphabet[(bits >> 18) & 0x3f];
        out[n++] = base64url_alphabet[(bits >> 12) & 0x3f];
    } else if (len - i == 2) {
        bits = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[n++] = base64url_alphabet[(bits >> 18) & 0x3f];
        out[n++] = base64url_alphabet[(bits >> 12) & 0x3f];
        out[n++] = base64url_alphabet[(bits >> 6) & 0x3f];
    }
    out[n] = '\0';
}

static int base64url_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

long auth_base64url_decode(const char *in, size_t len, uint8_t *out,
                           size_t cap)
{
    uint32_t bits = 0;
    int nbits = 0;
    size_t n = 0;

    /* One leftover character carries only 6 bits, less than a byte. */
    if (len % 4 == 1)
        return -1;
    for (size_t i = 0; i < len; i++) {
        int v = base64url_value((unsigned char)in[i]);

        if (v < 0)
            return -1;
        bits = (bits << 6) | (uint32_t)v;
        nbits += 6;
        if (nbits >= 8) {
            nbits -= 8;
            if (n == cap)
                return -1;
            out[n++] = (uint8_t)(bits >> nbits);
        }
    }
    /* Nonzero padding bits would let two strings decode to the same
     * bytes, so a canonical encoding is required. */
    if ((bits & ((1u << nbits) - 1)) != 0)
        return -1;
    return (long)n;
}

static int is_name_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
}

int auth_device_id_valid(const char *id)
{
    size_t len = 0;

    if (id == NULL)
        return 0;
    for (; id[len] != '\0'; len++) {
        if (len >= AUTH_DEVICE_ID_MAX)
            return 0;
        if (!is_name_char(id[len]) && id[len] != ':')
            return 0;
    }
    return len > 0;
}

int auth_type_name_valid(const char *type)
{
    size_t len = 0;

    if (type == NULL)
        return 0;
    for (; type[len] != '\0'; len++) {
        if (len >= AUTH_TYPE_MAX || !is_name_char(type[len]))
            return 0;
    }
    return len > 0;
}

int auth_key_hash(const char *key, size_t len, uint8_t hash[AUTH_HASH_LEN])
{
    unsigned int hash_len = 0;

    if (EVP_Digest(key, len, hash, &hash_len, EVP_sha256(), NULL) != 1 ||
        hash_len != AUTH_HASH_LEN)
        return ING_EIO;
    return 0;
}

int auth_key_generate(char key[AUTH_KEY_LEN + 1], uint8_t hash[AUTH_HASH_LEN])
{
    uint8_t random[AUTH_KEY_RANDOM_LEN];
    int rc;

    rc = ids_random_bytes(random, sizeof(random));
    if (rc != 0)
        goto done;
    memcpy(key, AUTH_KEY_PREFIX, AUTH_KEY_PREFIX_LEN);
    auth_base64url_encode(random, sizeof(random), key + AUTH_KEY_PREFIX_LEN);
    rc = auth_key_hash(key, AUTH_KEY_LEN, hash);

done:
    /* The key must not outlive this call anywhere but in the caller's
     * buffer. */
    OPENSSL_cleanse(random, sizeof(random));
    return rc;
}

int64_t auth_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
