/* CONNECT: protocol version, authentication, client identifier, session
 * state and the CONNACK that announces the server's limits.
 *
 * Authentication runs a list of steps. Each step looks at the CONNECT and
 * either does not apply (so the next one runs), accepts the device, or
 * rejects the connection with a reason code. A verified TLS client
 * certificate decides first; otherwise the user name (the device id) and
 * password (the API key) do.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "core/ids.h"
#include "core/log.h"
#include "mqtt/session.h"

#define CONNACK_CAP 1024

enum auth_step_result {
    AUTH_STEP_SKIP = 1,    /* this method does not apply */
    AUTH_STEP_ACCEPT = 0,  /* `dev` is filled */
    AUTH_STEP_REJECT = -1, /* `reason` and `metric` are set */
};

typedef struct auth_outcome {
    auth_device_t dev;
    uint8_t reason;     /* 5.0 reason code on rejection */
    const char *metric; /* label of ingestd_mqtt_auth_failures_total */
    int64_t expires_at; /* a JWT's exp (Unix seconds), or 0 */
    auth_failure_t why; /* the credential check's reason, when it ran */
} auth_outcome_t;

typedef int (*auth_step_fn)(mqtt_session_t *s, const mqtt_connect_t *c,
                            auth_outcome_t *out);

/* User name = device id, password = an API key or a JWT of that device. */
static int auth_api_key(mqtt_session_t *s, const mqtt_connect_t *c,
                        auth_outcome_t *out)
{
    char claimed[AUTH_DEVICE_ID_MAX + 1];
    enum auth_result res;

    if (c->username.data == NULL || c->password.data == NULL)
        return AUTH_STEP_SKIP;
    if (c->username.len > AUTH_DEVICE_ID_MAX) {
        out->reason = MQTT_RC_BAD_USERNAME_OR_PASSWORD;
        out->metric = "username_mismatch";
        return AUTH_STEP_REJECT;
    }
    memcpy(claimed, c->username.data, c->username.len);
    claimed[c->username.len] = '\0';
    /* A key or token of another device than the user name is treated like
     * a wrong password, so nothing leaks about which device it belongs
     * to. */
    res = auth_check_credential(s->listener->auth,
                                (const char *)c->password.data,
                                c->password.len, claimed, &out->dev, NULL,
                                &out->expires_at, &out->why);
    if (res == AUTH_UNKNOWN_KEY) {
        out->reason = MQTT_RC_BAD_USERNAME_OR_PASSWORD;
        out->metric = strcmp(out->why.reason, "device_mismatch") == 0
                          ? "username_mismatch"
                          : "bad_password";
        return AUTH_STEP_REJECT;
    }
    if (res == AUTH_DISABLED) {
        out->reason = MQTT_RC_NOT_AUTHORIZED;
        out->metric = "disabled";
        return AUTH_STEP_REJECT;
    }
    return AUTH_STEP_ACCEPT;
}

/* Returns 1 if the MQTT string `str` equals `text`. */
static int string_is(const mqtt_bytes_t *str, const char *text)
{
    return str->len == strlen(text) && memcmp(str->data, text, str->len) == 0;
}

/* A verified TLS client certificate names the device. A user name, when
 * sent, must be that device id, and a password, when sent, must be a
 * valid API key or JWT of the same device. The registry is asked again here,
 * since the device may have been disabled since the handshake. */
