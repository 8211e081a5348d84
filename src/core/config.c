/* Loading of the YAML configuration file into a config_t.
 *
 * config_yaml.c reads the file into a tree of nodes with line numbers.
 * This file maps that tree onto config_t. Every scalar directive is
 * described once in the `directives` table (name, type, bounds, default).
 * The device_types, sinks and bridges sections have their own parsers
 * because their keys are names chosen by the operator or form a sequence,
 * but the values inside them go through the same table-driven code.
 */
#include "core/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/config_yaml.h"
#include "core/errors.h"
#include "core/log.h"

/* Maximum length of a device type or sink name. Names appear in file
 * names, metric labels and log lines. */
#define NAME_MAX_LEN 64

#define KIB (UINT64_C(1) << 10)
#define MIB (UINT64_C(1) << 20)
#define GIB (UINT64_C(1) << 30)
#define TIB (UINT64_C(1) << 40)

#define MS_PER_S UINT64_C(1000)
#define MS_PER_M (60 * MS_PER_S)
#define MS_PER_H (60 * MS_PER_M)
#define MS_PER_D (24 * MS_PER_H)

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

enum directive_type {
    TYPE_STRING,   /* any non-empty string */
    TYPE_NAME,     /* 1 to NAME_MAX_LEN characters from a-z, 0-9, _ and - */
    TYPE_PATH,     /* resolved against the config file's folder */
    TYPE_BOOL,     /* true or false */
    TYPE_INT,      /* decimal integer within min..max */
    TYPE_DURATION, /* milliseconds, written with a unit */
    TYPE_SECONDS,  /* a duration stored in whole seconds, rounded up */
    TYPE_SIZE,     /* bytes, written with an optional unit */
    TYPE_ENUM,     /* one of `choices`, stored as its index */
    TYPE_LISTEN,   /* host:port with a numeric IPv4 or [IPv6] host */
};

/* The directive accepts "" and stores NULL, which disables the feature. */
#define FLAG_EMPTY_DISABLES 1

/* A directive: where its value goes and what values it accepts. */
typedef struct directive {
    const char *name; /* dotted path, such as "http.max_body_bytes" */
    enum directive_type type;
    size_t offset; /* of the field in the struct the table describes */
    size_t size;   /* of that field: an int, a uint64_t or a char * */
    uint64_t min;  /* bounds in bytes, milliseconds or plain numbers */
    uint64_t max;
    const char *default_value;  /* parsed like text from the file */
    const char *const *choices; /* TYPE_ENUM: names, NULL-terminated */
    int flags;
} directive_t;

static const char *const log_levels[] = {"debug", "info", "warn", "error",
                                         NULL};
static const char *const durabilities[] = {"fsync", "none", NULL};
static const char *const sink_kinds[] = {"file", "kafka",    "redis",
                                         "rabbitmq", "nats", "mqtt", NULL};
static const char *const redis_modes[] = {"stream", "pubsub", NULL};
static const char *const compressions[] = {"none", "gzip", "snappy", "lz4",
                                           "zstd", NULL};
static const char *const tls_client_auths[] = {"none", "optional", "required",
                                               NULL};
static const char *const tls_identities[] = {"cn", "san_uri", "san_dns",
                                             NULL};

/* An enum directive stores the index of the name it matched. */
_Static_assert(LOG_LEVEL_DEBUG == 0 && LOG_LEVEL_INFO == 1 &&
                   LOG_LEVEL_WARN == 2 && LOG_LEVEL_ERROR == 3,
               "log_levels[] must follow enum log_level");
_Static_assert(SPOOL_DURABILITY_FSYNC == 0 && SPOOL_DURABILITY_NONE == 1,
               "durabilities[] must follow enum spool_durability");
_Static_assert(CONFIG_SINK_FILE == 0 && CONFIG_SINK_KAFKA == 1 &&
                   CONFIG_SINK_REDIS == 2 && CONFIG_SINK_RABBITMQ == 3 &&
                   CONFIG_SINK_NATS == 4 && CONFIG_SINK_MQTT == 5,
               "sink_kinds[] must follow enum config_sink_kind");
_Static_assert(CONFIG_REDIS_STREAM == 0 && CONFIG_REDIS_PUBSUB == 1,
               "redis_modes[] must follow enum config_redis_mode");
_Static_assert(CONFIG_COMPRESSION_NONE == 0 && CONFIG_COMPRESSION_ZSTD == 4,
               "compressions[] must follow enum config_compression");
_Static_assert(CONFIG_TLS_CLIENT_AUTH_NONE == 0 &&
                   CONFIG_TLS_CLIENT_AUTH_OPTIONAL == 1 &&
                   CONFIG_TLS_CLIENT_AUTH_REQUIRED == 2,
               "tls_client_auths[] must follow enum config_tls_client_auth");
_Static_assert(CONFIG_TLS_IDENTITY_CN == 0 &&
                   CONFIG_TLS_IDENTITY_SAN_URI == 1 &&
                   CONFIG_TLS_IDENTITY_SAN_DNS == 2,
               "tls_identities[] must follow enum config_tls_identity");

#define CFG(member) offsetof(config_t, member), sizeof(((config_t *)0)->member)
#define SINK(member)                                                           \
    offsetof(config_sink_t, member), sizeof(((config_sink_t *)0)->member)

/* Every directive outside device_types and sinks. A default of NULL means
 * the value is derived after loading (registry.path from data_dir). */
