/* Unit tests for config loading (src/core/config.c).
 *
 * Each test writes its YAML into a fresh temporary folder together with a
 * small JSON Schema file, so no test depends on files in the repository.
 */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/config.h"
#include "core/errors.h"
#include "core/log.h"

/* The smallest valid config: one device type with a schema file. */
#define MINIMAL "device_types:\n  default:\n    schema: reading.json\n"

#define READING_SCHEMA                                                         \
    "{\"type\": \"object\", \"required\": [\"temperature\"],\n"                \
    " \"properties\": {\"temperature\": {\"type\": \"number\"}}}\n"

typedef struct fixture {
    char dir[PATH_MAX];         /* canonical temporary folder */
    char config_path[PATH_MAX]; /* dir/ingestd.yaml */
    char err[512];
    config_t *cfg;
} fixture_t;

/* Formats into `buf` and fails the test if the text does not fit. */
static void format_text(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    assert_true(n >= 0 && (size_t)n < size);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[PATH_MAX];
    FILE *f;

    format_text(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static int setup(void **state)
{
    fixture_t *fx = calloc(1, sizeof *fx);
    char template[] = "/tmp/ingestd-config-test-XXXXXX";

    if (!fx || !mkdtemp(template) || !realpath(template, fx->dir))
        return -1;
    format_text(fx->config_path, sizeof fx->config_path, "%s/ingestd.yaml",
                fx->dir);
    write_file(fx->dir, "reading.json", READING_SCHEMA);
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *fx = *state;
    char command[PATH_MAX + 16];

    config_free(fx->cfg);
    /* The folder name comes from mkdtemp, so it has no shell metacharacters. */
    format_text(command, sizeof command, "rm -rf '%s'", fx->dir);
    if (system(command) != 0)
        return -1;
    free(fx);
    return 0;
}

/* Writes `yaml` as the config file and loads it. */
static int load(fixture_t *fx, const char *yaml)
{
    config_free(fx->cfg);
    fx->cfg = NULL;
    write_file(fx->dir, "ingestd.yaml", yaml);
    return config_load(fx->config_path, &fx->cfg, fx->err, sizeof fx->err);
}

static void expect_loaded(fixture_t *fx, const char *yaml)
{
    int rc = load(fx, yaml);

    assert_string_equal(fx->err, "");
    assert_int_equal(rc, 0);
    assert_non_null(fx->cfg);
}

/* Loads `yaml`, expects ING_ECONFIG and the message `expected` after the
 * "<config path>:" prefix. */
static void expect_error(fixture_t *fx, const char *yaml, const char *expected)
{
    char full[1024];
    int rc = load(fx, yaml);

    format_text(full, sizeof full, "%s:%s", fx->config_path, expected);
    assert_string_equal(fx->err, full);
    assert_int_equal(rc, ING_ECONFIG);
    assert_null(fx->cfg);
}

static char *path_in(const fixture_t *fx, const char *name)
{
    static char path[PATH_MAX];

    format_text(path, sizeof path, "%s/%s", fx->dir, name);
    return path;
}

static void config_defaults(void **state)
{
    fixture_t *fx = *state;
    const config_t *cfg;

    expect_loaded(fx, MINIMAL);
    cfg = fx->cfg;
    assert_string_equal(cfg->path, fx->config_path);
    assert_string_equal(cfg->dir, fx->dir);
    assert_int_equal(cfg->log_level, LOG_LEVEL_INFO);
    assert_string_equal(cfg->data_dir, path_in(fx, "data"));
    assert_string_equal(cfg->registry.path, path_in(fx, "data/registry.db"));
    assert_int_equal(cfg->registry.key_grace_ms, 24 * 3600 * 1000);
    assert_int_equal(cfg->registry.reload_interval_ms, 2000);
    assert_int_equal(cfg->jwt.leeway_ms, 30000);
    assert_int_equal(cfg->jwt.max_lifetime_ms, 24 * 3600 * 1000);
    assert_null(cfg->jwt.audience);
    assert_null(cfg->jwt.issuer);
    assert_int_equal(cfg->auth.max_failures_per_minute, 10);
    assert_int_equal(cfg->auth.block_duration_ms, 60000);
    assert_int_equal(cfg->auth.guard_table_size, 4096);
    assert_string_equal(cfg->http.listen, "127.0.0.1:8080");
    assert_int_equal(cfg->http.workers, 0);
    assert_int_equal(cfg->http.max_header_bytes, 16 * 1024);
    assert_int_equal(cfg->http.max_body_bytes, 1024 * 1024);
    assert_int_equal(cfg->http.max_readings_per_request, 1000);
    assert_int_equal(cfg->http.header_timeout_ms, 10000);
    assert_int_equal(cfg->http.body_timeout_ms, 30000);
    assert_int_equal(cfg->http.idle_timeout_ms, 60000);
    assert_int_equal(cfg->http.max_connections, 10000);
    assert_int_equal(cfg->http.retry_after_s, 1);
    assert_string_equal(cfg->admin.listen, "127.0.0.1:9100");
    assert_int_equal(cfg->spool.durability, SPOOL_DURABILITY_FSYNC);
    assert_int_equal(cfg->spool.segment_size, 64 * 1024 * 1024);
    assert_int_equal(cfg->spool.max_size, UINT64_C(1) << 30);
    assert_int_equal(cfg->shutdown_timeout_ms, 10000);
    assert_string_equal(cfg->default_device_type, "default");

    assert_int_equal(cfg->device_type_count, 1);
    assert_string_equal(cfg->device_types[0].name, "default");
    assert_string_equal(cfg->device_types[0].schema_path,
                        path_in(fx, "reading.json"));
    assert_true(json_is_object(cfg->device_types[0].schema));
    assert_ptr_equal(config_device_type(cfg, "default"), &cfg->device_types[0]);
    assert_null(config_device_type(cfg, "other"));

    assert_int_equal(cfg->sink_count, 1);
    assert_string_equal(cfg->sinks[0].name, "file");
    assert_int_equal(cfg->sinks[0].kind, CONFIG_SINK_FILE);
    assert_string_equal(cfg->sinks[0].path, path_in(fx, "data/out"));
    assert_int_equal(cfg->sinks[0].rotate_size, 64 * 1024 * 1024);
    assert_int_equal(cfg->sinks[0].fsync, 1);
    assert_int_equal(cfg->sinks[0].batch_records, 512);
}

static void config_sets_every_section(void **state)
{
    fixture_t *fx = *state;
    const config_t *cfg;

    expect_loaded(fx, "log:\n"
                      "  level: debug\n"
                      "data_dir: /var/lib/ingestd\n"
                      "registry:\n"
                      "  path: devices.db\n"
                      "  key_grace_period: 1d\n"
                      "  reload_interval: 0\n"
                      "http:\n"
                      "  listen: \"[::1]:8443\"\n"
                      "  workers: 64\n"
                      "  max_header_bytes: 8KiB\n"
                      "  max_body_bytes: 2MB\n"
                      "  max_readings_per_request: 1\n"
                      "  header_timeout: 250ms\n"
                      "  body_timeout: 5m\n"
                      "  idle_timeout: 1h\n"
                      "  max_connections: 20\n"
                      "  retry_after: 1500ms\n"
                      "admin:\n"
                      "  listen: \"\"\n"
                      "spool:\n"
                      "  durability: none\n"
                      "  segment_size: 64KiB\n"
                      "  max_size: 128KiB\n"
                      "shutdown_timeout: 0\n"
                      "default_device_type: sensor\n" MINIMAL "  sensor:\n"
                      "    schema: reading.json\n");
    cfg = fx->cfg;
    assert_int_equal(cfg->log_level, LOG_LEVEL_DEBUG);
    assert_string_equal(cfg->data_dir, "/var/lib/ingestd");
    assert_string_equal(cfg->registry.path, path_in(fx, "devices.db"));
    assert_int_equal(cfg->registry.key_grace_ms, 86400000);
    assert_int_equal(cfg->registry.reload_interval_ms, 0);
    assert_string_equal(cfg->http.listen, "[::1]:8443");
    assert_int_equal(cfg->http.workers, 64);
    assert_int_equal(cfg->http.max_header_bytes, 8192);
    assert_int_equal(cfg->http.max_body_bytes, 2000000);
    assert_int_equal(cfg->http.max_readings_per_request, 1);
    assert_int_equal(cfg->http.header_timeout_ms, 250);
    assert_int_equal(cfg->http.body_timeout_ms, 300000);
    assert_int_equal(cfg->http.idle_timeout_ms, 3600000);
    assert_int_equal(cfg->http.max_connections, 20);
    assert_int_equal(cfg->http.retry_after_s, 2); /* rounded up */
    assert_null(cfg->admin.listen);
    assert_int_equal(cfg->spool.durability, SPOOL_DURABILITY_NONE);
    assert_int_equal(cfg->spool.segment_size, 65536);
    assert_int_equal(cfg->spool.max_size, 131072);
    assert_int_equal(cfg->shutdown_timeout_ms, 0);
    assert_string_equal(cfg->default_device_type, "sensor");
    assert_int_equal(cfg->device_type_count, 2);
    assert_string_equal(cfg->sinks[0].path, "/var/lib/ingestd/out");
}

static void config_parse_duration_good(void **state)
{
    static const struct {
        const char *text;
        uint64_t ms;
    } cases[] = {
        {"0", 0},
        {"0s", 0},
        {"250ms", 250},
        {"10s", 10000},
        {"5m", 300000},
        {"24h", 86400000},
        {"1d", 86400000},
        {"007s", 7000},
        {"18446744073709551615ms", UINT64_MAX},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t ms = 1;

        assert_int_equal(config_parse_duration_ms(cases[i].text, &ms), 0);
        assert_int_equal(ms, cases[i].ms);
    }
}

static void config_parse_duration_bad(void **state)
{
    static const char *const cases[] = {
        "",
        "10",
        "ms",
        "-1s",
        "1.5s",
        " 1s",
        "1s ",
        "1 s",
        "1S",
        "1sec",
        "1w",
        "+1s",
        "1s1",
        "18446744073709551616ms",
        "213503982334602d",
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t ms = 7;

        assert_int_equal(config_parse_duration_ms(cases[i], &ms), ING_EINVAL);
        assert_int_equal(ms, 7);
    }
    assert_int_equal(config_parse_duration_ms(NULL, NULL), ING_EINVAL);
}

static void config_parse_size_good(void **state)
{
    static const struct {
        const char *text;
        uint64_t bytes;
    } cases[] = {
        {"0", 0},
        {"512", 512},
        {"512B", 512},
        {"64KiB", 65536},
        {"64MiB", UINT64_C(64) << 20},
        {"1GiB", UINT64_C(1) << 30},
        {"2TiB", UINT64_C(2) << 40},
        {"3KB", 3000},
        {"5MB", 5000000},
        {"1GB", 1000000000},
        {"16777215TiB", UINT64_C(16777215) << 40},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t bytes = 1;

        assert_int_equal(config_parse_size(cases[i].text, &bytes), 0);
        assert_int_equal(bytes, cases[i].bytes);
    }
}

static void config_parse_size_bad(void **state)
{
    static const char *const cases[] = {
        "",      "lots",  "-1",   "-1KiB",       "1.5MiB",
        "1 MiB", "1kib",  "1K",   "1Ki",         "KiB",
        "+1",    "1MiBx", "0x10", "16777216TiB", "18446744073709551616",
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t bytes = 7;

        assert_int_equal(config_parse_size(cases[i], &bytes), ING_EINVAL);
        assert_int_equal(bytes, 7);
    }
}

static void config_rejects_bad_values(void **state)
{
    static const struct {
        const char *yaml;
        const char *message;
    } cases[] = {
        {"http:\n  max_body_bytes: lots\n",
         "2: http.max_body_bytes: expected a size such as 1MiB, got \"lots\""},
        {"http:\n  max_body_bytes: 2GiB\n",
         "2: http.max_body_bytes: expected a size from 1KiB to 1GiB, got "
         "\"2GiB\""},
        {"http:\n  header_timeout: 10\n",
         "2: http.header_timeout: expected a duration with a unit (ms, s, m, "
         "h or d) such as 10s, got \"10\""},
        {"http:\n  header_timeout: 2h\n",
         "2: http.header_timeout: expected a duration from 100ms to 1h, got "
         "\"2h\""},
        {"http:\n  workers: 65\n",
         "2: http.workers: expected an integer from 0 to 64, got \"65\""},
        {"http:\n  workers: -1\n",
         "2: http.workers: expected an integer from 0 to 64, got \"-1\""},
        {"http:\n  workers: 1.5\n",
         "2: http.workers: expected an integer from 0 to 64, got \"1.5\""},
        {"http:\n  retry_after: 0s\n",
         "2: http.retry_after: expected a duration from 1ms to 1h, got "
         "\"0s\""},
        {"log:\n  level: verbose\n",
         "2: log.level: expected one of debug, info, warn, error, got "
         "\"verbose\""},
        {"spool:\n  durability: fdatasync\n",
         "2: spool.durability: expected one of fsync, none, got "
         "\"fdatasync\""},
        {"spool:\n  segment_size: 1KiB\n",
         "2: spool.segment_size: expected a size from 64KiB to 1TiB, got "
         "\"1KiB\""},
        {"spool:\n  max_size: 64KiB\n",
         "2: spool.max_size: expected a size of at least 128KiB, got "
         "\"64KiB\""},
        {"spool:\n  segment_size: 64MiB\n  max_size: 100MiB\n",
         "3: spool.max_size: expected at least twice spool.segment_size "
         "(64MiB), got 100MiB"},
        {"spool:\n  segment_size: 1GiB\n",
         "2: spool.max_size: expected at least twice spool.segment_size "
         "(1GiB), got 1GiB"},
        {"data_dir: \"\"\n",
         "1: data_dir: expected a non-empty path, got \"\""},
        {"data_dir:\n", "1: data_dir: expected a non-empty path, got no value"},
        {"shutdown_timeout: \"ten\\tseconds\"\n",
         "1: shutdown_timeout: expected a duration with a unit (ms, s, m, h "
         "or d) such as 10s, got \"ten\\x09seconds\""},
        {"default_device_type: \"a\\0b\"\n",
         "1: default_device_type: the value contains a NUL character"},
        {"default_device_type: Sensor\n",
         "1: default_device_type: expected a name of 1 to 64 characters from "
         "a-z, 0-9, '_' and '-', got \"Sensor\""},
        {"default_device_type: sensor\n",
         "1: default_device_type: \"sensor\" is not a configured device type "
         "(configured: default)"},
    };
    fixture_t *fx = *state;
    char yaml[512];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        format_text(yaml, sizeof yaml, "%s" MINIMAL, cases[i].yaml);
        expect_error(fx, yaml, cases[i].message);
    }
}

static void config_bool_values(void **state)
{
    fixture_t *fx = *state;

    expect_loaded(fx, MINIMAL "sinks:\n  - name: a\n    fsync: false\n");
    assert_int_equal(fx->cfg->sinks[0].fsync, 0);
    expect_loaded(fx, MINIMAL "sinks:\n  - name: a\n    fsync: TRUE\n");
    assert_int_equal(fx->cfg->sinks[0].fsync, 1);
    expect_error(fx, MINIMAL "sinks:\n  - name: a\n    fsync: yes\n",
                 "6: sinks[0].fsync: expected true or false, got \"yes\"");
}

static void config_tls_listener_checks(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, "https:\n  listen: 127.0.0.1:8443\n" MINIMAL,
                 "2: https.listen: a TLS listener needs tls.cert_file and "
                 "tls.key_file");
    expect_error(fx,
                 "mqtts:\n  listen: 127.0.0.1:1883\n"
                 "tls:\n  cert_file: a.crt\n  key_file: a.key\n" MINIMAL,
                 "2: mqtts.listen: 127.0.0.1:1883 is also mqtt.listen; use "
                 "another port");
    expect_error(fx, "tls:\n  client_auth: required\n" MINIMAL,
                 "2: tls.client_auth: required needs tls.ca_file, the CA "
                 "bundle that client certificates are checked against");
    expect_error(fx, "tls:\n  crl_file: a.crl\n" MINIMAL,
                 "2: tls.crl_file: a CRL needs tls.ca_file, the CA bundle "
                 "of the certificates it revokes");
    expect_error(fx, "https:\n  listen: localhost:8443\n" MINIMAL,
                 "2: https.listen: expected an address such as "
                 "127.0.0.1:8443 or [::1]:8443, or \"\" to disable, got "
                 "\"localhost:8443\"");
}

