/* Flow control shared by every protocol adapter of one ingestd instance:
 * token buckets per device and per source address, daily quotas per device,
 * and connection counts in total, per listener and per device.
 *
 * State lives in two hash tables (devices, addresses), each split into
 * shards with one mutex each, so worker threads rarely wait for one
 * another. Each table holds at most `table_size` entries. An entry whose
 * state equals a new entry's (buckets full again, no quota used today, no
 * open connection) is dropped by a sweep, which changes nothing a client
 * can see. When a shard is full of entries that still matter, the least
 * recently used entry without open connections is evicted, and its device
 * or address starts over with full buckets and a fresh daily count.
 *
 * Times are Unix milliseconds (limits_now_ms). The daily quota resets at
 * midnight UTC. Everything is kept in memory only, so a restart resets the
 * buckets and the daily counts.
 */
#ifndef INGESTD_PIPELINE_LIMITS_H
#define INGESTD_PIPELINE_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#include "core/config.h"

typedef struct limits limits_t;

/* Listeners whose connections are counted against their own maximum
 * across every worker thread. */
enum limits_listener {
    LIMITS_LISTENER_HTTP = 0,  /* http.listen */
    LIMITS_LISTENER_HTTPS = 1, /* https.listen */
    LIMITS_LISTENER_MQTT = 2,  /* mqtt.listen */
    LIMITS_LISTENER_MQTTS = 3, /* mqtts.listen */
    LIMITS_LISTENER_COUNT = 4,
};

typedef struct limits_options {
    uint64_t table_size;      /* entries per table; at least 64 */
    uint64_t max_connections; /* all listeners together; 0 = unlimited */
    /* Maximum of each listener, across workers; 0 = unlimited. */
    uint64_t listener_max[LIMITS_LISTENER_COUNT];
    uint64_t connection_rate; /* new connections per second per address */
    uint64_t connection_burst; /* 0 = connection_rate */
} limits_options_t;

/* Creates the tables. Returns 0 or ING_ENOMEM. */
int limits_create(const limits_options_t *opts, limits_t **out);
void limits_destroy(limits_t *l);

/* Returns the current time in Unix milliseconds. */
uint64_t limits_now_ms(void);

/* Takes `readings` readings and `bytes` bytes from the buckets of device
 * `device_id` under limits `lim` at time `now_ms`. Either both buckets and
 * the daily count are charged, or nothing is. A request larger than a
 * bucket's capacity passes when the bucket is full and leaves it in debt,
 * so that no request is too large to ever pass.
 * Returns 0; ING_EQUOTA when the daily quota would be exceeded, with the
 * time until midnight UTC in `*retry_after_ms`; or ING_ERATE, with the
 * time until the buckets hold enough in `*retry_after_ms`. */
int limits_take_readings(limits_t *l, const char *device_id,
                         const config_limits_t *lim, uint64_t readings,
                         uint64_t bytes, uint64_t now_ms,
                         uint64_t *retry_after_ms);

/* Counts a new connection from `address` (an IP address without port) on
 * `listener` at `now_ms`. Returns 0 when it is counted, and then
 * limits_connection_close must follow; ING_ERATE when the address opened
 * connections faster than the configured rate, with the wait in
 * `*retry_after_ms`; or ING_EFULL when the total or the listener's maximum
 * is reached. Nothing is counted unless 0 is returned. */
int limits_connection_open(limits_t *l, enum limits_listener listener,
                           const char *address, uint64_t now_ms,
                           uint64_t *retry_after_ms);

/* Releases a connection counted by limits_connection_open. */
void limits_connection_close(limits_t *l, enum limits_listener listener);

/* Returns the connections open on `listener`, or on all listeners for
 * LIMITS_LISTENER_COUNT. */
uint64_t limits_connection_count(limits_t *l, enum limits_listener listener);

/* Counts a session of device `device_id` (MQTT or WebSocket). Returns 0,
 * and then limits_device_disconnect must follow, or ING_EQUOTA when the
 * device already has `max` sessions (0 = unlimited). */
int limits_device_connect(limits_t *l, const char *device_id, uint64_t max,
                          uint64_t now_ms);
void limits_device_disconnect(limits_t *l, const char *device_id);

/* Returns the entries held in the device table and the address table, for
 * tests and metrics. */
size_t limits_device_entries(limits_t *l);
size_t limits_address_entries(limits_t *l);

/* Drops every entry that no longer matters at `now_ms` (see above). The
 * tables also sweep themselves once a minute per shard. */
void limits_sweep(limits_t *l, uint64_t now_ms);

/* Copies the IP address of a "host:port" or "[v6]:port" peer string into
 * `out`, which falls back to the whole string when it has no port. */
void limits_peer_address(const char *peer, char *out, size_t size);

#endif