static const directive_t directives[] = {
    /* name, type, field, min, max, default, choices, flags */
    {"log.level", TYPE_ENUM, CFG(log_level), 0, 0, "info", log_levels, 0},
    {"data_dir", TYPE_PATH, CFG(data_dir), 0, 0, "./data", NULL, 0},
    {"registry.path", TYPE_PATH, CFG(registry.path), 0, 0, NULL, NULL, 0},
    {"registry.key_grace_period", TYPE_DURATION, CFG(registry.key_grace_ms), 0,
     365 * MS_PER_D, "24h", NULL, 0},
    {"registry.reload_interval", TYPE_DURATION,
     CFG(registry.reload_interval_ms), 0, MS_PER_D, "2s", NULL, 0},
    {"jwt.leeway", TYPE_DURATION, CFG(jwt.leeway_ms), 0, MS_PER_H, "30s",
     NULL, 0},
    {"jwt.max_lifetime", TYPE_DURATION, CFG(jwt.max_lifetime_ms), MS_PER_S,
     365 * MS_PER_D, "24h", NULL, 0},
    {"jwt.audience", TYPE_STRING, CFG(jwt.audience), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
    {"jwt.issuer", TYPE_STRING, CFG(jwt.issuer), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
    {"auth.max_failures_per_minute", TYPE_INT,
     CFG(auth.max_failures_per_minute), 0, 1000000, "10", NULL, 0},
    {"auth.block_duration", TYPE_DURATION, CFG(auth.block_duration_ms),
     MS_PER_S, MS_PER_D, "60s", NULL, 0},
    {"auth.guard_table_size", TYPE_INT, CFG(auth.guard_table_size), 16,
     1000000, "4096", NULL, 0},
    {"http.listen", TYPE_LISTEN, CFG(http.listen), 0, 0, "127.0.0.1:8080", NULL,
     0},
    {"http.workers", TYPE_INT, CFG(http.workers), 0, 64, "0", NULL, 0},
    {"http.max_header_bytes", TYPE_SIZE, CFG(http.max_header_bytes), KIB, MIB,
     "16KiB", NULL, 0},
    {"http.max_body_bytes", TYPE_SIZE, CFG(http.max_body_bytes), KIB, GIB,
     "1MiB", NULL, 0},
    {"http.max_readings_per_request", TYPE_INT,
     CFG(http.max_readings_per_request), 1, 1000000, "1000", NULL, 0},
    {"http.header_timeout", TYPE_DURATION, CFG(http.header_timeout_ms), 100,
     MS_PER_H, "10s", NULL, 0},
    {"http.body_timeout", TYPE_DURATION, CFG(http.body_timeout_ms), 100,
     MS_PER_H, "30s", NULL, 0},
    {"http.idle_timeout", TYPE_DURATION, CFG(http.idle_timeout_ms), 100,
     MS_PER_D, "60s", NULL, 0},
    {"http.max_connections", TYPE_INT, CFG(http.max_connections), 1, 1000000,
     "10000", NULL, 0},
    {"http.retry_after", TYPE_SECONDS, CFG(http.retry_after_s), 1, MS_PER_H,
     "1s", NULL, 0},
    {"limits.max_connections", TYPE_INT, CFG(limits.max_connections), 0,
     100000000, "0", NULL, 0},
    {"limits.max_connections_per_device", TYPE_INT,
     CFG(limits.max_connections_per_device), 0, 1000000, "0", NULL, 0},
    {"limits.connection_rate_per_address", TYPE_INT,
     CFG(limits.connection_rate_per_address), 0, 1000000, "0", NULL, 0},
    {"limits.connection_burst_per_address", TYPE_INT,
     CFG(limits.connection_burst_per_address), 0, 1000000, "0", NULL, 0},
    {"limits.table_size", TYPE_INT, CFG(limits.table_size), 64, 100000000,
     "1000000", NULL, 0},
    {"limits.max_json_depth", TYPE_INT, CFG(limits.max_json_depth), 1, 1000,
     "32", NULL, 0},
    {"admin.listen", TYPE_LISTEN, CFG(admin.listen), 0, 0, "127.0.0.1:9100",
     NULL, FLAG_EMPTY_DISABLES},
    {"ws.max_message_size", TYPE_SIZE, CFG(ws.max_message_size), KIB, GIB,
     "1MiB", NULL, 0},
    {"ws.max_fragments", TYPE_INT, CFG(ws.max_fragments), 1, 1000000,
     "1024", NULL, 0},
    {"ws.idle_timeout", TYPE_DURATION, CFG(ws.idle_timeout_ms), 100,
     MS_PER_D, "120s", NULL, 0},
    {"ws.ping_interval", TYPE_DURATION, CFG(ws.ping_interval_ms), 100,
     MS_PER_H, "30s", NULL, 0},
    {"ws.auth_timeout", TYPE_DURATION, CFG(ws.auth_timeout_ms), 100,
     MS_PER_H, "10s", NULL, 0},
    {"mqtt.listen", TYPE_LISTEN, CFG(mqtt.listen), 0, 0, "127.0.0.1:1883",
     NULL, FLAG_EMPTY_DISABLES},
    {"mqtt.max_packet_size", TYPE_SIZE, CFG(mqtt.max_packet_size), KIB,
     256 * MIB - 1, "1MiB", NULL, 0},
    {"mqtt.connect_timeout", TYPE_DURATION, CFG(mqtt.connect_timeout_ms),
     100, MS_PER_H, "10s", NULL, 0},
    {"mqtt.receive_maximum", TYPE_INT, CFG(mqtt.receive_maximum), 1, 65535,
     "64", NULL, 0},
    {"mqtt.topic_alias_maximum", TYPE_INT, CFG(mqtt.topic_alias_maximum), 0,
     65535, "16", NULL, 0},
    {"mqtt.max_session_expiry", TYPE_SECONDS, CFG(mqtt.max_session_expiry_s),
     0, 7 * MS_PER_D, "1h", NULL, 0},
    {"mqtt.max_keepalive", TYPE_SECONDS, CFG(mqtt.max_keepalive_s), 1000,
     65535 * MS_PER_S, "20m", NULL, 0},
    {"mqtt.max_connections", TYPE_INT, CFG(mqtt.max_connections), 1, 1000000,
     "10000", NULL, 0},
    {"mqtt.max_subscriptions", TYPE_INT, CFG(mqtt.max_subscriptions), 1, 1024,
     "8", NULL, 0},
    {"mqtt.topics", TYPE_STRING, CFG(mqtt.topics), 0, 0,
     "devices/{device_id}/data", NULL, 0},
    {"https.listen", TYPE_LISTEN, CFG(https.listen), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
    {"mqtts.listen", TYPE_LISTEN, CFG(mqtts.listen), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
    {"tls.cert_file", TYPE_PATH, CFG(tls.cert_file), 0, 0, NULL, NULL, 0},
    {"tls.key_file", TYPE_PATH, CFG(tls.key_file), 0, 0, NULL, NULL, 0},
    {"tls.ca_file", TYPE_PATH, CFG(tls.ca_file), 0, 0, NULL, NULL, 0},
    {"tls.crl_file", TYPE_PATH, CFG(tls.crl_file), 0, 0, NULL, NULL, 0},
    {"tls.client_auth", TYPE_ENUM, CFG(tls.client_auth), 0, 0, "none",
     tls_client_auths, 0},
    {"tls.identity", TYPE_ENUM, CFG(tls.identity), 0, 0, "cn",
     tls_identities, 0},
    {"spool.durability", TYPE_ENUM, CFG(spool.durability), 0, 0, "fsync",
     durabilities, 0},
    {"spool.segment_size", TYPE_SIZE, CFG(spool.segment_size), 64 * KIB, TIB,
     "64MiB", NULL, 0},
    {"spool.high_mark", TYPE_INT, CFG(spool.high_mark), 1, 100, "90", NULL,
     0},
    {"spool.low_mark", TYPE_INT, CFG(spool.low_mark), 1, 100, "80", NULL, 0},
    {"spool.max_size", TYPE_SIZE, CFG(spool.max_size), 128 * KIB, UINT64_MAX,
     "1GiB", NULL, 0},
    {"idempotency.enabled", TYPE_BOOL, CFG(idempotency.enabled), 0, 1, "true",
     NULL, 0},
    {"idempotency.field", TYPE_STRING, CFG(idempotency.field), 0, 0, "msg_id",
     NULL, FLAG_EMPTY_DISABLES},
    {"idempotency.window", TYPE_DURATION, CFG(idempotency.window_ms), MS_PER_S,
     30 * MS_PER_D, "24h", NULL, 0},
    {"idempotency.max_keys", TYPE_INT, CFG(idempotency.max_keys), 1,
     100000000, "1000000", NULL, 0},
    {"idempotency.mqtt_user_property", TYPE_STRING,
     CFG(idempotency.mqtt_user_property), 0, 0, "idempotency-key", NULL,
     FLAG_EMPTY_DISABLES},
    {"shutdown_timeout", TYPE_DURATION, CFG(shutdown_timeout_ms), 0, MS_PER_H,
     "10s", NULL, 0},
    {"sinks_drain_timeout", TYPE_DURATION, CFG(sinks_drain_timeout_ms), 0,
     MS_PER_H, "5s", NULL, 0},
    {"default_device_type", TYPE_NAME, CFG(default_device_type), 0, 0,
     "default", NULL, 0},
};

/* The keys of one entry of the sinks sequence. Defaults of NULL are set
 * after loading, because they depend on data_dir, the name or the type:
 * path (<data_dir>/out), dead_letter, address, topic and client_id. */
static const directive_t sink_directives[] = {
    {"name", TYPE_NAME, SINK(name), 0, 0, NULL, NULL, 0},
    {"type", TYPE_ENUM, SINK(kind), 0, 0, "file", sink_kinds, 0},
    {"batch_records", TYPE_INT, SINK(batch_records), 1, 100000, "512", NULL, 0},
    {"timeout", TYPE_DURATION, SINK(timeout_ms), 100, MS_PER_H, "30s", NULL,
     0},
    {"retry_min", TYPE_DURATION, SINK(retry_min_ms), 1, MS_PER_H, "100ms",
     NULL, 0},
    {"retry_max", TYPE_DURATION, SINK(retry_max_ms), 1, MS_PER_D, "30s", NULL,
     0},
    {"dead_letter", TYPE_PATH, SINK(dead_letter), 0, 0, NULL, NULL, 0},
    {"path", TYPE_PATH, SINK(path), 0, 0, NULL, NULL, 0},
    {"rotate_size", TYPE_SIZE, SINK(rotate_size), 64 * KIB, TIB, "64MiB", NULL,
     0},
    {"fsync", TYPE_BOOL, SINK(fsync), 0, 1, "true", NULL, 0},
    {"address", TYPE_STRING, SINK(address), 0, 0, NULL, NULL, 0},
    {"topic", TYPE_STRING, SINK(topic), 0, 0, NULL, NULL, 0},
    {"exchange", TYPE_STRING, SINK(exchange), 0, 0, "telemetry", NULL, 0},
    {"vhost", TYPE_STRING, SINK(vhost), 0, 0, "/", NULL, 0},
    {"mode", TYPE_ENUM, SINK(mode), 0, 0, "stream", redis_modes, 0},
    {"maxlen", TYPE_INT, SINK(maxlen), 0, UINT64_C(1) << 48, "0", NULL, 0},
    {"username", TYPE_STRING, SINK(username), 0, 0, NULL, NULL, 0},
    {"password", TYPE_STRING, SINK(password), 0, 0, NULL, NULL, 0},
    {"password_file", TYPE_PATH, SINK(password_file), 0, 0, NULL, NULL, 0},
    {"tls", TYPE_BOOL, SINK(tls), 0, 1, "false", NULL, 0},
    {"tls_ca_file", TYPE_PATH, SINK(tls_ca_file), 0, 0, NULL, NULL, 0},
    {"tls_cert_file", TYPE_PATH, SINK(tls_cert_file), 0, 0, NULL, NULL, 0},
    {"tls_key_file", TYPE_PATH, SINK(tls_key_file), 0, 0, NULL, NULL, 0},
    {"compression", TYPE_ENUM, SINK(compression), 0, 0, "none", compressions,
     0},
    {"linger", TYPE_DURATION, SINK(linger_ms), 0, 60 * MS_PER_S, "5ms", NULL,
     0},
    {"kafka_properties", TYPE_STRING, SINK(kafka_properties), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
    {"qos", TYPE_INT, SINK(qos), 0, 1, "1", NULL, 0},
    {"client_id", TYPE_STRING, SINK(client_id), 0, 0, NULL, NULL, 0},
    {"stream", TYPE_STRING, SINK(stream), 0, 0, "", NULL, FLAG_EMPTY_DISABLES},
};

#define BRIDGE(member)                                                         \
    offsetof(config_bridge_t, member), sizeof(((config_bridge_t *)0)->member)

/* The keys of one entry of the bridges sequence. client_id defaults to
 * "ingestd-<name>", set once the name is known. */
static const directive_t bridge_directives[] = {
    {"name", TYPE_NAME, BRIDGE(name), 0, 0, NULL, NULL, 0},
    {"host", TYPE_STRING, BRIDGE(host), 0, 0, "127.0.0.1", NULL, 0},
    {"port", TYPE_INT, BRIDGE(port), 1, 65535, "1883", NULL, 0},
    {"client_id", TYPE_STRING, BRIDGE(client_id), 0, 0, NULL, NULL, 0},
    {"username", TYPE_STRING, BRIDGE(username), 0, 0, NULL, NULL, 0},
    {"password", TYPE_STRING, BRIDGE(password), 0, 0, NULL, NULL, 0},
    {"password_file", TYPE_PATH, BRIDGE(password_file), 0, 0, NULL, NULL, 0},
    {"topics", TYPE_STRING, BRIDGE(topics_text), 0, 0,
     "devices/{device_id}/data", NULL, 0},
    {"shared_group", TYPE_STRING, BRIDGE(shared_group), 0, 0, "ingestd", NULL,
     FLAG_EMPTY_DISABLES},
    {"qos", TYPE_INT, BRIDGE(qos), 0, 1, "1", NULL, 0},
    {"keepalive", TYPE_SECONDS, BRIDGE(keepalive_s), MS_PER_S, 65535 * MS_PER_S,
     "30s", NULL, 0},
    {"reconnect_min", TYPE_DURATION, BRIDGE(reconnect_min_ms), 10, MS_PER_H,
     "500ms", NULL, 0},
    {"reconnect_max", TYPE_DURATION, BRIDGE(reconnect_max_ms), 10, MS_PER_H,
     "30s", NULL, 0},
    {"session_expiry", TYPE_SECONDS, BRIDGE(session_expiry_s), 0,
     (uint64_t)UINT32_MAX * MS_PER_S, "1h", NULL, 0},
    {"tls_ca_file", TYPE_PATH, BRIDGE(tls_ca_file), 0, 0, NULL, NULL, 0},
    {"tls_cert_file", TYPE_PATH, BRIDGE(tls_cert_file), 0, 0, NULL, NULL, 0},
    {"tls_key_file", TYPE_PATH, BRIDGE(tls_key_file), 0, 0, NULL, NULL, 0},
    {"feedback_topic", TYPE_STRING, BRIDGE(feedback_topic), 0, 0, "", NULL,
     FLAG_EMPTY_DISABLES},
};

#define LIMIT(member)                                                          \
    offsetof(config_limits_t, member), sizeof(((config_limits_t *)0)->member)

/* The keys of device_types.NAME.limits. Absent keys stay 0, unlimited. */
static const directive_t limit_directives[] = {
    {"readings_per_second", TYPE_INT, LIMIT(readings_per_second), 0,
     1000000000, "0", NULL, 0},
    {"burst", TYPE_INT, LIMIT(burst), 0, 1000000000, "0", NULL, 0},
    {"bytes_per_second", TYPE_SIZE, LIMIT(bytes_per_second), 0, TIB, "0",
     NULL, 0},
    {"daily_readings", TYPE_INT, LIMIT(daily_readings), 0, 1000000000000,
     "0", NULL, 0},
};

/* The schema key of a device type, which is a path with no default. */
static const directive_t schema_path_directive = {
    .name = "schema",
    .type = TYPE_PATH,
    .offset = offsetof(config_device_type_t, schema_path),
    .size = sizeof(char *),
};

/* State of one config_load call. */
typedef struct load {
    config_t *cfg;
    config_error_t error;
    unsigned long lines[ARRAY_LEN(directives)]; /* 0 while at default */
    unsigned long device_types_line;
    const config_node_t *sinks_node;
} load_t;

/* Outcomes of parse_value besides 0 and ING_ENOMEM. */
enum { VALUE_INVALID = 1, VALUE_OUT_OF_RANGE = 2 };

/* ---- Value parsers ---- */

/* Parses leading decimal digits of `s`. Returns 0 and stores the number
 * and the first byte after it, or -1 when there is no digit or the number
 * does not fit. */
static int parse_digits(const char *s, uint64_t *out, const char **rest)
{
    uint64_t v = 0;
    const char *p = s;

    if (*p < '0' || *p > '9')
        return -1;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned digit = (unsigned)(*p - '0');

        if (v > (UINT64_MAX - digit) / 10)
            return -1;
        v = v * 10 + digit;
    }
    *out = v;
    *rest = p;
    return 0;
}

/* Multiplies `number` by the multiplier of the unit named `suffix`.
 * Returns ING_EINVAL for an unknown unit or on overflow. */
static int apply_unit(uint64_t number, const char *suffix,
                      const char *const *names, const uint64_t *multipliers,
                      size_t count, uint64_t *out)
{
    for (size_t i = 0; i < count; i++) {
        if (strcmp(suffix, names[i]) != 0)
            continue;
        if (number > UINT64_MAX / multipliers[i])
            return ING_EINVAL;
        *out = number * multipliers[i];
        return 0;
    }
    return ING_EINVAL;
}

int config_parse_duration_ms(const char *s, uint64_t *out)
{
    static const char *const names[] = {"ms", "s", "m", "h", "d"};
    static const uint64_t multipliers[] = {1, MS_PER_S, MS_PER_M, MS_PER_H,
                                           MS_PER_D};
    uint64_t number;
    const char *rest;

    if (!s || parse_digits(s, &number, &rest) != 0)
        return ING_EINVAL;
    /* A bare number is ambiguous (seconds or milliseconds?) unless it is
     * zero, so only "0" may leave out the unit. */
    if (*rest == '\0') {
        if (number != 0)
            return ING_EINVAL;
        *out = 0;
        return 0;
    }
    return apply_unit(number, rest, names, multipliers, ARRAY_LEN(names), out);
}

int config_parse_size(const char *s, uint64_t *out)
{
    static const char *const names[] = {"",    "B",  "KiB", "MiB", "GiB",
                                        "TiB", "KB", "MB",  "GB",  "TB"};
    static const uint64_t multipliers[] = {
        1,   1,    KIB,     MIB,        GIB,
        TIB, 1000, 1000000, 1000000000, UINT64_C(1000000000000),
    };
    uint64_t number;
    const char *rest;

    if (!s || parse_digits(s, &number, &rest) != 0)
        return ING_EINVAL;
    return apply_unit(number, rest, names, multipliers, ARRAY_LEN(names), out);
}

static void format_with_units(char *buf, size_t size, uint64_t value,
                              const char *const *names,
                              const uint64_t *multipliers, size_t count)
{
    for (size_t i = 0; i < count; i++) {
        if (value != 0 && value % multipliers[i] == 0) {
            snprintf(buf, size, "%" PRIu64 "%s", value / multipliers[i],
                     names[i]);
            return;
        }
    }
    snprintf(buf, size, "%" PRIu64, value);
}

/* Writes a byte count in the largest binary unit that divides it. */
static void format_size(char *buf, size_t size, uint64_t bytes)
{
    static const char *const names[] = {"TiB", "GiB", "MiB", "KiB"};
    static const uint64_t multipliers[] = {TIB, GIB, MIB, KIB};

    format_with_units(buf, size, bytes, names, multipliers, ARRAY_LEN(names));
}

/* Writes milliseconds in the largest unit that divides them. */
static void format_duration(char *buf, size_t size, uint64_t ms)
{
    static const char *const names[] = {"d", "h", "m", "s", "ms"};
    static const uint64_t multipliers[] = {MS_PER_D, MS_PER_H, MS_PER_M,
                                           MS_PER_S, 1};

    format_with_units(buf, size, ms, names, multipliers, ARRAY_LEN(names));
}

static bool is_valid_name(const char *s)
{
    size_t n;

    for (n = 0; s[n]; n++) {
        char c = s[n];

        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
              c == '-'))
            return false;
    }
    return n >= 1 && n <= NAME_MAX_LEN;
}

/* Checks "host:port" where host is a dotted IPv4 address or a bracketed
 * IPv6 address, and port is 1 to 65535. Host names are rejected so that
 * loading never waits on DNS. */
static bool is_valid_listen(const char *s)
{
    char host[INET6_ADDRSTRLEN];
    unsigned char addr[sizeof(struct in6_addr)];
    const char *port;
    size_t host_len;
    int family;
    uint64_t number;
    const char *rest;

    if (s[0] == '[') {
        const char *close = strchr(s, ']');

        if (!close || close[1] != ':')
            return false;
        host_len = (size_t)(close - s - 1);
        s++;
        port = close + 2;
        family = AF_INET6;
    } else {
        const char *colon = strrchr(s, ':');

        if (!colon)
            return false;
        host_len = (size_t)(colon - s);
        port = colon + 1;
        family = AF_INET;
    }
    if (host_len == 0 || host_len >= sizeof host)
        return false;
    memcpy(host, s, host_len);
    host[host_len] = '\0';
    if (inet_pton(family, host, addr) != 1)
        return false;
    if (parse_digits(port, &number, &rest) != 0 || *rest != '\0')
        return false;
    return number >= 1 && number <= 65535;
}

/* Joins `dir` and `name` with one slash. */
static char *join_path(const char *dir, size_t dir_len, const char *name)
{
    bool slash = dir_len > 0 && dir[dir_len - 1] != '/';
    size_t name_len = strlen(name);
    char *out = malloc(dir_len + slash + name_len + 1);

    if (!out)
        return NULL;
    memcpy(out, dir, dir_len);
    if (slash)
        out[dir_len] = '/';
    memcpy(out + dir_len + slash, name, name_len + 1);
    return out;
}

/* Resolves `path` against `dir`, the canonical folder of the config file.
 * Leading "./" and "../" parts are folded into `dir`: because `dir` comes
 * from realpath(3) it has no symlinks, so its lexical parent is its real
 * parent. Later parts are kept as written. */
static char *resolve_path(const char *dir, const char *path)
{
    size_t dir_len = strlen(dir);

    if (path[0] == '/')
        return strdup(path);
    for (;;) {
        if (path[0] == '.' && (path[1] == '/' || path[1] == '\0')) {
            path += 1;
        } else if (path[0] == '.' && path[1] == '.' &&
                   (path[2] == '/' || path[2] == '\0')) {
            const char *last = memrchr(dir, '/', dir_len);

            if (last)
                dir_len = last == dir ? 1 : (size_t)(last - dir);
            path += 2;
        } else {
            break;
        }
        while (*path == '/')
            path++;
    }
    if (*path == '\0')
        return strndup(dir, dir_len);
    return join_path(dir, dir_len, path);
}

static bool is_numeric(enum directive_type type)
{
    return type == TYPE_BOOL || type == TYPE_INT || type == TYPE_DURATION ||
           type == TYPE_SECONDS || type == TYPE_SIZE || type == TYPE_ENUM;
}

/* Parses `text` for directive `d`. Stores a number in `*number` or a new
 * string in `*string` (NULL for a disabled feature). Returns 0,
 * VALUE_INVALID, VALUE_OUT_OF_RANGE or ING_ENOMEM. */
static int parse_value(const directive_t *d, const char *dir, const char *text,
                       uint64_t *number, char **string)
{
    uint64_t v = 0;
    const char *rest;

    *number = 0;
    *string = NULL;
    switch (d->type) {
    case TYPE_STRING:
    case TYPE_NAME:
    case TYPE_PATH:
    case TYPE_LISTEN:
        if (text[0] == '\0' && (d->flags & FLAG_EMPTY_DISABLES))
            return 0;
        if (text[0] == '\0')
            return VALUE_INVALID;
        if (d->type == TYPE_NAME && !is_valid_name(text))
            return VALUE_INVALID;
        if (d->type == TYPE_LISTEN && !is_valid_listen(text))
            return VALUE_INVALID;
        if (d->type == TYPE_PATH)
            *string = resolve_path(dir, text);
        else
            *string = strdup(text);
        return *string ? 0 : ING_ENOMEM;
    case TYPE_BOOL:
        if (!strcmp(text, "true") || !strcmp(text, "True") ||
            !strcmp(text, "TRUE"))
            v = 1;
        else if (strcmp(text, "false") && strcmp(text, "False") &&
                 strcmp(text, "FALSE"))
            return VALUE_INVALID;
        break;
    case TYPE_ENUM:
        for (v = 0; d->choices[v]; v++) {
            if (strcmp(text, d->choices[v]) == 0)
                break;
        }
        if (!d->choices[v])
            return VALUE_INVALID;
        *number = v;
        return 0;
    case TYPE_INT:
        if (parse_digits(text, &v, &rest) != 0 || *rest != '\0')
            return VALUE_INVALID;
        break;
    case TYPE_SIZE:
        if (config_parse_size(text, &v) != 0)
            return VALUE_INVALID;
        break;
    case TYPE_DURATION:
    case TYPE_SECONDS:
        if (config_parse_duration_ms(text, &v) != 0)
            return VALUE_INVALID;
        break;
    }
    if (v < d->min || v > d->max)
        return VALUE_OUT_OF_RANGE;
    if (d->type == TYPE_SECONDS)
        v = (v + MS_PER_S - 1) / MS_PER_S;
    *number = v;
    return 0;
}

static void store_value(const directive_t *d, void *base, uint64_t number,
                        char *string)
{
    char *field = (char *)base + d->offset;

    if (!is_numeric(d->type)) {
        char *old;

        memcpy(&old, field, sizeof old);
        free(old);
        memcpy(field, &string, sizeof string);
    } else if (d->size == sizeof(uint64_t)) {
        memcpy(field, &number, sizeof number);
    } else {
        /* The bounds keep every int and enum field's value small. */
        int small = (int)number;

        memcpy(field, &small, sizeof small);
    }
}

/* Writes what `d` accepts, such as "a size such as 1MiB", into `buf`. */
static void describe_expected(const directive_t *d, int outcome, char *buf,
                              size_t size)
{
    char low[32], high[32];
    const char *noun = d->type == TYPE_SIZE ? "a size" : "a duration";
    size_t used;

    switch (d->type) {
    case TYPE_STRING:
        snprintf(buf, size, "a non-empty string");
        return;
    case TYPE_NAME:
        snprintf(buf, size,
                 "a name of 1 to %d characters from a-z, 0-9, '_' and '-'",
                 NAME_MAX_LEN);
        return;
    case TYPE_PATH:
        snprintf(buf, size, "a non-empty path");
        return;
    case TYPE_LISTEN:
        /* Listeners that are off by default have no address to show. */
        if (d->default_value[0] == '\0') {
            snprintf(buf, size,
                     "an address such as 127.0.0.1:8443 or [::1]:8443, or "
                     "\"\" to disable");
            return;
        }
        snprintf(buf, size, "an address such as %s or [::1]:%s%s",
                 d->default_value, strrchr(d->default_value, ':') + 1,
                 (d->flags & FLAG_EMPTY_DISABLES) ? ", or \"\" to disable"
                                                  : "");
        return;
    case TYPE_BOOL:
        snprintf(buf, size, "true or false");
        return;
    case TYPE_ENUM:
        used = (size_t)snprintf(buf, size, "one of");
        for (size_t i = 0; d->choices[i] && used < size; i++)
            used += (size_t)snprintf(buf + used, size - used, "%s %s",
                                     i ? "," : "", d->choices[i]);
        return;
    case TYPE_INT:
        snprintf(buf, size, "an integer from %" PRIu64 " to %" PRIu64, d->min,
                 d->max);
        return;
    case TYPE_SIZE:
    case TYPE_DURATION:
    case TYPE_SECONDS:
        break;
    }
    if (d->type == TYPE_SIZE) {
        format_size(low, sizeof low, d->min);
        format_size(high, sizeof high, d->max);
    } else {
        format_duration(low, sizeof low, d->min);
        format_duration(high, sizeof high, d->max);
    }
    if (outcome == VALUE_OUT_OF_RANGE && d->max == UINT64_MAX)
        snprintf(buf, size, "%s of at least %s", noun, low);
    else if (outcome == VALUE_OUT_OF_RANGE)
        snprintf(buf, size, "%s from %s to %s", noun, low, high);
    else if (d->type == TYPE_SIZE)
        snprintf(buf, size, "a size such as %s", d->default_value);
    else
        snprintf(buf, size,
                 "a duration with a unit (ms, s, m, h or d) such as %s",
                 d->default_value);
}

/* Sets directive `d` of the struct at `base` from `value`. `name` is the
 * directive's full dotted name for messages. */
static int apply_directive(load_t *ld, const directive_t *d, void *base,
                           const char *name, const config_node_t *value)
{
    char expected[160];
    char shown[CONFIG_QUOTE_SIZE];
    uint64_t number;
    char *string;
    int rc;

    if (value->kind != YAML_SCALAR_NODE || config_node_is_null(value)) {
        describe_expected(d, VALUE_INVALID, expected, sizeof expected);
        return config_fail(&ld->error, value->line, "%s: expected %s, got %s",
                           name, expected, config_node_describe(value));
    }
    if (strlen(value->text) != value->len)
        return config_fail(&ld->error, value->line,
                           "%s: the value contains a NUL character", name);
    rc = parse_value(d, ld->cfg->dir, value->text, &number, &string);
    if (rc == ING_ENOMEM)
        return config_fail_nomem(&ld->error);
    if (rc != 0) {
        describe_expected(d, rc, expected, sizeof expected);
        return config_fail(&ld->error, value->line, "%s: expected %s, got %s",
                           name, expected,
                           config_quote(shown, sizeof shown, value->text));
    }
    store_value(d, base, number, string);
    return 0;
}

static int apply_defaults(load_t *ld, const directive_t *table, size_t count,
                          void *base)
{
    for (size_t i = 0; i < count; i++) {
        const directive_t *d = &table[i];
        uint64_t number;
        char *string;
        int rc;

        if (!d->default_value)
            continue;
        rc = parse_value(d, ld->cfg->dir, d->default_value, &number, &string);
        if (rc == ING_ENOMEM)
            return config_fail_nomem(&ld->error);
        if (rc != 0)
            return config_fail(&ld->error, 0,
                               "%s: the built-in default \"%s\" is invalid",
                               d->name, d->default_value);
        store_value(d, base, number, string);
    }
    return 0;
}

static const directive_t *find_directive(const directive_t *table, size_t count,
                                         const char *name)
{
    for (size_t i = 0; i < count; i++) {
        if (strcmp(table[i].name, name) == 0)
            return &table[i];
    }
    return NULL;
}

/* Returns the length of the key that `name` has directly under `prefix`
 * ("" for the top level), or 0 when `name` is not under `prefix`. */
static size_t key_under(const char *name, const char *prefix, const char **key)
{
    size_t prefix_len = strlen(prefix);

    if (prefix_len > 0) {
        if (strncmp(name, prefix, prefix_len) != 0 || name[prefix_len] != '.')
            return 0;
        name += prefix_len + 1;
    }
    *key = name;
    return strcspn(name, ".");
}

/* Writes the keys directly under `prefix` as a comma-separated list, each
 * once, in table order. */
static void join_keys(const directive_t *table, size_t count,
                      const char *prefix, char *buf, size_t size)
{
    size_t used = 0;

    buf[0] = '\0';
    for (size_t i = 0; i < count && used < size; i++) {
        const char *key, *other;
        size_t len = key_under(table[i].name, prefix, &key);
        bool seen = false;

        if (len == 0)
            continue;
        for (size_t j = 0; j < i && !seen; j++) {
            size_t other_len = key_under(table[j].name, prefix, &other);

            seen = other_len == len && memcmp(other, key, len) == 0;
        }
        if (!seen)
            used += (size_t)snprintf(buf + used, size - used, "%s%.*s",
                                     used ? ", " : "", (int)len, key);
    }
}

static bool is_section(const char *key)
{
    size_t len = strlen(key);

    for (size_t i = 0; i < ARRAY_LEN(directives) && len > 0; i++) {
        if (strncmp(directives[i].name, key, len) == 0 &&
            directives[i].name[len] == '.')
            return true;
    }
    return false;
}

static int fail_unknown_key(load_t *ld, const config_node_t *key,
                            const char *section, const char *known)
{
    if (!section)
        return config_fail(&ld->error, key->line,
                           "unknown key \"%s\" (known keys: %s)", key->text,
                           known);
    return config_fail(&ld->error, key->line,
                       "unknown key \"%s.%s\" (known keys in %s: %s)", section,
                       key->text, section, known);
}

/* ---- Sections ---- */

static int parse_section(load_t *ld, const config_node_t *key,
                         const config_node_t *map)
{
    const char *section = key->text;
    char name[128], known[256];
    int rc;

    if (config_node_is_null(map))
        return 0;
    if (map->kind != YAML_MAPPING_NODE)
        return config_fail(&ld->error, map->line,
                           "%s: expected a mapping of keys, got %s", section,
                           config_node_describe(map));
    rc = config_node_check_keys(&ld->error, map, section);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const config_node_t *subkey = map->items[i];
        const directive_t *d;

        snprintf(name, sizeof name, "%s.%s", section, subkey->text);
        d = find_directive(directives, ARRAY_LEN(directives), name);
        if (!d) {
            join_keys(directives, ARRAY_LEN(directives), section, known,
                      sizeof known);
            return fail_unknown_key(ld, subkey, section, known);
        }
        rc = apply_directive(ld, d, ld->cfg, d->name, map->items[i + 1]);
        ld->lines[d - directives] = map->items[i + 1]->line;
    }
    return rc;
}

static int parse_sink(load_t *ld, size_t index, const config_node_t *map)
{
    config_t *cfg = ld->cfg;
    config_sink_t *sink = &cfg->sinks[index];
    const config_node_t *name_node = NULL;
    char prefix[32], name[96], known[512];
    int rc;

    cfg->sink_count = index + 1;
    snprintf(prefix, sizeof prefix, "sinks[%zu]", index);
    rc = apply_defaults(ld, sink_directives, ARRAY_LEN(sink_directives), sink);
    if (rc != 0)
        return rc;
    join_keys(sink_directives, ARRAY_LEN(sink_directives), "", known,
              sizeof known);
    if (map->kind != YAML_MAPPING_NODE)
        return config_fail(&ld->error, map->line,
                           "%s: expected a mapping with keys such as name "
                           "and type, got %s",
                           prefix, config_node_describe(map));
    rc = config_node_check_keys(&ld->error, map, prefix);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const config_node_t *key = map->items[i];
        const directive_t *d = find_directive(
            sink_directives, ARRAY_LEN(sink_directives), key->text);

        if (!d)
            return fail_unknown_key(ld, key, prefix, known);
        snprintf(name, sizeof name, "%s.%s", prefix, d->name);
        rc = apply_directive(ld, d, sink, name, map->items[i + 1]);
        if (d == &sink_directives[0])
            name_node = map->items[i + 1];
    }
    if (rc != 0)
        return rc;
    if (!sink->name)
        return config_fail(&ld->error, map->line,
                           "%s: missing required key \"name\"", prefix);
    for (size_t j = 0; j < index; j++) {
        if (strcmp(cfg->sinks[j].name, sink->name) == 0)
            return config_fail(
                &ld->error, name_node->line,
                "%s.name: \"%s\" is already the name of sinks[%zu]; "
                "sink names must be unique",
                prefix, sink->name, j);
    }
    return 0;
}

