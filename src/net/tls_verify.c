/* Client certificate checks: chain verification results, the device
 * identity in a certificate, and the registry check.
 *
 * OpenSSL verifies the chain against tls.ca_file (and tls.crl_file) and
 * calls tls_on_verify for each certificate. A failure stops the handshake
 * with the alert that OpenSSL derives from the verification error, such as
 * certificate_expired or unknown_ca. At the leaf certificate the device id
 * is taken out as tls.identity selects and checked with
 * auth_check_certificate; an unknown, disabled or unpinned device fails
 * the handshake too, with the error X509_V_ERR_CERT_REJECTED, which
 * OpenSSL sends as the alert bad_certificate.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "core/errors.h"
#include "net/tls_internal.h"

#define URN_DEVICE "urn:device:"

void tls_attach_verdict(SSL *ssl, tls_verdict_t *v)
{
    SSL_set_app_data(ssl, v);
}

/* Returns the metric label of a verification error. */
static const char *reason_of(int error)
{
    switch (error) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
        return "expired";
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return "not_yet_valid";
    case X509_V_ERR_CERT_REVOKED:
        return "revoked";
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
        return "unknown_ca";
    case X509_V_ERR_UNABLE_TO_GET_CRL:
    case X509_V_ERR_CRL_HAS_EXPIRED:
    case X509_V_ERR_CRL_NOT_YET_VALID:
    case X509_V_ERR_CRL_SIGNATURE_FAILURE:
        return "crl_unavailable";
    case X509_V_ERR_INVALID_PURPOSE:
        return "wrong_purpose";
    default:
        return "invalid";
    }
}

int tls_identity_from_uri(const char *uri, char *out, size_t outlen)
{
    const char *start, *end;
    size_t len;

    if (strncasecmp(uri, URN_DEVICE, strlen(URN_DEVICE)) == 0) {
        start = uri + strlen(URN_DEVICE);
        end = start + strlen(start);
    } else {
        /* A URI with a path such as spiffe://example.org/device/ID: the
         * id is the last path segment. */
        if (strstr(uri, "://") == NULL)
            return ING_EINVAL;
        end = uri + strcspn(uri, "?#");
        start = end;
        while (start > uri && start[-1] != '/')
            start--;
        if (start <= strstr(uri, "://") + 3)
            return ING_EINVAL; /* an authority but no path */
    }
    len = (size_t)(end - start);
    if (len == 0 || len >= outlen || len > AUTH_DEVICE_ID_MAX)
        return ING_EINVAL;
    memcpy(out, start, len);
    out[len] = '\0';
    return auth_device_id_valid(out) ? 0 : ING_EINVAL;
}

/* Copies an ASN.1 string that must be plain text into `out`. Returns 0,
 * or ING_EINVAL for a string with a NUL or one too long. */
static int copy_text(const ASN1_STRING *s, char *out, size_t outlen)
{
    int len = ASN1_STRING_length(s);
    const unsigned char *data = ASN1_STRING_get0_data(s);

    if (len <= 0 || (size_t)len >= outlen ||
        memchr(data, '\0', (size_t)len) != NULL)
        return ING_EINVAL;
    memcpy(out, data, (size_t)len);
    out[len] = '\0';
    return 0;
}

static int identity_from_cn(X509 *cert, char *out, size_t outlen)
{
    X509_NAME *subject = X509_get_subject_name(cert);
    int last = -1, i = -1;
    X509_NAME_ENTRY *entry;

    while ((i = X509_NAME_get_index_by_NID(subject, NID_commonName, i)) >= 0)
        last = i;
    if (last < 0)
        return ING_EINVAL;
    entry = X509_NAME_get_entry(subject, last);
    if (copy_text(X509_NAME_ENTRY_get_data(entry), out, outlen) != 0)
        return ING_EINVAL;
    return auth_device_id_valid(out) ? 0 : ING_EINVAL;
}

static int identity_from_san(X509 *cert, int type, char *out, size_t outlen)
{
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name,
                                            NULL, NULL);
    char text[512];
    int rc = ING_EINVAL;

    for (int i = 0; i < sk_GENERAL_NAME_num(names) && rc != 0; i++) {
        const GENERAL_NAME *name = sk_GENERAL_NAME_value(names, i);

        if (name->type != type)
            continue;
        if (type == GEN_URI) {
            if (copy_text(name->d.uniformResourceIdentifier, text,
                          sizeof(text)) == 0)
                rc = tls_identity_from_uri(text, out, outlen);
        } else if (copy_text(name->d.dNSName, out, outlen) == 0 &&
                   auth_device_id_valid(out)) {
            rc = 0;
        }
    }
    GENERAL_NAMES_free(names);
    return rc;
}

