#include "core/log.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int log_threshold = LOG_LEVEL_INFO;

static const char *level_names[] = {"debug", "info", "warn", "error"};

int log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0)
            return i;
    }
    return -1;
}

const char *log_quote(char *buf, size_t size, const char *s)
{
    size_t n = 0;
    int needs_quotes = (s[0] == '\0');

    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f)
            needs_quotes = 1;
    }
    if (!needs_quotes) {
        snprintf(buf, size, "%s", s);
        return buf;
    }
    if (size < 3) {
        buf[0] = '\0';
        return buf;
    }
    buf[n++] = '"';
    for (const char *p = s; *p && n + 6 < size; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            buf[n++] = '\\';
            buf[n++] = (char)c;
        } else if (c < ' ' || c == 0x7f) {
            n += (size_t)snprintf(buf + n, size - n, "\\x%02x", c);
        } else {
            buf[n++] = (char)c;
        }
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return buf;
}

static void write_line(int level, const char *msg, const char *extra,
                       const char *fields_fmt, va_list ap)
{
    char line[4096];
    char quoted[512];
    struct timespec ts;
    struct tm tm;
    size_t n;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(line, sizeof(line), "ts=%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ level=%s msg=%s",
                          ts.tv_nsec / 1000000, level_names[level],
                          log_quote(quoted, sizeof(quoted), msg));
    if (fields_fmt && fields_fmt[0] && n < sizeof(line) - 1) {
        line[n++] = ' ';
        int w = vsnprintf(line + n, sizeof(line) - n, fields_fmt, ap);
        if (w > 0)
            n += (size_t)w;
    }
    if (extra && n < sizeof(line) - 1) {
        n += (size_t)snprintf(line + n, sizeof(line) - n, " %s", extra);
    }
    if (n > sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    /* One write per line keeps lines from several threads whole. */
    fwrite(line, 1, n, stderr);
}

void log_write(int level, const char *msg, const char *fields_fmt, ...)
{
    va_list ap;

    if (level < log_threshold)
        return;
    va_start(ap, fields_fmt);
    write_line(level, msg, NULL, fields_fmt, ap);
    va_end(ap);
}

/* A small fixed table is enough: keys are static call-site strings, and a
 * key that finds no free slot is logged without a limit. */
#define LIMIT_SLOTS 64

struct limit_slot {
    const char *key;
    time_t minute;
    int count;
    int suppressed;
};

static struct limit_slot limit_slots[LIMIT_SLOTS];
static pthread_mutex_t limit_lock = PTHREAD_MUTEX_INITIALIZER;

void log_write_limited(const char *key, int burst, int level, const char *msg,
                       const char *fields_fmt, ...)
{
    va_list ap;
    char extra[64] = "";
    time_t minute = time(NULL) / 60;
    int emit = 1;

    if (level < log_threshold)
        return;
    pthread_mutex_lock(&limit_lock);
    for (int i = 0; i < LIMIT_SLOTS; i++) {
        struct limit_slot *s = &limit_slots[i];
        if (s->key != NULL && s->key != key)
            continue;
        if (s->key == NULL) {
            s->key = key;
            s->minute = minute;
        }
        if (s->minute != minute) {
            if (s->suppressed > 0)
                snprintf(extra, sizeof(extra), "suppressed=%d", s->suppressed);
            s->minute = minute;
            s->count = 0;
            s->suppressed = 0;
        }
        if (++s->count > burst) {
            s->suppressed++;
            emit = 0;
        }
        break;
    }
    pthread_mutex_unlock(&limit_lock);
    if (!emit)
        return;
    va_start(ap, fields_fmt);
    write_line(level, msg, extra[0] ? extra : NULL, fields_fmt, ap);
    va_end(ap);
}
