/* Commands of the ingestd executable. Each returns the process exit code:
 * 0 on success, 1 on a runtime failure, 2 on a usage or configuration
 * error. */
#ifndef INGESTD_APP_APP_H
#define INGESTD_APP_APP_H

/* Runs the service until SIGTERM or SIGINT, then drains and exits. */
int app_serve(const char *config_path);

/* Loads and checks the configuration, including every schema, and prints
 * a summary or the first error. */
int app_check_config(const char *config_path);

/* Runs `ingestd device SUBCOMMAND ...`; argv[0] is the subcommand. */
int app_device(const char *config_path, int argc, char **argv);

#endif
