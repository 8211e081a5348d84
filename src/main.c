/* ingestd: device telemetry ingestion service. Command line entry point. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "app/app.h"

#define DEFAULT_CONFIG "/etc/ingestd/ingestd.yaml"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: ingestd [--help] [--version] COMMAND [ARGS] -c FILE\n"
            "\n"
            "Commands:\n"
            "  serve -c FILE                  run the service\n"
            "  check-config -c FILE           check a configuration and its "
            "schemas\n"
            "  healthcheck [--ready] -c FILE  GET /healthz (or /readyz) from "
            "admin.listen;\n"
            "                                 exit 0 on 200, 1 otherwise\n"
            "  device add ID [--type TYPE]    register a device and print its "
            "API key once\n"
            "  device list                    list registered devices\n"
            "  device disable ID              reject the device's readings\n"
            "  device enable ID               accept them again\n"
            "  device rotate-key ID [--grace DURATION]\n"
            "                                 issue a new key; the old one "
            "works for DURATION\n"
            "                                 (default: "
            "registry.key_grace_period)\n"
            "  device show ID                 print a device and its "
            "authentication methods\n"
            "  device set-cert ID --fingerprint HEX | --cert FILE.pem\n"
            "                                 pin the device's TLS client "
            "certificate\n"
            "  device clear-cert ID           remove the certificate pin\n"
            "  device set-jwt-key ID --alg RS256|ES256|EdDSA --public-key "
            "FILE.pem\n"
            "                                 accept JWTs signed by that "
            "key\n"
            "  device new-jwt-secret ID       create an HS256 secret and print "
            "it once\n"
            "  device clear-jwt ID            stop accepting JWTs\n"
            "  device set-limits ID [--readings-per-second N] [--burst N]\n"
            "      [--bytes-per-second SIZE] [--daily-readings N] [--clear]\n"
            "                                 override the device type's "
            "limits\n"
            "                                 (0 = unlimited)\n"
            "  device export [--include-secrets]\n"
            "                                 write every device as JSON "
            "Lines to stdout\n"
            "                                 (key hashes, never keys; HS256 "
            "secrets only\n"
            "                                 with --include-secrets)\n"
            "  device import [--replace] FILE|-\n"
            "                                 add or update the devices of an "
            "export in one\n"
            "                                 transaction; --replace also "
            "deletes the others\n"
            "\n"
            "Options:\n"
            "  -c, --config FILE  configuration file (default %s)\n"
            "  -h, --help         show this help\n"
            "  -V, --version      show the version\n",
            DEFAULT_CONFIG);
}

/* Finds -c/--config anywhere on the command line and removes it, so that
 * `ingestd -c F device add X` and `ingestd device add X -c F` both work. */
static const char *take_config(int *argc, char **argv)
{
    const char *path = NULL;
    int out = 1;

    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) &&
            i + 1 < *argc) {
            path = argv[++i];
            continue;
        }
        if (strncmp(a, "--config=", 9) == 0) {
            path = a + 9;
            continue;
        }
        argv[out++] = argv[i];
    }
    *argc = out;
    argv[out] = NULL;
    return path;
}

int main(int argc, char **argv)
{
    const char *config = take_config(&argc, argv);
    const char *cmd;

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 ||
        strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "-V") == 0 || strcmp(cmd, "--version") == 0) {
        printf("ingestd %s\n", INGESTD_VERSION);
        return 0;
    }
    if (config == NULL)
        config = DEFAULT_CONFIG;
    if (strcmp(cmd, "serve") == 0) {
        if (argc > 2) {
            fprintf(stderr, "ingestd: unexpected argument \"%s\"\n", argv[2]);
            return 2;
        }
        return app_serve(config);
    }
    if (strcmp(cmd, "check-config") == 0)
        return app_check_config(config);
    if (strcmp(cmd, "healthcheck") == 0)
        return app_healthcheck(config, argc - 2, argv + 2);
    if (strcmp(cmd, "device") == 0)
        return app_device(config, argc - 2, argv + 2);
    fprintf(stderr, "ingestd: unknown command \"%s\"\n\n", cmd);
    usage(stderr);
    return 2;
}
