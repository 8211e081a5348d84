/* TLS server contexts: settings, loading, reload, ALPN and metrics.
 *
 * Only TLS 1.2 and 1.3 are offered. TLS 1.2 suites are limited to ECDHE
 * key exchange with AES-GCM or ChaCha20-Poly1305, so every suite has
 * forward secrecy and an AEAD cipher. TLS 1.3 keeps OpenSSL's default
 * suites, which are all AEAD. Renegotiation is off, because the memory
 * BIO driver in conn.c handles one handshake per connection.
 */
#include "net/tls.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "core/errors.h"
#include "core/metrics.h"
#include "net/tls_internal.h"

#define TLS12_CIPHERS                                                          \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"               \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"               \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"

struct tls_server {
    const config_t *cfg;
    auth_t *auth;
    char name[16];
    unsigned char alpn[32]; /* one protocol in ALPN wire format */
    size_t alpn_len;
    pthread_mutex_t lock;
    SSL_CTX *ctx; /* under `lock`: the context for new connections */
};

/* Writes OpenSSL's first queued error after `what` into `err` and clears
 * the queue. */
static int fail_openssl(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char reason[160] = "unknown error";

    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    ERR_clear_error();
    snprintf(err, errlen, "%s: %s", what, reason);
    return ING_ECONFIG;
}

/* Selects our protocol when the client offers it. A client that offers
 * only other protocols gets no ALPN response instead of an alert, since
 * some MQTT clients offer vendor names. */
static int on_alpn_select(SSL *ssl, const unsigned char **out,
                          unsigned char *outlen, const unsigned char *in,
                          unsigned int inlen, void *arg)
{
    tls_server_t *s = arg;
    unsigned char *selected = NULL;

    (void)ssl;
    if (SSL_select_next_proto(&selected, outlen, s->alpn,
                              (unsigned int)s->alpn_len, in,
                              inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = selected;
    return SSL_TLSEXT_ERR_OK;
}

static int key_mismatch(const config_t *cfg, char *err, size_t errlen)
{
    ERR_clear_error();
    snprintf(err, errlen,
             "tls.key_file %s: the key does not match the certificate in "
             "tls.cert_file %s; use the key the certificate was issued for",
             cfg->tls.key_file, cfg->tls.cert_file);
    return ING_ECONFIG;
}

static int load_certificate(SSL_CTX *ctx, const config_t *cfg, char *err,
                            size_t errlen)
{
    char what[512];

    snprintf(what, sizeof(what), "tls.cert_file %s", cfg->tls.cert_file);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls.cert_file) != 1)
        return fail_openssl(err, errlen, what);
    snprintf(what, sizeof(what), "tls.key_file %s", cfg->tls.key_file);
    /* OpenSSL checks the key against the certificate while loading it,
     * and reports a mismatch as X509_R_KEY_VALUES_MISMATCH. */
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls.key_file,
                                    SSL_FILETYPE_PEM) != 1) {
        if (ERR_GET_REASON(ERR_peek_error()) != X509_R_KEY_VALUES_MISMATCH)
            return fail_openssl(err, errlen, what);
        return key_mismatch(cfg, err, errlen);
    }
    if (SSL_CTX_check_private_key(ctx) != 1)
        return key_mismatch(cfg, err, errlen);
    return 0;
}

/* Loads the client CA bundle and the CRL, and requests client
 * certificates as tls.client_auth sets. */
static int load_client_auth(SSL_CTX *ctx, const config_t *cfg, char *err,
                            size_t errlen)
{
    STACK_OF(X509_NAME) *names;
    X509_STORE *store;
    char what[512];
    int mode;

    if (cfg->tls.client_auth == CONFIG_TLS_CLIENT_AUTH_NONE)
        return 0;
    snprintf(what, sizeof(what), "tls.ca_file %s", cfg->tls.ca_file);
    if (SSL_CTX_load_verify_locations(ctx, cfg->tls.ca_file, NULL) != 1)
        return fail_openssl(err, errlen, what);
    /* The CertificateRequest names the accepted CAs, so that a client
     * with several certificates picks one of ours. */
    names = SSL_load_client_CA_file(cfg->tls.ca_file);
    if (names == NULL)
        return fail_openssl(err, errlen, what);
    SSL_CTX_set_client_CA_list(ctx, names);
    store = SSL_CTX_get_cert_store(ctx);
    if (cfg->tls.crl_file != NULL) {
        snprintf(what, sizeof(what), "tls.crl_file %s", cfg->tls.crl_file);
        if (X509_STORE_load_file(store, cfg->tls.crl_file) != 1)
            return fail_openssl(err, errlen, what);
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
    }
    mode = SSL_VERIFY_PEER;
    if (cfg->tls.client_auth == CONFIG_TLS_CLIENT_AUTH_REQUIRED)
        mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    SSL_CTX_set_verify(ctx, mode, tls_on_verify);
    /* Resumed sessions skip certificate verification, so every
     * connection runs a full handshake: a revoked certificate, or a
     * device disabled since, is then caught on its next connection. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
    return 0;
}

/* Builds a context from cfg->tls. `s` (may be NULL for check-config)
 * receives the ALPN and verification callbacks. */
static int build_context(const config_t *cfg, tls_server_t *s, SSL_CTX **out,
                         char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    int rc;

    if (ctx == NULL)
        return fail_openssl(err, errlen, "creating the TLS context");
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS) != 1) {
        rc = fail_openssl(err, errlen, "setting TLS versions and ciphers");
        goto error;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* Idle connections give their read and write buffers back. */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    rc = load_certificate(ctx, cfg, err, errlen);
    if (rc == 0)
        rc = load_client_auth(ctx, cfg, err, errlen);
    if (rc != 0)
        goto error;
    if (s != NULL) {
        SSL_CTX_set_app_data(ctx, s);
        SSL_CTX_set_alpn_select_cb(ctx, on_alpn_select, s);
    }
    *out = ctx;
    return 0;
error:
    SSL_CTX_free(ctx);
    return rc;
}

