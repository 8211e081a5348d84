/* Bridge lifecycle: the Paho MQTTAsync client, the control thread that
 * calls it, and the event loop that connects, reconnects and drains.
 */
#include "bridge/bridge.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge_internal.h"
#include "core/errors.h"
#include "core/log.h"

/* Seconds Paho waits for CONNACK before it reports a failed connect. */
#define CONNECT_TIMEOUT_S 10

/* Milliseconds Paho's disconnect waits for outgoing work to finish. */
#define DISCONNECT_TIMEOUT_MS 1000

/* How long a failed start waits for the bridges it started to stop. */
#define START_FAILURE_STOP_MS 2000

/* How long bridges_stop waits for an abandoned loop to confirm that it
 * no longer touches the pipeline. The loop makes no blocking calls, so
 * the confirmation normally arrives within milliseconds. */
#define ABANDON_WAIT_MS 2000

struct bridges {
    bridge_t *items;
    size_t count;
};

static pthread_once_t paho_once = PTHREAD_ONCE_INIT;

/* OpenSSL 3 initializes itself, so Paho must not do it again. */
static void init_paho(void)
{
    MQTTAsync_init_options opts = MQTTAsync_init_options_initializer;

    opts.do_openssl_init = 0;
    MQTTAsync_global_init(&opts);
}

/* Posts events to the loop. Safe from any thread, also after the loop
 * closed its wake handle, when the events are dropped. */
static void post_events(bridge_t *b, unsigned events)
{
    pthread_mutex_lock(&b->lock);
    b->events |= events;
    if (!b->wake_closed)
        uv_async_send(&b->wake);
    pthread_mutex_unlock(&b->lock);
}

static void post_failure(bridge_t *b, unsigned event, int code,
                         const char *text)
{
    pthread_mutex_lock(&b->lock);
    b->failure_code = code;
    snprintf(b->failure_text, sizeof(b->failure_text), "%s", text ? text : "");
    pthread_mutex_unlock(&b->lock);
    post_events(b, event);
}

static void request_control(bridge_t *b, enum bridge_control request)
{
    pthread_mutex_lock(&b->lock);
    if (b->control != CONTROL_QUIT)
        b->control = request;
    pthread_cond_signal(&b->control_wake);
    pthread_mutex_unlock(&b->lock);
}

/* ---- Paho callbacks, on the Paho receive thread ---- */

static void on_subscribed(void *context, MQTTAsync_successData5 *response)
{
    bridge_t *b = context;
    int count = response->alt.sub.reasonCodeCount;

    /* A SUBACK with one code carries it in reasonCode, with several in
     * the reasonCodes array. A code of 0x80 or more refuses a filter. */
    for (int i = 0; i < (count > 1 ? count : 1); i++) {
        int code = count > 1 ? (int)response->alt.sub.reasonCodes[i]
                             : (int)response->reasonCode;

        if (code >= MQTTREASONCODE_UNSPECIFIED_ERROR) {
            post_failure(b, EVENT_SUBSCRIBE_FAILED, code,
                         "the broker refused a subscription");
            return;
        }
    }
    post_events(b, EVENT_CONNECTED);
}

static void on_subscribe_failed(void *context, MQTTAsync_failureData5 *f)
{
    post_failure(context, EVENT_SUBSCRIBE_FAILED, f->reasonCode,
                 f->message ? f->message : "subscribe failed");
}

static void on_connected(void *context, MQTTAsync_successData5 *response)
{
    bridge_t *b = context;
    MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
    MQTTSubscribe_options sub_opts[b->cfg->topic_count];
    int qos[b->cfg->topic_count];
    int rc;

    pthread_mutex_lock(&b->lock);
    b->session_present = response->alt.connect.sessionPresent;
    pthread_mutex_unlock(&b->lock);
    for (size_t i = 0; i < b->cfg->topic_count; i++) {
        MQTTSubscribe_options init = MQTTSubscribe_options_initializer;

        sub_opts[i] = init;
        /* Retained messages only when the subscription is new, so that a
         * reconnect does not ingest them again. */
        sub_opts[i].retainHandling = 1;
        qos[i] = b->cfg->qos;
    }
    opts.onSuccess5 = on_subscribed;
    opts.onFailure5 = on_subscribe_failed;
    opts.context = b;
    opts.subscribeOptionsCount = (int)b->cfg->topic_count;
    opts.subscribeOptionsList = sub_opts;
    /* Paho's API may be called from its own callbacks. */
    rc = MQTTAsync_subscribeMany(b->client, (int)b->cfg->topic_count,
                                 b->filters, qos, &opts);
    if (rc != MQTTASYNC_SUCCESS)
        post_failure(b, EVENT_SUBSCRIBE_FAILED, rc, MQTTAsync_strerror(rc));
}

