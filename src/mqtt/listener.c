/* The per-loop MQTT context: TCP listener, mail from other threads, drain
 * and close.
 *
 * Each worker loop opens its own socket with SO_REUSEPORT on
 * mqtt.listen, so the kernel spreads connections over the workers. The
 * listener struct lives until its handles, its TCP connections and its
 * sessions are gone, counted in `refs`.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/errors.h"
#include "core/log.h"
#include "mqtt/session.h"
#include "net/conn.h"

#define LISTEN_BACKLOG 1024
#define READ_BUFFER 65536
#define MAX_LOOPS 128

/* A TCP connection, plain or TLS, under one session. */
typedef struct tcp_conn {
    net_conn_t net;
    mqtt_listener_t *listener;
    mqtt_session_t *session;
    struct tcp_conn *prev, *next; /* in listener->handshakes */
    int in_handshake;
    uint64_t id;
    int closing;
    int reading;
    int counted; /* within mqtt.max_connections and limits.* */
    int rate_limited; /* over limits.connection_rate_per_address */
    enum limits_listener kind;
} tcp_conn_t;

static atomic_uint_fast64_t next_conn_id = 1;

/* Listener of each loop, for transports that only know their loop. */
static pthread_mutex_t loops_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    uv_loop_t *loop;
    mqtt_listener_t *listener;
} loops[MAX_LOOPS];

static void register_loop(uv_loop_t *loop, mqtt_listener_t *l)
{
    size_t i, slot = MAX_LOOPS;

    pthread_mutex_lock(&loops_lock);
    for (i = 0; i < MAX_LOOPS; i++) {
        if (loops[i].loop == loop)
            break;
        if (loops[i].loop == NULL && slot == MAX_LOOPS)
            slot = i;
    }
    if (i == MAX_LOOPS)
        i = slot;
    if (i < MAX_LOOPS) {
        loops[i].loop = l != NULL ? loop : NULL;
        loops[i].listener = l;
    }
    pthread_mutex_unlock(&loops_lock);
}

mqtt_listener_t *mqtt_listener_for_loop(uv_loop_t *loop)
{
    mqtt_listener_t *l = NULL;

    pthread_mutex_lock(&loops_lock);
    for (size_t i = 0; i < MAX_LOOPS && l == NULL; i++) {
        if (loops[i].loop == loop)
            l = loops[i].listener;
    }
    pthread_mutex_unlock(&loops_lock);
    return l;
}

void mqtt_listener_ref(mqtt_listener_t *l)
{
    l->refs++;
}

void mqtt_listener_unref(mqtt_listener_t *l)
{
    if (--l->refs > 0)
        return;
    for (size_t i = 0; i < l->topic_count; i++)
        free(l->topics[i]);
    free(l->topics);
    pthread_mutex_destroy(&l->mail_lock);
    free(l);
}

/* ---- TCP transport ---- */

