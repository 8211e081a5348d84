/* Unit tests for the device identity rules of TLS client certificates. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include <openssl/x509v3.h>

#include "core/errors.h"
#include "net/tls.h"

static void identity_from_uri_cases(void **state)
{
    static const struct {
        const char *uri;
        const char *id; /* NULL: rejected */
    } cases[] = {
        {"urn:device:dev-1", "dev-1"},
        {"URN:DEVICE:dev-1", "dev-1"},
        {"urn:device:site:a:7", "site:a:7"},
        {"spiffe://example.org/device/dev-2", "dev-2"},
        {"https://example.org/devices/dev-3?x=1#f", "dev-3"},
        {"urn:device:", NULL},
        {"urn:device:bad id", NULL},
        {"spiffe://example.org", NULL},
        {"spiffe://example.org/device/", NULL},
        {"mailto:dev-1", NULL},
        {"dev-1", NULL},
    };
    char out[AUTH_DEVICE_ID_MAX + 1];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = tls_identity_from_uri(cases[i].uri, out, sizeof(out));

        if (cases[i].id == NULL) {
            assert_int_equal(rc, ING_EINVAL);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_string_equal(out, cases[i].id);
    }
}

/* Builds an unsigned certificate with `cn` (may be NULL) and a
 * subjectAltName value such as "URI:urn:device:x" (may be NULL). */
static X509 *make_cert(const char *cn, const char *san)
{
    X509 *cert = X509_new();
    X509_NAME *name = X509_get_subject_name(cert);

    if (cn != NULL)
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                   (const unsigned char *)cn, -1, -1, 0);
    if (san != NULL) {
        X509_EXTENSION *ext =
            X509V3_EXT_conf_nid(NULL, NULL, NID_subject_alt_name, san);
        X509_add_ext(cert, ext, -1);
        X509_EXTENSION_free(ext);
    }
    return cert;
}

static void identity_from_cert_modes(void **state)
{
    X509 *cert = make_cert("dev-cn", "DNS:not valid, DNS:dev-dns, "
                                     "URI:mailto:x, URI:urn:device:dev-uri");
    char out[AUTH_DEVICE_ID_MAX + 1];

    (void)state;
    assert_int_equal(tls_identity_from_cert(cert, CONFIG_TLS_IDENTITY_CN,
                                            out, sizeof(out)),
                     0);
    assert_string_equal(out, "dev-cn");
    assert_int_equal(tls_identity_from_cert(cert, CONFIG_TLS_IDENTITY_SAN_DNS,
                                            out, sizeof(out)),
                     0);
    assert_string_equal(out, "dev-dns");
    assert_int_equal(tls_identity_from_cert(cert, CONFIG_TLS_IDENTITY_SAN_URI,
                                            out, sizeof(out)),
                     0);
    assert_string_equal(out, "dev-uri");
    X509_free(cert);
}

static void identity_missing_is_rejected(void **state)
{
    X509 *cert = make_cert(NULL, NULL);
    X509 *bad_cn = make_cert("not a device id", "DNS:has space.example");
    char out[AUTH_DEVICE_ID_MAX + 1];

    (void)state;
    assert_int_equal(tls_identity_from_cert(cert, CONFIG_TLS_IDENTITY_CN,
                                            out, sizeof(out)),
                     ING_EINVAL);
    assert_int_equal(tls_identity_from_cert(cert, CONFIG_TLS_IDENTITY_SAN_URI,
                                            out, sizeof(out)),
                     ING_EINVAL);
    assert_int_equal(tls_identity_from_cert(bad_cn, CONFIG_TLS_IDENTITY_CN,
                                            out, sizeof(out)),
                     ING_EINVAL);
    assert_int_equal(tls_identity_from_cert(bad_cn,
                                            CONFIG_TLS_IDENTITY_SAN_DNS, out,
                                            sizeof(out)),
                     ING_EINVAL);
    X509_free(cert);
    X509_free(bad_cn);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(identity_from_uri_cases),
        cmocka_unit_test(identity_from_cert_modes),
        cmocka_unit_test(identity_missing_is_rejected),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