static void on_connect_failed(void *context, MQTTAsync_failureData5 *f)
{
    const char *text = f->message;

    if (text == NULL && f->reasonCode != 0)
        text = MQTTReasonCode_toString(f->reasonCode);
    post_failure(context, EVENT_CONNECT_FAILED,
                 f->reasonCode ? (int)f->reasonCode : f->code,
                 text ? text : MQTTAsync_strerror(f->code));
}

static void on_connection_lost(void *context, char *cause)
{
    post_failure(context, EVENT_LOST, 0, cause ? cause : "connection lost");
}

static void on_disconnect_done(void *context, MQTTAsync_successData5 *r)
{
    post_events(context, EVENT_DISCONNECTED);
}

static void on_disconnect_failed(void *context, MQTTAsync_failureData5 *f)
{
    post_events(context, EVENT_DISCONNECTED);
}

/* Publishes the rejection of a message to the device's feedback topic at
 * QoS 0. Called from on_message, which holds Paho's mutex. */
static void publish_feedback(bridge_t *b, const bridge_job_t *job)
{
    MQTTAsync_message msg = MQTTAsync_message_initializer;
    char *topic;

    if (job->feedback == NULL || job->device_id[0] == '\0')
        return;
    topic = bridge_topic_expand(b->cfg->feedback_topic, job->device_id);
    if (topic == NULL)
        return;
    msg.payload = job->feedback;
    msg.payloadlen = (int)strlen(job->feedback);
    msg.qos = 0;
    if (MQTTAsync_sendMessage(b->client, topic, &msg, NULL) !=
        MQTTASYNC_SUCCESS)
        log_write_limited("bridge-feedback", 3, LOG_LEVEL_WARN,
                          "bridge feedback not published", "bridge=%s",
                          b->cfg->name);
    free(topic);
}

/* Hands the message to the loop and waits for its fate. Returning 1 makes
 * Paho send the PUBACK, so this returns only once the message is durable
 * or rejected for good. A message the loop cannot finish (abandoned at
 * shutdown) keeps this thread waiting until the process exits, which
 * leaves the message unacknowledged for the broker to redeliver. */
static int on_message(void *context, char *topic, int topic_len,
                      MQTTAsync_message *message)
{
    bridge_t *b = context;
    bridge_job_t job = {
        .bridge = b,
        .topic = topic,
        .payload = message->payload,
        .len = message->payloadlen > 0 ? (size_t)message->payloadlen : 0,
        .topic_has_nul = topic_len > 0 && (size_t)topic_len != strlen(topic),
    };

    metrics_counter_add(b->bytes_in, job.len);
    pthread_mutex_lock(&b->lock);
    if (!b->wake_closed && !b->abandoned) {
        job.next = b->inbox;
        b->inbox = &job;
        uv_async_send(&b->wake);
    }
    while (!job.done)
        pthread_cond_wait(&b->job_done, &b->lock);
    pthread_mutex_unlock(&b->lock);

    publish_feedback(b, &job);
    free(job.feedback);
    MQTTAsync_freeMessage(&message);
    MQTTAsync_free(topic);
    return 1;
}

/* ---- Control thread ---- */

