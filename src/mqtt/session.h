/* Internals shared by the MQTT listener, sessions and session table. Not
 * part of the module interface (see mqtt.h).
 */
#ifndef INGESTD_MQTT_SESSION_H
#define INGESTD_MQTT_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <pthread.h>
#include <uv.h>

#include "mqtt/codec.h"
#include "mqtt/mqtt.h"

/* Client identifiers longer than this get 0x85 (5.0) or 0x02 (3.1.1). The
 * spec makes servers accept 1 to 23 characters and allows more. */
#define MQTT_CLIENT_ID_MAX 256

/* 5.0 reason codes that the codec does not name. */
#define MQTT_RC_SERVER_SHUTTING_DOWN 0x8b
#define MQTT_RC_RETAIN_NOT_SUPPORTED 0x9a

/* Interval of the submit retry while the spool is full. */
#define MQTT_FULL_RETRY_MS 100

/* Maximum wait before a message held by a rate limit or quota is tried
 * again, so that a raised limit takes effect within this time. */
#define MQTT_LIMIT_RETRY_MAX_MS 60000

/* Packets handled per turn of the event loop. More input waits for the
 * next turn, so that one flooding connection cannot keep the loop from
 * the other connections (see docs/flow-control.md). */
#define MQTT_PACKETS_PER_TURN 64

typedef struct mqtt_state mqtt_state_t;

/* Work that another thread hands to a session through its listener. */
enum mqtt_mail_kind {
    MQTT_MAIL_TAKEOVER = 1, /* another connection took the client id */
    MQTT_MAIL_FEEDBACK = 2, /* publish `topic` and `payload` at QoS 0 */
};

typedef struct mqtt_mail {
    struct mqtt_mail *next;
    enum mqtt_mail_kind kind;
    mqtt_session_t *session; /* compared, never dereferenced, until found */
    uint64_t session_id;
    char *topic;
    uint8_t *payload;
    size_t len;
} mqtt_mail_t;

struct mqtt_listener {
    uv_loop_t *loop;
    const config_t *cfg;
    auth_t *auth;
    pipeline_loop_t *pl;
    /* The pipeline's limits, kept here because connections close after
     * `pl` is detached at shutdown, while the pipeline lives on. */
    limits_t *limits;
    char **topics; /* templates from mqtt.topics */
    size_t topic_count;

    uv_tcp_t tcp;
    int listening;
    uv_tcp_t tls_tcp; /* the mqtts.listen socket */
    int tls_listening;
    tls_server_t *tls;
    struct tcp_conn *handshakes; /* TLS connections without a session yet */
    size_t tcp_connections; /* for mqtt.max_connections, TLS included */

    uv_async_t mail_async;
    pthread_mutex_t mail_lock;
    mqtt_mail_t *mail_head, *mail_tail;
    int mail_closed; /* under mail_lock: posts are dropped */

    mqtt_session_t *sessions; /* every open session of this loop */
    size_t session_count;
    int draining;
    int closing;
    int refs; /* owner, handles and sessions */
};

/* A reply owed to the client, in order of arrival. A PUBLISH gets its
 * item at once and the item becomes ready when the pipeline completes. */
typedef struct mqtt_reply {
    struct mqtt_reply *next;
    int ready;
    uint8_t *bytes; /* the encoded packet, or NULL to send nothing */
    size_t len;
    /* Once sent: 1 closes the connection (3.1.1 failures), and a reason
     * code >= 0x80 in `disconnect` sends a 5.0 DISCONNECT first. */
    int close_after;
    uint8_t disconnect;
    /* PUBLISH only. */
    mqtt_session_t *session;
    pipeline_batch_t *batch;
    uint8_t qos;
    uint16_t packet_id;
    size_t readings;
    mqtt_state_t *state; /* QoS 2: where the packet id goes */
} mqtt_reply_t;

enum mqtt_session_phase {
    MQTT_PHASE_CONNECT = 0, /* waiting for CONNECT */
    MQTT_PHASE_ACTIVE = 1,
    MQTT_PHASE_CLOSING = 2, /* close requested, input ignored */
};