static void config_tls_defaults_off(void **state)
{
    fixture_t *fx = *state;

    expect_loaded(fx, MINIMAL);
    assert_null(fx->cfg->https.listen);
    assert_null(fx->cfg->mqtts.listen);
    assert_null(fx->cfg->tls.cert_file);
    assert_int_equal(fx->cfg->tls.client_auth, CONFIG_TLS_CLIENT_AUTH_NONE);
    assert_int_equal(fx->cfg->tls.identity, CONFIG_TLS_IDENTITY_CN);
}

static void config_flow_control_keys(void **state)
{
    fixture_t *fx = *state;
    const config_limits_t *lim;

    expect_loaded(fx, MINIMAL);
    assert_int_equal(fx->cfg->spool.high_mark, 90);
    assert_int_equal(fx->cfg->spool.low_mark, 80);
    assert_int_equal(fx->cfg->limits.max_connections, 0);
    assert_int_equal(fx->cfg->limits.max_connections_per_device, 0);
    assert_int_equal(fx->cfg->device_types[0].limits.readings_per_second, 0);
    config_free(fx->cfg);
    fx->cfg = NULL;

    expect_loaded(fx, "limits:\n  max_connections: 500\n"
                      "  connection_rate_per_address: 20\n"
                      "spool:\n  high_mark: 70\n  low_mark: 50\n" MINIMAL
                      "    limits:\n      readings_per_second: 10\n"
                      "      burst: 20\n      bytes_per_second: 4KiB\n"
                      "      daily_readings: 86400\n");
    lim = &fx->cfg->device_types[0].limits;
    assert_int_equal(lim->readings_per_second, 10);
    assert_int_equal(lim->burst, 20);
    assert_int_equal(lim->bytes_per_second, 4096);
    assert_int_equal(lim->daily_readings, 86400);
    assert_int_equal(fx->cfg->limits.max_connections, 500);
    assert_int_equal(fx->cfg->limits.connection_rate_per_address, 20);
    assert_int_equal(fx->cfg->spool.high_mark, 70);
    assert_int_equal(fx->cfg->spool.low_mark, 50);
}