static void connect_client(bridge_t *b)
{
    const config_bridge_t *cfg = b->cfg;
    MQTTAsync_connectOptions opts = MQTTAsync_connectOptions_initializer5;
    MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
    MQTTProperties props = MQTTProperties_initializer;
    MQTTProperty expiry = {
        .identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL,
        .value.integer4 = (unsigned int)cfg->session_expiry_s,
    };
    int rc;

    MQTTProperties_add(&props, &expiry);
    opts.keepAliveInterval = (int)cfg->keepalive_s;
    opts.cleanstart = 0;
    opts.connectProperties = &props;
    opts.connectTimeout = CONNECT_TIMEOUT_S;
    opts.username = cfg->username;
    opts.password = cfg->password;
    opts.automaticReconnect = 0;
    opts.onSuccess5 = on_connected;
    opts.onFailure5 = on_connect_failed;
    opts.context = b;
    if (strncmp(b->uri, "ssl://", 6) == 0) {
        ssl.trustStore = cfg->tls_ca_file;
        ssl.keyStore = cfg->tls_cert_file;
        ssl.privateKey = cfg->tls_key_file;
        ssl.enableServerCertAuth = 1;
        ssl.verify = 1;
        opts.ssl = &ssl;
    }
    rc = MQTTAsync_connect(b->client, &opts);
    MQTTProperties_free(&props);
    if (rc != MQTTASYNC_SUCCESS)
        post_failure(b, EVENT_CONNECT_FAILED, rc, MQTTAsync_strerror(rc));
}

static void disconnect_client(bridge_t *b)
{
    MQTTAsync_disconnectOptions opts = MQTTAsync_disconnectOptions_initializer5;

    opts.timeout = DISCONNECT_TIMEOUT_MS;
    opts.onSuccess5 = on_disconnect_done;
    opts.onFailure5 = on_disconnect_failed;
    opts.context = b;
    if (MQTTAsync_disconnect(b->client, &opts) != MQTTASYNC_SUCCESS)
        post_events(b, EVENT_DISCONNECTED);
}

