/* Service manager notifications (the sd_notify protocol of systemd).
 *
 * Each call sends one datagram to $NOTIFY_SOCKET through libsystemd and
 * does nothing when the variable is unset, so the service runs the same
 * outside systemd. Failures to send are logged once and otherwise
 * ignored: a notification is never a reason to stop serving. Internal to
 * the app module.
 */
#ifndef INGESTD_APP_NOTIFY_H
#define INGESTD_APP_NOTIFY_H

#include <stdint.h>

/* Sends READY=1 and STATUS=`status`, once every listener accepts. */
void notify_ready(const char *status);

/* Sends STOPPING=1 and STATUS=`status` when the drain starts. */
void notify_stopping(const char *status);

/* Sends STATUS=`status` alone. */
void notify_status(const char *status);

/* Sends WATCHDOG=1: the main loop is still turning. */
void notify_watchdog(void);

/* Returns the period in milliseconds at which WATCHDOG=1 should be sent:
 * half of $WATCHDOG_USEC, and at least 1, when the service manager
 * enabled the watchdog for this process ($WATCHDOG_PID, when set, must be
 * our PID). Returns 0 when no watchdog is expected. */
uint64_t notify_watchdog_period_ms(void);

#endif
