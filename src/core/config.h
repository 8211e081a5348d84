/* The service configuration, loaded from one YAML file.
 *
 * Every directive is described once in a table in config.c (name, type,
 * bounds, default). Loading stops at the first unknown key or bad value with
 * an error that names the file, line, directive and the expected value.
 * Durations are written with a unit (250ms, 10s, 5m, 24h) and sizes with a
 * binary unit (512KiB, 64MiB, 1GiB) or as plain bytes.
 */
#ifndef INGESTD_CORE_CONFIG_H
#define INGESTD_CORE_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

enum spool_durability {
    SPOOL_DURABILITY_FSYNC = 0, /* ack after fdatasync (default) */
    SPOOL_DURABILITY_NONE = 1,  /* ack after write(2): lossy on power loss */
};

/* Whether the TLS listeners ask for a client certificate. */
enum config_tls_client_auth {
    CONFIG_TLS_CLIENT_AUTH_NONE = 0,     /* never asked for */
    CONFIG_TLS_CLIENT_AUTH_OPTIONAL = 1, /* verified when the client sends one */
    CONFIG_TLS_CLIENT_AUTH_REQUIRED = 2, /* the handshake fails without one */
};

/* Where the device id comes from in a client certificate. */
enum config_tls_identity {
    CONFIG_TLS_IDENTITY_CN = 0,      /* the subject's common name */
    CONFIG_TLS_IDENTITY_SAN_URI = 1, /* a URI subject alternative name */
    CONFIG_TLS_IDENTITY_SAN_DNS = 2, /* a DNS subject alternative name */
};

/* Flow-control limits of a device type, or of one device in the registry.
 * 0 means unlimited. See docs/flow-control.md. */
typedef struct config_limits {
    uint64_t readings_per_second; /* refill rate of the readings bucket */
    uint64_t burst;               /* its capacity; 0 = readings_per_second */
    uint64_t bytes_per_second;    /* stored record bytes; one second's burst */
    uint64_t daily_readings;      /* per UTC day */
} config_limits_t;

typedef struct config_device_type {
    char *name;
    /* Path of the JSON Schema file, resolved against the config file's folder,
     * or NULL when the schema was given inline. */
    char *schema_path;
    json_t *schema; /* the loaded schema document, owned */
    config_limits_t limits;
} config_device_type_t;

enum config_sink_kind {
    CONFIG_SINK_FILE = 0,
    CONFIG_SINK_KAFKA = 1,
    CONFIG_SINK_REDIS = 2,
    CONFIG_SINK_RABBITMQ = 3,
    CONFIG_SINK_NATS = 4,
    CONFIG_SINK_MQTT = 5,
};

enum config_redis_mode {
    CONFIG_REDIS_STREAM = 0, /* XADD to a stream */
    CONFIG_REDIS_PUBSUB = 1, /* PUBLISH to a channel: fire and forget */
};

enum config_compression {
    CONFIG_COMPRESSION_NONE = 0,
    CONFIG_COMPRESSION_GZIP = 1,
    CONFIG_COMPRESSION_SNAPPY = 2,
    CONFIG_COMPRESSION_LZ4 = 3,
    CONFIG_COMPRESSION_ZSTD = 4,
};

/* One entry of the sinks sequence. Keys that do not apply to the sink's
 * type keep their defaults and are ignored. See docs/sinks.md. */