static void *control_main(void *arg)
{
    bridge_t *b = arg;

    pthread_mutex_lock(&b->lock);
    for (;;) {
        enum bridge_control request;

        while (b->control == CONTROL_NONE)
            pthread_cond_wait(&b->control_wake, &b->lock);
        request = b->control;
        if (request == CONTROL_QUIT)
            break;
        b->control = CONTROL_NONE;
        pthread_mutex_unlock(&b->lock);
        if (request == CONTROL_CONNECT)
            connect_client(b);
        else
            disconnect_client(b);
        pthread_mutex_lock(&b->lock);
    }
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* ---- Event loop ---- */

static void on_handle_closed(uv_handle_t *handle)
{
    (void)handle;
}

static void set_connected(bridge_t *b, int up)
{
    atomic_store(&b->is_connected, up);
    metrics_gauge_set(b->connected, up);
}

static void request_connect(bridge_t *b)
{
    b->state = BRIDGE_CONNECTING;
    request_control(b, CONTROL_CONNECT);
}

static void on_reconnect_timer(uv_timer_t *timer)
{
    bridge_t *b = timer->data;

    if (b->state != BRIDGE_IDLE || b->stop_requested)
        return;
    metrics_counter_add(b->reconnects, 1);
    request_connect(b);
}

static void schedule_reconnect(bridge_t *b, const char *what, int code,
                               const char *text)
{
    const config_bridge_t *cfg = b->cfg;
    uint64_t wait = bridge_backoff_ms(b->attempt, cfg->reconnect_min_ms,
                                      cfg->reconnect_max_ms, bridge_random(b));
    char reason[192];

    b->attempt++;
    b->state = BRIDGE_IDLE;
    log_write_limited("bridge-retry", 5, LOG_LEVEL_WARN, what,
                      "bridge=%s broker=%s:%d code=%d reason=%s "
                      "retry_in_ms=%llu attempt=%u",
                      cfg->name, cfg->host, cfg->port, code,
                      log_quote(reason, sizeof(reason), text),
                      (unsigned long long)wait, b->attempt);
    uv_timer_start(&b->reconnect_timer, on_reconnect_timer, wait, 0);
}

/* Interval of the drain check while stopping. */
#define DRAIN_CHECK_MS 20

static void close_loop(bridge_t *b)
{
    pthread_mutex_lock(&b->lock);
    b->wake_closed = 1;
    pthread_mutex_unlock(&b->lock);
    b->state = BRIDGE_CLOSED;
    uv_close((uv_handle_t *)&b->wake, on_handle_closed);
    uv_close((uv_handle_t *)&b->reconnect_timer, on_handle_closed);
    uv_close((uv_handle_t *)&b->retry_timer, on_handle_closed);
    pipeline_loop_detach(b->pl);
    b->pl = NULL;
}

/* Runs every DRAIN_CHECK_MS while stopping. The loop ends once the client
 * is disconnected and every message it received is finished, because
 * only then has each stored message had its chance to be acknowledged. */
static void on_drain_check(uv_timer_t *timer)
{
    bridge_t *b = timer->data;
    int inbox_empty;

    if (b->state != BRIDGE_IDLE)
        return;
    pthread_mutex_lock(&b->lock);
    inbox_empty = b->inbox == NULL;
    pthread_mutex_unlock(&b->lock);
    if (!inbox_empty || b->submitted > 0 || b->retries != NULL)
        return;
    uv_timer_stop(timer);
    log_info("bridge stopped", "bridge=%s", b->cfg->name);
    close_loop(b);
}

/* Stops taking part in anything: bridges_stop timed out, and the pipeline
 * is about to be destroyed. Jobs still open stay unfinished, so their
 * on_message never acknowledges them. */
static void abandon(bridge_t *b)
{
    size_t open = b->submitted;

    for (bridge_job_t *j = b->retries; j != NULL; j = j->next)
        open++;
    pthread_mutex_lock(&b->lock);
    b->abandoned = 1;
    b->wake_closed = 1;
    for (bridge_job_t *j = b->inbox; j != NULL; j = j->next)
        open++;
    pthread_mutex_unlock(&b->lock);
    log_error("bridge abandoned at shutdown timeout; its unacknowledged "
              "messages stay with the broker",
              "bridge=%s open_messages=%zu", b->cfg->name, open);
    uv_timer_stop(&b->reconnect_timer);
    uv_timer_stop(&b->retry_timer);
    b->state = BRIDGE_CLOSED;
    uv_stop(&b->loop);
}

static void start_disconnect(bridge_t *b)
{
    b->state = BRIDGE_DISCONNECTING;
    request_control(b, CONTROL_DISCONNECT);
}

/* Puts the bridge in IDLE after its connection ended, then either
 * reconnects later or, when stopping, starts the drain check. */
static void after_disconnect(bridge_t *b, const char *what, int code,
                             const char *text)
{
    set_connected(b, 0);
    b->state = BRIDGE_IDLE;
    if (b->stop_requested) {
        uv_timer_start(&b->reconnect_timer, on_drain_check, 0, DRAIN_CHECK_MS);
        return;
    }
    schedule_reconnect(b, what, code, text);
}

static void handle_connected(bridge_t *b, int session_present)
{
    const config_bridge_t *cfg = b->cfg;

    set_connected(b, 1);
    b->attempt = 0;
    b->state = BRIDGE_CONNECTED;
    log_info("bridge connected and subscribed",
             "bridge=%s broker=%s:%d client_id=%s session_present=%d "
             "filter=%s filters=%zu",
             cfg->name, cfg->host, cfg->port, cfg->client_id, session_present,
             b->filters[0], cfg->topic_count);
    if (b->stop_requested)
        start_disconnect(b);
}

static void handle_stop(bridge_t *b)
{
    b->stop_requested = 1;
    log_info("bridge stopping", "bridge=%s", b->cfg->name);
    if (b->state == BRIDGE_CONNECTED) {
        start_disconnect(b);
    } else if (b->state == BRIDGE_IDLE) {
        uv_timer_stop(&b->reconnect_timer);
        uv_timer_start(&b->reconnect_timer, on_drain_check, 0, DRAIN_CHECK_MS);
    }
    /* CONNECTING ends in an event whose handler checks stop_requested,
     * and DISCONNECTING ends in EVENT_DISCONNECTED. */
}

/* Applies the connection events in the order they can happen for one
 * connect attempt, so that events posted together end in the last
 * state. */
static void handle_events(bridge_t *b, unsigned events, int code,
                          const char *text, int session_present)
{
    if (events & EVENT_STOP)
        handle_stop(b);
    if ((events & EVENT_CONNECTED) && b->state == BRIDGE_CONNECTING)
        handle_connected(b, session_present);
    if ((events & EVENT_SUBSCRIBE_FAILED) &&
        (b->state == BRIDGE_CONNECTING || b->state == BRIDGE_CONNECTED)) {
        log_write_limited("bridge-subscribe", 5, LOG_LEVEL_ERROR,
                          "bridge subscribe failed; disconnecting to retry",
                          "bridge=%s code=%d reason=\"%s\"", b->cfg->name, code,
                          text);
        start_disconnect(b);
    }
    if ((events & EVENT_CONNECT_FAILED) && b->state == BRIDGE_CONNECTING)
        after_disconnect(b, "bridge connect failed", code, text);
    if ((events & EVENT_LOST) &&
        (b->state == BRIDGE_CONNECTING || b->state == BRIDGE_CONNECTED))
        after_disconnect(b, "bridge lost its broker connection", code, text);
    if ((events & (EVENT_DISCONNECTED | EVENT_LOST)) &&
        b->state == BRIDGE_DISCONNECTING)
        after_disconnect(b, "bridge disconnected", code, text);
}

static void on_wake(uv_async_t *handle)
{
    bridge_t *b = handle->data;
    bridge_job_t *inbox, *ordered = NULL;
    char text[sizeof(b->failure_text)];
    int code, session_present;
    unsigned events;

    pthread_mutex_lock(&b->lock);
    events = b->events;
    b->events = 0;
    inbox = b->inbox;
    b->inbox = NULL;
    code = b->failure_code;
    memcpy(text, b->failure_text, sizeof(text));
    session_present = b->session_present;
    pthread_mutex_unlock(&b->lock);

    if (events & EVENT_ABANDON) {
        abandon(b);
        return;
    }
    /* on_message pushes to the head; handle jobs in arrival order. */
    while (inbox != NULL) {
        bridge_job_t *next = inbox->next;

        inbox->next = ordered;
        ordered = inbox;
        inbox = next;
    }
    while (ordered != NULL) {
        bridge_job_t *job = ordered;

        ordered = job->next;
        job->next = NULL;
        bridge_ingest(b, job);
    }
    if (events != 0 && b->state != BRIDGE_CLOSED)
        handle_events(b, events, code, text, session_present);
}

static void *loop_main(void *arg)
{
    bridge_t *b = arg;

    log_info("bridge starting",
             "bridge=%s broker=%s:%d client_id=%s qos=%d shared_group=%s",
             b->cfg->name, b->cfg->host, b->cfg->port, b->cfg->client_id,
             b->cfg->qos, b->cfg->shared_group ? b->cfg->shared_group : "");
    request_connect(b);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    if (!b->abandoned && uv_loop_close(&b->loop) != 0)
        log_warn("bridge loop closed with open handles", "bridge=%s",
                 b->cfg->name);
    pthread_mutex_lock(&b->lock);
    b->loop_done = 1;
    pthread_cond_broadcast(&b->finished);
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

/* ---- Start and stop ---- */

static void register_metrics(bridge_t *b)
{
    char labels[160];

    for (int r = 0; r < BRIDGE_RESULT_COUNT; r++) {
        snprintf(labels, sizeof(labels), "bridge=\"%s\",result=\"%s\"",
                 b->cfg->name, bridge_result_names[r]);
        b->messages[r] = metrics_counter(
            "ingestd_bridge_messages_total",
            "Messages received from brokers by bridges, by outcome. Every "
            "outcome is acknowledged; only stored ones are in the spool.",
            labels);
    }
    snprintf(labels, sizeof(labels), "bridge=\"%s\"", b->cfg->name);
    b->bytes_in = metrics_counter(
        "ingestd_bridge_received_bytes_total",
        "Payload bytes of the messages received by each bridge.", labels);
    b->reconnects = metrics_counter(
        "ingestd_bridge_reconnects_total",
        "Connection attempts after the first, per bridge.", labels);
    b->store_retries = metrics_counter(
        "ingestd_bridge_store_retries_total",
        "Times a bridge held a message unacknowledged because the spool "
        "could not take it, per bridge.",
        labels);
    b->connected = metrics_gauge(
        "ingestd_bridge_connected",
        "1 while the bridge is connected and subscribed, else 0.", labels);
}

static uint64_t random_seed(void)
{
    uint64_t seed = 0;

    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
        seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return seed != 0 ? seed : 1;
}

/* Prepares everything that can fail before any thread starts. */
static int init_bridge(bridge_t *b, const config_t *cfg,
                       const config_bridge_t *bcfg, auth_t *auth,
                       pipeline_t *pipeline, char *err, size_t errlen)
{
    MQTTAsync_createOptions create = MQTTAsync_createOptions_initializer5;
    int tls = bcfg->tls_ca_file || bcfg->tls_cert_file;
    size_t size = strlen(bcfg->host) + 32;
    pthread_condattr_t attr;
    int rc;

    b->cfg = bcfg;
    b->root = cfg;
    b->auth = auth;
    b->pipeline = pipeline;
    b->random_state = random_seed();
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->job_done, NULL);
    pthread_cond_init(&b->control_wake, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&b->finished, &attr);
    pthread_condattr_destroy(&attr);
    register_metrics(b);

    b->uri = malloc(size);
    b->filters = calloc(bcfg->topic_count, sizeof(*b->filters));
    if (b->uri == NULL || b->filters == NULL)
        return ING_ENOMEM;
    /* A numeric IPv6 address needs brackets in the URI. */
    snprintf(b->uri, size,
             strchr(bcfg->host, ':') ? "%s://[%s]:%d" : "%s://%s:%d",
             tls ? "ssl" : "tcp", bcfg->host, bcfg->port);
    for (size_t i = 0; i < bcfg->topic_count; i++) {
        b->filters[i] =
            bridge_topic_filter(bcfg->topics[i], bcfg->shared_group);
        if (b->filters[i] == NULL)
            return ING_ENOMEM;
    }
    create.sendWhileDisconnected = 0;
    rc =
        MQTTAsync_createWithOptions(&b->client, b->uri, bcfg->client_id,
                                    MQTTCLIENT_PERSISTENCE_NONE, NULL, &create);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(err, errlen,
                 "bridge %s: cannot create the MQTT client "
                 "for %s: %s",
                 bcfg->name, b->uri, MQTTAsync_strerror(rc));
        b->client = NULL;
        return ING_ECONFIG;
    }
    rc = MQTTAsync_setCallbacks(b->client, b, on_connection_lost, on_message,
                                NULL);
    if (rc != MQTTASYNC_SUCCESS) {
        snprintf(err, errlen, "bridge %s: cannot set the MQTT callbacks: %s",
                 bcfg->name, MQTTAsync_strerror(rc));
        return ING_ECONFIG;
    }
    if (uv_loop_init(&b->loop) != 0)
        return ING_ENOMEM;
    uv_async_init(&b->loop, &b->wake, on_wake);
    b->wake.data = b;
    uv_timer_init(&b->loop, &b->reconnect_timer);
    uv_timer_init(&b->loop, &b->retry_timer);
    b->reconnect_timer.data = b->retry_timer.data = b;
    /* The loop thread has not started, so attaching here is attaching
     * from the only thread that touches the loop. */
    b->pl = pipeline_loop_attach(pipeline, &b->loop);
    return b->pl != NULL ? 0 : ING_ENOMEM;
}