static void config_rejects_bad_flow_control(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, "spool:\n  high_mark: 80\n  low_mark: 80\n" MINIMAL,
                 "3: spool.low_mark: expected a percentage below "
                 "spool.high_mark (80), got 80");
    expect_error(fx, MINIMAL "    limits:\n      rate: 5\n",
                 "5: unknown key \"device_types.default.limits.rate\" (known "
                 "keys in device_types.default.limits: readings_per_second, "
                 "burst, "
                 "bytes_per_second, daily_readings)");
    expect_error(fx, MINIMAL "    limits: 5\n",
                 "4: device_types.default.limits: expected a mapping with keys "
                 "such as readings_per_second, got a scalar");
}

static void config_rejects_unknown_key(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, "http:\n  lsten: 127.0.0.1:80\n" MINIMAL,
                 "2: unknown key \"http.lsten\" (known keys in http: listen, "
                 "workers, max_header_bytes, max_body_bytes, "
                 "max_readings_per_request, header_timeout, body_timeout, "
                 "idle_timeout, max_connections, retry_after)");
    expect_error(fx, MINIMAL "lgo:\n  level: info\n",
                 "4: unknown key \"lgo\" (known keys: log, data_dir, "
                 "registry, jwt, auth, http, limits, admin, ws, mqtt, https, "
                 "mqtts, tls, spool, idempotency, shutdown_timeout, "
                 "sinks_drain_timeout, default_device_type, device_types, "
                 "sinks, bridges)");
    /* A dotted key at the top level is not a shortcut for a section. */
    expect_error(fx, MINIMAL "http.listen: 127.0.0.1:80\n",
                 "4: unknown key \"http.listen\" (known keys: log, data_dir, "
                 "registry, jwt, auth, http, limits, admin, ws, mqtt, https, "
                 "mqtts, tls, spool, idempotency, shutdown_timeout, "
                 "sinks_drain_timeout, default_device_type, device_types, "
                 "sinks, bridges)");
    expect_error(fx, MINIMAL "    shema: x.json\n",
                 "4: unknown key \"device_types.default.shema\" (known keys "
                 "in device_types.default: schema, schema_inline, limits)");
    expect_error(fx, MINIMAL "sinks:\n  - name: a\n    rotate: 1MiB\n",
                 "6: unknown key \"sinks[0].rotate\" (known keys in sinks[0]: "
                 "name, type, batch_records, timeout, retry_min, retry_max, "
                 "dead_letter, path, rotate_size, fsync, address, topic, "
                 "exchange, vhost, mode, maxlen, username, password, "
                 "password_file, tls, tls_ca_file, tls_cert_file, "
                 "tls_key_file, compression, linger, kafka_properties, qos, "
                 "client_id, stream)");
}

static void config_rejects_duplicate_key(void **state)
{
    fixture_t *fx = *state;

    expect_error(
        fx, "http:\n  listen: 127.0.0.1:80\n  listen: 127.0.0.1:81\n" MINIMAL,
        "3: duplicate key \"http.listen\" (first set at line 2)");
    expect_error(fx, "log:\n  level: info\n" MINIMAL "log:\n  level: warn\n",
                 "6: duplicate key \"log\" (first set at line 1)");
    expect_error(fx, MINIMAL "  default:\n    schema: reading.json\n",
                 "4: duplicate key \"device_types.default\" (first set at "
                 "line 2)");
    expect_error(fx, MINIMAL "sinks:\n  - name: a\n    name: b\n",
                 "6: duplicate key \"sinks[0].name\" (first set at line 5)");
}