/* Takes `c` off the list of TLS handshakes in progress. */
static void handshake_done(tcp_conn_t *c)
{
    mqtt_listener_t *l = c->listener;

    if (!c->in_handshake)
        return;
    c->in_handshake = 0;
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        l->handshakes = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static void on_net_closed(net_conn_t *n)
{
    tcp_conn_t *c = n->data;
    mqtt_listener_t *l = c->listener;

    handshake_done(c);
    if (c->counted) {
        l->tcp_connections--;
        limits_connection_close(l->limits, c->kind);
    }
    if (c->session != NULL)
        mqtt_session_transport_closed(c->session);
    free(c);
    mqtt_listener_unref(l);
}

static void close_now(tcp_conn_t *c)
{
    if (net_conn_is_closing(&c->net))
        return;
    c->closing = 1;
    net_conn_close(&c->net);
}

static void on_shutdown(net_conn_t *n, int status)
{
    (void)status;
    close_now(n->data);
}

static void on_net_written(net_conn_t *n, int status)
{
    tcp_conn_t *c = n->data;

    if (status < 0 && status != UV_ECANCELED && !c->closing) {
        log_debug("mqtt write failed", "conn=%llu peer=%s error=%s",
                  (unsigned long long)c->id, c->net.peer,
                  uv_strerror(status));
        close_now(c);
    }
}

static int tcp_write(void *ctx, uint8_t *data, size_t len)
{
    tcp_conn_t *c = ctx;

    if (c->closing) {
        free(data);
        return -1;
    }
    return net_conn_write(&c->net, (char *)data, (const char *)data, len) == 0
               ? 0
               : -1;
}

static void tcp_close(void *ctx)
{
    tcp_conn_t *c = ctx;

    if (c->closing)
        return;
    c->closing = 1;
    if (c->reading) {
        net_conn_set_reading(&c->net, 0);
        c->reading = 0;
    }
    /* Shutting down first lets the queued replies reach the client. */
    if (net_conn_shutdown(&c->net, on_shutdown) != 0)
        close_now(c);
}

static void on_net_read(net_conn_t *n, ssize_t nread, const char *data)
{
    tcp_conn_t *c = n->data;

    if (nread < 0) {
        if (nread != UV_EOF)
            log_debug("mqtt read failed", "conn=%llu peer=%s error=%s",
                      (unsigned long long)c->id, c->net.peer,
                      uv_strerror((int)nread));
        close_now(c);
        return;
    }
    if (nread > 0 && c->session != NULL && !c->closing)
        mqtt_session_feed(c->session, (const uint8_t *)data, (size_t)nread);
}

static void tcp_pause(void *ctx)
{
    tcp_conn_t *c = ctx;

    if (c->reading) {
        net_conn_set_reading(&c->net, 0);
        c->reading = 0;
    }
}

static void tcp_resume(void *ctx)
{
    tcp_conn_t *c = ctx;

    if (!c->reading && !c->closing) {
        net_conn_set_reading(&c->net, 1);
        c->reading = 1;
    }
}

static const mqtt_transport_ops_t tcp_ops = {
    .write = tcp_write,
    .close = tcp_close,
    .pause = tcp_pause,
    .resume = tcp_resume,
};

/* Opens the session once the connection carries plaintext, which for
 * MQTTS is after the TLS handshake. */
static void on_net_ready(net_conn_t *n)
{
    tcp_conn_t *c = n->data;
    mqtt_listener_t *l = c->listener;
    mqtt_transport_t t = {.ops = &tcp_ops,
                          .kind = c->net.tls != NULL ? "tls" : "tcp"};

    handshake_done(c);
    t.ctx = c;
    t.conn_id = c->id;
    t.peer = c->net.peer;
    t.cert = net_conn_peer_cert(&c->net);
    c->session = mqtt_session_open(l, &t);
    if (c->session == NULL) {
        close_now(c);
        return;
    }
    if (c->rate_limited)
        c->session->connect_reject = MQTT_RC_CONNECTION_RATE_EXCEEDED;
    tcp_resume(c);
}

static const net_conn_events_t tcp_events = {
    .on_ready = on_net_ready,
    .on_read = on_net_read,
    .on_written = on_net_written,
    .on_closed = on_net_closed,
};

/* Applies the connection limits before any byte is read, so that a
 * connection storm costs no TLS handshake. A plain connection over the
 * address's rate still reads its CONNECT, so that 5.0 clients get CONNACK
 * 0x9F. A TLS connection closes at once. Returns 0 when the connection
 * goes on, or -1 after closing it. */
static int count_connection(mqtt_listener_t *l, tcp_conn_t *c,
                            const char *name)
{
    char address[64];
    uint64_t wait_ms;
    int rc;

    c->kind = c->net.tls != NULL ? LIMITS_LISTENER_MQTTS
                                 : LIMITS_LISTENER_MQTT;
    limits_peer_address(c->net.peer, address, sizeof(address));
    rc = limits_connection_open(l->limits, c->kind, address,
                                limits_now_ms(), &wait_ms);
    if (rc == 0) {
        c->counted = 1;
        l->tcp_connections++;
        return 0;
    }
    pipeline_count_rejected("mqtt", rc == ING_ERATE ? "connection_rate"
                                                    : "too_many_connections");
    log_write_limited("mqtt_connection_limit", 5, LOG_LEVEL_WARN,
                      "mqtt connection turned away",
                      "listener=%s peer=%s reason=%s", name, c->net.peer,
                      rc == ING_ERATE ? "connection_rate"
                                      : "too_many_connections");
    if (rc == ING_ERATE && c->net.tls == NULL) {
        c->rate_limited = 1;
        return 0;
    }
    mqtt_metrics_malformed("too_many_connections");
    close_now(c);
    return -1;
}

static void accept_connection(mqtt_listener_t *l, uv_stream_t *server,
                              tls_server_t *tls)
{
    const char *name = tls != NULL ? "mqtts" : "mqtt";
    tcp_conn_t *c;

    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->listener = l;
    c->id = atomic_fetch_add(&next_conn_id, 1);
    net_conn_init(l->loop, &c->net, &tcp_events, c);
    c->net.id = c->id;
    mqtt_listener_ref(l);
    if (net_conn_accept(server, &c->net, name, tls,
                        l->cfg->mqtt.connect_timeout_ms) != 0) {
        close_now(c);
        return;
    }
    if (count_connection(l, c, name) != 0)
        return;
    if (tls != NULL) {
        /* Until the handshake ends the connection has no session, so
         * the listener keeps it in a list of its own to close it when
         * the server drains. */
        c->in_handshake = 1;
        c->next = l->handshakes;
        if (c->next != NULL)
            c->next->prev = c;
        l->handshakes = c;
    }
    if (net_conn_start(&c->net) != 0)
        close_now(c);
}

/* Closes the TLS connections whose handshake has not ended. */
static void close_handshakes(mqtt_listener_t *l)
{
    tcp_conn_t *c = l->handshakes;

    while (c != NULL) {
        tcp_conn_t *next = c->next;

        handshake_done(c);
        close_now(c);
        c = next;
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    accept_connection(server->data, server, NULL);
}

static void on_tls_connection(uv_stream_t *server, int status)
{
    mqtt_listener_t *l = server->data;

    if (status < 0)
        return;
    accept_connection(l, server, l->tls);
}

/* ---- Listening socket ---- */

/* Opens a non-blocking listening socket on `address` ("host:port" or
 * "[v6]:port"). Returns the descriptor or a negative ing_error. */
static int open_socket(const char *address, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    const char *configured = address;
    char host[256];
    const char *colon = strrchr(address, ':');
    int fd = -1, one = 1, rc;
    size_t hlen;

    if (colon == NULL || colon == address)
        goto invalid;
    hlen = (size_t)(colon - address);
    if (address[0] == '[' && hlen >= 2 && address[hlen - 1] == ']') {
        address++;
        hlen -= 2;
    }
    if (hlen >= sizeof(host))
        goto invalid;
    memcpy(host, address, hlen);
    host[hlen] = '\0';
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV | AI_NUMERICHOST;
    rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "mqtt listen %s: %s", configured, gai_strerror(rc));
        return ING_EINVAL;
    }
    fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                0);
    if (fd < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) != 0 ||
        listen(fd, LISTEN_BACKLOG) != 0) {
        snprintf(err, errlen, "mqtt listen %s: %s", configured, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(res);
        return ING_EIO;
    }
    freeaddrinfo(res);
    return fd;
invalid:
    snprintf(err, errlen,
             "mqtt listen %s: expected host:port, such as 127.0.0.1:1883",
             configured);
    return ING_EINVAL;
}

