/* The parts of the opening handshake that are WebSocket's own: checking
 * Sec-WebSocket-Key and computing Sec-WebSocket-Accept (RFC 6455 section
 * 4.2.2). The HTTP module parses the request and sends the response. */
#include <string.h>

#include <openssl/evp.h>

#include "core/errors.h"
#include "ws/ws.h"

/* Appended to the client's key before hashing, fixed by RFC 6455. */
static const char accept_guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/* The base64 encoding of 16 bytes: 22 characters and two '=' of padding. */
#define KEY_LEN 24
#define KEY_CHARS 22

static int is_base64_char(char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
           (ch >= '0' && ch <= '9') || ch == '+' || ch == '/';
}

int ws_handshake_key_valid(const char *key)
{
    if (key == NULL || strlen(key) != KEY_LEN)
        return 0;
    for (size_t i = 0; i < KEY_CHARS; i++) {
        if (!is_base64_char(key[i]))
            return 0;
    }
    return key[KEY_CHARS] == '=' && key[KEY_CHARS + 1] == '=';
}

int ws_handshake_accept(const char *key, char out[WS_ACCEPT_LEN + 1])
{
    char input[KEY_LEN + sizeof(accept_guid)];
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;

    if (!ws_handshake_key_valid(key))
        return ING_EINVAL;
    memcpy(input, key, KEY_LEN);
    memcpy(input + KEY_LEN, accept_guid, sizeof(accept_guid) - 1);
    if (EVP_Digest(input, KEY_LEN + sizeof(accept_guid) - 1, digest,
                   &digest_len, EVP_sha1(), NULL) != 1 ||
        digest_len != 20)
        return ING_EIO;
    /* EVP_EncodeBlock writes 4 characters per 3 bytes and a NUL. */
    if (EVP_EncodeBlock((unsigned char *)out, digest, (int)digest_len) !=
        WS_ACCEPT_LEN)
        return ING_EIO;
    return 0;
}
