/* Listening sockets, accepting, connection bookkeeping, drain and close.
 *
 * Each worker loop opens its own socket with SO_REUSEPORT on the same
 * address, so the kernel spreads new connections over the workers. The
 * listener struct lives until its listening handle and every connection
 * struct are gone, counted in `refs`.
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
#include "http/http_internal.h"

#define LISTEN_BACKLOG 1024

/* The admin listener serves operators and scrapers, so fixed limits fit. */
static const http_limits_t admin_limits = {
    .max_header_bytes = 16 * 1024,
    .max_body_bytes = 64 * 1024,
    .max_readings = 0,
    .header_timeout_ms = 10000,
    .body_timeout_ms = 10000,
    .idle_timeout_ms = 60000,
    .max_connections = 256,
    .retry_after_s = 1,
};

static atomic_uint_fast64_t next_conn_id = 1;

static void listener_unref(http_listener_t *l)
{
    if (--l->refs == 0)
        free(l);
}

/* Resolves `host` (empty for every address) into `ss`. Numeric addresses
 * need no lookup, and names such as "localhost" come from the resolver. */
static int resolve(const char *host, int port, struct sockaddr_storage *ss,
                   socklen_t *sslen, char *err, size_t errlen,
                   const char *address)
{
    struct addrinfo hints = {0}, *res = NULL;
    char service[16];
    int rc;

    snprintf(service, sizeof(service), "%d", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    rc = getaddrinfo(host[0] ? host : NULL, service, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "listen %s: %s", address, gai_strerror(rc));
        return ING_EINVAL;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *sslen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Opens a non-blocking listening socket on `address`. Returns the file
 * descriptor, or a negative ing_error with a message in `err`. */
static int open_socket(const char *address, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    char host[256];
    int port, fd, one = 1;

    if (http_listen_parse(address, host, sizeof(host), &port) != 0) {
        snprintf(err, errlen,
                 "listen %s: expected host:port or [ipv6]:port, such as "
                 "127.0.0.1:8080",
                 address ? address : "(none)");
        return ING_EINVAL;
    }
    if (resolve(host, port, &ss, &sslen, err, errlen, address) != 0)
        return ING_EINVAL;
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto error;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0 ||
        bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
        listen(fd, LISTEN_BACKLOG) != 0)
        goto error;
    return fd;
error:
    snprintf(err, errlen, "listen %s: %s", address, strerror(errno));
    if (fd >= 0)
        close(fd);
    return ING_EIO;
}

static void link_conn(http_listener_t *l, http_conn_t *c)
{
    c->next = l->conns;
    if (l->conns != NULL)
        l->conns->prev = c;
    l->conns = c;
    l->conn_count++;
    l->refs++;
}

static void unlink_conn(http_listener_t *l, http_conn_t *c)
{
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        l->conns = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

/* Responds 429 at once to a connection over
 * limits.connection_rate_per_address. The rate is a whole number of
 * connections per second, so a token is back within one second. */
static void turn_away_rate(http_conn_t *c)
{
    http_response_t resp = {0};

    if (http_response_error(&resp, 429, "connection_rate_exceeded",
                            "too many new connections from this address; "
                            "retry after the Retry-After delay",
                            "Retry-After: 1\r\n", NULL) != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_turn_away(c, &resp);
}

/* Responds 503 at once to a connection over max_connections, so that the
 * client learns to retry instead of waiting in the backlog. */
static void turn_away(http_conn_t *c)
{
    http_listener_t *l = c->listener;
    http_response_t resp = {0};
    char headers[64];

    if (c->turned_away == HTTP_TURN_AWAY_RATE) {
        turn_away_rate(c);
        return;
    }
    if (l->kind == HTTP_LISTENER_API)
        pipeline_count_rejected("http", "too_many_connections");
    snprintf(headers, sizeof(headers), "Retry-After: %llu\r\n",
             (unsigned long long)l->limits.retry_after_s);
    http_metrics_rejected("too_many_connections");
    log_write_limited("http_too_many_connections", 5, LOG_LEVEL_WARN,
                      "connection turned away", "listener=%s peer=%s max=%llu",
                      l->name, c->peer,
                      (unsigned long long)l->limits.max_connections);
    if (http_response_error(&resp, 503, "too_many_connections",
                            "the server has too many open connections; "
                            "retry after the Retry-After delay",
                            headers, NULL) != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_turn_away(c, &resp);
}

void http_listener_conn_ready(net_conn_t *n)
{
    http_conn_t *c = n->data;

    if (c->turned_away) {
        turn_away(c);
        return;
    }
    if (http_conn_start(c) != 0)
        http_conn_close(c);
}

/* Counts a device API connection in the limits shared by every worker,
 * before its TLS handshake. Returns 0 when it goes on, or -1 after
 * closing it. */
static int count_api_connection(http_listener_t *l, http_conn_t *c)
{
    char address[64];
    uint64_t wait_ms;
    int rc;

    limits_peer_address(c->peer, address, sizeof(address));
    rc = limits_connection_open(l->flow_limits,
                                l->tls != NULL ? LIMITS_LISTENER_HTTPS
                                               : LIMITS_LISTENER_HTTP,
                                address, limits_now_ms(), &wait_ms);
    if (rc == 0) {
        c->counted = 1;
        l->served++;
        log_debug("connection opened", "conn=%llu listener=%s peer=%s",
                  (unsigned long long)c->id, l->name, c->peer);
        return 0;
    }
    /* A client over a connection maximum still completes its TLS
     * handshake, so that it can read the 503 response. */
    if (rc == ING_EFULL) {
        c->turned_away = HTTP_TURN_AWAY_FULL;
        return 0;
    }
    pipeline_count_rejected("http", "connection_rate");
    log_write_limited("http_connection_rate", 5, LOG_LEVEL_WARN,
                      "connection turned away: connection rate exceeded",
                      "listener=%s peer=%s", l->name, c->peer);
    /* Over the rate, a TLS client gets no handshake, which is what a
     * connection storm costs most. */
    if (l->tls != NULL) {
        http_conn_close(c);
        return -1;
    }
    c->turned_away = HTTP_TURN_AWAY_RATE;
    return 0;
}

void http_listener_conn_uncount(http_conn_t *c)
{
    http_listener_t *l = c->listener;

    l->served--;
    if (l->kind == HTTP_LISTENER_API)
        limits_connection_close(l->flow_limits,
                                l->tls != NULL ? LIMITS_LISTENER_HTTPS
                                               : LIMITS_LISTENER_HTTP);
}

static void on_connection(uv_stream_t *server, int status)
{
    http_listener_t *l = server->data;
    http_conn_t *c;

    if (status < 0) {
        log_debug("accept failed", "listener=%s error=%s", l->name,
                  uv_strerror(status));
        return;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL)
        return;
    c->listener = l;
    c->id = atomic_fetch_add(&next_conn_id, 1);
    net_conn_init(l->loop, &c->net, &http_conn_events, c);
    c->net.id = c->id;
    uv_timer_init(l->loop, &c->timer);
    c->timer.data = c;
    c->handles = 2;
    link_conn(l, c);
    http_metrics_connection(l->kind, 1);
    if (net_conn_accept(server, &c->net, l->name, l->tls,
                        l->limits.header_timeout_ms) != 0) {
        http_conn_close(c);
        return;
    }
    snprintf(c->peer, sizeof(c->peer), "%s", c->net.peer);
    if (l->kind == HTTP_LISTENER_API) {
        if (count_api_connection(l, c) != 0)
            return;
    } else if (l->served >= l->limits.max_connections) {
        c->turned_away = HTTP_TURN_AWAY_FULL;
    } else {
        c->counted = 1;
        l->served++;
        log_debug("connection opened", "conn=%llu listener=%s peer=%s",
                  (unsigned long long)c->id, l->name, c->peer);
    }
    if (net_conn_start(&c->net) != 0)
        http_conn_close(c);
}

void http_listener_conn_gone(http_conn_t *c)
{
    http_listener_t *l = c->listener;

    unlink_conn(l, c);
    free(c->in);
    free(c->req.body);
    http_response_clear(&c->req.reject);
    free(c);
    listener_unref(l);
}

static void on_listener_closed(uv_handle_t *h)
{
    listener_unref(h->data);
}

static void stop_listening(http_listener_t *l)
{
    if (!l->listening)
        return;
    l->listening = 0;
    uv_close((uv_handle_t *)&l->tcp, on_listener_closed);
}

static int start(uv_loop_t *loop, const char *address, http_listener_t *l,
                 char *err, size_t errlen)
{
    int fd = open_socket(address, err, errlen);
    int rc;

    if (fd < 0)
        return fd;
    l->loop = loop;
    l->refs = 2; /* the owner and the listening handle */
    snprintf(l->address, sizeof(l->address), "%s", address);
    uv_tcp_init(loop, &l->tcp);
    l->tcp.data = l;
    l->listening = 1;
    rc = uv_tcp_open(&l->tcp, fd);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&l->tcp, LISTEN_BACKLOG, on_connection);
    if (rc != 0) {
        snprintf(err, errlen, "listen %s: %s", address, uv_strerror(rc));
        /* Closing the handle also closes the adopted descriptor. */
        stop_listening(l);
        return ING_EIO;
    }
    log_info("http listener started", "listener=%s address=%s", l->name,
             address);
    return 0;
}

/* Starts an API listener on `address`, with TLS when `tls` is set. */
static int api_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                     pipeline_loop_t *pl, const char *address,
                     tls_server_t *tls, http_listener_t **out, char *err,
                     size_t errlen)
{
    http_listener_t *l = calloc(1, sizeof(*l));
    int rc;

    if (l == NULL)
        return ING_ENOMEM;
    l->kind = HTTP_LISTENER_API;
    l->name = tls != NULL ? "https" : "api";
    l->tls = tls;
    l->limits = (http_limits_t){
        .max_header_bytes = cfg->http.max_header_bytes,
        .max_body_bytes = cfg->http.max_body_bytes,
        .max_readings = cfg->http.max_readings_per_request,
        .header_timeout_ms = cfg->http.header_timeout_ms,
        .body_timeout_ms = cfg->http.body_timeout_ms,
        .idle_timeout_ms = cfg->http.idle_timeout_ms,
        .max_connections = cfg->http.max_connections,
        .retry_after_s = cfg->http.retry_after_s,
    };
    l->routes = http_api_routes;
    l->route_count = http_api_route_count;
    l->endpoints = "POST /v1/data, GET /v1/ws and GET /mqtt";
    l->auth = auth;
    l->pl = pl;
    l->flow_limits = pipeline_limits(pipeline_loop_pipeline(pl));
    l->ws = (ws_ingest_config_t){
        .auth = auth,
        .pl = pl,
        .ws =
            {
                .max_message_size = cfg->ws.max_message_size,
                .max_fragments = cfg->ws.max_fragments,
                .idle_timeout_ms = cfg->ws.idle_timeout_ms,
                .ping_interval_ms = cfg->ws.ping_interval_ms,
            },
        .auth_timeout_ms = cfg->ws.auth_timeout_ms,
        .max_readings = cfg->http.max_readings_per_request,
        .retry_after_s = cfg->http.retry_after_s,
    };
    /* A WebSocket message may carry one whole MQTT packet, or several
     * packets up to ws.max_message_size. The MQTT keep alive takes the
     * place of WebSocket pings and the idle timeout, as on the MQTT TCP
     * listener, and paho-mqtt 1.6.1 answers pings with an unmasked pong,
     * which the server must reject as a protocol error. */
    l->mqtt_ws = (ws_options_t){
        .max_message_size = cfg->ws.max_message_size,
        .max_fragments = cfg->ws.max_fragments,
        .idle_timeout_ms = 0,
        .ping_interval_ms = 0,
    };
    if (cfg->mqtt.max_packet_size > l->mqtt_ws.max_message_size)
        l->mqtt_ws.max_message_size = cfg->mqtt.max_packet_size;
    rc = start(loop, address, l, err, errlen);
    if (rc != 0) {
        listener_unref(l);
        return rc;
    }
    *out = l;
    return 0;
}

int http_api_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                   pipeline_loop_t *pl, http_listener_t **out, char *err,
                   size_t errlen)
{
    return api_start(loop, cfg, auth, pl, cfg->http.listen, NULL, out, err,
                     errlen);
}

int http_https_start(uv_loop_t *loop, const config_t *cfg, auth_t *auth,
                     pipeline_loop_t *pl, tls_server_t *tls,
                     http_listener_t **out, char *err, size_t errlen)
{
    return api_start(loop, cfg, auth, pl, cfg->https.listen, tls, out, err,
                     errlen);
}

int http_admin_start(uv_loop_t *loop, const char *listen,
                     const http_admin_hooks_t *hooks, http_listener_t **out,
                     char *err, size_t errlen)
{
    http_listener_t *l = calloc(1, sizeof(*l));
    int rc;

    if (l == NULL)
        return ING_ENOMEM;
    l->kind = HTTP_LISTENER_ADMIN;
    l->name = "admin";
    l->limits = admin_limits;
    l->routes = http_admin_routes;
    l->route_count = http_admin_route_count;
    l->endpoints = "GET /metrics, GET /healthz and GET /readyz";
    if (hooks != NULL)
        l->hooks = *hooks;
    rc = start(loop, listen, l, err, errlen);
    if (rc != 0) {
        listener_unref(l);
        return rc;
    }
    *out = l;
    return 0;
}

void http_listener_drain(http_listener_t *l)
{
    http_conn_t *c = l->conns;

    l->draining = 1;
    stop_listening(l);
    while (c != NULL) {
        http_conn_t *next = c->next;
        if (c->state == CONN_IDLE && c->in_len == c->in_off)
            http_conn_close(c);
        else if (c->state == CONN_STREAM && !c->closed)
            c->stream->on_drain(c->stream_arg);
        c = next;
    }
    log_info("http listener draining", "listener=%s connections=%zu",
             l->name, l->conn_count);
}

size_t http_listener_connections(http_listener_t *l)
{
    return l->conn_count;
}

void http_listener_close(http_listener_t *l)
{
    http_conn_t *c = l->conns;

    l->draining = 1;
    l->closing = 1;
    stop_listening(l);
    while (c != NULL) {
        http_conn_t *next = c->next;
        http_conn_close(c);
        c = next;
    }
    log_info("http listener stopped", "listener=%s", l->name);
    listener_unref(l);
}