static int auth_certificate(mqtt_session_t *s, const mqtt_connect_t *c,
                            auth_outcome_t *out)
{
    const tls_peer_t *cert = s->transport_open ? s->transport.cert : NULL;
    auth_device_t key_dev;
    enum auth_result res;

    if (cert == NULL)
        return AUTH_STEP_SKIP;
    if (c->username.data != NULL &&
        !string_is(&c->username, cert->device_id)) {
        out->reason = MQTT_RC_BAD_USERNAME_OR_PASSWORD;
        out->metric = "certificate_mismatch";
        return AUTH_STEP_REJECT;
    }
    if (c->password.data != NULL) {
        /* The password may be an API key or a JWT, and must belong to the
         * certificate's device. A JWT's expiry still ends the session. */
        res = auth_check_credential(
            s->listener->auth, (const char *)c->password.data,
            c->password.len, cert->device_id, &key_dev, NULL,
            &out->expires_at, &out->why);
        if (res != AUTH_OK) {
            out->reason = MQTT_RC_BAD_USERNAME_OR_PASSWORD;
            out->metric = out->why.reason != NULL &&
                                  strcmp(out->why.reason,
                                         "device_mismatch") == 0
                              ? "certificate_mismatch"
                              : "bad_password";
            return AUTH_STEP_REJECT;
        }
    }
    res = auth_check_certificate(s->listener->auth, cert->device_id,
                                 cert->fingerprint, &out->dev, NULL);
    if (res != AUTH_OK) {
        out->reason = MQTT_RC_NOT_AUTHORIZED;
        out->metric = res == AUTH_DISABLED ? "disabled" : "certificate";
        return AUTH_STEP_REJECT;
    }
    return AUTH_STEP_ACCEPT;
}

static const auth_step_fn auth_steps[] = {auth_certificate, auth_api_key};

static int authenticate(mqtt_session_t *s, const mqtt_connect_t *c,
                        auth_outcome_t *out)
{
    if (c->version == MQTT_V5 &&
        mqtt_props_has(&c->props, MQTT_PROP_AUTH_METHOD)) {
        /* No enhanced authentication method is offered. */
        out->reason = MQTT_RC_BAD_AUTH_METHOD;
        out->metric = "auth_method";
        return AUTH_STEP_REJECT;
    }
    for (size_t i = 0; i < sizeof(auth_steps) / sizeof(auth_steps[0]); i++) {
        int rc = auth_steps[i](s, c, out);
        if (rc != AUTH_STEP_SKIP)
            return rc;
    }
    out->reason = MQTT_RC_BAD_USERNAME_OR_PASSWORD;
    out->metric = "missing_credentials";
    return AUTH_STEP_REJECT;
}

/* Maps a 5.0 CONNACK reason code to the 3.1.1 return code. */
static uint8_t connack_v311(uint8_t reason)
{
    switch (reason) {
    case MQTT_RC_SUCCESS:
        return 0x00;
    case MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION:
        return 0x01;
    case MQTT_RC_CLIENT_ID_NOT_VALID:
        return 0x02;
    case MQTT_RC_SERVER_UNAVAILABLE:
    case MQTT_RC_SERVER_BUSY:
    case MQTT_RC_SERVER_SHUTTING_DOWN:
    case MQTT_RC_QUOTA_EXCEEDED:
        return 0x03;
    case MQTT_RC_NOT_AUTHORIZED:
        return 0x05;
    default:
        return 0x04;
    }
}

/* Sends CONNACK with `connack` filled except the reason code, in the
 * session's version. */
static void send_connack(mqtt_session_t *s, int version,
                         mqtt_connack_t *connack)
{
    uint8_t *buf = malloc(CONNACK_CAP);
    int n;

    if (buf == NULL)
        return;
    if (version != MQTT_V5)
        connack->reason_code = connack_v311(connack->reason_code);
    n = mqtt_encode_connack(buf, CONNACK_CAP, version, connack,
                            s->client_max_packet);
    if (n <= 0 || n > CONNACK_CAP) {
        free(buf);
        return;
    }
    mqtt_session_send(s, buf, (size_t)n);
}

/* Rejects the CONNECT with `reason` (a 5.0 code, mapped for 3.1.1) and
 * closes. */
static int reject(mqtt_session_t *s, int version, uint8_t reason,
                  const char *metric, const char *why)
{
    mqtt_connack_t connack = {.reason_code = reason};

    mqtt_metrics_auth_failure(metric);
    log_write_limited("mqtt_connect_rejected", 10, LOG_LEVEL_INFO,
                      "mqtt connection rejected",
                      "conn=%llu client=%s device=%s peer=%s reason=%s "
                      "code=0x%02x",
                      (unsigned long long)s->id, s->client_id,
                      s->device.id[0] ? s->device.id : "-", s->peer, metric,
                      reason);
    if (version == MQTT_V5 && why != NULL) {
        connack.props.reason_string.data = (const uint8_t *)why;
        connack.props.reason_string.len = strlen(why);
        mqtt_props_set(&connack.props, MQTT_PROP_REASON_STRING);
    }
    s->version = version;
    send_connack(s, version, &connack);
    mqtt_session_close(s);
    return -1;
}

