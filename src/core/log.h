/* Logging as logfmt lines on stderr.
 *
 * Each line reads: ts=2026-12-04T17:00:00.123Z level=info msg="..." k=v ...
 * The level is checked before any formatting, so a disabled debug line costs
 * one comparison. Callers pass the key=value fields as a printf format and
 * wrap values that may contain spaces or quotes with log_quote().
 */
#ifndef INGESTD_CORE_LOG_H
#define INGESTD_CORE_LOG_H

#include <stdarg.h>
#include <stddef.h>

enum log_level {
    LOG_LEVEL_DEBUG = 0,
    LOG_LEVEL_INFO = 1,
    LOG_LEVEL_WARN = 2,
    LOG_LEVEL_ERROR = 3,
};

extern int log_threshold;

/* Parses "debug", "info", "warn" or "error". Returns the level or -1. */
int log_level_parse(const char *name);

/* Writes one line. Prefer the macros below, which check the level first. */
void log_write(int level, const char *msg, const char *fields_fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes one line unless the same key logged more than `burst` lines in the
 * current minute. When the minute ends, the next line for that key carries a
 * suppressed=N field. `key` must be a string literal or otherwise static. */
void log_write_limited(const char *key, int burst, int level, const char *msg,
                       const char *fields_fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Formats `s` as a logfmt value: quoted when it contains spaces, quotes, '='
 * or control characters, which are escaped. Returns `buf`. The output is cut
 * to fit `size`. */
const char *log_quote(char *buf, size_t size, const char *s);

#define log_debug(msg, ...)                                                    \
    do {                                                                       \
        if (log_threshold <= LOG_LEVEL_DEBUG)                                  \
            log_write(LOG_LEVEL_DEBUG, msg, __VA_ARGS__);                      \
    } while (0)
#define log_info(msg, ...)                                                     \
    do {                                                                       \
        if (log_threshold <= LOG_LEVEL_INFO)                                   \
            log_write(LOG_LEVEL_INFO, msg, __VA_ARGS__);                       \
    } while (0)
#define log_warn(msg, ...) log_write(LOG_LEVEL_WARN, msg, __VA_ARGS__)
#define log_error(msg, ...) log_write(LOG_LEVEL_ERROR, msg, __VA_ARGS__)

#endif
