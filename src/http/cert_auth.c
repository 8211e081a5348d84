/* Requests on connections with a verified TLS client certificate.
 *
 * The certificate names a device. A request without a credential header
 * is authenticated as that device. A request with an API key or a JWT is
 * authenticated by the credential as usual, and its device must be the
 * certificate's, so one connection never speaks for two devices.
 */
#include <stdio.h>
#include <string.h>

#include "http/http_internal.h"

int http_cert_check(http_conn_t *c, http_request_t *r)
{
    const tls_peer_t *cert = net_conn_peer_cert(&c->net);
    auth_failure_t why = {0};
    enum auth_result res;
    char message[256];

    if (cert == NULL || r->key_len > 0 || r->key_overflow)
        return HTTP_CERT_NONE;
    /* The handshake checked the registry, but the device may have been
     * disabled or re-pinned since. */
    res = auth_check_certificate(c->listener->auth, cert->device_id,
                                 cert->fingerprint, &r->dev, &why);
    if (res == AUTH_OK) {
        r->have_dev = 1;
        return HTTP_CERT_ACCEPTED;
    }
    if (res == AUTH_DISABLED) {
        r->have_dev = 1;
        http_request_reject(c, 403, "device_disabled",
                            "this device is disabled; ask the operator to "
                            "enable it",
                            NULL, HTTP_REJECT_AFTER_BODY_CLOSE, NULL);
        return HTTP_CERT_REJECTED;
    }
    snprintf(message, sizeof(message),
             "the client certificate is no longer accepted: %s",
             why.detail[0] != '\0' ? why.detail : "unknown device");
    http_request_reject(c, 403, "certificate_rejected", message, NULL,
                        HTTP_REJECT_AFTER_BODY_CLOSE, NULL);
    return HTTP_CERT_REJECTED;
}

int http_cert_matches(http_conn_t *c, http_request_t *r)
{
    const tls_peer_t *cert = net_conn_peer_cert(&c->net);

    if (cert == NULL || strcmp(cert->device_id, r->dev.id) == 0)
        return 1;
    http_request_reject(c, 403, "credential_mismatch",
                        "credential does not match client certificate: the "
                        "API key or JWT belongs to another device than the "
                        "certificate's",
                        NULL, HTTP_REJECT_AFTER_BODY_CLOSE, NULL);
    return 0;
}