static int parse_sinks(load_t *ld, const config_node_t *seq)
{
    int rc = 0;

    if (config_node_is_null(seq))
        return 0;
    if (seq->kind != YAML_SEQUENCE_NODE)
        return config_fail(
            &ld->error, seq->line,
            "sinks: expected a sequence of sink mappings, got %s",
            config_node_describe(seq));
    if (seq->count == 0)
        return config_fail(
            &ld->error, seq->line,
            "sinks: at least one sink is required; remove the key to "
            "get the default file sink");
    ld->cfg->sinks = calloc(seq->count, sizeof *ld->cfg->sinks);
    if (!ld->cfg->sinks)
        return config_fail_nomem(&ld->error);
    ld->sinks_node = seq;
    for (size_t i = 0; rc == 0 && i < seq->count; i++)
        rc = parse_sink(ld, i, seq->items[i]);
    return rc;
}

/* ---- Device types and their schemas ---- */

static int open_regular_file(const char *path, FILE **out, char *reason,
                             size_t size)
{
    struct stat st;
    FILE *f = fopen(path, "re");

    if (!f) {
        snprintf(reason, size, "%s", strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(reason, size, "not a regular file");
        fclose(f);
        return -1;
    }
    *out = f;
    return 0;
}

static const char *json_type_name(const json_t *json)
{
    switch (json_typeof(json)) {
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    default:
        return "an object";
    }
}

static int load_schema_file(load_t *ld, const char *name, unsigned long line,
                            config_device_type_t *type)
{
    char reason[128];
    json_error_t error;
    json_t *doc;
    FILE *f;

    if (open_regular_file(type->schema_path, &f, reason, sizeof reason) != 0)
        return config_fail(&ld->error, line,
                           "%s: cannot read the schema file %s: %s", name,
                           type->schema_path, reason);
    doc = json_loadf(f, JSON_REJECT_DUPLICATES, &error);
    fclose(f);
    if (!doc)
        return config_fail(&ld->error, line, "%s: invalid JSON in %s:%d:%d: %s",
                           name, type->schema_path, error.line, error.column,
                           error.text);
    if (!json_is_object(doc)) {
        const char *got = json_type_name(doc);

        json_decref(doc);
        return config_fail(&ld->error, line,
                           "%s: expected a JSON object in %s, got %s", name,
                           type->schema_path, got);
    }
    type->schema = doc;
    return 0;
}

/* Parses the limits of device type `type_path` ("device_types.NAME") into
 * `limits`. */
static int parse_device_limits(load_t *ld, const char *type_path,
                               const config_node_t *map,
                               config_limits_t *limits)
{
    char path[160], name[192], known[128];
    int rc;

    snprintf(path, sizeof path, "%s.limits", type_path);

    if (map->kind != YAML_MAPPING_NODE)
        return config_fail(&ld->error, map->line,
                           "%s: expected a mapping with keys such as "
                           "readings_per_second, got %s",
                           path, config_node_describe(map));
    join_keys(limit_directives, ARRAY_LEN(limit_directives), "", known,
              sizeof known);
    rc = config_node_check_keys(&ld->error, map, path);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const config_node_t *key = map->items[i];
        const directive_t *d = find_directive(
            limit_directives, ARRAY_LEN(limit_directives), key->text);

        if (!d)
            return fail_unknown_key(ld, key, path, known);
        snprintf(name, sizeof name, "%s.%s", path, d->name);
        rc = apply_directive(ld, d, limits, name, map->items[i + 1]);
    }
    return rc;
}

