/* Bridge mode: ingest from an existing MQTT broker as its client.
 *
 * Each configured bridge connects to its broker with MQTT 5 and resumes a
 * persistent session (clean start off, session expiry from the config).
 * It subscribes to its topic templates through a shared subscription
 * ($share/GROUP/filter) unless the group is empty, so that several ingestd
 * instances split one stream. The device id comes from the {device_id}
 * level of the topic and is looked up in the registry, because the broker,
 * not ingestd, authenticated the publisher.
 *
 * A QoS 1 message is acknowledged to the broker only after its readings are
 * durable in the spool. Messages that can never be stored (unknown or
 * disabled device, invalid JSON, failed validation) are counted, logged and
 * acknowledged, so that the broker does not redeliver them forever.
 * docs/bridge.md explains why the Paho MQTTAsync client library makes this
 * possible and libmosquitto 2.0.11 does not.
 */
#ifndef INGESTD_BRIDGE_BRIDGE_H
#define INGESTD_BRIDGE_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#include "auth/auth.h"
#include "core/config.h"
#include "pipeline/pipeline.h"

typedef struct bridges bridges_t;

/* Starts one thread with its own event loop for each bridge in `cfg`, and
 * each begins connecting. This does not wait for any connection, because
 * a broker that is down is retried with backoff. `cfg`, `auth` and
 * `pipeline` must outlive the bridges. Stores NULL in `*out` when no
 * bridge is configured. Returns 0, or ING_ENOMEM or ING_ECONFIG with a
 * message in `err`. */
int bridges_start(const config_t *cfg, auth_t *auth, pipeline_t *pipeline,
                  bridges_t **out, char *err, size_t errlen);

/* Stops every bridge: each disconnects once the messages it received so
 * far are durable and acknowledged (messages that arrive meanwhile are
 * stored and acknowledged too). A bridge still waiting after `timeout_ms`,
 * for example on a full spool, is abandoned: its unacknowledged messages
 * stay with the broker, and its memory is left allocated because the
 * client library may still hold it. Call before the pipeline is
 * destroyed. Accepts NULL. */
void bridges_stop(bridges_t *b, uint64_t timeout_ms);

/* Number of bridges whose broker connection is up and subscribed. */
size_t bridges_connected(bridges_t *b);

#endif
