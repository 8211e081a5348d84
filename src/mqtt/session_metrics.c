/* Metric series of the MQTT server.
 *
 * Series with a small fixed label set are looked up once and cached; the
 * registry returns the same stable pointer to every thread, so a race
 * only stores the same value twice. Series labelled by a free-form reason
 * are looked up on each use, which is rare.
 */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "core/metrics.h"
#include "mqtt/session.h"

/* Index 0 is transport "tcp", 1 is "ws". */
static _Atomic(metrics_gauge_t *) open_conns[2];
static _Atomic(metrics_counter_t *) conns_total[2];
static _Atomic(metrics_counter_t *) packets[2][16];
static _Atomic(metrics_counter_t *) bytes[2];

static const char *const packet_names[16] = {
    "reserved", "connect", "connack", "publish", "puback", "pubrec",
    "pubrel", "pubcomp", "subscribe", "suback", "unsubscribe", "unsuback",
    "pingreq", "pingresp", "disconnect", "auth"};

void mqtt_metrics_connection(const char *transport, int delta)
{
    int ws = transport != NULL && strcmp(transport, "ws") == 0;
    metrics_gauge_t *g = atomic_load(&open_conns[ws]);
    metrics_counter_t *c = atomic_load(&conns_total[ws]);
    const char *labels = ws ? "transport=\"ws\"" : "transport=\"tcp\"";

    if (g == NULL) {
        g = metrics_gauge("ingestd_mqtt_connections",
                          "Open MQTT connections, by transport", labels);
        atomic_store(&open_conns[ws], g);
    }
    if (c == NULL) {
        c = metrics_counter("ingestd_mqtt_connections_total",
                            "MQTT connections opened, by transport", labels);
        atomic_store(&conns_total[ws], c);
    }
    metrics_gauge_add(g, delta);
    if (delta > 0)
        metrics_counter_add(c, (uint64_t)delta);
}

void mqtt_metrics_packet(int out, uint8_t type)
{
    metrics_counter_t *c = atomic_load(&packets[out != 0][type & 15]);
    char labels[64];

    if (c == NULL) {
        snprintf(labels, sizeof(labels), "direction=\"%s\",type=\"%s\"",
                 out ? "out" : "in", packet_names[type & 15]);
        c = metrics_counter("ingestd_mqtt_packets_total",
                            "MQTT packets, by direction and type", labels);
        atomic_store(&packets[out != 0][type & 15], c);
    }
    metrics_counter_add(c, 1);
}

static void count(const char *name, const char *help, const char *key,
                  const char *value)
{
    char labels[128];

    snprintf(labels, sizeof(labels), "%s=\"%s\"", key, value);
    metrics_counter_add(metrics_counter(name, help, labels), 1);
}

void mqtt_metrics_message(uint8_t qos, const char *result)
{
    char labels[96];

    snprintf(labels, sizeof(labels), "qos=\"%u\",result=\"%s\"", qos,
             result);
    metrics_counter_add(
        metrics_counter("ingestd_mqtt_messages_total",
                        "MQTT PUBLISH messages received, by QoS and result",
                        labels),
        1);
}

void mqtt_metrics_auth_failure(const char *reason)
{
    count("ingestd_mqtt_auth_failures_total",
          "MQTT connections rejected at CONNECT, by reason", "reason",
          reason);
}

const char *mqtt_metrics_error_label(int code)
{
    switch (code) {
    case MQTT_E_REMAINING_LENGTH:
        return "remaining_length";
    case MQTT_E_PACKET_TOO_LARGE:
        return "packet_too_large";
    case MQTT_E_PACKET_TYPE_RESERVED:
        return "reserved_packet_type";
    case MQTT_E_HEADER_FLAGS:
        return "reserved_flags";
    case MQTT_E_PUBLISH_QOS:
        return "publish_qos";
    case MQTT_E_SERVER_PACKET:
    case MQTT_E_SECOND_CONNECT:
        return "unexpected_packet";
    case MQTT_E_PROTOCOL_NAME:
    case MQTT_E_PROTOCOL_LEVEL:
        return "protocol_version";
    default:
        return mqtt_error_reason(code) == MQTT_RC_MALFORMED_PACKET
                   ? "malformed_packet"
                   : "protocol_error";
    }
}

void mqtt_metrics_malformed(const char *reason)
{
    count("ingestd_mqtt_malformed_total",
          "MQTT connections ended for a malformed packet, a protocol "
          "violation or a timeout, by reason",
          "reason", reason);
}

void mqtt_metrics_bytes(uint64_t in, uint64_t out)
{
    metrics_counter_t *r = atomic_load(&bytes[0]);
    metrics_counter_t *s = atomic_load(&bytes[1]);

    if (r == NULL) {
        r = metrics_counter("ingestd_mqtt_bytes_received_total",
                            "Bytes received on MQTT connections", NULL);
        atomic_store(&bytes[0], r);
    }
    if (s == NULL) {
        s = metrics_counter("ingestd_mqtt_bytes_sent_total",
                            "Bytes queued for sending on MQTT connections",
                            NULL);
        atomic_store(&bytes[1], s);
    }
    if (in > 0)
        metrics_counter_add(r, in);
    if (out > 0)
        metrics_counter_add(s, out);
}

void mqtt_metrics_readings(const char *result, uint64_t n)
{
    char labels[64];

    if (n == 0)
        return;
    snprintf(labels, sizeof(labels), "protocol=\"mqtt\",result=\"%s\"",
             result);
    metrics_counter_add(
        metrics_counter("ingestd_readings_total",
                        "Readings received, by protocol and result", labels),
        n);
}
