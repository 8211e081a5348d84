/* Declarations shared by the files of the net module only. */
#ifndef INGESTD_NET_TLS_INTERNAL_H
#define INGESTD_NET_TLS_INTERNAL_H

#include <openssl/ssl.h>

#include "net/tls.h"

/* The certificate verification callback of contexts with client
 * authentication (tls_verify.c). It records the first failure in the
 * connection's tls_verdict_t, and at the leaf certificate takes the
 * device id and checks it against the registry. */
int tls_on_verify(int ok, X509_STORE_CTX *store);

/* Settings of a server, for the verification callback (tls.c). */
const config_t *tls_server_config(const tls_server_t *s);
auth_t *tls_server_auth(const tls_server_t *s);

#endif