/* Frees a bridge whose threads have ended, or that never started them. */
static void free_bridge(bridge_t *b)
{
    if (b->client != NULL)
        MQTTAsync_destroy(&b->client);
    for (size_t i = 0; b->filters != NULL && i < b->cfg->topic_count; i++)
        free(b->filters[i]);
    free(b->filters);
    free(b->uri);
    pthread_cond_destroy(&b->finished);
    pthread_cond_destroy(&b->control_wake);
    pthread_cond_destroy(&b->job_done);
    pthread_mutex_destroy(&b->lock);
}

/* Undoes init_bridge for a bridge whose threads never started. */
static void discard_bridge(bridge_t *b)
{
    if (b->wake.loop != NULL) {
        uv_close((uv_handle_t *)&b->wake, NULL);
        uv_close((uv_handle_t *)&b->reconnect_timer, NULL);
        uv_close((uv_handle_t *)&b->retry_timer, NULL);
        if (b->pl != NULL)
            pipeline_loop_detach(b->pl);
        uv_run(&b->loop, UV_RUN_DEFAULT);
        uv_loop_close(&b->loop);
    }
    free_bridge(b);
}

int bridges_start(const config_t *cfg, auth_t *auth, pipeline_t *pipeline,
                  bridges_t **out, char *err, size_t errlen)
{
    bridges_t *all;
    int rc = 0;

    *out = NULL;
    if (cfg->bridge_count == 0)
        return 0;
    pthread_once(&paho_once, init_paho);
    all = calloc(1, sizeof(*all));
    if (all == NULL)
        return ING_ENOMEM;
    all->items = calloc(cfg->bridge_count, sizeof(*all->items));
    if (all->items == NULL) {
        free(all);
        return ING_ENOMEM;
    }
    for (size_t i = 0; rc == 0 && i < cfg->bridge_count; i++) {
        bridge_t *b = &all->items[i];

        rc = init_bridge(b, cfg, &cfg->bridges[i], auth, pipeline, err, errlen);
        if (rc != 0) {
            if (rc == ING_ENOMEM)
                snprintf(err, errlen, "bridge %s: out of memory",
                         cfg->bridges[i].name);
            discard_bridge(b);
            break;
        }
        all->count = i + 1;
        b->control_started =
            pthread_create(&b->control_thread, NULL, control_main, b) == 0;
        b->loop_started =
            b->control_started &&
            pthread_create(&b->loop_thread, NULL, loop_main, b) == 0;
        if (!b->loop_started) {
            snprintf(err, errlen, "bridge %s: cannot start its threads",
                     cfg->bridges[i].name);
            rc = ING_ENOMEM;
        }
    }
    if (rc != 0) {
        bridges_stop(all, START_FAILURE_STOP_MS);
        return rc;
    }
    *out = all;
    return 0;
}

