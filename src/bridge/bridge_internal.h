/* Types and helpers shared by the files of the bridge module. Not part of
 * the module interface.
 *
 * Threads of one bridge:
 * - The Paho receive thread, shared by every MQTTAsync client of the
 *   process, runs on_message and blocks in it until the bridge loop has
 *   decided the message's fate. Paho sends the PUBACK only after
 *   on_message returns 1, and it holds its global API mutex meanwhile.
 * - The bridge loop thread runs a libuv loop. It validates and stores
 *   messages through the pipeline and owns all state marked "loop only".
 * - The control thread makes the Paho API calls that the loop requests
 *   (connect, disconnect). The loop never calls Paho itself, because a
 *   call blocks on Paho's mutex while on_message, which holds that mutex,
 *   may be waiting for the loop.
 */
#ifndef INGESTD_BRIDGE_BRIDGE_INTERNAL_H
#define INGESTD_BRIDGE_BRIDGE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <MQTTAsync.h>
#include <uv.h>

#include "auth/auth.h"
#include "core/config.h"
#include "core/metrics.h"
#include "pipeline/pipeline.h"

/* The protocol name stored in each envelope. */
#define BRIDGE_PROTOCOL "mqtt-bridge"

/* The final outcome of one message: its metric label, and whether it was
 * stored. Every outcome is acknowledged to the broker. */
enum bridge_result {
    BRIDGE_STORED = 0,
    BRIDGE_INVALID_JSON,
    BRIDGE_INVALID,         /* failed validation or empty */
    BRIDGE_FORBIDDEN,       /* a reading names another device */
    BRIDGE_UNKNOWN_DEVICE,  /* no device has the topic's id */
    BRIDGE_DEVICE_DISABLED, /* the device is disabled in the registry */
    BRIDGE_TOO_LARGE,       /* over http.max_body_bytes or too many readings */
    BRIDGE_UNMATCHED_TOPIC, /* the topic matches none of the templates */
    BRIDGE_RESULT_COUNT,
};

/* The metric label of each enum bridge_result. */
extern const char *const bridge_result_names[BRIDGE_RESULT_COUNT];

typedef struct bridge bridge_t;

/* One received message, from on_message to the loop and back. It lives on
 * on_message's stack, which waits until `done` is set. */
typedef struct bridge_job {
    struct bridge_job *next;
    bridge_t *bridge;
    const char *topic;
    const char *payload;
    size_t len;
    int topic_has_nul; /* Paho reported embedded NUL bytes */

    /* Set by the loop, read by on_message once `done` is set. */
    int done; /* guarded by bridge->lock */
    int result;
    char device_id[AUTH_DEVICE_ID_MAX + 1]; /* "" unless the topic matched */
    char *feedback; /* malloc'd JSON for the feedback topic, or NULL */

    unsigned retries; /* failed attempts to store, loop only */
} bridge_job_t;

/* Connection state, loop only. */
enum bridge_state {
    BRIDGE_IDLE = 0,      /* disconnected, a reconnect timer may be armed */
    BRIDGE_CONNECTING,    /* connect requested, not yet subscribed */
    BRIDGE_CONNECTED,     /* connected and subscribed */
    BRIDGE_DISCONNECTING, /* our disconnect requested, not yet done */
    BRIDGE_CLOSED,        /* handles closed, the loop thread is ending */
};

/* Bits of bridge->events, posted by Paho callbacks to the loop. */
enum {
    EVENT_CONNECTED = 1 << 0,        /* subscribed after a connect */
    EVENT_CONNECT_FAILED = 1 << 1,   /* no connection came up */
    EVENT_SUBSCRIBE_FAILED = 1 << 2, /* connected, but not subscribed */
    EVENT_LOST = 1 << 3,             /* an established connection broke */
    EVENT_DISCONNECTED = 1 << 4,     /* our own disconnect finished */
    EVENT_STOP = 1 << 5,             /* bridges_stop requests a drain */
    EVENT_ABANDON = 1 << 6,          /* bridges_stop gave up waiting */
};

