/* MQTT over WebSocket: a ws connection as the transport of an MQTT
 * session.
 *
 * The MQTT module owns the sessions, their authentication, QoS handling,
 * limits, takeover and drain, so a client sees the same server as on the
 * MQTT TCP listener. This file only moves bytes: binary messages go to
 * mqtt_session_feed, and each packet the session writes goes out as one
 * binary message. The ws module depends on the mqtt module and never the
 * other way round (see CMakeLists.txt).
 */
#include <stdlib.h>

#include "core/log.h"
#include "mqtt/mqtt.h"
#include "ws/ws.h"

/* One connection: the ws connection and the session on top of it. The
 * struct is freed in on_close, after mqtt_session_transport_closed. */
typedef struct mqtt_ws {
    ws_conn_t *ws;
    mqtt_session_t *session; /* NULL if the session failed to start */
    int draining;            /* the server is stopping: close with 1001 */
} mqtt_ws_t;

/* ---- Transport operations for the session ---- */

static int transport_write(void *ctx, uint8_t *data, size_t len)
{
    mqtt_ws_t *conn = ctx;
    int rc;

    /* wslay copies the message into its queue. */
    rc = ws_conn_send_binary(conn->ws, data, len);
    free(data);
    return rc == 0 ? 0 : -1;
}

static void transport_close(void *ctx)
{
    mqtt_ws_t *conn = ctx;

    if (conn->draining)
        ws_conn_close(conn->ws, WS_CLOSE_GOING_AWAY, "server shutting down");
    else
        ws_conn_close(conn->ws, WS_CLOSE_NORMAL, NULL);
}

static void transport_pause(void *ctx)
{
    mqtt_ws_t *conn = ctx;

    ws_conn_pause(conn->ws, 1);
}

static void transport_resume(void *ctx)
{
    mqtt_ws_t *conn = ctx;

    ws_conn_pause(conn->ws, 0);
}

static const mqtt_transport_ops_t transport_ops = {
    .write = transport_write,
    .close = transport_close,
    .pause = transport_pause,
    .resume = transport_resume,
};

/* ---- ws handler ---- */

static void on_text(ws_conn_t *ws, const char *data, size_t len, void *arg)
{
    (void)data;
    (void)len;
    (void)arg;
    log_write_limited("mqtt_ws_text", 5, LOG_LEVEL_INFO,
                      "mqtt over websocket: text message rejected",
                      "conn=%llu peer=%s", (unsigned long long)ws_conn_id(ws),
                      ws_conn_peer(ws));
    ws_conn_close(ws, WS_CLOSE_UNSUPPORTED_DATA,
                  "MQTT over WebSocket uses binary messages only");
}

static void on_binary(ws_conn_t *ws, const uint8_t *data, size_t len, void *arg)
{
    mqtt_ws_t *conn = arg;

    (void)ws;
    if (conn->session != NULL)
        mqtt_session_feed(conn->session, data, len);
}

static void on_drain(ws_conn_t *ws, void *arg)
{
    mqtt_ws_t *conn = arg;

    conn->draining = 1;
    if (conn->session != NULL)
        mqtt_session_drain(conn->session);
    else
        ws_conn_close(ws, WS_CLOSE_GOING_AWAY, "server shutting down");
}

static void on_close(ws_conn_t *ws, uint16_t code, void *arg)
{
    mqtt_ws_t *conn = arg;

    (void)ws;
    (void)code;
    if (conn->session != NULL)
        mqtt_session_transport_closed(conn->session);
    free(conn);
}

static const ws_handler_t mqtt_handler = {
    .on_text = on_text,
    .on_binary = on_binary,
    .on_drain = on_drain,
    .on_close = on_close,
};

/* ---- Entry points ---- */

int ws_mqtt_available(uv_loop_t *loop)
{
    return mqtt_listener_for_loop(loop) != NULL;
}

ws_conn_t *ws_mqtt_open(const ws_stream_t *stream, const ws_options_t *opts)
{
    mqtt_listener_t *listener = mqtt_listener_for_loop(stream->loop);
    mqtt_transport_t transport = {.ops = &transport_ops, .kind = "ws"};
    mqtt_ws_t *conn;

    if (listener == NULL)
        return NULL;
    conn = calloc(1, sizeof(*conn));
    if (conn == NULL)
        return NULL;
    conn->ws = ws_conn_open(stream, opts, &mqtt_handler, conn);
    if (conn->ws == NULL) {
        free(conn);
        return NULL;
    }
    transport.ctx = conn;
    transport.conn_id = stream->conn_id;
    transport.peer = ws_conn_peer(conn->ws);
    transport.cert = stream->cert;
    conn->session = mqtt_session_open(listener, &transport);
    if (conn->session == NULL) {
        /* The HTTP route turns requests away while the server drains,
         * so this is an allocation failure or a drain that started in
         * between. The ws connection closes and on_close frees `conn`. */
        log_error("mqtt over websocket: session failed to start",
                  "conn=%llu peer=%s", (unsigned long long)stream->conn_id,
                  ws_conn_peer(conn->ws));
        ws_conn_close(conn->ws, WS_CLOSE_INTERNAL_ERROR,
                      "the MQTT session failed to start; retry");
    }
    return conn->ws;
}