static void config_rejects_wrong_node_type(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, "http:\n  listen:\n    host: 127.0.0.1\n" MINIMAL,
                 "3: http.listen: expected an address such as 127.0.0.1:8080 "
                 "or [::1]:8080, got a mapping");
    expect_error(fx, "http:\n  workers: [1, 2]\n" MINIMAL,
                 "2: http.workers: expected an integer from 0 to 64, got a "
                 "sequence");
    expect_error(fx, "http: 127.0.0.1:80\n" MINIMAL,
                 "1: http: expected a mapping of keys, got a scalar");
    expect_error(fx, "- http\n",
                 "1: expected a mapping of keys at the top level, got a "
                 "sequence");
    expect_error(fx, "device_types: [default]\n",
                 "1: device_types: expected a mapping of device type names, "
                 "got a sequence");
    expect_error(fx, "device_types:\n  default: reading.json\n",
                 "2: device_types.default: expected a mapping with schema or "
                 "schema_inline, got a scalar");
    expect_error(fx, "[a]: 1\n" MINIMAL,
                 "1: a mapping key must be a scalar, got a sequence");
}

static void config_empty_section_uses_defaults(void **state)
{
    fixture_t *fx = *state;

    expect_loaded(fx, "http:\n# every key commented out\nspool: ~\n" MINIMAL);
    assert_string_equal(fx->cfg->http.listen, "127.0.0.1:8080");
    assert_int_equal(fx->cfg->spool.max_size, UINT64_C(1) << 30);
}

static void config_reports_yaml_syntax_error(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, MINIMAL "http:\n  listen: \"127.0.0.1:80\n",
                 "6:1: YAML syntax error: found unexpected end of stream "
                 "(while scanning a quoted scalar at line 5)");
    expect_error(fx, "http:\n  listen: a\n bad: b\n" MINIMAL,
                 "3:2: YAML syntax error: did not find expected key (while "
                 "parsing a block mapping at line 1)");
    expect_error(fx, MINIMAL "---\nlog: {}\n",
                 "4: a second YAML document starts here, but the config file "
                 "must contain one");
    expect_error(fx, "x: &anchor 5\nshutdown_timeout: *anchor\n" MINIMAL,
                 "2: aliases such as *anchor are not supported; repeat the "
                 "value instead");
}

static void config_rejects_deep_nesting(void **state)
{
    fixture_t *fx = *state;
    char yaml[512];
    size_t used;

    format_text(yaml, sizeof yaml, MINIMAL "  deep:\n    schema_inline: ");
    used = strlen(yaml);
    for (int i = 0; i < 70; i++)
        yaml[used++] = '[';
    for (int i = 0; i < 70; i++)
        yaml[used++] = ']';
    yaml[used++] = '\n';
    yaml[used] = '\0';
    expect_error(fx, yaml, "5: the config nests deeper than 64 levels");
}

static void config_rejects_bad_listen(void **state)
{
    static const char *const bad[] = {
        "localhost:8080",  "127.0.0.1",     "127.0.0.1:",   "127.0.0.1:0",
        "127.0.0.1:65536", "127.0.0.1:+80", "256.0.0.1:80", ":8080",
        "::1:8080",        "[::1]",         "[::1]8080",    "[127.0.0.1]:80",
        "[::1]:80x",       "1.2.3:80",
    };
    fixture_t *fx = *state;
    char yaml[256], message[256];

    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        format_text(yaml, sizeof yaml, "http:\n  listen: \"%s\"\n" MINIMAL,
                    bad[i]);
        format_text(message, sizeof message,
                    "2: http.listen: expected an address such as "
                    "127.0.0.1:8080 or [::1]:8080, got \"%s\"",
                    bad[i]);
        expect_error(fx, yaml, message);
    }
    expect_error(fx, "http:\n  listen: \"\"\n" MINIMAL,
                 "2: http.listen: expected an address such as 127.0.0.1:8080 "
                 "or [::1]:8080, got \"\"");
    expect_error(fx, "admin:\n  listen: nowhere\n" MINIMAL,
                 "2: admin.listen: expected an address such as 127.0.0.1:9100 "
                 "or [::1]:9100, or \"\" to disable, got \"nowhere\"");
    expect_error(fx, "admin:\n  listen: 127.0.0.1:8080\n" MINIMAL,
                 "2: admin.listen: 127.0.0.1:8080 is also http.listen; use "
                 "another port");
    expect_loaded(fx, "http:\n  listen: 0.0.0.0:65535\n" MINIMAL);
    assert_string_equal(fx->cfg->http.listen, "0.0.0.0:65535");
}

static void config_rejects_bad_schema_file(void **state)
{
    fixture_t *fx = *state;
    char message[1024];

    format_text(message, sizeof message,
                "3: device_types.default.schema: cannot read the schema file "
                "%s/missing.json: No such file or directory",
                fx->dir);
    expect_error(fx, "device_types:\n  default:\n    schema: missing.json\n",
                 message);

    write_file(fx->dir, "broken.json", "{\"type\": \"object\",\n  \"x\": }\n");
    format_text(message, sizeof message,
                "3: device_types.default.schema: invalid JSON in "
                "%s/broken.json:2:8: unexpected token near '}'",
                fx->dir);
    expect_error(fx, "device_types:\n  default:\n    schema: broken.json\n",
                 message);

    write_file(fx->dir, "array.json", "[1, 2]\n");
    format_text(message, sizeof message,
                "3: device_types.default.schema: expected a JSON object in "
                "%s/array.json, got an array",
                fx->dir);
    expect_error(fx, "device_types:\n  default:\n    schema: array.json\n",
                 message);

    format_text(message, sizeof message,
                "3: device_types.default.schema: cannot read the schema file "
                "%s: not a regular file",
                fx->dir);
    expect_error(fx, "device_types:\n  default:\n    schema: .\n", message);
}

static void config_device_type_errors(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx, "log:\n  level: info\n",
                 " device_types: at least one device type is required");
    expect_error(fx, "device_types: {}\n",
                 "1: device_types: at least one device type is required");
    expect_error(fx, "device_types:\n  Bad.Name:\n    schema: reading.json\n",
                 "2: device_types: the name \"Bad.Name\" is invalid; use 1 to "
                 "64 characters from a-z, 0-9, '_' and '-'");
    expect_error(fx,
                 "device_types:\n  default:\n    schema: reading.json\n"
                 "    schema_inline: {type: object}\n",
                 "3: device_types.default: set either schema or "
                 "schema_inline, not both");
    expect_error(fx, "device_types:\n  default: {}\n",
                 "2: device_types.default: missing schema; set schema to a "
                 "JSON Schema file or schema_inline to a mapping");
    expect_error(fx, "device_types:\n  default:\n    schema_inline: [1]\n",
                 "3: device_types.default.schema_inline: expected a mapping "
                 "(a JSON Schema object), got a sequence");
}

