/* The MQTT 3.1.1 and 5.0 server: listener, sessions and feedback.
 *
 * Each worker loop has one mqtt_listener_t. It owns the loop's MQTT
 * sessions, whether they arrived over TCP (its own SO_REUSEPORT socket on
 * cfg->mqtt.listen) or over another transport such as WebSocket, which
 * feeds bytes through the session interface below. Sessions with the same
 * client identifier share state across all loops through one global
 * session table (see docs/mqtt.md).
 */
#ifndef INGESTD_MQTT_MQTT_H
#define INGESTD_MQTT_MQTT_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "auth/auth.h"
#include "core/config.h"
#include "net/tls.h"
#include "pipeline/pipeline.h"

typedef struct mqtt_listener mqtt_listener_t;
typedef struct mqtt_session mqtt_session_t;

/* Creates the MQTT context of `loop` and, when cfg->mqtt.listen is set,
 * starts listening there. `cfg`, `auth` and `pl` must outlive the
 * listener. Call on the loop's thread. Returns 0, ING_ENOMEM, or a
 * negative ing_error with a message such as "mqtt listen 127.0.0.1:1883:
 * address already in use" in `err`. */
int mqtt_listener_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                        pipeline_loop_t *pl, mqtt_listener_t **out,
                        char *err, size_t errlen);

/* Starts listening with TLS on cfg->mqtts.listen in the context `l`,
 * with the contexts of `tls` (shared by every loop, must outlive `l`).
 * The TLS handshake must finish within mqtt.connect_timeout, which then
 * starts again for CONNECT. Call on the loop's thread. Returns 0 or a
 * negative ing_error with a message in `err`. */
int mqtt_listener_start_tls(mqtt_listener_t *l, tls_server_t *tls,
                            char *err, size_t errlen);

/* Returns the listener started on `loop`, or NULL. Thread-safe; used by
 * transports such as WebSocket that live in another module. */
mqtt_listener_t *mqtt_listener_for_loop(uv_loop_t *loop);

/* Stops accepting connections and drains every session: acknowledgements
 * still owed are sent, then 5.0 clients get DISCONNECT 0x8B (Server
 * shutting down) and every connection is closed. Call on the loop's
 * thread. */
void mqtt_listener_drain(mqtt_listener_t *l);

/* Number of open sessions on this loop, any transport. */
size_t mqtt_listener_connections(mqtt_listener_t *l);

/* Closes every session at once and frees the listener once libuv closed
 * its handles and the last pipeline completion ran (run the loop
 * afterwards). */
void mqtt_listener_close(mqtt_listener_t *l);

/* ---- Sessions over any byte transport ---- */

/* Operations of the transport under a session. `ctx` is
 * mqtt_transport_t.ctx. None of them calls back into the session before
 * it returns. */
typedef struct mqtt_transport_ops {
    /* Queues `len` bytes for sending and takes ownership of the malloc'd
     * `data`, also on failure. Returns 0 or -1. */
    int (*write)(void *ctx, uint8_t *data, size_t len);
    /* Closes the transport once the queued bytes are written. The owner
     * then calls mqtt_session_transport_closed. */
    void (*close)(void *ctx);
    /* Stops and restarts reading, for flow control. */
    void (*pause)(void *ctx);
    void (*resume)(void *ctx);
} mqtt_transport_ops_t;

typedef struct mqtt_transport {
    const mqtt_transport_ops_t *ops;
    void *ctx;
    const char *kind; /* "tcp", "tls" or "ws", for logs */
    uint64_t conn_id; /* for logs */
    const char *peer; /* "ip:port", copied */
    /* The device of a verified TLS client certificate, or NULL. It lives
     * as long as the transport, and CONNECT authenticates with it. */
    const tls_peer_t *cert;
} mqtt_transport_t;

/* Starts a session on listener `l` over `t` (copied), waiting for
 * CONNECT within mqtt.connect_timeout. Call on the listener's loop
 * thread. Returns NULL on allocation failure or while the listener
 * drains; the caller then closes the transport itself. */
mqtt_session_t *mqtt_session_open(mqtt_listener_t *l,
                                  const mqtt_transport_t *t);

/* Hands bytes read from the transport to the session, which copies what
 * it needs. Packets may be split or joined anyhow. */
void mqtt_session_feed(mqtt_session_t *s, const uint8_t *data, size_t len);

/* Tells the session that the server is stopping (see
 * mqtt_listener_drain). */
void mqtt_session_drain(mqtt_session_t *s);

/* Tells the session that its transport is gone: the peer closed it, an
 * error ended it, or the close operation completed. The session never
 * uses the transport again and frees itself once its last pipeline
 * completion ran. */
void mqtt_session_transport_closed(mqtt_session_t *s);

/* ---- Feedback ---- */

/* Publishes a validation error for device `device_id` on
 * devices/{device_id}/errors to every connected session of that device
 * that subscribed to a matching filter, at QoS 0. `payload` is copied.
 * Thread-safe; delivery happens later on each session's loop. */
void mqtt_feedback_publish(const char *device_id, const char *payload,
                           size_t len);

#endif