/* Rejects a CONNECT from an address blocked after too many failed
 * authentications, without checking its credential. MQTT 3.1.1 has no
 * return code for this, so a 3.1.1 client sees the connection close
 * without CONNACK. */
static int reject_blocked(mqtt_session_t *s, int version)
{
    if (version == MQTT_V5)
        return reject(s, version, MQTT_RC_CONNECTION_RATE_EXCEEDED,
                      "auth_blocked",
                      "too_many_auth_failures: too many failed "
                      "authentications from this address; retry later");
    mqtt_metrics_auth_failure("auth_blocked");
    log_write_limited("mqtt_connect_rejected", 10, LOG_LEVEL_INFO,
                      "mqtt connection rejected",
                      "conn=%llu peer=%s reason=auth_blocked",
                      (unsigned long long)s->id, s->peer);
    mqtt_session_close(s);
    return -1;
}

/* Rejects a CONNECT on a connection that its listener accepted over
 * limits.connection_rate_per_address: CONNACK 0x9F in 5.0, a close
 * without CONNACK in 3.1.1, which has no such return code. */
static int reject_connection_rate(mqtt_session_t *s, int version)
{
    if (version == MQTT_V5)
        return reject(s, version, s->connect_reject, "connection_rate",
                      "connection_rate_exceeded: too many new connections "
                      "from this address; retry later");
    mqtt_metrics_auth_failure("connection_rate");
    mqtt_session_close(s);
    return -1;
}

/* Counts the session against limits.max_connections_per_device. A CONNECT
 * that takes over the device's session with the same client id always
 * passes, as the MQTT specification requires; it is counted anyway, and
 * the count drops when the old session ends. Returns 0 or ING_EQUOTA. */
static int count_device_connection(mqtt_session_t *s)
{
    pipeline_t *p = pipeline_loop_pipeline(s->listener->pl);

    if (pipeline_config(p)->limits.max_connections_per_device == 0)
        return 0;
    if (pipeline_device_connect(p, &s->device) != 0) {
        if (!mqtt_table_owned(s->client_id, s->device.id)) {
            pipeline_count_rejected("mqtt", "device_connection_limit");
            return ING_EQUOTA;
        }
        limits_device_connect(pipeline_limits(p), s->device.id, UINT64_MAX,
                              limits_now_ms());
    }
    s->device_counted = 1;
    return 0;
}

/* Rejects a CONNECT that failed to decode. */
static int reject_malformed(mqtt_session_t *s, const mqtt_connect_t *c,
                            int code)
{
    int v311;

    mqtt_metrics_malformed(mqtt_metrics_error_label(code));
    log_write_limited("mqtt_malformed", 10, LOG_LEVEL_INFO,
                      "mqtt CONNECT rejected",
                      "conn=%llu peer=%s version=%d error=\"%s\"",
                      (unsigned long long)s->id, s->peer, c->version,
                      mqtt_strerror(code));
    if (c->version == MQTT_V5) {
        mqtt_connack_t connack = {.reason_code = mqtt_error_reason(code)};
        s->version = MQTT_V5;
        send_connack(s, MQTT_V5, &connack);
    } else if (c->version != 0 &&
               (v311 = mqtt_error_connack_v311(code)) >= 0) {
        mqtt_connack_t connack = {.reason_code = (uint8_t)v311};
        /* The code is already a 3.1.1 return code. */
        uint8_t *buf = malloc(CONNACK_CAP);
        int n = buf ? mqtt_encode_connack(buf, CONNACK_CAP, MQTT_V311,
                                          &connack, 0)
                    : 0;
        if (n > 0 && n <= CONNACK_CAP)
            mqtt_session_send(s, buf, (size_t)n);
        else
            free(buf);
    }
    mqtt_session_close(s);
    return -1;
}