static void config_converts_inline_schema(void **state)
{
    fixture_t *fx = *state;
    const json_t *schema, *props;
    json_t *expected;
    json_error_t error;

    expect_loaded(fx,
                  "device_types:\n"
                  "  default:\n"
                  "    schema_inline:\n"
                  "      type: object\n"
                  "      required: [temperature, \"5\"]\n"
                  "      additionalProperties: false\n"
                  "      properties:\n"
                  "        temperature: {type: number, minimum: -40.5}\n"
                  "        count: {type: integer, maximum: 0x10}\n"
                  "        mode: {enum: [true, 'true', null, ~, 007, 0o17]}\n"
                  "        note: {default: !!str 12, const: 1e3}\n"
                  "        empty: {default: \"\"}\n");
    assert_null(fx->cfg->device_types[0].schema_path);
    schema = fx->cfg->device_types[0].schema;
    expected = json_loads(
        "{\"type\": \"object\", \"required\": [\"temperature\", \"5\"],"
        " \"additionalProperties\": false, \"properties\": {"
        "  \"temperature\": {\"type\": \"number\", \"minimum\": -40.5},"
        "  \"count\": {\"type\": \"integer\", \"maximum\": 16},"
        "  \"mode\": {\"enum\": [true, \"true\", null, null, 7, 15]},"
        "  \"note\": {\"default\": \"12\", \"const\": 1000.0},"
        "  \"empty\": {\"default\": \"\"}}}",
        0, &error);
    assert_non_null(expected);
    assert_true(json_equal(schema, expected));
    json_decref(expected);

    /* json_equal treats 1000 and 1000.0 as unequal, so check the types. */
    props = json_object_get(schema, "properties");
    assert_true(json_is_real(
        json_object_get(json_object_get(props, "temperature"), "minimum")));
    assert_true(json_is_integer(
        json_object_get(json_object_get(props, "count"), "maximum")));
}

static void config_rejects_bad_inline_values(void **state)
{
    fixture_t *fx = *state;

    expect_error(fx,
                 "device_types:\n  default:\n    schema_inline:\n"
                 "      maximum: .inf\n",
                 "4: device_types.default.schema_inline.maximum: \".inf\" has "
                 "no JSON equivalent");
    expect_error(fx,
                 "device_types:\n  default:\n    schema_inline:\n"
                 "      maximum: 99999999999999999999\n",
                 "4: device_types.default.schema_inline.maximum: the integer "
                 "\"99999999999999999999\" is out of range");
    expect_error(fx,
                 "device_types:\n  default:\n    schema_inline:\n"
                 "      maximum: 1e999\n",
                 "4: device_types.default.schema_inline.maximum: the number "
                 "\"1e999\" is out of range");
    expect_error(fx,
                 "device_types:\n  default:\n    schema_inline:\n"
                 "      enum: [!!binary aGk=]\n",
                 "4: device_types.default.schema_inline.enum[0]: the tag "
                 "tag:yaml.org,2002:binary is not supported; quote the value "
                 "to make it a string");
    expect_error(fx,
                 "device_types:\n  default:\n    schema_inline:\n"
                 "      properties:\n        a: {}\n        a: {}\n",
                 "6: duplicate key "
                 "\"device_types.default.schema_inline.properties.a\" (first "
                 "set at line 5)");
}

static void config_resolves_relative_paths(void **state)
{
    fixture_t *fx = *state;
    char sub[PATH_MAX], config_path[PATH_MAX], expected[PATH_MAX];
    char previous[PATH_MAX];

    format_text(sub, sizeof sub, "%s/conf", fx->dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    write_file(sub, "ingestd.yaml",
               "data_dir: ../data\n"
               "registry:\n  path: ./db/../registry.db\n"
               "device_types:\n  default:\n    schema: ../reading.json\n"
               "sinks:\n  - name: out\n    path: /srv/out\n"
               "  - name: local\n    path: .\n");

    /* Load through a relative path to check that the folder is made
     * absolute. */
    assert_non_null(getcwd(previous, sizeof previous));
    assert_int_equal(chdir(fx->dir), 0);
    format_text(config_path, sizeof config_path, "conf/ingestd.yaml");
    assert_int_equal(
        config_load(config_path, &fx->cfg, fx->err, sizeof fx->err), 0);
    assert_int_equal(chdir(previous), 0);

    assert_string_equal(fx->cfg->path, "conf/ingestd.yaml");
    assert_string_equal(fx->cfg->dir, sub);
    assert_string_equal(fx->cfg->data_dir, path_in(fx, "data"));
    format_text(expected, sizeof expected, "%s/db/../registry.db", sub);
    assert_string_equal(fx->cfg->registry.path, expected);
    assert_string_equal(fx->cfg->device_types[0].schema_path,
                        path_in(fx, "reading.json"));
    assert_string_equal(fx->cfg->sinks[0].path, "/srv/out");
    assert_string_equal(fx->cfg->sinks[1].path, sub);
}

static void config_sinks(void **state)
{
    fixture_t *fx = *state;
    const config_sink_t *sinks;

    expect_loaded(fx, MINIMAL "sinks:\n"
                              "  - name: archive\n"
                              "    type: file\n"
                              "    path: /srv/archive\n"
                              "    rotate_size: 1GiB\n"
                              "    fsync: false\n"
                              "    batch_records: 100000\n"
                              "  - name: second_copy-2\n");
    assert_int_equal(fx->cfg->sink_count, 2);
    sinks = fx->cfg->sinks;
    assert_string_equal(sinks[0].name, "archive");
    assert_string_equal(sinks[0].path, "/srv/archive");
    assert_int_equal(sinks[0].rotate_size, UINT64_C(1) << 30);
    assert_int_equal(sinks[0].fsync, 0);
    assert_int_equal(sinks[0].batch_records, 100000);
    assert_string_equal(sinks[1].name, "second_copy-2");
    assert_int_equal(sinks[1].kind, CONFIG_SINK_FILE);
    assert_string_equal(sinks[1].path, path_in(fx, "data/out"));
    assert_int_equal(sinks[1].rotate_size, 64 * 1024 * 1024);
    assert_int_equal(sinks[1].fsync, 1);
    assert_int_equal(sinks[1].batch_records, 512);
}

static void config_sink_errors(void **state)
{
    static const struct {
        const char *yaml;
        const char *message;
    } cases[] = {
        {"sinks: []\n",
         "4: sinks: at least one sink is required; remove the key to get the "
         "default file sink"},
        {"sinks:\n  name: a\n",
         "5: sinks: expected a sequence of sink mappings, got a mapping"},
        {"sinks:\n  - a\n",
         "5: sinks[0]: expected a mapping with keys such as name and type, "
         "got a scalar"},
        {"sinks:\n  - type: file\n",
         "5: sinks[0]: missing required key \"name\""},
        {"sinks:\n  - name: a\n  - name: b\n  - name: a\n    path: x\n",
         "7: sinks[2].name: \"a\" is already the name of sinks[0]; sink names "
         "must be unique"},
        {"sinks:\n  - name: My Sink\n",
         "5: sinks[0].name: expected a name of 1 to 64 characters from a-z, "
         "0-9, '_' and '-', got \"My Sink\""},
        {"sinks:\n  - name: "
         "a1234567890123456789012345678901234567890123456789012345678901234\n",
         "5: sinks[0].name: expected a name of 1 to 64 characters from a-z, "
         "0-9, '_' and '-', got "
         "\"a12345678901234567890123456789012345678901234567890123456789..."
         "\""},
        {"sinks:\n  - name: a\n    type: kafak\n",
         "6: sinks[0].type: expected one of file, kafka, redis, rabbitmq, "
         "nats, mqtt, got \"kafak\""},
        {"sinks:\n  - name: a\n    batch_records: 0\n",
         "6: sinks[0].batch_records: expected an integer from 1 to 100000, "
         "got \"0\""},
        {"sinks:\n  - name: a\n    rotate_size: 1KiB\n",
         "6: sinks[0].rotate_size: expected a size from 64KiB to 1TiB, got "
         "\"1KiB\""},
    };
    fixture_t *fx = *state;
    char yaml[512];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        format_text(yaml, sizeof yaml, MINIMAL "%s", cases[i].yaml);
        expect_error(fx, yaml, cases[i].message);
    }
}

