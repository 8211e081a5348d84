/* sd_notify wrappers; see notify.h. */
#include "app/notify.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "core/log.h"

/* Set after the first failed send, so that a broken socket logs once
 * instead of at every watchdog tick. */
static atomic_int send_failed;

static void send_state(const char *state)
{
    int rc = sd_notify(0, state);

    if (rc < 0 && !atomic_exchange(&send_failed, 1))
        log_warn("sending a notification to the service manager failed; "
                 "later failures are not logged",
                 "error=\"%s\"", strerror(-rc));
}

/* Sends `head` followed by a STATUS line. A newline inside `status` would
 * start a new assignment, so it is replaced with a space. */
static void send_with_status(const char *head, const char *status)
{
    char msg[512];
    int n = snprintf(msg, sizeof(msg), "%s%sSTATUS=%s", head,
                     head[0] ? "\n" : "", status);

    if (n < 0)
        return;
    for (char *p = strstr(msg, "STATUS="); *p != '\0'; p++) {
        if (*p == '\n')
            *p = ' ';
    }
    send_state(msg);
}

void notify_ready(const char *status)
{
    send_with_status("READY=1", status);
}

void notify_stopping(const char *status)
{
    send_with_status("STOPPING=1", status);
}

void notify_status(const char *status)
{
    send_with_status("", status);
}

void notify_watchdog(void)
{
    send_state("WATCHDOG=1");
}

uint64_t notify_watchdog_period_ms(void)
{
    uint64_t usec = 0;
    uint64_t ms;

    /* sd_watchdog_enabled checks WATCHDOG_PID against getpid() and
     * returns 0 when the watchdog is meant for another process. */
    if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
        return 0;
    ms = usec / 2000;
    return ms > 0 ? ms : 1;
}