/* Picks the client id: the client's, or a new one when it sent none. */
static int choose_client_id(mqtt_session_t *s, const mqtt_connect_t *c,
                            int *assigned)
{
    char uuid[UUID_STR_LEN];

    *assigned = 0;
    if (c->client_id.len > MQTT_CLIENT_ID_MAX)
        return ING_EINVAL;
    if (c->client_id.len > 0) {
        memcpy(s->client_id, c->client_id.data, c->client_id.len);
        s->client_id[c->client_id.len] = '\0';
        return 0;
    }
    /* The codec already rejected an empty 3.1.1 id without clean
     * session, so the id only names a session that ends with it. */
    if (ids_uuid7(uuid) != 0)
        return ING_EIO;
    snprintf(s->client_id, sizeof(s->client_id), "ingestd-%s", uuid);
    *assigned = 1;
    return 0;
}

/* Sets the keep-alive deadline: 1.5 times the interval in use. Returns
 * the interval to announce as Server Keep Alive in 5.0, or -1 to send
 * none. */
static int setup_keepalive(mqtt_session_t *s, const mqtt_connect_t *c)
{
    uint64_t max = s->listener->cfg->mqtt.max_keepalive_s;
    uint64_t ka = c->keep_alive;
    int announce = -1;

    if (c->version == MQTT_V5 && (ka == 0 || ka > max)) {
        ka = max;
        announce = (int)ka;
    }
    s->keepalive_ms = ka * 1500u;
    mqtt_session_arm_keepalive(s);
    return announce;
}

static void fill_limits(mqtt_session_t *s, mqtt_connack_t *connack)
{
    const config_t *cfg = s->listener->cfg;
    mqtt_props_t *p = &connack->props;

    p->receive_maximum = (uint16_t)cfg->mqtt.receive_maximum;
    mqtt_props_set(p, MQTT_PROP_RECEIVE_MAXIMUM);
    p->retain_available = 0;
    mqtt_props_set(p, MQTT_PROP_RETAIN_AVAILABLE);
    p->maximum_packet_size = (uint32_t)cfg->mqtt.max_packet_size;
    mqtt_props_set(p, MQTT_PROP_MAXIMUM_PACKET_SIZE);
    if (cfg->mqtt.topic_alias_maximum > 0) {
        p->topic_alias_maximum = (uint16_t)cfg->mqtt.topic_alias_maximum;
        mqtt_props_set(p, MQTT_PROP_TOPIC_ALIAS_MAXIMUM);
    }
    p->subscription_id_available = 0;
    mqtt_props_set(p, MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE);
    p->shared_sub_available = 0;
    mqtt_props_set(p, MQTT_PROP_SHARED_SUB_AVAILABLE);
}

/* Returns the session expiry granted. A 5.0 client requests one with a
 * property, and 3.1.1 with clean session 0 gets mqtt.max_session_expiry. */
static uint32_t granted_expiry(const mqtt_session_t *s,
                               const mqtt_connect_t *c, int *capped)
{
    uint64_t max = s->listener->cfg->mqtt.max_session_expiry_s;
    uint64_t requested;

    *capped = 0;
    if (c->version == MQTT_V5)
        requested = mqtt_props_has(&c->props, MQTT_PROP_SESSION_EXPIRY)
                    ? c->props.session_expiry
                    : 0;
    else
        requested = c->clean_start ? 0 : max;
    if (requested > max) {
        requested = max;
        *capped = 1;
    }
    return (uint32_t)requested;
}