static int parse_device_type(load_t *ld, const config_node_t *key,
                             const config_node_t *value,
                             config_device_type_t *type)
{
    const config_node_t *file = NULL, *inline_schema = NULL;
    char shown[CONFIG_QUOTE_SIZE];
    char path[128], name[160];
    int rc;

    if (!is_valid_name(key->text))
        return config_fail(&ld->error, key->line,
                           "device_types: the name %s is invalid; use 1 to %d "
                           "characters from a-z, 0-9, '_' and '-'",
                           config_quote(shown, sizeof shown, key->text),
                           NAME_MAX_LEN);
    type->name = strdup(key->text);
    if (!type->name)
        return config_fail_nomem(&ld->error);
    snprintf(path, sizeof path, "device_types.%s", key->text);
    if (value->kind != YAML_MAPPING_NODE)
        return config_fail(
            &ld->error, value->line,
            "%s: expected a mapping with schema or schema_inline, "
            "got %s",
            path, config_node_describe(value));
    rc = config_node_check_keys(&ld->error, value, path);
    for (size_t i = 0; rc == 0 && i < value->count; i += 2) {
        const config_node_t *subkey = value->items[i];

        if (strcmp(subkey->text, "schema") == 0)
            file = value->items[i + 1];
        else if (strcmp(subkey->text, "schema_inline") == 0)
            inline_schema = value->items[i + 1];
        else if (strcmp(subkey->text, "limits") == 0)
            rc = parse_device_limits(ld, path, value->items[i + 1],
                                     &type->limits);
        else
            return fail_unknown_key(ld, subkey, path,
                                    "schema, schema_inline, limits");
    }
    if (rc != 0)
        return rc;
    if (file && inline_schema)
        return config_fail(&ld->error, value->line,
                           "%s: set either schema or schema_inline, not both",
                           path);
    if (!file && !inline_schema)
        return config_fail(
            &ld->error, value->line,
            "%s: missing schema; set schema to a JSON Schema file or "
            "schema_inline to a mapping",
            path);
    if (file) {
        snprintf(name, sizeof name, "%s.schema", path);
        rc = apply_directive(ld, &schema_path_directive, type, name, file);
        if (rc == 0)
            rc = load_schema_file(ld, name, file->line, type);
        return rc;
    }
    snprintf(name, sizeof name, "%s.schema_inline", path);
    if (inline_schema->kind != YAML_MAPPING_NODE)
        return config_fail(
            &ld->error, inline_schema->line,
            "%s: expected a mapping (a JSON Schema object), got %s", name,
            config_node_describe(inline_schema));
    return config_node_to_json(&ld->error, inline_schema, name, &type->schema);
}

