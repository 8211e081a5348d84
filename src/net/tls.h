/* TLS for the listeners: server contexts built from the tls.* settings,
 * reloaded on SIGHUP, and the client certificate checks of mutual TLS.
 *
 * A tls_server_t belongs to one listener kind ("https" or "mqtts") and is
 * shared by every worker loop. It holds the current OpenSSL SSL_CTX
 * behind a mutex. A new connection takes an SSL object from the current
 * context, and SSL_new takes a reference on that context, so a reload
 * swaps the pointer for new connections while open connections keep the
 * context they started with until they close.
 *
 * The handshake itself runs in net/conn.c over memory BIOs. This file
 * supplies the contexts, the certificate verification callback and the
 * handshake metrics.
 */
#ifndef INGESTD_NET_TLS_H
#define INGESTD_NET_TLS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "auth/auth.h"
#include "core/config.h"

/* The identity taken from a verified client certificate. */
typedef struct tls_peer {
    char device_id[AUTH_DEVICE_ID_MAX + 1];
    unsigned char fingerprint[32]; /* SHA-256 of the certificate's DER */
    auth_device_t dev;             /* as auth_check_certificate filled it */
} tls_peer_t;

typedef struct tls_server tls_server_t;

/* Creates the TLS server of listener `name` ("https" or "mqtts", also
 * the metrics label) from cfg->tls: loads the certificate chain and key,
 * the client CA bundle and the CRL, and offers `alpn` ("http/1.1" or
 * "mqtt") in ALPN. `cfg` and `auth` must outlive the server. Returns 0,
 * ING_ENOMEM, or ING_ECONFIG with a message naming the file in `err`. */
int tls_server_create(const config_t *cfg, auth_t *auth, const char *name,
                      const char *alpn, tls_server_t **out, char *err,
                      size_t errlen);

/* Loads the tls.* files again into a new context and makes it the one
 * for new connections. On failure the previous context stays in use.
 * Thread-safe. Returns 0 or ING_ECONFIG with a message in `err`. */
int tls_server_reload(tls_server_t *s, char *err, size_t errlen);

/* Frees the server. Connections still open keep their own context. */
void tls_server_free(tls_server_t *s);

/* Returns the listener name given to tls_server_create. */
const char *tls_server_name(const tls_server_t *s);

/* Creates an SSL object for one accepted connection from the current
 * context, in server mode. Thread-safe. Returns NULL on allocation
 * failure. */
SSL *tls_server_new_ssl(tls_server_t *s);

/* Builds a context from cfg->tls as tls_server_create does and frees it,
 * for `ingestd check-config`. Returns 0 or ING_ECONFIG with a message
 * such as "tls.key_file /etc/ingestd/key.pem: the key does not match the
 * certificate in tls.cert_file ..." in `err`. */
int tls_check_config(const config_t *cfg, char *err, size_t errlen);

/* ---- One connection's handshake (used by net/conn.c) ---- */

/* Why a handshake failed, or the device that its client certificate
 * names. Filled by the verification callback. */
typedef struct tls_verdict {
    const char *reason;   /* metric label, static, or NULL */
    char detail[200];     /* for the log line */
    int have_peer;        /* `peer` contains a verified certificate */
    tls_peer_t peer;
} tls_verdict_t;

/* Attaches `v` to `ssl`, for the verification callback to fill. */
void tls_attach_verdict(SSL *ssl, tls_verdict_t *v);

/* Completes `v` after a failed handshake: when the verification callback
 * recorded nothing, takes the reason from OpenSSL's error queue (a
 * missing client certificate, no shared protocol version or cipher).
 * Clears the error queue. */
void tls_explain_failure(SSL *ssl, tls_verdict_t *v);

enum tls_handshake_result {
    TLS_HANDSHAKE_OK = 0,
    TLS_HANDSHAKE_FAILED = 1,        /* protocol error or no common cipher */
    TLS_HANDSHAKE_CERT_REJECTED = 2, /* the client certificate failed */
    TLS_HANDSHAKE_TIMEOUT = 3,
    TLS_HANDSHAKE_CLOSED = 4,        /* the client left before the end */
};

/* Counts a handshake in ingestd_tls_handshakes_total{listener,result}
 * and, for TLS_HANDSHAKE_CERT_REJECTED, in
 * ingestd_tls_client_cert_failures_total{reason}. */
void tls_metrics_handshake(const char *listener,
                           enum tls_handshake_result result,
                           const char *reason);

/* ---- Identity rules (exported for the unit tests) ---- */

/* Takes the device id out of a URI subject alternative name: the rest of
 * "urn:device:ID", or else the last segment of the URI's path, after the
 * last '/' (query and fragment removed). The id must pass
 * auth_device_id_valid. Returns 0 and writes it to `out`, or ING_EINVAL. */
int tls_identity_from_uri(const char *uri, char *out, size_t outlen);

/* Takes the device id out of `cert` as `mode` (enum config_tls_identity)
 * selects: the subject's last CN, the first URI SAN that yields an id, or
 * the first DNS SAN that is a valid id. Returns 0, or ING_EINVAL. */
int tls_identity_from_cert(X509 *cert, int mode, char *out, size_t outlen);

#endif