int tls_identity_from_cert(X509 *cert, int mode, char *out, size_t outlen)
{
    switch (mode) {
    case CONFIG_TLS_IDENTITY_SAN_URI:
        return identity_from_san(cert, GEN_URI, out, outlen);
    case CONFIG_TLS_IDENTITY_SAN_DNS:
        return identity_from_san(cert, GEN_DNS, out, outlen);
    default:
        return identity_from_cn(cert, out, outlen);
    }
}

static const char *const identity_names[] = {
    [CONFIG_TLS_IDENTITY_CN] = "subject CN",
    [CONFIG_TLS_IDENTITY_SAN_URI] = "URI subject alternative name",
    [CONFIG_TLS_IDENTITY_SAN_DNS] = "DNS subject alternative name",
};

/* Takes the device id from the verified leaf certificate and checks it
 * against the registry. Returns 1 when the device may connect. */
static int check_leaf(X509 *cert, const tls_server_t *s, tls_verdict_t *v)
{
    const config_t *cfg = tls_server_config(s);
    tls_peer_t *p = &v->peer;
    auth_failure_t why = {0};
    unsigned int md_len = 0;

    if (tls_identity_from_cert(cert, cfg->tls.identity, p->device_id,
                               sizeof(p->device_id)) != 0) {
        v->reason = "no_identity";
        snprintf(v->detail, sizeof(v->detail),
                 "the certificate has no %s that is a valid device id",
                 identity_names[cfg->tls.identity]);
        return 0;
    }
    if (X509_digest(cert, EVP_sha256(), p->fingerprint, &md_len) != 1 ||
        md_len != sizeof(p->fingerprint)) {
        v->reason = "invalid";
        snprintf(v->detail, sizeof(v->detail),
                 "computing the certificate fingerprint failed");
        return 0;
    }
    if (auth_check_certificate(tls_server_auth(s), p->device_id,
                               p->fingerprint, &p->dev, &why) != AUTH_OK) {
        v->reason = why.reason != NULL ? why.reason : "unknown_device";
        snprintf(v->detail, sizeof(v->detail), "device %.40s: %.150s",
                 p->device_id, why.detail);
        return 0;
    }
    v->have_peer = 1;
    return 1;
}

int tls_on_verify(int ok, X509_STORE_CTX *store)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(
        store, SSL_get_ex_data_X509_STORE_CTX_idx());
    tls_verdict_t *v = SSL_get_app_data(ssl);
    const tls_server_t *s = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    X509 *cert = X509_STORE_CTX_get_current_cert(store);
    int depth = X509_STORE_CTX_get_error_depth(store);
    char subject[160] = "?";

    if (v == NULL || s == NULL)
        return 0;
    if (cert != NULL)
        X509_NAME_oneline(X509_get_subject_name(cert), subject,
                          sizeof(subject));
    if (!ok) {
        int error = X509_STORE_CTX_get_error(store);

        if (v->reason == NULL) {
            v->reason = reason_of(error);
            snprintf(v->detail, sizeof(v->detail), "%s (depth %d, %s)",
                     X509_verify_cert_error_string(error), depth, subject);
        }
        return 0;
    }
    if (depth != 0 || cert == NULL)
        return 1;
    if (!check_leaf(cert, s, v)) {
        X509_STORE_CTX_set_error(store, X509_V_ERR_CERT_REJECTED);
        return 0;
    }
    return 1;
}

void tls_explain_failure(SSL *ssl, tls_verdict_t *v)
{
    unsigned long e = ERR_peek_error();
    char text[160];

    if (v->reason == NULL && ERR_GET_LIB(e) == ERR_LIB_SSL &&
        ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
        v->reason = "missing";
        snprintf(v->detail, sizeof(v->detail),
                 "the client sent no certificate and tls.client_auth is "
                 "required");
    } else if (v->detail[0] == '\0') {
        if (e != 0)
            ERR_error_string_n(e, text, sizeof(text));
        else
            snprintf(text, sizeof(text), "protocol error");
        snprintf(v->detail, sizeof(v->detail), "%s", text);
    }
    (void)ssl;
    ERR_clear_error();
}