typedef struct config_sink {
    char *name; /* unique, names the sink's cursor and its metrics */
    enum config_sink_kind kind;
    uint64_t batch_records; /* records read from the spool per batch */
    uint64_t timeout_ms;    /* wait for the broker's acks of one batch */
    uint64_t retry_min_ms;  /* backoff after a failed batch, doubling */
    uint64_t retry_max_ms;
    char *dead_letter; /* default <data_dir>/dead-letter/<name>.ndjson */

    char *path;           /* file sink: output folder */
    uint64_t rotate_size; /* file sink: start a new file past this size */
    int fsync;            /* file sink: fsync output before committing */

    /* Broker address; the default depends on the type (kafka: a comma
     * list of bootstrap servers, nats: a nats:// URL, others host:port). */
    char *address;
    /* Template of the Kafka topic, Redis key or channel, RabbitMQ routing
     * key, NATS subject or MQTT topic, with {device_id}, {device_type} and
     * {protocol}. The default depends on the type. */
    char *topic;
    char *exchange; /* rabbitmq: exchange template, default "telemetry" */
    char *vhost;    /* rabbitmq: default "/" */
    enum config_redis_mode mode; /* redis */
    uint64_t maxlen;             /* redis stream: XADD MAXLEN ~ N, 0 = none */
    char *username;              /* NULL for none */
    char *password;      /* NULL for none; from password or password_file */
    char *password_file; /* read into password at load */
    int tls;
    char *tls_ca_file;
    char *tls_cert_file;
    char *tls_key_file;
    enum config_compression compression; /* kafka */
    uint64_t linger_ms;                  /* kafka */
    char *kafka_properties; /* "k=v,k=v" passed to librdkafka, or NULL */
    int qos;                /* mqtt: 0 or 1 */
    char *client_id;        /* mqtt: default "ingestd-<name>" */
    /* nats: JetStream stream to create if missing, capturing the subjects,
     * or NULL when the stream must exist. */
    char *stream;
} config_sink_t;

/* A connection to an existing MQTT broker that ingestd subscribes to, as a
 * client, to ingest what devices publish there (see docs/bridge.md). */
typedef struct config_bridge {
    char *name;      /* unique, names the bridge in metrics and logs */
    char *host;      /* broker host name or address */
    int port;
    char *client_id; /* default "ingestd-<name>"; stable for the session */
    char *username;  /* NULL for none */
    char *password;  /* NULL for none; from password or password_file */
    char *password_file;
    /* Topic templates, each with one {device_id} level, such as
     * "devices/{device_id}/data". Parsed from a comma-separated list. */
    char **topics;
    size_t topic_count;
    char *shared_group; /* NULL subscribes without $share/GROUP/ */
    int qos;            /* 0 or 1 */
    uint64_t keepalive_s;
    uint64_t reconnect_min_ms;
    uint64_t reconnect_max_ms;
    uint64_t session_expiry_s;
    char *tls_ca_file; /* TLS is on when any tls_ file is set */
    char *tls_cert_file;
    char *tls_key_file;
    char *feedback_topic; /* template for validation errors; NULL for off */
    char *topics_text;    /* the topics value as written, for messages */
} config_bridge_t;