static int parse_device_types(load_t *ld, const config_node_t *key,
                              const config_node_t *map)
{
    config_t *cfg = ld->cfg;
    int rc;

    ld->device_types_line = key->line;
    if (config_node_is_null(map))
        return 0;
    if (map->kind != YAML_MAPPING_NODE)
        return config_fail(
            &ld->error, map->line,
            "device_types: expected a mapping of device type names, "
            "got %s",
            config_node_describe(map));
    if (map->count == 0)
        return config_fail(
            &ld->error, map->line,
            "device_types: at least one device type is required");
    rc = config_node_check_keys(&ld->error, map, "device_types");
    if (rc != 0)
        return rc;
    cfg->device_types = calloc(map->count / 2, sizeof *cfg->device_types);
    if (!cfg->device_types)
        return config_fail_nomem(&ld->error);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        cfg->device_type_count = i / 2 + 1;
        rc = parse_device_type(ld, map->items[i], map->items[i + 1],
                               &cfg->device_types[i / 2]);
    }
    return rc;
}

/* ---- Bridges to MQTT brokers ---- */

/* Maximum size of a password_file. A password is a line, not a document. */
#define PASSWORD_FILE_MAX 4096

/* Checks an MQTT topic template: no wildcards, no leading '$' (those
 * topics belong to the broker), and "{device_id}" exactly once as a whole
 * level. Returns NULL when valid, or the reason. */
static const char *check_topic_template(const char *t)
{
    static const char placeholder[] = "{device_id}";
    const size_t len = sizeof placeholder - 1;
    const char *at = strstr(t, placeholder);

    if (t[0] == '\0')
        return "a topic is empty";
    if (t[0] == '$')
        return "a topic starts with '$', which is reserved for the broker";
    if (strpbrk(t, "+#"))
        return "a topic contains the wildcard '+' or '#'";
    if (!at)
        return "a topic has no {device_id} level";
    if (strstr(at + len, placeholder))
        return "a topic has {device_id} more than once";
    if ((at != t && at[-1] != '/') || (at[len] != '\0' && at[len] != '/'))
        return "{device_id} must be a whole topic level, such as "
               "devices/{device_id}/data";
    if (strlen(t) > 65535)
        return "a topic is longer than 65535 bytes";
    return NULL;
}

/* Splits the comma-separated topics of `b` into b->topics, trimming
 * spaces around each. Returns 0, ING_ENOMEM, or VALUE_INVALID with the
 * reason in `*reason`. */
static int split_topics(config_bridge_t *b, const char **reason)
{
    const char *p = b->topics_text;
    size_t count = 1;

    for (const char *c = p; *c; c++)
        count += *c == ',';
    b->topics = calloc(count, sizeof *b->topics);
    if (!b->topics)
        return ING_ENOMEM;
    for (;;) {
        size_t n = strcspn(p, ",");
        const char *start = p, *end = p + n;
        char *topic;

        while (start < end && *start == ' ')
            start++;
        while (end > start && end[-1] == ' ')
            end--;
        topic = strndup(start, (size_t)(end - start));
        if (!topic)
            return ING_ENOMEM;
        b->topics[b->topic_count++] = topic;
        *reason = check_topic_template(topic);
        if (*reason)
            return VALUE_INVALID;
        for (size_t i = 0; i + 1 < b->topic_count; i++) {
            if (strcmp(b->topics[i], topic) == 0) {
                *reason = "a topic is listed twice";
                return VALUE_INVALID;
            }
        }
        if (p[n] == '\0')
            return 0;
        p += n + 1;
    }
}

/* Reads the secret in the file `path` into a new string in `*out`. One
 * trailing line end is dropped, since editors add it. `prefix` names the
 * bridge or sink in messages. */
static int read_password_file(load_t *ld, const char *path, const char *prefix,
                              unsigned long line, char **out)
{
    char reason[128];
    char buf[PASSWORD_FILE_MAX + 1];
    size_t n;
    FILE *f;

    if (open_regular_file(path, &f, reason, sizeof reason) != 0)
        return config_fail(&ld->error, line,
                           "%s.password_file: cannot read %s: %s", prefix,
                           path, reason);
    n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    if (n > PASSWORD_FILE_MAX)
        return config_fail(&ld->error, line,
                           "%s.password_file: %s is over %d bytes; it must "
                           "contain only the password",
                           prefix, path, PASSWORD_FILE_MAX);
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    buf[n] = '\0';
    if (n == 0 || strlen(buf) != n)
        return config_fail(&ld->error, line,
                           "%s.password_file: %s is empty or contains a NUL "
                           "character",
                           prefix, path);
    *out = strdup(buf);
    explicit_bzero(buf, sizeof buf);
    return *out ? 0 : config_fail_nomem(&ld->error);
}

/* Returns the line of bridge key `key`, or of the whole entry when the
 * entry leaves the key at its default. */
static unsigned long bridge_line(const config_node_t *map,
                                 const config_node_t **nodes, const char *key)
{
    const directive_t *d =
        find_directive(bridge_directives, ARRAY_LEN(bridge_directives), key);
    const config_node_t *node = nodes[d - bridge_directives];

    return node ? node->line : map->line;
}

/* Checks the rules of one bridge that span several keys. `nodes` contains
 * the value node of each bridge directive that the entry sets. */