int tls_server_create(const config_t *cfg, auth_t *auth, const char *name,
                      const char *alpn, tls_server_t **out, char *err,
                      size_t errlen)
{
    tls_server_t *s = calloc(1, sizeof(*s));
    size_t alpn_len = strlen(alpn);
    int rc;

    if (s == NULL)
        return ING_ENOMEM;
    if (alpn_len == 0 || alpn_len >= sizeof(s->alpn)) {
        free(s);
        return ING_EINVAL;
    }
    s->cfg = cfg;
    s->auth = auth;
    snprintf(s->name, sizeof(s->name), "%s", name);
    s->alpn[0] = (unsigned char)alpn_len;
    memcpy(s->alpn + 1, alpn, alpn_len);
    s->alpn_len = alpn_len + 1;
    pthread_mutex_init(&s->lock, NULL);
    rc = build_context(cfg, s, &s->ctx, err, errlen);
    if (rc != 0) {
        tls_server_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int tls_server_reload(tls_server_t *s, char *err, size_t errlen)
{
    SSL_CTX *ctx, *old;
    int rc = build_context(s->cfg, s, &ctx, err, errlen);

    if (rc != 0)
        return rc;
    pthread_mutex_lock(&s->lock);
    old = s->ctx;
    s->ctx = ctx;
    pthread_mutex_unlock(&s->lock);
    /* Drops only the server's reference: each open connection's SSL
     * object holds its own. */
    SSL_CTX_free(old);
    return 0;
}

void tls_server_free(tls_server_t *s)
{
    if (s == NULL)
        return;
    SSL_CTX_free(s->ctx);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

const char *tls_server_name(const tls_server_t *s)
{
    return s->name;
}

SSL *tls_server_new_ssl(tls_server_t *s)
{
    SSL *ssl;

    pthread_mutex_lock(&s->lock);
    ssl = SSL_new(s->ctx);
    pthread_mutex_unlock(&s->lock);
    if (ssl != NULL)
        SSL_set_accept_state(ssl);
    return ssl;
}

int tls_check_config(const config_t *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx;
    int rc;

    if (cfg->https.listen == NULL && cfg->mqtts.listen == NULL)
        return 0;
    rc = build_context(cfg, NULL, &ctx, err, errlen);
    if (rc == 0)
        SSL_CTX_free(ctx);
    return rc;
}

/* ---- Verification results and metrics ---- */

const config_t *tls_server_config(const tls_server_t *s)
{
    return s->cfg;
}

auth_t *tls_server_auth(const tls_server_t *s)
{
    return s->auth;
}

static const char *const result_names[] = {
    [TLS_HANDSHAKE_OK] = "ok",
    [TLS_HANDSHAKE_FAILED] = "failed",
    [TLS_HANDSHAKE_CERT_REJECTED] = "client_cert_rejected",
    [TLS_HANDSHAKE_TIMEOUT] = "timeout",
    [TLS_HANDSHAKE_CLOSED] = "closed",
};

void tls_metrics_handshake(const char *listener,
                           enum tls_handshake_result result,
                           const char *reason)
{
    char labels[128];

    snprintf(labels, sizeof(labels), "listener=\"%s\",result=\"%s\"",
             listener, result_names[result]);
    metrics_counter_add(
        metrics_counter("ingestd_tls_handshakes_total",
                        "TLS handshakes on the https and mqtts listeners, "
                        "by outcome.",
                        labels),
        1);
    if (result != TLS_HANDSHAKE_CERT_REJECTED)
        return;
    snprintf(labels, sizeof(labels), "reason=\"%s\"",
             reason != NULL ? reason : "invalid");
    metrics_counter_add(
        metrics_counter("ingestd_tls_client_cert_failures_total",
                        "Client certificates rejected in the TLS "
                        "handshake, by reason.",
                        labels),
        1);
}