static void config_sink_paths_must_differ(void **state)
{
    fixture_t *fx = *state;
    char message[1024];

    format_text(
        message, sizeof message,
        "6: sinks[1].path: %s/data/out is already the path of sinks[0]; "
        "give each sink its own folder",
        fx->dir);
    expect_error(fx, MINIMAL "sinks:\n  - name: a\n  - name: b\n", message);
}

static void config_sink_type_defaults(void **state)
{
    static const struct {
        enum config_sink_kind kind;
        const char *address;
        const char *topic;
    } expected[] = {
        {CONFIG_SINK_KAFKA, "127.0.0.1:9092", "telemetry.{device_type}"},
        {CONFIG_SINK_REDIS, "127.0.0.1:6379", "telemetry:{device_type}"},
        {CONFIG_SINK_RABBITMQ, "127.0.0.1:5672", "{device_type}.{device_id}"},
        {CONFIG_SINK_NATS, "nats://127.0.0.1:4222",
         "telemetry.{device_type}.{device_id}"},
        {CONFIG_SINK_MQTT, "127.0.0.1:1883",
         "telemetry/{device_type}/{device_id}"},
    };
    fixture_t *fx = *state;
    const config_sink_t *sinks;

    expect_loaded(fx, MINIMAL "sinks:\n"
                              "  - {name: k, type: kafka}\n"
                              "  - {name: r, type: redis}\n"
                              "  - {name: q, type: rabbitmq}\n"
                              "  - {name: n, type: nats}\n"
                              "  - {name: m, type: mqtt}\n");
    assert_int_equal(fx->cfg->sink_count, 5);
    sinks = fx->cfg->sinks;
    for (size_t i = 0; i < 5; i++) {
        assert_int_equal(sinks[i].kind, expected[i].kind);
        assert_string_equal(sinks[i].address, expected[i].address);
        assert_string_equal(sinks[i].topic, expected[i].topic);
        assert_null(sinks[i].path);
        assert_int_equal(sinks[i].batch_records, 512);
        assert_int_equal(sinks[i].timeout_ms, 30000);
        assert_int_equal(sinks[i].retry_min_ms, 100);
        assert_int_equal(sinks[i].retry_max_ms, 30000);
        assert_int_equal(sinks[i].tls, 0);
        assert_null(sinks[i].password);
    }
    assert_string_equal(sinks[0].dead_letter,
                        path_in(fx, "data/dead-letter/k.ndjson"));
    assert_int_equal(sinks[0].compression, CONFIG_COMPRESSION_NONE);
    assert_int_equal(sinks[0].linger_ms, 5);
    assert_null(sinks[0].kafka_properties);
    assert_int_equal(sinks[1].mode, CONFIG_REDIS_STREAM);
    assert_int_equal(sinks[1].maxlen, 0);
    assert_string_equal(sinks[2].exchange, "telemetry");
    assert_string_equal(sinks[2].vhost, "/");
    assert_null(sinks[3].stream);
    assert_int_equal(sinks[4].qos, 1);
    assert_string_equal(sinks[4].client_id, "ingestd-m");
    assert_int_equal(fx->cfg->sinks_drain_timeout_ms, 5000);
}

static void config_sink_broker_keys(void **state)
{
    fixture_t *fx = *state;
    const config_sink_t *sink;

    write_file(fx->dir, "redis.pass", "s3cret\n");
    expect_loaded(fx, MINIMAL "sinks_drain_timeout: 2s\n"
                              "sinks:\n"
                              "  - name: cache\n"
                              "    type: redis\n"
                              "    address: localhost:6380\n"
                              "    topic: \"t:{protocol}:{device_id}\"\n"
                              "    mode: pubsub\n"
                              "    username: ingest\n"
                              "    password_file: redis.pass\n"
                              "    timeout: 2s\n"
                              "    retry_min: 10ms\n"
                              "    retry_max: 1s\n"
                              "    dead_letter: rejected.ndjson\n"
                              "  - name: k\n"
                              "    type: kafka\n"
                              "    address: \"10.0.0.1:9092,10.0.0.2:9092\"\n"
                              "    compression: zstd\n"
                              "    linger: 20ms\n"
                              "    kafka_properties: "
                              "\"security.protocol=SASL_SSL\"\n");
    assert_int_equal(fx->cfg->sinks_drain_timeout_ms, 2000);
    sink = &fx->cfg->sinks[0];
    assert_string_equal(sink->address, "localhost:6380");
    assert_string_equal(sink->topic, "t:{protocol}:{device_id}");
    assert_int_equal(sink->mode, CONFIG_REDIS_PUBSUB);
    assert_string_equal(sink->username, "ingest");
    assert_string_equal(sink->password, "s3cret");
    assert_int_equal(sink->timeout_ms, 2000);
    assert_int_equal(sink->retry_min_ms, 10);
    assert_int_equal(sink->retry_max_ms, 1000);
    assert_string_equal(sink->dead_letter, path_in(fx, "rejected.ndjson"));
    sink = &fx->cfg->sinks[1];
    assert_string_equal(sink->address, "10.0.0.1:9092,10.0.0.2:9092");
    assert_int_equal(sink->compression, CONFIG_COMPRESSION_ZSTD);
    assert_int_equal(sink->linger_ms, 20);
    assert_string_equal(sink->kafka_properties, "security.protocol=SASL_SSL");
}

