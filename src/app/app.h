/* Commands of the ingestd executable. Each returns the process exit code:
 * 0 on success, 1 on a runtime failure, 2 on a usage or configuration
 * error. */
#ifndef INGESTD_APP_APP_H
#define INGESTD_APP_APP_H

#include <stddef.h>

/* Runs the service until SIGTERM or SIGINT, then drains and exits. */
int app_serve(const char *config_path);

/* Loads and checks the configuration, including every schema, and prints
 * a summary or the first error. */
int app_check_config(const char *config_path);

/* Runs `ingestd device SUBCOMMAND ...`; argv[0] is the subcommand. */
int app_device(const char *config_path, int argc, char **argv);

/* Runs `ingestd healthcheck [--ready]`: GETs /healthz, or /readyz with
 * --ready, from the admin listener named in the configuration. Exits 0 on
 * a 200 answer, 1 on any other answer or no answer, 2 on a usage or
 * configuration error. */
int app_healthcheck(const char *config_path, int argc, char **argv);

/* Sends `GET path HTTP/1.1` to `listen` ("IPv4:port" or "[IPv6]:port";
 * the wildcard addresses are probed on loopback) and reads the status
 * line, within 5 seconds in total. Returns the HTTP status code, or
 * ING_EINVAL (bad address) or ING_EIO (no connection, timeout or no valid
 * status line) with the reason in `err`. */
int healthcheck_probe(const char *listen, const char *path, char *err,
                      size_t errlen);

#endif