struct mqtt_session {
    mqtt_listener_t *listener;
    mqtt_session_t *prev, *next; /* in listener->sessions */
    uint64_t id;
    mqtt_transport_t transport;
    char peer[64];
    int transport_open;
    int refs; /* transport, timers and pending pipeline batches */

    enum mqtt_session_phase phase;
    int version;
    char client_id[MQTT_CLIENT_ID_MAX + 1];
    auth_device_t device;
    int64_t auth_expires_at; /* the CONNECT's JWT exp (Unix s), or 0 */
    mqtt_state_t *state;
    uint32_t session_expiry; /* seconds, as granted */

    uint8_t *in; /* bytes received and not yet handled */
    size_t in_len, in_off, in_cap;
    int processing;
    int paused; /* reading stopped through the transport */

    uv_timer_t timer;       /* connect timeout, then keep alive */
    uv_timer_t retry_timer; /* submit retry while the spool is full */
    uint64_t keepalive_ms;  /* 1.5 times the keep alive; 0 for none */
    uint64_t last_rx_ms;

    /* Limits the client announced in its 5.0 CONNECT. */
    uint32_t client_max_packet; /* 0 for none */

    /* Topic aliases, index 1 to topic_alias_maximum. */
    char **aliases;
    size_t alias_count;

    mqtt_reply_t *replies_head, *replies_tail;
    size_t inflight; /* QoS 1 and 2 messages not yet completed */
    mqtt_reply_t *held; /* a message the full spool has not accepted */
    int draining;
    int yielded;         /* input left for the next loop turn */
    int device_counted;  /* counted in limits.max_connections_per_device */
    uint8_t connect_reject; /* 5.0 reason code for the CONNECT, or 0 */
};

/* ---- listener.c ---- */

/* Queues mail for a session of listener `l` and wakes its loop. Takes
 * ownership of the mail, also when it is dropped because the listener
 * closes. Thread-safe. */
void mqtt_listener_post(mqtt_listener_t *l, mqtt_mail_t *mail);

void mqtt_listener_ref(mqtt_listener_t *l);
void mqtt_listener_unref(mqtt_listener_t *l);

/* ---- session.c ---- */

/* Queues `len` encoded bytes (malloc'd, ownership taken) to the client. */
void mqtt_session_send(mqtt_session_t *s, uint8_t *bytes, size_t len);

/* Sends a 5.0 DISCONNECT with `reason` (nothing in 3.1.1) and closes. */
void mqtt_session_fail(mqtt_session_t *s, uint8_t reason, const char *why);

/* Closes the transport after the queued bytes. */
void mqtt_session_close(mqtt_session_t *s);

/* Sends the acknowledgements at the head of the queue that are ready. */
void mqtt_session_flush_replies(mqtt_session_t *s);

/* Appends a reply to the queue. Returns NULL on allocation failure. */
mqtt_reply_t *mqtt_session_push_reply(mqtt_session_t *s);

/* Resumes or pauses reading and handles buffered input as the state
 * allows. */
void mqtt_session_update(mqtt_session_t *s);

/* Replaces the connect timeout with the keep-alive check, using
 * s->keepalive_ms (0 turns it off). */
void mqtt_session_arm_keepalive(mqtt_session_t *s);

/* Schedules mqtt_session_retry_held after MQTT_FULL_RETRY_MS. */
void mqtt_session_arm_retry(mqtt_session_t *s);

/* Schedules mqtt_session_retry_held after `ms` milliseconds. */
void mqtt_session_arm_retry_in(mqtt_session_t *s, uint64_t ms);

/* Handles mail taken from the listener's queue. */
void mqtt_session_mail(mqtt_session_t *s, mqtt_mail_t *mail);

void mqtt_session_unref(mqtt_session_t *s);

/* ---- session_connect.c ---- */

/* Handles the first packet, which must be CONNECT. Returns 0, or -1 when
 * the session is closing. */
int mqtt_session_on_connect(mqtt_session_t *s, const mqtt_frame_t *frame);

/* ---- session_publish.c ---- */

/* Handles a decoded PUBLISH. Returns 0, or -1 when the session is
 * closing. */
int mqtt_session_on_publish(mqtt_session_t *s, mqtt_publish_t *p);

