/* `ingestd device export` and `ingestd device import`, which copy one
 * registry's devices to other instances. Used by device_cmd.c only.
 */
#ifndef INGESTD_APP_DEVICE_SYNC_H
#define INGESTD_APP_DEVICE_SYNC_H

#include "auth/auth.h"
#include "core/config.h"

/* Writes every device of `reg` to stdout as JSON Lines, with the HS256
 * secrets when `include_secrets` is nonzero, and warns on stderr about
 * each secret left out. Returns the exit status: 0, or 1 on failure. */
int device_export(registry_t *reg, int include_secrets);

/* Imports the devices in `path` ("-" for stdin) into `reg`, deleting the
 * others when `replace` is nonzero, and prints the counts. Types are
 * checked against `cfg`. Returns the exit status: 0, 1 when the registry
 * or the input cannot be read or written, or 2 when the input is invalid
 * (nothing is imported then). */
int device_import(const config_t *cfg, registry_t *reg, const char *path,
                  int replace);

#endif