static void config_sink_broker_errors(void **state)
{
    static const struct {
        const char *yaml;
        const char *message;
    } cases[] = {
        {"sinks:\n  - name: a\n    type: redis\n    topic: \"t:{device}\"\n",
         "7: sinks[0].topic: unknown placeholder {device}; use {device_id}, "
         "{device_type} or {protocol} in \"t:{device}\""},
        {"sinks:\n  - name: a\n    type: kafka\n    topic: \"t.{device_id\"\n",
         "7: sinks[0].topic: '{' at offset 2 has no closing '}' in "
         "\"t.{device_id\""},
        {"sinks:\n  - name: a\n    type: nats\n    topic: \"t.}\"\n",
         "7: sinks[0].topic: '}' without '{' at offset 2 in \"t.}\""},
        {"sinks:\n  - name: a\n    type: rabbitmq\n"
         "    exchange: \"x.{nope}\"\n",
         "7: sinks[0].exchange: unknown placeholder {nope}; use {device_id}, "
         "{device_type} or {protocol} in \"x.{nope}\""},
        {"sinks:\n  - name: a\n    type: redis\n    tls: true\n",
         "7: sinks[0].tls: the redis sink does not support TLS (the hiredis "
         "library it uses has no TLS); reach Redis over loopback or a TLS "
         "tunnel"},
        {"sinks:\n  - name: a\n    type: redis\n    mode: pubsub\n"
         "    maxlen: 10\n",
         "8: sinks[0].maxlen: applies only to mode: stream"},
        {"sinks:\n  - name: a\n    type: redis\n    password: x\n"
         "    password_file: p\n",
         "8: sinks[0]: set either password or password_file, not both"},
        {"sinks:\n  - name: a\n    type: redis\n    address: localhost\n",
         "7: sinks[0].address: expected host:port such as 127.0.0.1:6379, "
         "got \"localhost\""},
        {"sinks:\n  - name: a\n    type: redis\n    address: \"a:1,b:2\"\n",
         "7: sinks[0].address: expected host:port such as 127.0.0.1:6379, "
         "got \"a:1,b:2\""},
        {"sinks:\n  - name: a\n    type: kafka\n    address: \"a:1,b\"\n",
         "7: sinks[0].address: expected host:port or a comma-separated list "
         "of them, such as 127.0.0.1:9092, got \"a:1,b\""},
        {"sinks:\n  - name: a\n    type: nats\n    address: \"1.2.3.4:4222\"\n",
         "7: sinks[0].address: expected a URL such as nats://127.0.0.1:4222, "
         "got \"1.2.3.4:4222\""},
        {"sinks:\n  - name: a\n    type: mqtt\n    address: \"h:70000\"\n",
         "7: sinks[0].address: expected host:port such as 127.0.0.1:6379, "
         "got \"h:70000\""},
        {"sinks:\n  - name: a\n    type: redis\n    path: /tmp/x\n",
         "7: sinks[0].path: does not apply to a sink of type redis; remove "
         "it"},
        {"sinks:\n  - name: a\n    topic: x\n",
         "6: sinks[0].topic: does not apply to a sink of type file; remove "
         "it"},
        {"sinks:\n  - name: a\n    type: kafka\n    qos: 1\n",
         "7: sinks[0].qos: does not apply to a sink of type kafka; remove "
         "it"},
        {"sinks:\n  - name: a\n    type: kafka\n    retry_min: 2s\n"
         "    retry_max: 1s\n",
         "7: sinks[0].retry_min: must not be greater than retry_max"},
        {"sinks:\n  - name: a\n    type: mqtt\n    tls_cert_file: c.pem\n"
         "    tls: true\n",
         "7: sinks[0]: set both tls_cert_file and tls_key_file, or neither"},
        {"sinks:\n  - name: a\n    type: mqtt\n    tls_ca_file: ca.pem\n",
         "5: sinks[0]: tls_ca_file, tls_cert_file and tls_key_file need "
         "tls: true"},
        {"sinks:\n  - name: a\n    type: mqtt\n    qos: 2\n",
         "7: sinks[0].qos: expected an integer from 0 to 1, got \"2\""},
        {"sinks:\n  - name: a\n    type: kafka\n    compression: brotli\n",
         "7: sinks[0].compression: expected one of none, gzip, snappy, lz4, "
         "zstd, got \"brotli\""},
        {"sinks:\n  - name: a\n    type: redis\n    mode: list\n",
         "7: sinks[0].mode: expected one of stream, pubsub, got \"list\""},
        {"sinks:\n  - name: a\n    type: redis\n  - name: b\n"
         "    type: redis\n    dead_letter: data/dead-letter/a.ndjson\n",
         "9: sinks[1].dead_letter: %s/data/dead-letter/a.ndjson is already "
         "the dead-letter file of sinks[0]; give each sink its own"},
    };
    fixture_t *fx = *state;
    char yaml[512], message[512];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        format_text(yaml, sizeof yaml, MINIMAL "%s", cases[i].yaml);
        format_text(message, sizeof message, cases[i].message, fx->dir);
        expect_error(fx, yaml, message);
    }
}

static void config_bridges(void **state)
{
    fixture_t *fx = *state;
    const config_bridge_t *b;

    expect_loaded(fx,
                  MINIMAL "bridges:\n"
                          "  - name: plant-a\n"
                          "    host: broker.example\n"
                          "    port: 8883\n"
                          "    client_id: ingestd-a-1\n"
                          "    username: ingest\n"
                          "    password: s3cret\n"
                          "    topics: \"a/{device_id}, b/{device_id}/up\"\n"
                          "    shared_group: \"\"\n"
                          "    qos: 0\n"
                          "    keepalive: 1m\n"
                          "    reconnect_min: 100ms\n"
                          "    reconnect_max: 5s\n"
                          "    session_expiry: 0\n"
                          "    tls_ca_file: ca.pem\n"
                          "    tls_cert_file: /etc/c.pem\n"
                          "    tls_key_file: /etc/k.pem\n"
                          "    feedback_topic: devices/{device_id}/errors\n"
                          "  - name: plant-b\n");
    assert_int_equal(fx->cfg->bridge_count, 2);
    b = &fx->cfg->bridges[0];
    assert_string_equal(b->name, "plant-a");
    assert_string_equal(b->host, "broker.example");
    assert_int_equal(b->port, 8883);
    assert_string_equal(b->client_id, "ingestd-a-1");
    assert_string_equal(b->username, "ingest");
    assert_string_equal(b->password, "s3cret");
    assert_int_equal(b->topic_count, 2);
    assert_string_equal(b->topics[0], "a/{device_id}");
    assert_string_equal(b->topics[1], "b/{device_id}/up");
    assert_null(b->shared_group);
    assert_int_equal(b->qos, 0);
    assert_int_equal(b->keepalive_s, 60);
    assert_int_equal(b->reconnect_min_ms, 100);
    assert_int_equal(b->reconnect_max_ms, 5000);
    assert_int_equal(b->session_expiry_s, 0);
    assert_string_equal(b->tls_ca_file, path_in(fx, "ca.pem"));
    assert_string_equal(b->tls_cert_file, "/etc/c.pem");
    assert_string_equal(b->tls_key_file, "/etc/k.pem");
    assert_string_equal(b->feedback_topic, "devices/{device_id}/errors");

    b = &fx->cfg->bridges[1];
    assert_string_equal(b->name, "plant-b");
    assert_string_equal(b->host, "127.0.0.1");
    assert_int_equal(b->port, 1883);
    assert_string_equal(b->client_id, "ingestd-plant-b");
    assert_null(b->username);
    assert_null(b->password);
    assert_int_equal(b->topic_count, 1);
    assert_string_equal(b->topics[0], "devices/{device_id}/data");
    assert_string_equal(b->shared_group, "ingestd");
    assert_int_equal(b->qos, 1);
    assert_int_equal(b->keepalive_s, 30);
    assert_int_equal(b->reconnect_min_ms, 500);
    assert_int_equal(b->reconnect_max_ms, 30000);
    assert_int_equal(b->session_expiry_s, 3600);
    assert_null(b->tls_ca_file);
    assert_null(b->feedback_topic);

    expect_loaded(fx, MINIMAL);
    assert_int_equal(fx->cfg->bridge_count, 0);
    expect_loaded(fx, MINIMAL "bridges: []\n");
    assert_int_equal(fx->cfg->bridge_count, 0);
}