/* Handles PUBREL. */
void mqtt_session_on_pubrel(mqtt_session_t *s, const mqtt_ack_t *a);

/* Retries the held message's submit. */
void mqtt_session_retry_held(mqtt_session_t *s);

/* Frees a reply and its batch. */
void mqtt_reply_free(mqtt_reply_t *r);

/* ---- session_subscribe.c ---- */

void mqtt_session_on_subscribe(mqtt_session_t *s,
                               const mqtt_subscribe_t *sub);
void mqtt_session_on_unsubscribe(mqtt_session_t *s,
                                 const mqtt_subscribe_t *unsub);

/* Returns 1 if `topic` matches MQTT filter `filter` (+ and # wildcards). */
int mqtt_topic_matches(const char *filter, const char *topic);

/* ---- session_table.c ---- */

/* Attaches session `s` to the state of `client_id`, creating it or, with
 * `clean`, replacing it. The previous owner, if any, gets takeover mail.
 * Sets *present when earlier state carried over. Returns 0, ING_ENOMEM,
 * or ING_EEXIST when another device uses this client id. */
int mqtt_table_attach(mqtt_session_t *s, bool clean, uint32_t expiry,
                      mqtt_state_t **out, bool *present);

/* Detaches `s` from its state. A state with session expiry 0 is removed
 * at once, others when their expiry passes. Thread-safe. */
void mqtt_table_detach(mqtt_session_t *s);

/* Takes and drops a reference on a state, so that a message that becomes
 * durable after its connection ended still records its QoS 2 packet id. */
mqtt_state_t *mqtt_state_ref(mqtt_state_t *st);
void mqtt_state_unref(mqtt_state_t *st);

/* Returns 1 when a connected session of device `device_id` uses client
 * id `client_id`, so that a new CONNECT with it takes that session over.
 * Thread-safe. */
int mqtt_table_owned(const char *client_id, const char *device_id);

/* Changes the expiry applied when the session disconnects. */
void mqtt_table_set_expiry(mqtt_state_t *st, uint32_t expiry);

/* The QoS 2 packet ids received and stored, awaiting PUBREL. */
int mqtt_state_qos2_has(mqtt_state_t *st, uint16_t id);
int mqtt_state_qos2_add(mqtt_state_t *st, uint16_t id);
int mqtt_state_qos2_remove(mqtt_state_t *st, uint16_t id);

/* Packet ids of QoS 1 messages stored in this session, at most `max`
 * (the oldest are forgotten first), so that a PUBLISH resent with DUP
 * after a lost PUBACK is acknowledged without being stored again. A
 * PUBLISH without DUP reuses its id for a new message and removes it. */
int mqtt_state_qos1_has(mqtt_state_t *st, uint16_t id);
int mqtt_state_qos1_add(mqtt_state_t *st, uint16_t id, size_t max);
void mqtt_state_qos1_remove(mqtt_state_t *st, uint16_t id);

/* Adds a feedback filter. Returns 0, ING_EFULL past `max`, or
 * ING_ENOMEM. A filter already present counts as added. */
int mqtt_state_subscribe(mqtt_state_t *st, const char *filter, size_t max);

/* Removes a feedback filter. Returns 1 if it existed, else 0. */
int mqtt_state_unsubscribe(mqtt_state_t *st, const char *filter);

/* ---- session_metrics.c ---- */

/* Counts a connection opening (+1) or closing (-1) on `transport`, the
 * mqtt_transport_t kind: "ws", or anything else for "tcp". */
void mqtt_metrics_connection(const char *transport, int delta);
void mqtt_metrics_packet(int out, uint8_t type);
void mqtt_metrics_message(uint8_t qos, const char *result);
void mqtt_metrics_auth_failure(const char *reason);
void mqtt_metrics_malformed(const char *reason);
/* Returns the metric label for a decode error: a short name such as
 * "reserved_flags", or "malformed_packet" / "protocol_error". */
const char *mqtt_metrics_error_label(int code);
void mqtt_metrics_bytes(uint64_t in, uint64_t out);
void mqtt_metrics_readings(const char *result, uint64_t n);

#endif
