#include "app/app.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "auth/auth.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fsutil.h"

static void format_ms(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (ms <= 0) {
        snprintf(buf, len, "-");
        return;
    }
    gmtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void print_entry(const registry_entry_t *e, void *arg)
{
    char created[32], rotated[32], old_until[32];
    int64_t now_ms = (int64_t)time(NULL) * 1000;
    size_t *count = arg;

    format_ms(e->created_ms, created, sizeof(created));
    format_ms(e->key_rotated_ms, rotated, sizeof(rotated));
    if (e->old_key_expires_ms > now_ms)
        format_ms(e->old_key_expires_ms, old_until, sizeof(old_until));
    else
        snprintf(old_until, sizeof(old_until), "-");
    printf("%-32s %-16s %-9s %-21s %-21s %s\n", e->id, e->type,
           e->enabled ? "enabled" : "disabled", created, rotated, old_until);
    (*count)++;
}

static int open_registry(const config_t *cfg, registry_t **reg)
{
    char err[512];
    char *dir = strdup(cfg->registry.path);
    char *slash;

    if (dir == NULL)
        return 1;
    slash = strrchr(dir, '/');
    if (slash != NULL && slash != dir) {
        *slash = '\0';
        if (fs_mkdir_p(dir) != 0) {
            fprintf(stderr, "ingestd: cannot create folder %s: %s\n", dir,
                    strerror(errno));
            free(dir);
            return 1;
        }
    }
    free(dir);
    if (registry_open(cfg->registry.path, reg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 1;
    }
    return 0;
}

static int device_add(const config_t *cfg, registry_t *reg, const char *id,
                      const char *type)
{
    char key[AUTH_KEY_LEN + 1];
    int rc;

    if (type == NULL)
        type = cfg->default_device_type;
    if (config_device_type(cfg, type) == NULL) {
        fprintf(stderr,
                "ingestd: device type \"%s\" is not configured in %s; add it "
                "under device_types or pick a configured one\n",
                type, cfg->path);
        return 2;
    }
    rc = registry_device_add(reg, id, type, key);
    if (rc == ING_EEXIST) {
        fprintf(stderr,
                "ingestd: device \"%s\" already exists; use `device "
                "rotate-key %s` for a new key\n",
                id, id);
        return 1;
    }
    if (rc == ING_EINVAL) {
        fprintf(stderr,
                "ingestd: invalid device id \"%s\": use 1 to 128 characters "
                "from A-Z a-z 0-9 . _ : -\n",
                id);
        return 2;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: adding device \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("Added device \"%s\" of type \"%s\". Its API key is shown only "
           "once:\n%s\n",
           id, type, key);
    return 0;
}

static int device_rotate(const config_t *cfg, registry_t *reg, const char *id,
                         const char *grace)
{
    char key[AUTH_KEY_LEN + 1];
    uint64_t grace_ms = cfg->registry.key_grace_ms;
    int rc;

    if (grace != NULL && config_parse_duration_ms(grace, &grace_ms) != 0) {
        fprintf(stderr,
                "ingestd: invalid --grace \"%s\": expected a duration such as "
                "0s, 10m or 24h\n",
                grace);
        return 2;
    }
    rc = registry_device_rotate_key(reg, id, grace_ms, key);
    if (rc == ING_ENOTFOUND) {
        fprintf(stderr, "ingestd: device \"%s\" not found\n", id);
        return 1;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: rotating the key of \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("New API key for device \"%s\", shown only once (the previous key "
           "stays valid for %llu s):\n%s\n",
           id, (unsigned long long)(grace_ms / 1000), key);
    return 0;
}

static int device_set_enabled(registry_t *reg, const char *id, int enabled)
{
    int rc = registry_device_set_enabled(reg, id, enabled);

    if (rc == ING_ENOTFOUND) {
        fprintf(stderr, "ingestd: device \"%s\" not found\n", id);
        return 1;
    }
    if (rc != 0) {
        fprintf(stderr, "ingestd: updating device \"%s\" failed: %s\n", id,
                ing_strerror(rc));
        return 1;
    }
    printf("Device \"%s\" %s.\n", id, enabled ? "enabled" : "disabled");
    return 0;
}

static void device_usage(FILE *f)
{
    fprintf(f,
            "usage: ingestd device add ID [--type TYPE] -c FILE\n"
            "       ingestd device list -c FILE\n"
            "       ingestd device disable ID -c FILE\n"
            "       ingestd device enable ID -c FILE\n"
            "       ingestd device rotate-key ID [--grace DURATION] -c FILE\n");
}

int app_device(const char *config_path, int argc, char **argv)
{
    static const struct option opts[] = {
        {"type", required_argument, NULL, 't'},
        {"grace", required_argument, NULL, 'g'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *type = NULL, *grace = NULL, *sub, *id = NULL;
    char err[1024];
    config_t *cfg = NULL;
    registry_t *reg = NULL;
    int c, rc = 2;

    if (argc < 1) {
        device_usage(stderr);
        return 2;
    }
    sub = argv[0];
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:g:h", opts, NULL)) != -1) {
        switch (c) {
        case 't':
            type = optarg;
            break;
        case 'g':
            grace = optarg;
            break;
        case 'h':
            device_usage(stdout);
            return 0;
        default:
            device_usage(stderr);
            return 2;
        }
    }
    if (optind < argc)
        id = argv[optind++];
    if (optind < argc) {
        fprintf(stderr, "ingestd: unexpected argument \"%s\"\n", argv[optind]);
        return 2;
    }
    if (strcmp(sub, "list") != 0 && id == NULL) {
        fprintf(stderr, "ingestd: device %s needs a device id\n", sub);
        device_usage(stderr);
        return 2;
    }
    if (config_load(config_path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 2;
    }
    if (open_registry(cfg, &reg) != 0) {
        rc = 1;
        goto done;
    }
    if (strcmp(sub, "add") == 0) {
        rc = device_add(cfg, reg, id, type);
    } else if (strcmp(sub, "list") == 0) {
        size_t count = 0;
        printf("%-32s %-16s %-9s %-21s %-21s %s\n", "ID", "TYPE", "STATUS",
               "CREATED", "KEY_ROTATED", "OLD_KEY_VALID_UNTIL");
        rc = registry_device_list(reg, print_entry, &count) == 0 ? 0 : 1;
    } else if (strcmp(sub, "disable") == 0) {
        rc = device_set_enabled(reg, id, 0);
    } else if (strcmp(sub, "enable") == 0) {
        rc = device_set_enabled(reg, id, 1);
    } else if (strcmp(sub, "rotate-key") == 0) {
        rc = device_rotate(cfg, reg, id, grace);
    } else {
        fprintf(stderr, "ingestd: unknown device command \"%s\"\n", sub);
        device_usage(stderr);
        rc = 2;
    }

done:
    if (reg != NULL)
        registry_close(reg);
    config_free(cfg);
    return rc;
}
