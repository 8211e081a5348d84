/* The RabbitMQ sink: publishes each record to an exchange over AMQP 0-9-1,
 * through librabbitmq, with publisher confirms.
 *
 * A batch is published on one channel in confirm mode. The sink then waits,
 * up to the sink's timeout, until the broker confirmed every delivery tag.
 * A basic.ack means RabbitMQ took responsibility for the message, which for
 * a persistent message in a durable queue means it is on disk. A
 * basic.nack means it did not, so the record is sent again.
 *
 * Messages are published with the mandatory flag, so a message that no
 * queue is bound to receive comes back as basic.return before its ack. It
 * is dead-lettered, because nothing would ever read it. When the wait times
 * out or the connection fails, every record not yet confirmed is retried on
 * a new connection.
 *
 * Each exchange is declared as a durable topic exchange the first time a
 * connection publishes to it, so that a fresh broker works without setup.
 * An exchange that already exists with another type is used as it is.
 * Queues and bindings are the operator's: see docs/sinks.md.
 */
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

#include <amqp.h>
#include <amqp_framing.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <openssl/ssl.h>

#include "core/errors.h"
#include "core/log.h"
#include "sinks/sink.h"
#include "sinks/sinks_internal.h"
#include "sinks/template.h"

/* AMQP carries exchange names and routing keys as short strings. */
#define NAME_MAX_BYTES 255
#define CHANNEL 1
/* Exchanges remembered as declared per connection. Past this many (a
 * template with {device_id} and many devices) the list starts over, and
 * declaring again is harmless. */
#define DECLARED_MAX 1024

/* One record of the batch being delivered. */
typedef struct pending {
    sink_envelope_t env;
    char exchange[NAME_MAX_BYTES + 1];
    char routing_key[NAME_MAX_BYTES + 1];
    int published;
    int settled;
    /* Set when the broker returned the message as unroutable. Its ack
     * follows the return. */
    int returned;
} pending_t;

/* A basic.return being read: the method, then a content header, then
 * body frames that are skipped. */
typedef struct return_state {
    int active;
    uint64_t body_left;
} return_state_t;

typedef struct rabbitmq_sink {
    sink_ctx_t *ctx;
    char *host;
    int port;
    char *vhost;
    char *username;
    char *password;
    int tls;
    char *tls_ca_file;
    char *tls_cert_file;
    char *tls_key_file;
    sink_template_t *exchange;
    sink_template_t *topic;
    uint64_t timeout_ms;
    amqp_connection_state_t conn; /* NULL while disconnected */
    uint64_t next_tag;            /* delivery tag of the next publish */
    char **declared;              /* exchanges declared on this connection */
    size_t declared_count;
    pending_t *batch;
    size_t batch_cap;
    size_t *by_tag; /* batch index of delivery tag first_tag + k */
    uint64_t first_tag;
    size_t published;
    return_state_t ret;
} rabbitmq_sink_t;

static void forget_declared(rabbitmq_sink_t *r)
{
    for (size_t i = 0; i < r->declared_count; i++)
        free(r->declared[i]);
    r->declared_count = 0;
}

static void disconnect(rabbitmq_sink_t *r)
{
    if (r->conn != NULL)
        amqp_destroy_connection(r->conn);
    r->conn = NULL;
    forget_declared(r);
    sink_set_connected(r->ctx, false);
}

