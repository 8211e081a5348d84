/* `ingestd device export` and `ingestd device import`. */
#include "app/device_sync.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "auth/registry_io.h"
#include "core/errors.h"

/* Devices named one by one in the warning about left-out secrets. */
#define OMITTED_NAMES_MAX 10

struct omitted {
    size_t count;
    char names[OMITTED_NAMES_MAX * (AUTH_DEVICE_ID_MAX + 4)];
};

static void on_secret_omitted(const char *id, void *arg)
{
    struct omitted *o = arg;
    size_t len = strlen(o->names);

    if (o->count < OMITTED_NAMES_MAX)
        snprintf(o->names + len, sizeof(o->names) - len, "%s\"%s\"",
                 o->count > 0 ? ", " : "", id);
    o->count++;
}

int device_export(registry_t *reg, int include_secrets)
{
    struct omitted omitted = {0};
    registry_export_options_t opts = {
        .include_secrets = include_secrets,
        .on_secret_omitted = on_secret_omitted,
        .arg = &omitted,
    };
    char err[512];
    int n;

    n = registry_export(reg, stdout, &opts, err, sizeof(err));
    if (n < 0) {
        fprintf(stderr, "ingestd: device export failed: %s\n", err);
        return 1;
    }
    if (omitted.count > 0)
        fprintf(stderr,
                "ingestd: warning: left out the HS256 secret of %zu "
                "device(s): %s%s. An import keeps the secret such a device "
                "already has there and fails for a new one; export with "
                "--include-secrets to copy the secrets.\n",
                omitted.count, omitted.names,
                omitted.count > OMITTED_NAMES_MAX ? " and more" : "");
    if (include_secrets)
        fprintf(stderr, "ingestd: the export contains HS256 secrets: keep it "
                        "readable only by ingestd, like the registry.\n");
    fprintf(stderr, "ingestd: exported %d device(s)\n", n);
    return 0;
}

struct import_context {
    const config_t *cfg;
    const char *path;
};

static int type_known(const char *type, void *arg)
{
    const struct import_context *ctx = arg;

    return config_device_type(ctx->cfg, type) != NULL;
}

static void on_import_error(const char *message, void *arg)
{
    const struct import_context *ctx = arg;

    fprintf(stderr, "ingestd: %s: %s\n", ctx->path, message);
}

int device_import(const config_t *cfg, registry_t *reg, const char *path,
                  int replace)
{
    struct import_context ctx = {.cfg = cfg, .path = path};
    registry_import_options_t opts = {
        .replace = replace,
        .type_known = type_known,
        .on_error = on_import_error,
        .arg = &ctx,
    };
    registry_import_counts_t counts;
    int use_stdin = strcmp(path, "-") == 0;
    FILE *in = use_stdin ? stdin : fopen(path, "r");
    int rc;

    if (use_stdin)
        ctx.path = "stdin";
    if (in == NULL) {
        fprintf(stderr, "ingestd: cannot open %s: %s\n", path,
                strerror(errno));
        return 2;
    }
    rc = registry_import(reg, in, &opts, &counts);
    if (!use_stdin)
        fclose(in);
    if (rc == ING_EINVAL) {
        fprintf(stderr,
                "ingestd: nothing imported: %zu error(s) in %s; fix them "
                "and import again\n",
                counts.errors, ctx.path);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: nothing imported: %s\n", ing_strerror(rc));
        return 1;
    }
    printf("%zu added, %zu updated, %zu unchanged, %zu deleted\n",
           counts.added, counts.updated, counts.unchanged, counts.deleted);
    return 0;
}