static void deadline_after(struct timespec *ts, uint64_t ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Waits until the bridge's loop thread returned or `deadline` passed.
 * Returns 1 when it returned. */
static int wait_loop_done(bridge_t *b, const struct timespec *deadline)
{
    int done;

    pthread_mutex_lock(&b->lock);
    while (!b->loop_done && pthread_cond_timedwait(&b->finished, &b->lock,
                                                   deadline) != ETIMEDOUT)
        ;
    done = b->loop_done;
    pthread_mutex_unlock(&b->lock);
    return done;
}

/* Asks a loop that missed the deadline to abandon its work, and waits
 * until it confirmed, so that it no longer touches the pipeline. */
static void abandon_loop(bridge_t *b)
{
    struct timespec deadline;

    pthread_mutex_lock(&b->lock);
    b->events |= EVENT_ABANDON;
    if (!b->wake_closed)
        uv_async_send(&b->wake);
    pthread_mutex_unlock(&b->lock);
    deadline_after(&deadline, ABANDON_WAIT_MS);
    if (!wait_loop_done(b, &deadline))
        log_error("bridge loop did not confirm abandon", "bridge=%s",
                  b->cfg->name);
}

void bridges_stop(bridges_t *all, uint64_t timeout_ms)
{
    struct timespec deadline;
    int abandoned = 0;

    if (all == NULL)
        return;
    deadline_after(&deadline, timeout_ms);
    for (size_t i = 0; i < all->count; i++) {
        if (all->items[i].loop_started)
            post_events(&all->items[i], EVENT_STOP);
    }
    for (size_t i = 0; i < all->count; i++) {
        bridge_t *b = &all->items[i];

        if (b->loop_started && !wait_loop_done(b, &deadline)) {
            abandon_loop(b);
            abandoned = 1;
        }
    }
    /* A message callback that never returns holds Paho's global mutex,
     * so no Paho call may be made any more: leave the clients and their
     * memory to the process exit. */
    if (abandoned)
        return;
    for (size_t i = 0; i < all->count; i++) {
        bridge_t *b = &all->items[i];

        if (b->loop_started)
            pthread_join(b->loop_thread, NULL);
        if (b->control_started) {
            request_control(b, CONTROL_QUIT);
            pthread_join(b->control_thread, NULL);
        }
        if (b->loop_started)
            free_bridge(b);
        else
            discard_bridge(b);
    }
    free(all->items);
    free(all);
}

size_t bridges_connected(bridges_t *all)
{
    size_t n = 0;

    for (size_t i = 0; all != NULL && i < all->count; i++)
        n += (size_t)atomic_load(&all->items[i].is_connected);
    return n;
}