static void rabbitmq_close(void *state)
{
    rabbitmq_sink_t *r = state;

    if (r == NULL)
        return;
    if (r->conn != NULL) {
        /* A clean close lets the broker drop the connection at once
         * instead of logging it as lost. Both calls are bounded by the
         * RPC timeout. */
        amqp_channel_close(r->conn, CHANNEL, AMQP_REPLY_SUCCESS);
        amqp_connection_close(r->conn, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(r->conn);
        r->conn = NULL;
    }
    forget_declared(r);
    free(r->declared);
    if (r->password != NULL)
        explicit_bzero(r->password, strlen(r->password));
    free(r->password);
    free(r->username);
    free(r->vhost);
    free(r->host);
    free(r->tls_ca_file);
    free(r->tls_cert_file);
    free(r->tls_key_file);
    free(r->batch);
    free(r->by_tag);
    sink_template_free(r->exchange);
    sink_template_free(r->topic);
    free(r);
}

/* Splits "host:port" or "[v6]:port", which config_load checked. */
static int split_address(const char *address, rabbitmq_sink_t *r)
{
    const char *colon = strrchr(address, ':');
    const char *host = address;
    size_t host_len;

    if (colon == NULL)
        return ING_EINVAL;
    host_len = (size_t)(colon - address);
    if (host_len >= 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host++;
        host_len -= 2;
    }
    r->host = strndup(host, host_len);
    r->port = atoi(colon + 1);
    if (r->host == NULL)
        return ING_ENOMEM;
    return r->port > 0 && r->port <= 65535 ? 0 : ING_EINVAL;
}

/* Returns 1 when `host` names this machine's loopback interface. */
static int is_loopback(const char *host)
{
    return strcmp(host, "localhost") == 0 || strcmp(host, "::1") == 0 ||
           strncmp(host, "127.", 4) == 0;
}

static int copy_string(char **dst, const char *src)
{
    if (src == NULL)
        return 0;
    *dst = strdup(src);
    return *dst != NULL ? 0 : ING_ENOMEM;
}

/* Sets the credentials. RabbitMQ's built-in guest user may only log in
 * from loopback, so guest/guest is the default only for a broker on
 * loopback. A remote broker needs a username. */
static int set_credentials(const config_sink_t *cfg, rabbitmq_sink_t *r,
                           char *err, size_t errlen)
{
    if (cfg->username == NULL && !is_loopback(r->host)) {
        snprintf(err, errlen,
                 "sink %s: set username and password; RabbitMQ's guest "
                 "user may only log in from loopback",
                 cfg->name);
        return ING_ECONFIG;
    }
    if (copy_string(&r->username, cfg->username ? cfg->username : "guest") <
            0 ||
        copy_string(&r->password,
                    cfg->password   ? cfg->password
                    : cfg->username ? ""
                                    : "guest") < 0)
        return ING_ENOMEM;
    return 0;
}

static int rabbitmq_open(const config_sink_t *cfg, sink_ctx_t *ctx,
                         void **state, char *err, size_t errlen)
{
    rabbitmq_sink_t *r = calloc(1, sizeof(*r));
    int rc;

    if (r == NULL)
        goto nomem;
    r->ctx = ctx;
    r->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : 30000;
    r->tls = cfg->tls;
    rc = split_address(cfg->address ? cfg->address : "", r);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0) {
        snprintf(err, errlen, "sink %s: invalid address \"%s\"", cfg->name,
                 cfg->address ? cfg->address : "");
        goto config_error;
    }
    rc = set_credentials(cfg, r, err, errlen);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0)
        goto config_error;
    if (copy_string(&r->vhost, cfg->vhost ? cfg->vhost : "/") < 0 ||
        copy_string(&r->tls_ca_file, cfg->tls_ca_file) < 0 ||
        copy_string(&r->tls_cert_file, cfg->tls_cert_file) < 0 ||
        copy_string(&r->tls_key_file, cfg->tls_key_file) < 0)
        goto nomem;
    /* config_load checks templates, so only a caller that built the config
     * by hand gets a compile error here. */
    rc = sink_template_compile(cfg->topic ? cfg->topic : "", &r->topic, err,
                               errlen);
    if (rc == 0)
        rc = sink_template_compile(cfg->exchange ? cfg->exchange
                                                 : "telemetry",
                                   &r->exchange, err, errlen);
    if (rc == ING_ENOMEM)
        goto nomem;
    if (rc < 0)
        goto config_error;
    r->declared = calloc(DECLARED_MAX, sizeof(*r->declared));
    if (r->declared == NULL)
        goto nomem;
    /* Connecting waits for the first batch: an unreachable broker must not
     * stop ingestd from starting. */
    *state = r;
    return 0;

config_error:
    rabbitmq_close(r);
    return ING_ECONFIG;

nomem:
    rabbitmq_close(r);
    snprintf(err, errlen, "out of memory");
    return ING_ENOMEM;
}