/* Splits mqtt.topics into templates, each with exactly one {device_id}
 * level and no wildcards. */
static int parse_topics(mqtt_listener_t *l, const char *text, char *err,
                        size_t errlen)
{
    const char *p = text ? text : "";

    while (*p != '\0') {
        size_t n = strcspn(p, ",");
        const char *start = p, *end = p + n, *at;
        char *t, **grown;

        while (start < end && *start == ' ')
            start++;
        while (end > start && end[-1] == ' ')
            end--;
        t = strndup(start, (size_t)(end - start));
        if (t == NULL)
            return ING_ENOMEM;
        at = strstr(t, "{device_id}");
        if (t[0] == '\0' || strpbrk(t, "+#") != NULL || at == NULL ||
            strstr(at + 1, "{device_id}") != NULL ||
            (at != t && at[-1] != '/') || (at[11] != '\0' && at[11] != '/')) {
            snprintf(err, errlen,
                     "mqtt.topics: \"%s\" must contain {device_id} once as "
                     "a whole level and no wildcards, such as "
                     "devices/{device_id}/data",
                     t);
            free(t);
            return ING_ECONFIG;
        }
        grown = realloc(l->topics, (l->topic_count + 1) * sizeof(*grown));
        if (grown == NULL) {
            free(t);
            return ING_ENOMEM;
        }
        l->topics = grown;
        l->topics[l->topic_count++] = t;
        p += n;
        if (*p == ',')
            p++;
    }
    if (l->topic_count == 0) {
        snprintf(err, errlen, "mqtt.topics: no topic template configured");
        return ING_ECONFIG;
    }
    return 0;
}