static int finish_bridge(load_t *ld, size_t index, const config_node_t *map,
                         const config_node_t **nodes)
{
    config_bridge_t *b = &ld->cfg->bridges[index];
    const char *reason = NULL;
    char prefix[32];
    int rc;

    snprintf(prefix, sizeof prefix, "bridges[%zu]", index);
    if (!b->client_id) {
        size_t size = strlen(b->name) + sizeof "ingestd-";

        b->client_id = malloc(size);
        if (!b->client_id)
            return config_fail_nomem(&ld->error);
        snprintf(b->client_id, size, "ingestd-%s", b->name);
    }
    rc = split_topics(b, &reason);
    if (rc == ING_ENOMEM)
        return config_fail_nomem(&ld->error);
    if (rc != 0)
        return config_fail(&ld->error, bridge_line(map, nodes, "topics"),
                           "%s.topics: %s in \"%s\"", prefix, reason,
                           b->topics_text);
    if (b->feedback_topic && (reason = check_topic_template(b->feedback_topic)))
        return config_fail(&ld->error,
                           bridge_line(map, nodes, "feedback_topic"),
                           "%s.feedback_topic: %s", prefix, reason);
    if (b->shared_group && strpbrk(b->shared_group, "/+#"))
        return config_fail(&ld->error, bridge_line(map, nodes, "shared_group"),
                           "%s.shared_group: expected a name without '/', "
                           "'+' or '#', got \"%s\"",
                           prefix, b->shared_group);
    if (b->reconnect_min_ms > b->reconnect_max_ms)
        return config_fail(&ld->error, bridge_line(map, nodes, "reconnect_min"),
                           "%s.reconnect_min: must not be greater than "
                           "reconnect_max",
                           prefix);
    if (!b->tls_cert_file != !b->tls_key_file)
        return config_fail(&ld->error, map->line,
                           "%s: set both tls_cert_file and tls_key_file, or "
                           "neither",
                           prefix);
    if (b->password && b->password_file)
        return config_fail(&ld->error, bridge_line(map, nodes, "password_file"),
                           "%s: set either password or password_file, not "
                           "both",
                           prefix);
    if (b->password_file)
        return read_password_file(ld, b->password_file, prefix,
                                  bridge_line(map, nodes, "password_file"),
                                  &b->password);
    return 0;
}

static int parse_bridge(load_t *ld, size_t index, const config_node_t *map)
{
    config_t *cfg = ld->cfg;
    config_bridge_t *b = &cfg->bridges[index];
    const config_node_t *nodes[ARRAY_LEN(bridge_directives)] = {0};
    char prefix[32], name[96], known[256];
    int rc;

    cfg->bridge_count = index + 1;
    snprintf(prefix, sizeof prefix, "bridges[%zu]", index);
    rc = apply_defaults(ld, bridge_directives, ARRAY_LEN(bridge_directives), b);
    if (rc != 0)
        return rc;
    join_keys(bridge_directives, ARRAY_LEN(bridge_directives), "", known,
              sizeof known);
    if (map->kind != YAML_MAPPING_NODE)
        return config_fail(&ld->error, map->line,
                           "%s: expected a mapping with keys %s, got %s",
                           prefix, known, config_node_describe(map));
    rc = config_node_check_keys(&ld->error, map, prefix);
    for (size_t i = 0; rc == 0 && i < map->count; i += 2) {
        const config_node_t *key = map->items[i];
        const directive_t *d = find_directive(
            bridge_directives, ARRAY_LEN(bridge_directives), key->text);

        if (!d)
            return fail_unknown_key(ld, key, prefix, known);
        snprintf(name, sizeof name, "%s.%s", prefix, d->name);
        rc = apply_directive(ld, d, b, name, map->items[i + 1]);
        nodes[d - bridge_directives] = map->items[i + 1];
    }
    if (rc != 0)
        return rc;
    if (!b->name)
        return config_fail(&ld->error, map->line,
                           "%s: missing required key \"name\"", prefix);
    for (size_t j = 0; j < index; j++) {
        if (strcmp(cfg->bridges[j].name, b->name) == 0)
            return config_fail(&ld->error, bridge_line(map, nodes, "name"),
                               "%s.name: \"%s\" is already the name of "
                               "bridges[%zu]; bridge names must be unique",
                               prefix, b->name, j);
    }
    rc = finish_bridge(ld, index, map, nodes);
    if (rc != 0)
        return rc;
    /* The broker ends the older of two connections with one client id. */
    for (size_t j = 0; j < index; j++) {
        const config_bridge_t *other = &cfg->bridges[j];

        if (strcmp(other->client_id, b->client_id) == 0 &&
            strcmp(other->host, b->host) == 0 && other->port == b->port)
            return config_fail(&ld->error, map->line,
                               "%s.client_id: \"%s\" is already the client "
                               "id of bridges[%zu] on the same broker",
                               prefix, b->client_id, j);
    }
    return 0;
}

static int parse_bridges(load_t *ld, const config_node_t *seq)
{
    int rc = 0;

    if (config_node_is_null(seq))
        return 0;
    if (seq->kind != YAML_SEQUENCE_NODE)
        return config_fail(
            &ld->error, seq->line,
            "bridges: expected a sequence of bridge mappings, got %s",
            config_node_describe(seq));
    ld->cfg->bridges =
        calloc(seq->count ? seq->count : 1, sizeof *ld->cfg->bridges);
    if (!ld->cfg->bridges)
        return config_fail_nomem(&ld->error);
    for (size_t i = 0; rc == 0 && i < seq->count; i++)
        rc = parse_bridge(ld, i, seq->items[i]);
    return rc;
}

/* ---- The whole file ---- */

static int parse_root(load_t *ld, const config_node_t *root)
{
    char known[256];
    int rc = 0;

    if (!root || config_node_is_null(root))
        return 0;
    if (root->kind != YAML_MAPPING_NODE)
        return config_fail(
            &ld->error, root->line,
            "expected a mapping of keys at the top level, got %s",
            config_node_describe(root));
    rc = config_node_check_keys(&ld->error, root, "");
    for (size_t i = 0; rc == 0 && i < root->count; i += 2) {
        const config_node_t *key = root->items[i];
        const config_node_t *value = root->items[i + 1];
        const directive_t *d =
            find_directive(directives, ARRAY_LEN(directives), key->text);

        if (strcmp(key->text, "device_types") == 0) {
            rc = parse_device_types(ld, key, value);
        } else if (strcmp(key->text, "sinks") == 0) {
            rc = parse_sinks(ld, value);
        } else if (strcmp(key->text, "bridges") == 0) {
            rc = parse_bridges(ld, value);
        } else if (is_section(key->text)) {
            rc = parse_section(ld, key, value);
        } else if (d && !strchr(d->name, '.')) {
            rc = apply_directive(ld, d, ld->cfg, d->name, value);
            ld->lines[d - directives] = value->line;
        } else {
            join_keys(directives, ARRAY_LEN(directives), "", known,
                      sizeof known);
            strncat(known, ", device_types, sinks, bridges",
                    sizeof known - strlen(known) - 1);
            rc = fail_unknown_key(ld, key, NULL, known);
        }
    }
    return rc;
}

static unsigned long line_of(const load_t *ld, const char *name)
{
    const directive_t *d =
        find_directive(directives, ARRAY_LEN(directives), name);

    return ld->lines[d - directives];
}

static int add_default_sink(load_t *ld)
{
    config_t *cfg = ld->cfg;
    int rc;

    cfg->sinks = calloc(1, sizeof *cfg->sinks);
    if (!cfg->sinks)
        return config_fail_nomem(&ld->error);
    cfg->sink_count = 1;
    rc = apply_defaults(ld, sink_directives, ARRAY_LEN(sink_directives),
                        cfg->sinks);
    if (rc != 0)
        return rc;
    cfg->sinks[0].name = strdup("file");
    return cfg->sinks[0].name ? 0 : config_fail_nomem(&ld->error);
}

/* ---- Sinks: values and rules that depend on the type ---- */

#define KIND_BIT(kind) (1u << (kind))
#define BROKER_KINDS                                                           \
    (KIND_BIT(CONFIG_SINK_KAFKA) | KIND_BIT(CONFIG_SINK_REDIS) |               \
     KIND_BIT(CONFIG_SINK_RABBITMQ) | KIND_BIT(CONFIG_SINK_NATS) |             \
     KIND_BIT(CONFIG_SINK_MQTT))

/* The sink types each type-specific key applies to. Keys not listed here
 * (name, type, batch_records, timeout, retry_min, retry_max, dead_letter)
 * apply to every type. Setting a key that the type ignores is an error,
 * because it is most likely a mistake about which sink is which. */
static const struct {
    const char *key;
    unsigned kinds;
} sink_key_kinds[] = {
    {"path", KIND_BIT(CONFIG_SINK_FILE)},
    {"rotate_size", KIND_BIT(CONFIG_SINK_FILE)},
    {"fsync", KIND_BIT(CONFIG_SINK_FILE)},
    {"address", BROKER_KINDS},
    {"topic", BROKER_KINDS},
    {"exchange", KIND_BIT(CONFIG_SINK_RABBITMQ)},
    {"vhost", KIND_BIT(CONFIG_SINK_RABBITMQ)},
    {"mode", KIND_BIT(CONFIG_SINK_REDIS)},
    {"maxlen", KIND_BIT(CONFIG_SINK_REDIS)},
    {"username", BROKER_KINDS},
    {"password", BROKER_KINDS},
    {"password_file", BROKER_KINDS},
    {"tls", BROKER_KINDS},
    {"tls_ca_file", BROKER_KINDS},
    {"tls_cert_file", BROKER_KINDS},
    {"tls_key_file", BROKER_KINDS},
    {"compression", KIND_BIT(CONFIG_SINK_KAFKA)},
    {"linger", KIND_BIT(CONFIG_SINK_KAFKA)},
    {"kafka_properties", KIND_BIT(CONFIG_SINK_KAFKA)},
    {"qos", KIND_BIT(CONFIG_SINK_MQTT)},
    {"client_id", KIND_BIT(CONFIG_SINK_MQTT)},
    {"stream", KIND_BIT(CONFIG_SINK_NATS)},
};

/* Broker address and topic template by sink type; NULL for the file sink. */
static const char *const sink_default_address[] = {
    [CONFIG_SINK_KAFKA] = "127.0.0.1:9092",
    [CONFIG_SINK_REDIS] = "127.0.0.1:6379",
    [CONFIG_SINK_RABBITMQ] = "127.0.0.1:5672",
    [CONFIG_SINK_NATS] = "nats://127.0.0.1:4222",
    [CONFIG_SINK_MQTT] = "127.0.0.1:1883",
};
static const char *const sink_default_topic[] = {
    [CONFIG_SINK_KAFKA] = "telemetry.{device_type}",
    [CONFIG_SINK_REDIS] = "telemetry:{device_type}",
    [CONFIG_SINK_RABBITMQ] = "{device_type}.{device_id}",
    [CONFIG_SINK_NATS] = "telemetry.{device_type}.{device_id}",
    [CONFIG_SINK_MQTT] = "telemetry/{device_type}/{device_id}",
};
_Static_assert(ARRAY_LEN(sink_default_address) == CONFIG_SINK_MQTT + 1 &&
                   ARRAY_LEN(sink_default_topic) == CONFIG_SINK_MQTT + 1,
               "every sink type needs a default address and topic");