static void log_connection_error(rabbitmq_sink_t *r, const char *msg,
                                 const char *detail)
{
    char ebuf[256];

    log_write_limited("sink_rabbitmq_connection", 5, LOG_LEVEL_WARN, msg,
                      "sink=%s host=%s port=%d error=%s",
                      sink_log_name(r->ctx), r->host, r->port,
                      log_quote(ebuf, sizeof(ebuf), detail));
}

/* Describes a failed RPC reply, such as "server closed the channel: 404
 * NOT_FOUND - no exchange 'x' in vhost '/'". */
static const char *describe_reply(amqp_rpc_reply_t reply, char *buf,
                                  size_t size)
{
    const amqp_connection_close_t *cc;
    const amqp_channel_close_t *ch;

    switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf(buf, size, "no error");
        break;
    case AMQP_RESPONSE_NONE:
        snprintf(buf, size, "no reply");
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(buf, size, "%s", amqp_error_string2(reply.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            cc = reply.reply.decoded;
            snprintf(buf, size, "server closed the connection: %u %.*s",
                     cc->reply_code, (int)cc->reply_text.len,
                     (const char *)cc->reply_text.bytes);
        } else if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            ch = reply.reply.decoded;
            snprintf(buf, size, "server closed the channel: %u %.*s",
                     ch->reply_code, (int)ch->reply_text.len,
                     (const char *)ch->reply_text.bytes);
        } else {
            snprintf(buf, size, "server error, method 0x%08" PRIx32,
                     reply.reply.id);
        }
        break;
    }
    return buf;
}

/* Opens channel 1 in confirm mode, where delivery tags start again at 1. */
static int open_channel(rabbitmq_sink_t *r)
{
    char buf[300];

    amqp_channel_open(r->conn, CHANNEL);
    if (amqp_get_rpc_reply(r->conn).reply_type == AMQP_RESPONSE_NORMAL)
        amqp_confirm_select(r->conn, CHANNEL);
    if (amqp_get_rpc_reply(r->conn).reply_type != AMQP_RESPONSE_NORMAL) {
        log_connection_error(
            r, "opening a rabbitmq channel in confirm mode failed",
            describe_reply(amqp_get_rpc_reply(r->conn), buf, sizeof(buf)));
        return ING_EIO;
    }
    r->next_tag = 1;
    return 0;
}

/* Sets up TLS with the configured CA, or the system's CAs without one.
 * librabbitmq checks the broker's certificate and host name by default.
 * NOTE: no test runs a TLS broker yet, so this path has not been run. */
static amqp_socket_t *new_tls_socket(rabbitmq_sink_t *r)
{
    amqp_socket_t *sock = amqp_ssl_socket_new(r->conn);
    int status;

    if (sock == NULL) {
        log_connection_error(r, "creating a TLS socket failed",
                             "out of memory");
        return NULL;
    }
    if (r->tls_ca_file != NULL)
        status = amqp_ssl_socket_set_cacert(sock, r->tls_ca_file);
    else
        status = SSL_CTX_set_default_verify_paths(
                     amqp_ssl_socket_get_context(sock)) == 1
                     ? AMQP_STATUS_OK
                     : AMQP_STATUS_SSL_ERROR;
    if (status == AMQP_STATUS_OK && r->tls_cert_file != NULL)
        status = amqp_ssl_socket_set_key(sock, r->tls_cert_file,
                                         r->tls_key_file);
    if (status != AMQP_STATUS_OK) {
        log_connection_error(r, "loading the TLS CA, certificate or key "
                                "failed",
                             amqp_error_string2(status));
        return NULL;
    }
    return sock;
}