typedef struct config {
    char *path; /* the file this was loaded from */
    char *dir;  /* its folder, against which relative paths resolve */

    int log_level; /* enum log_level */

    char *data_dir; /* spool and sink cursors live under it */

    struct {
        char *path;                  /* SQLite file */
        uint64_t key_grace_ms;       /* old key's life after rotate-key */
        uint64_t reload_interval_ms; /* poll for changes; 0 = SIGHUP only */
    } registry;

    struct {
        uint64_t leeway_ms;       /* clock skew allowed on exp, nbf, iat */
        uint64_t max_lifetime_ms; /* cap on exp - iat, or exp - now */
        char *audience;           /* required aud, or NULL: not checked */
        char *issuer;             /* required iss, or NULL: not checked */
    } jwt;

    struct {
        /* Failed authentications from one address within a minute before
         * it is blocked; 0 turns the limit off. */
        uint64_t max_failures_per_minute;
        uint64_t block_duration_ms;
        uint64_t guard_table_size; /* addresses tracked per instance */
    } auth;

    struct {
        char *listen; /* host:port */
        int workers;  /* 0 = one per core */
        uint64_t max_header_bytes;
        uint64_t max_body_bytes;
        uint64_t max_readings_per_request;
        uint64_t header_timeout_ms; /* time to receive a request's headers */
        uint64_t body_timeout_ms;   /* time to receive a request's body */
        uint64_t idle_timeout_ms;   /* keep-alive connection with no request */
        uint64_t max_connections;   /* per listener, across workers */
        uint64_t retry_after_s;     /* Retry-After of 503 responses */
    } http;

    struct {
        char *listen; /* host:port, or NULL when the file sets "" */
    } admin;

    struct {
        uint64_t max_message_size; /* one WebSocket message, reassembled */
        uint64_t max_fragments;    /* frames of one message; more: 1009 */
        uint64_t idle_timeout_ms;  /* no frame at all for this long: close */
        uint64_t ping_interval_ms; /* server pings an idle connection */
        uint64_t auth_timeout_ms;  /* first-message authentication window */
    } ws;

    struct {
        char *listen; /* host:port, or NULL when the file sets "" */
        uint64_t max_packet_size;
        uint64_t connect_timeout_ms; /* TCP accept to CONNECT */
        uint64_t receive_maximum;    /* QoS 1 and 2 in flight per client */
        uint64_t topic_alias_maximum;
        uint64_t max_session_expiry_s; /* cap on a client's request */
        uint64_t max_keepalive_s;      /* cap, sent as Server Keep Alive */
        uint64_t max_connections;      /* per listener, across workers */
        uint64_t max_subscriptions;    /* feedback filters per session */
        /* Comma-separated topic templates, each with one {device_id}
         * level, such as "devices/{device_id}/data". */
        char *topics;
    } mqtt;

    /* TLS of the https and mqtts listeners (see docs/tls.md). */
    struct {
        char *cert_file; /* PEM chain, the server certificate first */
        char *key_file;  /* PEM private key of that certificate */
        char *ca_file;   /* PEM bundle of CAs that sign client certificates */
        char *crl_file;  /* PEM CRL of that CA, or NULL */
        int client_auth; /* enum config_tls_client_auth */
        int identity;    /* enum config_tls_identity */
    } tls;

    struct {
        char *listen; /* host:port, or NULL (the default) for off */
    } https;

    struct {
        char *listen; /* host:port, or NULL (the default) for off */
    } mqtts;

    struct {
        enum spool_durability durability;
        uint64_t segment_size;
        uint64_t max_size; /* 503 past this many bytes on disk */
        /* Percent of max_size: past high_mark new readings are turned
         * away until the spool shrinks below low_mark. */
        uint64_t high_mark;
        uint64_t low_mark;
    } spool;

    /* Connection limits of the instance (docs/flow-control.md); 0 means
     * unlimited. */
    struct {
        uint64_t max_connections; /* every device listener together */
        uint64_t max_connections_per_device; /* MQTT and WebSocket */
        uint64_t connection_rate_per_address; /* new per second */
        uint64_t connection_burst_per_address; /* 0 = the rate */
        uint64_t table_size; /* devices and addresses tracked, each */
        /* Arrays and objects nested in one reading, the reading's own
         * object counting as 1. Not a connection limit, but consumers
         * such as Python's json module fail on deep nesting. */
        uint64_t max_json_depth;
    } limits;

    /* Idempotent ingest: repeats of a key are answered with the original
     * message ids instead of being stored again (docs/idempotency.md). */
    struct {
        int enabled;
        char *field; /* reading field holding a per-reading key, or NULL */
        uint64_t window_ms; /* how long an accepted key is remembered */
        uint64_t max_keys;  /* past this, the oldest keys are evicted */
        char *mqtt_user_property; /* MQTT 5 user property name, or NULL */
    } idempotency;

    uint64_t shutdown_timeout_ms; /* drain time on SIGTERM */
    /* After the listeners stopped, sinks keep delivering for up to this
     * long, so a clean stop with healthy destinations empties the spool. */
    uint64_t sinks_drain_timeout_ms;

    char *default_device_type;
    config_device_type_t *device_types;
    size_t device_type_count;

    config_sink_t *sinks;
    size_t sink_count;

    config_bridge_t *bridges;
    size_t bridge_count;
} config_t;

/* Loads and checks `path`. On success stores a new config in `*out` and
 * returns 0. On failure returns ING_ECONFIG (or ING_ENOMEM) and writes a
 * message such as "config/ingestd.yaml:12: http.max_body_bytes: expected a
 * size such as 1MiB, got \"lots\"" into `err`. */
int config_load(const char *path, config_t **out, char *err, size_t errlen);

/* Finds a device type by name. Returns NULL when there is none. */
const config_device_type_t *config_device_type(const config_t *cfg,
                                               const char *name);

/* Frees `cfg` and everything it owns, schemas included. Accepts NULL. */
void config_free(config_t *cfg);

/* Parsers shared with the command line. Each returns 0 or ING_EINVAL. */
int config_parse_duration_ms(const char *s, uint64_t *out);
int config_parse_size(const char *s, uint64_t *out);

#endif