/* Returns the value node of `key` in sinks[index], or NULL when the entry
 * leaves it at its default or there is no sinks section. */
static const config_node_t *sink_node(const load_t *ld, size_t index,
                                      const char *key)
{
    const config_node_t *map;

    if (!ld->sinks_node)
        return NULL;
    map = ld->sinks_node->items[index];
    for (size_t i = 0; i + 1 < map->count; i += 2) {
        if (strcmp(map->items[i]->text, key) == 0)
            return map->items[i + 1];
    }
    return NULL;
}

/* Returns the line of `key` in sinks[index], or of the entry when the key
 * is at its default, or 0 for the built-in default sink. */
static unsigned long sink_line(const load_t *ld, size_t index,
                               const char *key)
{
    const config_node_t *node = sink_node(ld, index, key);

    if (node)
        return node->line;
    return ld->sinks_node ? ld->sinks_node->items[index]->line : 0;
}

/* Checks a destination template with the rules of sink_template_compile
 * in src/sinks/template.c: '{' and '}' appear only in {device_id},
 * {device_type} or {protocol}. Returns NULL when valid, or the reason,
 * formatted into `buf`. */
static const char *check_sink_template(const char *t, char *buf, size_t size)
{
    static const char *const names[] = {"{device_id}", "{device_type}",
                                        "{protocol}"};

    for (const char *p = t; *p; p++) {
        const char *close;
        bool known = false;

        if (*p == '}') {
            snprintf(buf, size, "'}' without '{' at offset %zu",
                     (size_t)(p - t));
            return buf;
        }
        if (*p != '{')
            continue;
        close = strchr(p, '}');
        if (!close) {
            snprintf(buf, size, "'{' at offset %zu has no closing '}'",
                     (size_t)(p - t));
            return buf;
        }
        for (size_t i = 0; i < ARRAY_LEN(names) && !known; i++)
            known = strlen(names[i]) == (size_t)(close - p + 1) &&
                    strncmp(p, names[i], (size_t)(close - p + 1)) == 0;
        if (!known) {
            snprintf(buf, size,
                     "unknown placeholder %.*s; use {device_id}, "
                     "{device_type} or {protocol}",
                     (int)(close - p + 1 > 64 ? 64 : close - p + 1), p);
            return buf;
        }
        p = close;
    }
    return NULL;
}

/* Checks "host:port" with a port from 1 to 65535. The host may be a name,
 * resolved by the sink when it connects. */
static bool is_valid_host_port(const char *s, size_t len)
{
    const char *colon = memrchr(s, ':', len);
    uint64_t port = 0;

    if (!colon || colon == s || colon == s + len - 1)
        return false;
    for (const char *p = colon + 1; p < s + len; p++) {
        if (*p < '0' || *p > '9' || port > 65535)
            return false;
        port = port * 10 + (uint64_t)(*p - '0');
    }
    return port >= 1 && port <= 65535;
}

/* Checks a sink's address: host:port, a comma-separated list of them for
 * kafka, or a nats:// or tls:// URL for nats. Returns NULL when valid, or
 * what was expected. */
static const char *check_sink_address(enum config_sink_kind kind,
                                      const char *address)
{
    const char *p = address;

    if (kind == CONFIG_SINK_NATS) {
        if (strncmp(address, "nats://", 7) != 0 &&
            strncmp(address, "tls://", 6) != 0)
            return "a URL such as nats://127.0.0.1:4222";
        return NULL;
    }
    for (;;) {
        size_t n = strcspn(p, ",");

        if (kind != CONFIG_SINK_KAFKA && p[n] == ',')
            return "host:port such as 127.0.0.1:6379";
        if (!is_valid_host_port(p, n))
            return kind == CONFIG_SINK_KAFKA
                       ? "host:port or a comma-separated list of them, "
                         "such as 127.0.0.1:9092"
                       : "host:port such as 127.0.0.1:6379";
        if (p[n] == '\0')
            return NULL;
        p += n + 1;
    }
}

static int check_sink_keys(load_t *ld, size_t index, const char *prefix)
{
    config_sink_t *sink = &ld->cfg->sinks[index];

    for (size_t i = 0; i < ARRAY_LEN(sink_key_kinds); i++) {
        const config_node_t *node = sink_node(ld, index, sink_key_kinds[i].key);

        if (node && !(sink_key_kinds[i].kinds & KIND_BIT(sink->kind)))
            return config_fail(&ld->error, node->line,
                               "%s.%s: does not apply to a sink of type %s; "
                               "remove it",
                               prefix, sink_key_kinds[i].key,
                               sink_kinds[sink->kind]);
    }
    return 0;
}

/* Stores a copy of `value` in `*field` unless the file set it. */
static int default_string(load_t *ld, char **field, const char *value)
{
    if (*field || !value)
        return 0;
    *field = strdup(value);
    return *field ? 0 : config_fail_nomem(&ld->error);
}

static int set_sink_defaults(load_t *ld, config_sink_t *sink)
{
    const config_t *cfg = ld->cfg;
    char file[NAME_MAX_LEN + 32];
    int rc;

    if (sink->kind == CONFIG_SINK_FILE && !sink->path) {
        sink->path = join_path(cfg->data_dir, strlen(cfg->data_dir), "out");
        if (!sink->path)
            return config_fail_nomem(&ld->error);
    }
    if (!sink->dead_letter) {
        snprintf(file, sizeof file, "dead-letter/%s.ndjson", sink->name);
        sink->dead_letter =
            join_path(cfg->data_dir, strlen(cfg->data_dir), file);
        if (!sink->dead_letter)
            return config_fail_nomem(&ld->error);
    }
    rc = default_string(ld, &sink->address, sink_default_address[sink->kind]);
    if (rc == 0)
        rc = default_string(ld, &sink->topic, sink_default_topic[sink->kind]);
    if (rc == 0 && sink->kind == CONFIG_SINK_MQTT && !sink->client_id) {
        snprintf(file, sizeof file, "ingestd-%s", sink->name);
        rc = default_string(ld, &sink->client_id, file);
    }
    return rc;
}

/* Checks the rules of a broker sink that span several keys, and reads its
 * password_file. */
static int finish_broker_sink(load_t *ld, size_t index, const char *prefix)
{
    config_sink_t *sink = &ld->cfg->sinks[index];
    const char *expected;
    char reason[160];

    if ((expected = check_sink_address(sink->kind, sink->address)))
        return config_fail(&ld->error, sink_line(ld, index, "address"),
                           "%s.address: expected %s, got \"%s\"", prefix,
                           expected, sink->address);
    if (check_sink_template(sink->topic, reason, sizeof reason))
        return config_fail(&ld->error, sink_line(ld, index, "topic"),
                           "%s.topic: %s in \"%s\"", prefix, reason,
                           sink->topic);
    if (sink->kind == CONFIG_SINK_RABBITMQ &&
        check_sink_template(sink->exchange, reason, sizeof reason))
        return config_fail(&ld->error, sink_line(ld, index, "exchange"),
                           "%s.exchange: %s in \"%s\"", prefix, reason,
                           sink->exchange);
    if (!sink->tls_cert_file != !sink->tls_key_file)
        return config_fail(&ld->error, sink_line(ld, index, "tls_cert_file"),
                           "%s: set both tls_cert_file and tls_key_file, or "
                           "neither",
                           prefix);
    if (!sink->tls && (sink->tls_ca_file || sink->tls_cert_file))
        return config_fail(&ld->error, sink_line(ld, index, "tls"),
                           "%s: tls_ca_file, tls_cert_file and tls_key_file "
                           "need tls: true",
                           prefix);
    /* Debian 12's hiredis (0.14) is built without hiredis_ssl. */
    if (sink->kind == CONFIG_SINK_REDIS && sink->tls)
        return config_fail(&ld->error, sink_line(ld, index, "tls"),
                           "%s.tls: the redis sink does not support TLS "
                           "(the hiredis library it uses has no TLS); "
                           "reach Redis over loopback or a TLS tunnel",
                           prefix);
    if (sink->kind == CONFIG_SINK_REDIS &&
        sink->mode == CONFIG_REDIS_PUBSUB && sink->maxlen > 0)
        return config_fail(&ld->error, sink_line(ld, index, "maxlen"),
                           "%s.maxlen: applies only to mode: stream", prefix);
    if (sink->password && sink->password_file)
        return config_fail(&ld->error, sink_line(ld, index, "password_file"),
                           "%s: set either password or password_file, not "
                           "both",
                           prefix);
    if (sink->password_file)
        return read_password_file(ld, sink->password_file, prefix,
                                  sink_line(ld, index, "password_file"),
                                  &sink->password);
    return 0;
}

/* Checks that sinks[index] shares no file with an earlier sink: two file
 * sinks in one folder, or two sinks with one dead-letter file, would write
 * over each other's lines. */
static int check_sink_files_unique(load_t *ld, size_t index)
{
    const config_sink_t *sink = &ld->cfg->sinks[index];

    for (size_t j = 0; j < index; j++) {
        const config_sink_t *other = &ld->cfg->sinks[j];

        if (sink->path && other->path && strcmp(other->path, sink->path) == 0)
            return config_fail(&ld->error, sink_line(ld, index, "path"),
                               "sinks[%zu].path: %s is already the path of "
                               "sinks[%zu]; give each sink its own folder",
                               index, sink->path, j);
        if (strcmp(other->dead_letter, sink->dead_letter) == 0)
            return config_fail(&ld->error, sink_line(ld, index, "dead_letter"),
                               "sinks[%zu].dead_letter: %s is already the "
                               "dead-letter file of sinks[%zu]; give each "
                               "sink its own",
                               index, sink->dead_letter, j);
    }
    return 0;
}

static int finish_sink(load_t *ld, size_t index)
{
    config_sink_t *sink = &ld->cfg->sinks[index];
    char prefix[32];
    int rc;

    snprintf(prefix, sizeof prefix, "sinks[%zu]", index);
    rc = check_sink_keys(ld, index, prefix);
    if (rc == 0)
        rc = set_sink_defaults(ld, sink);
    if (rc != 0)
        return rc;
    if (sink->retry_min_ms > sink->retry_max_ms)
        return config_fail(&ld->error, sink_line(ld, index, "retry_min"),
                           "%s.retry_min: must not be greater than retry_max",
                           prefix);
    if (sink->kind != CONFIG_SINK_FILE) {
        rc = finish_broker_sink(ld, index, prefix);
        if (rc != 0)
            return rc;
    }
    return check_sink_files_unique(ld, index);
}