static int connect_rabbitmq(rabbitmq_sink_t *r)
{
    struct timeval tv = {
        .tv_sec = (time_t)(r->timeout_ms / 1000),
        .tv_usec = (suseconds_t)(r->timeout_ms % 1000) * 1000,
    };
    amqp_socket_t *sock;
    amqp_rpc_reply_t reply;
    char buf[300];
    int status;
    int on = 1;

    r->conn = amqp_new_connection();
    if (r->conn == NULL) {
        log_connection_error(r, "connecting to rabbitmq failed",
                             "out of memory");
        return ING_ENOMEM;
    }
    sock = r->tls ? new_tls_socket(r) : amqp_tcp_socket_new(r->conn);
    if (sock == NULL)
        goto error;
    /* Bounds the login and every RPC (channel, confirm mode, declares). */
    amqp_set_handshake_timeout(r->conn, &tv);
    amqp_set_rpc_timeout(r->conn, &tv);
    status = amqp_socket_open_noblock(sock, r->host, r->port, &tv);
    if (status != AMQP_STATUS_OK) {
        log_connection_error(r, "connecting to rabbitmq failed",
                             amqp_error_string2(status));
        goto error;
    }
    /* Heartbeats are off, because librabbitmq sends them only inside its
     * own calls and the broker would drop an idle sink. The confirm timeout
     * detects a dead broker during a batch, and TCP keepalive between
     * batches. */
    setsockopt(amqp_get_sockfd(r->conn), SOL_SOCKET, SO_KEEPALIVE, &on,
               sizeof(on));
    reply = amqp_login(r->conn, r->vhost, 0, AMQP_DEFAULT_FRAME_SIZE, 0,
                       AMQP_SASL_METHOD_PLAIN, r->username, r->password);
    if (reply.reply_type != AMQP_RESPONSE_NORMAL) {
        log_connection_error(r,
                             "rabbitmq login failed; check vhost, username "
                             "and password",
                             describe_reply(reply, buf, sizeof(buf)));
        goto error;
    }
    if (open_channel(r) < 0)
        goto error;
    sink_set_connected(r->ctx, true);
    return 0;

error:
    amqp_destroy_connection(r->conn);
    r->conn = NULL;
    return ING_EIO;
}

/* Sends channel.close-ok for the broker's channel.close, which the
 * protocol requires before the channel can be opened again. */
static int close_ok_channel(rabbitmq_sink_t *r)
{
    amqp_channel_close_ok_t ok = {0};

    return amqp_send_method(r->conn, CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD,
                            &ok) == AMQP_STATUS_OK
               ? 0
               : ING_EIO;
}

static int remember_declared(rabbitmq_sink_t *r, const char *name)
{
    if (r->declared_count == DECLARED_MAX)
        forget_declared(r);
    r->declared[r->declared_count] = strdup(name);
    if (r->declared[r->declared_count] == NULL)
        return ING_ENOMEM;
    r->declared_count++;
    return 0;
}

/* Declares exchange `name` (passive: only checks that it exists). Returns
 * 0, the AMQP reply code when the broker closed the channel (the channel
 * is open again), or ING_EIO when the connection failed. */
static int declare_exchange(rabbitmq_sink_t *r, const char *name,
                            int passive)
{
    amqp_rpc_reply_t reply;
    char buf[300];
    int code;

    amqp_exchange_declare(r->conn, CHANNEL, amqp_cstring_bytes(name),
                          amqp_cstring_bytes("topic"), passive, 1, 0, 0,
                          amqp_empty_table);
    reply = amqp_get_rpc_reply(r->conn);
    if (reply.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    describe_reply(reply, buf, sizeof(buf));
    if (reply.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION ||
        reply.reply.id != AMQP_CHANNEL_CLOSE_METHOD) {
        log_connection_error(r, "declaring a rabbitmq exchange failed", buf);
        return ING_EIO;
    }
    code = ((amqp_channel_close_t *)reply.reply.decoded)->reply_code;
    if (close_ok_channel(r) < 0 || open_channel(r) < 0)
        return ING_EIO;
    return code;
}

/* Makes sure exchange `name` exists before publishing to it. The broker's
 * own amq.* exchanges cannot be declared, so they are used as they are. A
 * passive declare checks an exchange that exists with another type or
 * durability (406), or that this user may not configure (403). */
static int ensure_exchange(rabbitmq_sink_t *r, const char *name)
{
    char ebuf[300];
    int rc;

    if (strncmp(name, "amq.", 4) == 0)
        return 0;
    for (size_t i = 0; i < r->declared_count; i++) {
        if (strcmp(r->declared[i], name) == 0)
            return 0;
    }
    rc = declare_exchange(r, name, 0);
    if (rc == AMQP_PRECONDITION_FAILED || rc == AMQP_ACCESS_REFUSED)
        rc = declare_exchange(r, name, 1);
    if (rc == 0)
        return remember_declared(r, name);
    if (rc > 0) {
        log_write_limited("sink_rabbitmq_declare", 5, LOG_LEVEL_WARN,
                          "rabbitmq exchange missing and cannot be "
                          "declared; retrying",
                          "sink=%s exchange=%s code=%d", sink_log_name(r->ctx),
                          log_quote(ebuf, sizeof(ebuf), name), rc);
        return ING_EIO;
    }
    return rc;
}

/* Reads the record's envelope and expands its exchange and routing key.
 * Sets the outcome to REJECTED when the record cannot be routed, and
 * returns 1 when it can. */
static int prepare_record(rabbitmq_sink_t *r, const spool_record_t *rec,
                          pending_t *p, sink_outcome_t *out)
{
    int len;

    if (sink_envelope_parse(rec->data, rec->len, &p->env) < 0) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "the record is not a valid envelope");
        return 0;
    }
    len = sink_template_expand(r->exchange, &p->env, p->exchange,
                               sizeof(p->exchange));
    if (len >= 0)
        len = sink_template_expand(r->topic, &p->env, p->routing_key,
                                   sizeof(p->routing_key));
    if (len == ING_ETOOBIG) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "the exchange or routing key is over 255 bytes");
        return 0;
    }
    if (len < 0) {
        out->status = SINK_RECORD_REJECTED;
        snprintf(out->reason, sizeof(out->reason),
                 "the exchange or routing key template needs an envelope "
                 "field that is empty");
        return 0;
    }
    return 1;
}