/* Requests to the control thread. */
enum bridge_control {
    CONTROL_NONE = 0,
    CONTROL_CONNECT,
    CONTROL_DISCONNECT,
    CONTROL_QUIT,
};

struct bridge {
    const config_bridge_t *cfg;
    const config_t *root;
    auth_t *auth;
    pipeline_t *pipeline;
    MQTTAsync client;
    char *uri;      /* tcp://host:port or ssl://host:port */
    char **filters; /* subscription filters, one per topic template */
    pthread_t loop_thread;
    pthread_t control_thread;
    int loop_started, control_started;

    /* Shared between threads, guarded by `lock`. */
    pthread_mutex_t lock;
    pthread_cond_t job_done;     /* on_message waits here */
    pthread_cond_t control_wake; /* the control thread waits here */
    pthread_cond_t finished;     /* bridges_stop waits here */
    bridge_job_t *inbox;         /* jobs not yet seen by the loop */
    unsigned events;             /* EVENT_* bits not yet handled */
    int failure_code;            /* Paho or MQTT reason of the last failure */
    char failure_text[160];
    int session_present;
    enum bridge_control control; /* pending request for the control thread */
    int wake_closed;             /* the loop closed `wake`: do not signal it */
    int loop_done;               /* the loop thread has returned */
    int abandoned; /* the loop gave up and never touches the pipeline */
    atomic_int is_connected;

    /* Loop only. */
    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t reconnect_timer;
    uv_timer_t retry_timer;
    pipeline_loop_t *pl;
    enum bridge_state state;
    int stop_requested;
    unsigned attempt;      /* failed connects since the last success */
    uint64_t random_state; /* xorshift64 state for backoff jitter */
    bridge_job_t *retries; /* jobs waiting for the spool */
    size_t submitted;      /* jobs whose batch is in the spool */

    /* Metrics, created at start. */
    metrics_counter_t *messages[BRIDGE_RESULT_COUNT];
    metrics_counter_t *bytes_in;
    metrics_counter_t *reconnects;
    metrics_counter_t *store_retries;
    metrics_gauge_t *connected;
};

/* ---- ingest.c: message handling on the loop thread ---- */

/* Decides the fate of `job`: stores it through the pipeline (finishing it
 * once durable), finishes it at once as rejected, or queues it on
 * b->retries when the spool cannot take it yet. */
void bridge_ingest(bridge_t *b, bridge_job_t *job);

/* Sets the job's result, counts it and wakes its on_message. */
void bridge_job_finish(bridge_t *b, bridge_job_t *job, int result);

/* Returns the next pseudo-random number of the bridge's xorshift64. */
uint64_t bridge_random(bridge_t *b);

/* ---- topic.c: topic templates ---- */

/* Returns a new string: `template` with its {device_id} level replaced by
 * `level`, or NULL on allocation failure. */
char *bridge_topic_expand(const char *template, const char *level);

/* Returns a new subscription filter for `template`: the {device_id} level
 * becomes '+', and "$share/GROUP/" is prepended unless `group` is NULL.
 * Returns NULL on allocation failure. */
char *bridge_topic_filter(const char *template, const char *group);

/* Matches `topic` against `template` level by level. On a match, copies
 * the {device_id} level into `id` and returns 1. Returns 0 when the topic
 * does not match, or when its id level is empty or does not fit `size`. */
int bridge_topic_match(const char *template, const char *topic, char *id,
                       size_t size);

/* ---- backoff.c ---- */

/* Returns the wait before retry number `attempt` (0 for the first): a
 * value drawn from `random` uniformly between `min_ms` and a cap that
 * starts at `min_ms` and doubles with each attempt up to `max_ms`. */
uint64_t bridge_backoff_ms(unsigned attempt, uint64_t min_ms, uint64_t max_ms,
                           uint64_t random);

#endif