static int finish_sinks(load_t *ld)
{
    config_t *cfg = ld->cfg;
    int rc;

    if (cfg->sink_count == 0) {
        rc = add_default_sink(ld);
        if (rc != 0)
            return rc;
    }
    for (size_t i = 0; i < cfg->sink_count; i++) {
        rc = finish_sink(ld, i);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Returns the address of a listener other than `self` that `listen`
 * repeats, or NULL. */
static const char *listen_clash(const config_t *cfg, const char *self,
                                const char *listen)
{
    const char *names[] = {"http.listen", "admin.listen", "mqtt.listen",
                           "https.listen", "mqtts.listen"};
    const char *values[] = {cfg->http.listen, cfg->admin.listen,
                            cfg->mqtt.listen, cfg->https.listen,
                            cfg->mqtts.listen};

    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        if (strcmp(names[i], self) != 0 && values[i] != NULL &&
            strcmp(values[i], listen) == 0)
            return names[i];
    }
    return NULL;
}

/* Checks the TLS listeners: each needs its own address, and the server
 * certificate and key; client certificates need a CA bundle. The files
 * themselves are read when the listeners start and by check-config. */
static int finish_tls(load_t *ld)
{
    config_t *cfg = ld->cfg;
    const char *names[] = {"https.listen", "mqtts.listen"};
    const char *values[] = {cfg->https.listen, cfg->mqtts.listen};
    int on = cfg->https.listen != NULL || cfg->mqtts.listen != NULL;

    for (size_t i = 0; i < ARRAY_LEN(names); i++) {
        const char *other;

        if (values[i] == NULL)
            continue;
        other = listen_clash(cfg, names[i], values[i]);
        if (other != NULL)
            return config_fail(&ld->error, line_of(ld, names[i]),
                               "%s: %s is also %s; use another port",
                               names[i], values[i], other);
    }
    if (on && (cfg->tls.cert_file == NULL || cfg->tls.key_file == NULL))
        return config_fail(
            &ld->error,
            line_of(ld, cfg->https.listen ? "https.listen" : "mqtts.listen"),
            "%s: a TLS listener needs tls.cert_file and tls.key_file",
            cfg->https.listen ? "https.listen" : "mqtts.listen");
    if (cfg->tls.client_auth != CONFIG_TLS_CLIENT_AUTH_NONE &&
        cfg->tls.ca_file == NULL)
        return config_fail(&ld->error, line_of(ld, "tls.client_auth"),
                           "tls.client_auth: %s needs tls.ca_file, the CA "
                           "bundle that client certificates are checked "
                           "against",
                           tls_client_auths[cfg->tls.client_auth]);
    if (cfg->tls.crl_file != NULL && cfg->tls.ca_file == NULL)
        return config_fail(&ld->error, line_of(ld, "tls.crl_file"),
                           "tls.crl_file: a CRL needs tls.ca_file, the CA "
                           "bundle of the certificates it revokes");
    return 0;
}

/* Fills the values derived from others and checks rules that span
 * several directives. */
static int finish_config(load_t *ld)
{
    config_t *cfg = ld->cfg;
    int rc;
    char names[256];
    char segment[32], max[32];
    size_t used = 0;

    if (!cfg->registry.path) {
        cfg->registry.path =
            join_path(cfg->data_dir, strlen(cfg->data_dir), "registry.db");
        if (!cfg->registry.path)
            return config_fail_nomem(&ld->error);
    }
    if (cfg->device_type_count == 0)
        return config_fail(
            &ld->error, ld->device_types_line,
            "device_types: at least one device type is required");
    if (!config_device_type(cfg, cfg->default_device_type)) {
        unsigned long line = line_of(ld, "default_device_type");

        names[0] = '\0';
        for (size_t i = 0; i < cfg->device_type_count && used < sizeof names;
             i++)
            used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
                                     i ? ", " : "", cfg->device_types[i].name);
        return config_fail(
            &ld->error, line ? line : ld->device_types_line,
            "default_device_type: \"%s\" is not a configured device "
            "type (configured: %s)",
            cfg->default_device_type, names);
    }
    /* The spool frees space only by deleting a whole segment that every
     * sink has passed, so it needs room for that segment and the one being
     * written. */
    if (cfg->spool.max_size / 2 < cfg->spool.segment_size) {
        unsigned long line = line_of(ld, "spool.max_size");

        format_size(max, sizeof max, cfg->spool.max_size);
        format_size(segment, sizeof segment, cfg->spool.segment_size);
        return config_fail(&ld->error,
                           line ? line : line_of(ld, "spool.segment_size"),
                           "spool.max_size: expected at least twice "
                           "spool.segment_size (%s), got %s",
                           segment, max);
    }
    if (cfg->spool.low_mark >= cfg->spool.high_mark)
        return config_fail(&ld->error,
                           line_of(ld, "spool.low_mark")
                               ? line_of(ld, "spool.low_mark")
                               : line_of(ld, "spool.high_mark"),
                           "spool.low_mark: expected a percentage below "
                           "spool.high_mark (%llu), got %llu",
                           (unsigned long long)cfg->spool.high_mark,
                           (unsigned long long)cfg->spool.low_mark);
    if (cfg->admin.listen && strcmp(cfg->admin.listen, cfg->http.listen) == 0)
        return config_fail(
            &ld->error, line_of(ld, "admin.listen"),
            "admin.listen: %s is also http.listen; use another port",
            cfg->admin.listen);
    rc = finish_tls(ld);
    if (rc != 0)
        return rc;
    return finish_sinks(ld);
}

/* Stores the canonical folder of `path` in `*out`. */
static int find_config_dir(load_t *ld, const char *path, char **out)
{
    const char *slash = strrchr(path, '/');
    char *folder;

    if (!slash)
        folder = strdup(".");
    else if (slash == path)
        folder = strdup("/");
    else
        folder = strndup(path, (size_t)(slash - path));
    if (!folder)
        return config_fail_nomem(&ld->error);
    *out = realpath(folder, NULL);
    if (!*out) {
        int rc =
            errno == ENOMEM
                ? config_fail_nomem(&ld->error)
                : config_fail(&ld->error, 0, "cannot resolve the folder %s: %s",
                              folder, strerror(errno));

        free(folder);
        return rc;
    }
    free(folder);
    return 0;
}

int config_load(const char *path, config_t **out, char *err, size_t errlen)
{
    load_t ld = {.error = {.file = path, .buf = err, .size = errlen}};
    config_node_t *root = NULL;
    char reason[128];
    FILE *f;
    int rc;

    *out = NULL;
    if (errlen > 0)
        err[0] = '\0';
    if (open_regular_file(path, &f, reason, sizeof reason) != 0)
        return config_fail(&ld.error, 0, "cannot read the config file: %s",
                           reason);
    ld.cfg = calloc(1, sizeof *ld.cfg);
    if (!ld.cfg) {
        fclose(f);
        return config_fail_nomem(&ld.error);
    }
    ld.cfg->path = strdup(path);
    if (!ld.cfg->path) {
        rc = config_fail_nomem(&ld.error);
        goto error;
    }
    rc = find_config_dir(&ld, path, &ld.cfg->dir);
    if (rc == 0)
        rc = config_yaml_read(&ld.error, f, &root);
    if (rc == 0)
        rc = apply_defaults(&ld, directives, ARRAY_LEN(directives), ld.cfg);
    if (rc == 0)
        rc = parse_root(&ld, root);
    if (rc == 0)
        rc = finish_config(&ld);
    if (rc != 0)
        goto error;
    fclose(f);
    config_node_free(root);
    *out = ld.cfg;
    return 0;

error:
    fclose(f);
    config_node_free(root);
    config_free(ld.cfg);
    return rc;
}

const config_device_type_t *config_device_type(const config_t *cfg,
                                               const char *name)
{
    for (size_t i = 0; i < cfg->device_type_count; i++) {
        if (strcmp(cfg->device_types[i].name, name) == 0)
            return &cfg->device_types[i];
    }
    return NULL;
}

static void free_bridge(config_bridge_t *b)
{
    free(b->name);
    free(b->host);
    free(b->client_id);
    free(b->username);
    if (b->password)
        explicit_bzero(b->password, strlen(b->password));
    free(b->password);
    free(b->password_file);
    for (size_t i = 0; i < b->topic_count; i++)
        free(b->topics[i]);
    free(b->topics);
    free(b->topics_text);
    free(b->shared_group);
    free(b->tls_ca_file);
    free(b->tls_cert_file);
    free(b->tls_key_file);
    free(b->feedback_topic);
}

static void free_sink(config_sink_t *sink)
{
    free(sink->name);
    free(sink->dead_letter);
    free(sink->path);
    free(sink->address);
    free(sink->topic);
    free(sink->exchange);
    free(sink->vhost);
    free(sink->username);
    if (sink->password)
        explicit_bzero(sink->password, strlen(sink->password));
    free(sink->password);
    free(sink->password_file);
    free(sink->tls_ca_file);
    free(sink->tls_cert_file);
    free(sink->tls_key_file);
    free(sink->kafka_properties);
    free(sink->client_id);
    free(sink->stream);
}

void config_free(config_t *cfg)
{
    if (!cfg)
        return;
    for (size_t i = 0; i < cfg->device_type_count; i++) {
        free(cfg->device_types[i].name);
        free(cfg->device_types[i].schema_path);
        json_decref(cfg->device_types[i].schema);
    }
    free(cfg->device_types);
    for (size_t i = 0; i < cfg->sink_count; i++)
        free_sink(&cfg->sinks[i]);
    free(cfg->sinks);
    for (size_t i = 0; i < cfg->bridge_count; i++)
        free_bridge(&cfg->bridges[i]);
    free(cfg->bridges);
    free(cfg->path);
    free(cfg->dir);
    free(cfg->data_dir);
    free(cfg->registry.path);
    free(cfg->jwt.audience);
    free(cfg->jwt.issuer);
    free(cfg->http.listen);
    free(cfg->admin.listen);
    free(cfg->mqtt.listen);
    free(cfg->mqtt.topics);
    free(cfg->https.listen);
    free(cfg->mqtts.listen);
    free(cfg->tls.cert_file);
    free(cfg->tls.key_file);
    free(cfg->tls.ca_file);
    free(cfg->tls.crl_file);
    free(cfg->idempotency.field);
    free(cfg->idempotency.mqtt_user_property);
    free(cfg->default_device_type);
    free(cfg);
}