/* ---- Mail from other threads ---- */

static void free_mail(mqtt_mail_t *mail)
{
    free(mail->topic);
    free(mail->payload);
    free(mail);
}

void mqtt_listener_post(mqtt_listener_t *l, mqtt_mail_t *mail)
{
    int dropped;

    pthread_mutex_lock(&l->mail_lock);
    dropped = l->mail_closed;
    if (!dropped) {
        if (l->mail_tail != NULL)
            l->mail_tail->next = mail;
        else
            l->mail_head = mail;
        l->mail_tail = mail;
        uv_async_send(&l->mail_async);
    }
    pthread_mutex_unlock(&l->mail_lock);
    if (dropped)
        free_mail(mail);
}

static void on_mail(uv_async_t *a)
{
    mqtt_listener_t *l = a->data;
    mqtt_mail_t *list, *next;

    pthread_mutex_lock(&l->mail_lock);
    list = l->mail_head;
    l->mail_head = l->mail_tail = NULL;
    pthread_mutex_unlock(&l->mail_lock);
    for (; list != NULL; list = next) {
        next = list->next;
        /* The session may have ended since the mail was posted, so it
         * is looked up instead of trusted. */
        for (mqtt_session_t *s = l->sessions; s != NULL; s = s->next) {
            if (s == list->session && s->id == list->session_id) {
                mqtt_session_mail(s, list);
                break;
            }
        }
        free_mail(list);
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    mqtt_listener_unref(h->data);
}

/* ---- Lifecycle ---- */

int mqtt_listener_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                        pipeline_loop_t *pl, mqtt_listener_t **out,
                        char *err, size_t errlen)
{
    mqtt_listener_t *l = calloc(1, sizeof(*l));
    int fd, rc;

    if (l == NULL)
        return ING_ENOMEM;
    l->loop = loop;
    l->cfg = cfg;
    l->auth = auth;
    l->pl = pl;
    l->limits = pipeline_limits(pipeline_loop_pipeline(pl));
    l->refs = 1;
    pthread_mutex_init(&l->mail_lock, NULL);
    rc = parse_topics(l, cfg->mqtt.topics, err, errlen);
    if (rc != 0) {
        mqtt_listener_unref(l);
        return rc;
    }
    if (cfg->mqtt.listen != NULL) {
        fd = open_socket(cfg->mqtt.listen, err, errlen);
        if (fd < 0) {
            mqtt_listener_unref(l);
            return fd;
        }
        uv_tcp_init(loop, &l->tcp);
        l->tcp.data = l;
        l->refs++;
        l->listening = 1;
        rc = uv_tcp_open(&l->tcp, fd);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&l->tcp, LISTEN_BACKLOG,
                           on_connection);
        if (rc != 0) {
            snprintf(err, errlen, "mqtt listen %s: %s", cfg->mqtt.listen,
                     uv_strerror(rc));
            l->listening = 0;
            uv_close((uv_handle_t *)&l->tcp, on_handle_closed);
            mqtt_listener_unref(l);
            return ING_EIO;
        }
    }
    uv_async_init(loop, &l->mail_async, on_mail);
    l->mail_async.data = l;
    l->refs++;
    register_loop(loop, l);
    if (cfg->mqtt.listen != NULL)
        log_info("mqtt listener started", "address=%s topics=\"%s\"",
                 cfg->mqtt.listen, cfg->mqtt.topics);
    *out = l;
    return 0;
}