static void add_header(amqp_table_entry_t *entries, int *count,
                       const char *key, const char *value)
{
    if (value[0] == '\0')
        return;
    entries[*count].key = amqp_cstring_bytes(key);
    entries[*count].value.kind = AMQP_FIELD_KIND_UTF8;
    entries[*count].value.value.bytes = amqp_cstring_bytes(value);
    (*count)++;
}

/* Publishes one prepared record: persistent, mandatory, JSON, with the
 * message id and the device fields as headers. */
static int publish_record(rabbitmq_sink_t *r, const spool_record_t *rec,
                          const pending_t *p)
{
    amqp_basic_properties_t props = {0};
    amqp_table_entry_t headers[3];
    int header_count = 0;
    int64_t received_ms = sink_parse_received_at(p->env.received_at);
    int status;

    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG |
                   AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_APP_ID_FLAG |
                   AMQP_BASIC_HEADERS_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    props.app_id = amqp_cstring_bytes("ingestd");
    if (p->env.message_id[0] != '\0') {
        props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        props.message_id = amqp_cstring_bytes(p->env.message_id);
    }
    if (received_ms > 0) {
        props._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
        props.timestamp = (uint64_t)received_ms / 1000;
    }
    add_header(headers, &header_count, "device_id", p->env.device_id);
    add_header(headers, &header_count, "device_type", p->env.device_type);
    add_header(headers, &header_count, "protocol", p->env.protocol);
    props.headers.num_entries = header_count;
    props.headers.entries = headers;
    status = amqp_basic_publish(
        r->conn, CHANNEL, amqp_cstring_bytes(p->exchange),
        amqp_cstring_bytes(p->routing_key), 1, 0, &props,
        (amqp_bytes_t){.len = rec->len, .bytes = (void *)rec->data});
    if (status != AMQP_STATUS_OK) {
        log_connection_error(r, "publishing to rabbitmq failed",
                             amqp_error_string2(status));
        return ING_EIO;
    }
    return 0;
}

/* Sets the outcome of the record with delivery tag `tag`, or of every
 * unsettled one up to it when `multiple` is set. */
static void settle_tags(rabbitmq_sink_t *r, uint64_t tag, int multiple,
                        int acked, sink_outcome_t *out, size_t *unsettled)
{
    uint64_t from = multiple ? r->first_tag : tag;

    if (tag < r->first_tag || tag >= r->first_tag + r->published)
        return;
    for (uint64_t t = from; t <= tag; t++) {
        size_t i = r->by_tag[t - r->first_tag];
        pending_t *p = &r->batch[i];

        if (p->settled)
            continue;
        p->settled = 1;
        (*unsettled)--;
        if (!acked) {
            out[i].status = SINK_RECORD_RETRY;
            snprintf(out[i].reason, sizeof(out[i].reason),
                     "rabbitmq refused the message (basic.nack)");
        } else if (p->returned) {
            out[i].status = SINK_RECORD_REJECTED;
            snprintf(out[i].reason, sizeof(out[i].reason),
                     "no queue bound to exchange \"%.60s\" for routing key "
                     "\"%.80s\"",
                     p->exchange, p->routing_key);
        } else {
            out[i].status = SINK_RECORD_OK;
        }
    }
}