int mqtt_session_on_connect(mqtt_session_t *s, const mqtt_frame_t *frame)
{
    mqtt_connect_t c;
    mqtt_connack_t connack = {0};
    auth_outcome_t auth = {0};
    bool present = false;
    int assigned, capped, announce, rc;
    uint32_t expiry;

    if (frame->type != MQTT_CONNECT) {
        mqtt_metrics_malformed("first_packet_not_connect");
        log_write_limited("mqtt_malformed", 10, LOG_LEVEL_INFO,
                          "mqtt connection closed: first packet is not "
                          "CONNECT",
                          "conn=%llu peer=%s type=%u",
                          (unsigned long long)s->id, s->peer, frame->type);
        mqtt_session_close(s);
        return -1;
    }
    memset(&c, 0, sizeof(c));
    rc = mqtt_decode_connect(frame, &c);
    if (rc != 0)
        return reject_malformed(s, &c, rc);
    if (c.version == MQTT_V5 &&
        mqtt_props_has(&c.props, MQTT_PROP_MAXIMUM_PACKET_SIZE))
        s->client_max_packet = c.props.maximum_packet_size;
    if (choose_client_id(s, &c, &assigned) != 0)
        return reject(s, c.version, MQTT_RC_CLIENT_ID_NOT_VALID,
                      "client_id_invalid", "client identifier too long");
    if (s->draining || s->listener->draining)
        return reject(s, c.version, MQTT_RC_SERVER_SHUTTING_DOWN,
                      "shutting_down", "server shutting down");
    if (s->connect_reject != 0)
        return reject_connection_rate(s, c.version);
    if (auth_guard_check_peer(s->listener->auth, s->peer) > 0)
        return reject_blocked(s, c.version);
    if (authenticate(s, &c, &auth) != AUTH_STEP_ACCEPT) {
        char text[200];

        if (auth.reason == MQTT_RC_BAD_USERNAME_OR_PASSWORD)
            auth_guard_failed_peer(s->listener->auth, s->peer);
        if (auth.why.reason != NULL)
            snprintf(text, sizeof(text), "%s: %s", auth.why.reason,
                     auth.why.detail);
        else
            snprintf(text, sizeof(text), "authentication failed");
        return reject(s, c.version, auth.reason, auth.metric, text);
    }
    s->device = auth.dev;
    s->auth_expires_at = auth.expires_at;
    if (count_device_connection(s) != 0)
        return reject(s, c.version, MQTT_RC_QUOTA_EXCEEDED,
                      "device_connection_limit",
                      "too many connections of this device; close one or "
                      "reuse its client identifier");
    expiry = granted_expiry(s, &c, &capped);
    rc = mqtt_table_attach(s, c.clean_start || assigned, expiry, &s->state,
                           &present);
    if (rc == ING_EEXIST)
        return reject(s, c.version, MQTT_RC_CLIENT_ID_NOT_VALID,
                      "client_id_in_use",
                      "client identifier in use by another device");
    if (rc != 0)
        return reject(s, c.version, MQTT_RC_SERVER_UNAVAILABLE,
                      "server_error", NULL);

    s->version = c.version;
    s->session_expiry = expiry;
    s->phase = MQTT_PHASE_ACTIVE;
    connack.session_present = present;
    announce = setup_keepalive(s, &c);
    if (c.version == MQTT_V5) {
        fill_limits(s, &connack);
        if (announce >= 0) {
            connack.props.server_keep_alive = (uint16_t)announce;
            mqtt_props_set(&connack.props, MQTT_PROP_SERVER_KEEP_ALIVE);
        }
        if (capped) {
            connack.props.session_expiry = expiry;
            mqtt_props_set(&connack.props, MQTT_PROP_SESSION_EXPIRY);
        }
        if (assigned) {
            connack.props.assigned_client_id.data =
                (const uint8_t *)s->client_id;
            connack.props.assigned_client_id.len = strlen(s->client_id);
            mqtt_props_set(&connack.props, MQTT_PROP_ASSIGNED_CLIENT_ID);
        }
    }
    send_connack(s, c.version, &connack);
    log_info("mqtt client connected",
             "conn=%llu client=%s device=%s peer=%s version=%s "
             "session_present=%d keepalive=%u will=%d",
             (unsigned long long)s->id, s->client_id, s->device.id, s->peer,
             c.version == MQTT_V5 ? "5.0" : "3.1.1", present ? 1 : 0,
             (unsigned)c.keep_alive, c.will ? 1 : 0);
    return 0;
}