static void config_bridge_errors(void **state)
{
    static const struct {
        const char *yaml;
        const char *message;
    } cases[] = {
        {"bridges:\n  name: a\n",
         "5: bridges: expected a sequence of bridge mappings, got a mapping"},
        {"bridges:\n  - host: x\n",
         "5: bridges[0]: missing required key \"name\""},
        {"bridges:\n  - name: a\n  - name: a\n    port: 1884\n",
         "6: bridges[1].name: \"a\" is already the name of bridges[0]; "
         "bridge names must be unique"},
        {"bridges:\n  - name: a\n    prot: 1\n",
         "6: unknown key \"bridges[0].prot\" (known keys in bridges[0]: name, "
         "host, port, client_id, username, password, password_file, topics, "
         "shared_group, qos, keepalive, reconnect_min, reconnect_max, "
         "session_expiry, tls_ca_file, tls_cert_file, tls_key_file, "
         "feedback_topic)"},
        {"bridges:\n  - name: a\n    port: 0\n",
         "6: bridges[0].port: expected an integer from 1 to 65535, got \"0\""},
        {"bridges:\n  - name: a\n    qos: 2\n",
         "6: bridges[0].qos: expected an integer from 0 to 1, got \"2\""},
        {"bridges:\n  - name: a\n    topics: devices/+/data\n",
         "6: bridges[0].topics: a topic contains the wildcard '+' or '#' in "
         "\"devices/+/data\""},
        {"bridges:\n  - name: a\n    topics: devices/data\n",
         "6: bridges[0].topics: a topic has no {device_id} level in "
         "\"devices/data\""},
        {"bridges:\n  - name: a\n    topics: d/{device_id}x\n",
         "6: bridges[0].topics: {device_id} must be a whole topic level, such "
         "as devices/{device_id}/data in \"d/{device_id}x\""},
        {"bridges:\n  - name: a\n    topics: \"a/{device_id}/{device_id}\"\n",
         "6: bridges[0].topics: a topic has {device_id} more than once in "
         "\"a/{device_id}/{device_id}\""},
        {"bridges:\n  - name: a\n    topics: \"a/{device_id},\"\n",
         "6: bridges[0].topics: a topic is empty in \"a/{device_id},\""},
        {"bridges:\n  - name: a\n    topics: \"a/{device_id}, "
         "a/{device_id}\"\n",
         "6: bridges[0].topics: a topic is listed twice in \"a/{device_id}, "
         "a/{device_id}\""},
        {"bridges:\n  - name: a\n    topics: $SYS/{device_id}\n",
         "6: bridges[0].topics: a topic starts with '$', which is reserved "
         "for the broker in \"$SYS/{device_id}\""},
        {"bridges:\n  - name: a\n    feedback_topic: errors/#\n",
         "6: bridges[0].feedback_topic: a topic contains the wildcard '+' or "
         "'#'"},
        {"bridges:\n  - name: a\n    shared_group: a/b\n",
         "6: bridges[0].shared_group: expected a name without '/', '+' or "
         "'#', got \"a/b\""},
        {"bridges:\n  - name: a\n    reconnect_min: 1m\n",
         "6: bridges[0].reconnect_min: must not be greater than "
         "reconnect_max"},
        {"bridges:\n  - name: a\n    tls_cert_file: c.pem\n",
         "5: bridges[0]: set both tls_cert_file and tls_key_file, or "
         "neither"},
        {"bridges:\n  - name: a\n    password: x\n    password_file: p\n",
         "7: bridges[0]: set either password or password_file, not both"},
        {"bridges:\n  - name: a\n  - name: b\n    client_id: ingestd-a\n",
         "6: bridges[1].client_id: \"ingestd-a\" is already the client id of "
         "bridges[0] on the same broker"},
        {"bridges:\n  - name: a\n    keepalive: 0\n",
         "6: bridges[0].keepalive: expected a duration from 1s to 65535s, "
         "got \"0\""},
    };
    fixture_t *fx = *state;
    char yaml[512];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        format_text(yaml, sizeof yaml, MINIMAL "%s", cases[i].yaml);
        expect_error(fx, yaml, cases[i].message);
    }
}

static void config_bridge_password_file(void **state)
{
    fixture_t *fx = *state;
    char message[1024];

    write_file(fx->dir, "broker.pass", "from-file\n");
    expect_loaded(fx, MINIMAL "bridges:\n"
                              "  - name: a\n"
                              "    password_file: broker.pass\n");
    assert_string_equal(fx->cfg->bridges[0].password, "from-file");
    assert_string_equal(fx->cfg->bridges[0].password_file,
                        path_in(fx, "broker.pass"));

    write_file(fx->dir, "empty.pass", "\n");
    format_text(message, sizeof message,
                "6: bridges[0].password_file: %s/empty.pass is empty or "
                "contains a NUL character",
                fx->dir);
    expect_error(fx,
                 MINIMAL "bridges:\n  - name: a\n    password_file: "
                         "empty.pass\n",
                 message);

    format_text(message, sizeof message,
                "6: bridges[0].password_file: cannot read %s/missing.pass: "
                "No such file or directory",
                fx->dir);
    expect_error(fx,
                 MINIMAL "bridges:\n  - name: a\n    password_file: "
                         "missing.pass\n",
                 message);
}

static void config_reports_missing_file(void **state)
{
    fixture_t *fx = *state;
    char path[PATH_MAX], message[PATH_MAX + 128];
    config_t *cfg = (config_t *)1;

    format_text(path, sizeof path, "%s/absent.yaml", fx->dir);
    format_text(message, sizeof message,
                "%s: cannot read the config file: No such file or directory",
                path);
    assert_int_equal(config_load(path, &cfg, fx->err, sizeof fx->err),
                     ING_ECONFIG);
    assert_null(cfg);
    assert_string_equal(fx->err, message);
}

static void config_error_fits_small_buffer(void **state)
{
    fixture_t *fx = *state;
    char small[16];

    write_file(fx->dir, "ingestd.yaml", "http:\n  workers: 100\n" MINIMAL);
    memset(small, 'x', sizeof small);
    assert_int_equal(
        config_load(fx->config_path, &fx->cfg, small, sizeof small),
        ING_ECONFIG);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_int_equal(config_load(fx->config_path, &fx->cfg, NULL, 0),
                     ING_ECONFIG);
}

/* The documented example must stay loadable. CMake's test runner sets
 * INGESTD_SOURCE_DIR to the repository root. */
static void config_example_file_loads(void **state)
{
    const char *source_dir = getenv("INGESTD_SOURCE_DIR");
    char path[PATH_MAX], expected[PATH_MAX], err[512];
    config_t *cfg = NULL;

    if (!source_dir)
        skip();
    format_text(path, sizeof path, "%s/config/ingestd.yaml", source_dir);
    assert_int_equal(config_load(path, &cfg, err, sizeof err), 0);
    assert_non_null(realpath(source_dir, expected));
    strncat(expected, "/data", sizeof expected - strlen(expected) - 1);
    assert_string_equal(cfg->data_dir, expected);
    assert_int_equal(cfg->device_type_count, 1);
    assert_int_equal(cfg->sink_count, 1);
    config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(config_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(config_sets_every_section, setup,
                                        teardown),
        cmocka_unit_test(config_parse_duration_good),
        cmocka_unit_test(config_parse_duration_bad),
        cmocka_unit_test(config_parse_size_good),
        cmocka_unit_test(config_parse_size_bad),
        cmocka_unit_test_setup_teardown(config_rejects_bad_values, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_bool_values, setup, teardown),
        cmocka_unit_test_setup_teardown(config_tls_listener_checks, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_tls_defaults_off, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_flow_control_keys, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_bad_flow_control,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(config_rejects_unknown_key, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_duplicate_key, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_wrong_node_type, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_empty_section_uses_defaults,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(config_reports_yaml_syntax_error, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_deep_nesting, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_bad_listen, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_bad_schema_file, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_device_type_errors, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_converts_inline_schema, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_rejects_bad_inline_values, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_resolves_relative_paths, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_sinks, setup, teardown),
        cmocka_unit_test_setup_teardown(config_sink_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(config_sink_type_defaults, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_sink_broker_keys, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_sink_broker_errors, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_sink_paths_must_differ, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_bridges, setup, teardown),
        cmocka_unit_test_setup_teardown(config_bridge_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(config_bridge_password_file, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_reports_missing_file, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(config_error_fits_small_buffer, setup,
                                        teardown),
        cmocka_unit_test(config_example_file_loads),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
