/* Export and import of the device registry as JSON Lines.
 *
 * Each instance of ingestd keeps its own registry, and `device add` draws a
 * new random key each time. Exporting one registry and importing it into
 * the others gives every instance the same devices with the same key
 * hashes, certificate pins and JWT keys. The format is described in
 * docs/authentication.md.
 */
#ifndef INGESTD_AUTH_REGISTRY_IO_H
#define INGESTD_AUTH_REGISTRY_IO_H

#include <stddef.h>
#include <stdio.h>

#include "auth/auth.h"

/* Version of the export format, written as "schema_version" on every line.
 * It counts changes of the line format, not registry migrations: a new
 * registry column becomes a new member without a new version. */
#define REGISTRY_EXPORT_VERSION 1

/* Longest line registry_import accepts, in bytes without the newline. */
#define REGISTRY_IMPORT_LINE_MAX (64 * 1024)

/* Maximum number of devices in one import. */
#define REGISTRY_IMPORT_DEVICES_MAX 1000000

/* Maximum number of errors registry_import reports one by one. The rest
 * are only counted. */
#define REGISTRY_IMPORT_ERRORS_MAX 50

typedef struct registry_export_options {
    /* Writes each HS256 secret as "jwt_secret" (base64url) when nonzero.
     * Otherwise the member is left out. */
    int include_secrets;
    /* Called with the id of each device whose secret was left out. May be
     * NULL. */
    void (*on_secret_omitted)(const char *id, void *arg);
    void *arg;
} registry_export_options_t;

/* Writes every device of `r`, ordered by id, to `out`: one JSON object per
 * line with "schema_version" first, then one member per column of the
 * devices table whose value is not NULL. Blobs are written in lowercase
 * hex, except jwt_secret (see registry_export_options_t). The columns are
 * read from the table itself, so columns added by later migrations are
 * exported without changes here. Returns the number of devices written,
 * or ING_EDB, ING_ENOMEM, or ING_EIO when writing to `out` fails, with a
 * message in `err`. */
int registry_export(registry_t *r, FILE *out,
                    const registry_export_options_t *opts, char *err,
                    size_t errlen);

typedef struct registry_import_options {
    /* Deletes the devices of the registry that the input does not
     * contain. */
    int replace;
    /* Returns 1 when devices may have type `type`, or 0. NULL accepts
     * every valid type name. */
    int (*type_known)(const char *type, void *arg);
    /* Receives each error as "line N: FIELD: REASON". Required. */
    void (*on_error)(const char *message, void *arg);
    void *arg;
} registry_import_options_t;

typedef struct registry_import_counts {
    size_t added;
    size_t updated;
    size_t unchanged;
    size_t deleted;
    size_t errors; /* errors found, also those not reported one by one */
} registry_import_counts_t;

/* Reads JSON Lines as registry_export writes them from `in` and upserts
 * the devices into `r` in one transaction. Every line is checked before
 * the registry is changed, and on any error nothing is changed. Blank
 * lines are skipped. A member left out sets its column to NULL, except a
 * missing jwt_secret of an HS256 device, which keeps the secret the device
 * already has in `r`. A device whose columns all match is counted as
 * unchanged and not written, so importing the same input twice changes
 * nothing the second time, and the running service does not reload.
 * Fills `counts`. Returns 0, ING_EINVAL when the input has errors (each
 * passed to opts->on_error), ING_EIO when reading `in` fails, ING_ENOMEM
 * or ING_EDB (with a message passed to opts->on_error). */
int registry_import(registry_t *r, FILE *in,
                    const registry_import_options_t *opts,
                    registry_import_counts_t *counts);

#endif