int mqtt_listener_start_tls(mqtt_listener_t *l, tls_server_t *tls,
                            char *err, size_t errlen)
{
    const char *address = l->cfg->mqtts.listen;
    int fd, rc;

    fd = open_socket(address, err, errlen);
    if (fd < 0)
        return fd;
    l->tls = tls;
    uv_tcp_init(l->loop, &l->tls_tcp);
    l->tls_tcp.data = l;
    l->refs++;
    l->tls_listening = 1;
    rc = uv_tcp_open(&l->tls_tcp, fd);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&l->tls_tcp, LISTEN_BACKLOG,
                       on_tls_connection);
    if (rc != 0) {
        snprintf(err, errlen, "mqtts listen %s: %s", address,
                 uv_strerror(rc));
        l->tls_listening = 0;
        uv_close((uv_handle_t *)&l->tls_tcp, on_handle_closed);
        return ING_EIO;
    }
    log_info("mqtts listener started", "address=%s", address);
    return 0;
}

static void stop_listening(mqtt_listener_t *l)
{
    if (l->tls_listening) {
        l->tls_listening = 0;
        uv_close((uv_handle_t *)&l->tls_tcp, on_handle_closed);
    }
    if (!l->listening)
        return;
    l->listening = 0;
    uv_close((uv_handle_t *)&l->tcp, on_handle_closed);
}

void mqtt_listener_drain(mqtt_listener_t *l)
{
    mqtt_session_t *s = l->sessions;

    if (l->draining)
        return;
    l->draining = 1;
    stop_listening(l);
    close_handshakes(l);
    while (s != NULL) {
        mqtt_session_t *next = s->next;
        mqtt_session_drain(s);
        s = next;
    }
    log_info("mqtt listener draining", "connections=%zu", l->session_count);
}

size_t mqtt_listener_connections(mqtt_listener_t *l)
{
    return l->session_count;
}

void mqtt_listener_close(mqtt_listener_t *l)
{
    mqtt_session_t *s = l->sessions;

    l->draining = 1;
    l->closing = 1;
    stop_listening(l);
    close_handshakes(l);
    register_loop(l->loop, NULL);
    while (s != NULL) {
        mqtt_session_t *next = s->next;
        mqtt_session_close(s);
        if (s->transport.ops == &tcp_ops)
            close_now(s->transport.ctx);
        s = next;
    }
    pthread_mutex_lock(&l->mail_lock);
    l->mail_closed = 1;
    pthread_mutex_unlock(&l->mail_lock);
    on_mail(&l->mail_async);
    uv_close((uv_handle_t *)&l->mail_async, on_handle_closed);
    log_info("mqtt listener stopped", "address=%s",
             l->cfg->mqtt.listen ? l->cfg->mqtt.listen : "off");
    mqtt_listener_unref(l);
}