/* Marks the unsettled record whose message id the returned message
 * carries. Returned messages are matched by message id because
 * basic.return names no delivery tag. */
static void mark_returned(rabbitmq_sink_t *r, amqp_bytes_t message_id)
{
    for (size_t k = 0; k < r->published; k++) {
        pending_t *p = &r->batch[r->by_tag[k]];

        if (!p->settled && !p->returned &&
            strlen(p->env.message_id) == message_id.len &&
            memcmp(p->env.message_id, message_id.bytes, message_id.len) ==
                0) {
            p->returned = 1;
            return;
        }
    }
}

/* Handles one frame while waiting for confirms. Returns 0, or ING_EIO
 * when the broker closed the channel or the connection. */
static int handle_frame(rabbitmq_sink_t *r, const amqp_frame_t *f,
                        sink_outcome_t *out, size_t *unsettled)
{
    const amqp_basic_properties_t *props;
    char buf[300];

    if (f->frame_type == AMQP_FRAME_HEADER && r->ret.active) {
        props = f->payload.properties.decoded;
        if (props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
            mark_returned(r, props->message_id);
        r->ret.body_left = f->payload.properties.body_size;
        r->ret.active = r->ret.body_left > 0;
        return 0;
    }
    if (f->frame_type == AMQP_FRAME_BODY && r->ret.active) {
        size_t len = f->payload.body_fragment.len;

        r->ret.body_left -= len < r->ret.body_left ? len : r->ret.body_left;
        r->ret.active = r->ret.body_left > 0;
        return 0;
    }
    if (f->frame_type != AMQP_FRAME_METHOD)
        return 0;
    switch (f->payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
        const amqp_basic_ack_t *ack = f->payload.method.decoded;

        settle_tags(r, ack->delivery_tag, ack->multiple, 1, out, unsettled);
        return 0;
    }
    case AMQP_BASIC_NACK_METHOD: {
        const amqp_basic_nack_t *nack = f->payload.method.decoded;

        settle_tags(r, nack->delivery_tag, nack->multiple, 0, out,
                    unsettled);
        return 0;
    }
    case AMQP_BASIC_RETURN_METHOD:
        /* The reply code is 312 NO_ROUTE, because mandatory is the only
         * flag that makes RabbitMQ return a message. */
        r->ret.active = 1;
        return 0;
    case AMQP_CHANNEL_CLOSE_METHOD: {
        const amqp_channel_close_t *cc = f->payload.method.decoded;

        snprintf(buf, sizeof(buf), "%u %.*s", cc->reply_code,
                 (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
        log_connection_error(r, "rabbitmq closed the channel", buf);
        return ING_EIO;
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
        const amqp_connection_close_t *cc = f->payload.method.decoded;

        snprintf(buf, sizeof(buf), "%u %.*s", cc->reply_code,
                 (int)cc->reply_text.len, (const char *)cc->reply_text.bytes);
        log_connection_error(r, "rabbitmq closed the connection", buf);
        return ING_EIO;
    }
    case AMQP_CONNECTION_BLOCKED_METHOD:
        log_write_limited("sink_rabbitmq_blocked", 5, LOG_LEVEL_WARN,
                          "rabbitmq blocked publishing (memory or disk "
                          "alarm)",
                          "sink=%s", sink_log_name(r->ctx));
        return 0;
    default:
        return 0;
    }
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Waits until every published record is confirmed or `deadline_ms`
 * passes. Returns 0 when all are settled, or ING_EIO. Records not settled
 * keep the RETRY outcome that the runner set. */
static int wait_for_confirms(rabbitmq_sink_t *r, uint64_t deadline_ms,
                             sink_outcome_t *out)
{
    size_t unsettled = r->published;
    char detail[64];

    memset(&r->ret, 0, sizeof(r->ret));
    while (unsettled > 0) {
        uint64_t now = now_ms();
        uint64_t left = deadline_ms > now ? deadline_ms - now : 0;
        struct timeval tv = {
            .tv_sec = (time_t)(left / 1000),
            .tv_usec = (suseconds_t)(left % 1000) * 1000,
        };
        amqp_frame_t frame;
        int status;

        if (left == 0) {
            snprintf(detail, sizeof(detail),
                     "%zu of %zu messages unconfirmed after %" PRIu64
                     " ms",
                     unsettled, r->published, r->timeout_ms);
            log_connection_error(r, "rabbitmq did not confirm in time",
                                 detail);
            return ING_EIO;
        }
        status = amqp_simple_wait_frame_noblock(r->conn, &frame, &tv);
        if (status == AMQP_STATUS_TIMEOUT)
            continue;
        if (status != AMQP_STATUS_OK) {
            log_connection_error(r, "rabbitmq connection failed during a "
                                    "batch",
                                 amqp_error_string2(status));
            return ING_EIO;
        }
        if (handle_frame(r, &frame, out, &unsettled) < 0)
            return ING_EIO;
        /* Frees the decoded frame, whose needed fields were copied. */
        amqp_maybe_release_buffers(r->conn);
    }
    return 0;
}

static int reserve_batch(rabbitmq_sink_t *r, size_t n)
{
    pending_t *batch;
    size_t *by_tag;

    if (n <= r->batch_cap)
        return 0;
    batch = realloc(r->batch, n * sizeof(*batch));
    if (batch == NULL)
        return ING_ENOMEM;
    r->batch = batch;
    by_tag = realloc(r->by_tag, n * sizeof(*by_tag));
    if (by_tag == NULL)
        return ING_ENOMEM;
    r->by_tag = by_tag;
    r->batch_cap = n;
    return 0;
}

/* Reads and routes every record and declares the exchanges they need,
 * before anything is published, so that declares do not interleave with
 * confirms. Returns 0 or ING_EIO (connection lost) or ING_ENOMEM. */
static int prepare_batch(rabbitmq_sink_t *r, const spool_record_t *recs,
                         size_t n, sink_outcome_t *out)
{
    int rc;

    for (size_t i = 0; i < n; i++) {
        pending_t *p = &r->batch[i];

        p->published = prepare_record(r, &recs[i], p, &out[i]);
        p->settled = 0;
        p->returned = 0;
        if (p->published && (rc = ensure_exchange(r, p->exchange)) < 0)
            return rc;
    }
    return 0;
}

static int rabbitmq_deliver(void *state, const spool_record_t *recs,
                            size_t n, sink_outcome_t *out)
{
    rabbitmq_sink_t *r = state;
    uint64_t deadline_ms = now_ms() + r->timeout_ms;
    int rc;

    if ((rc = reserve_batch(r, n)) < 0)
        return rc;
    if (r->conn == NULL && (rc = connect_rabbitmq(r)) < 0)
        return rc;
    rc = prepare_batch(r, recs, n, out);
    if (rc < 0)
        goto error;
    r->first_tag = r->next_tag;
    r->published = 0;
    /* NOTE: amqp_basic_publish writes with no deadline, so a broker that
     * stops reading (a memory or disk alarm) holds this loop until the
     * alarm clears. Only the confirm wait is bounded by the timeout. */
    for (size_t i = 0; i < n; i++) {
        if (!r->batch[i].published)
            continue;
        if ((rc = publish_record(r, &recs[i], &r->batch[i])) < 0)
            goto error;
        r->by_tag[r->published++] = i;
        r->next_tag++;
    }
    if (wait_for_confirms(r, deadline_ms, out) < 0) {
        /* Confirms of this batch may still arrive and would be mistaken
         * for the next one's, so the next batch starts a new
         * connection. */
        disconnect(r);
    }
    return 0;

error:
    disconnect(r);
    return rc;
}

const sink_ops_t sink_rabbitmq_ops = {
    .kind = "rabbitmq",
    .open = rabbitmq_open,
    .deliver = rabbitmq_deliver,
    .close = rabbitmq_close,
};
