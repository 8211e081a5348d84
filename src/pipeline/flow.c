/* Spool congestion with hysteresis, per-device limits and rejection
 * counters (see flow.h and docs/flow-control.md).
 */
#include "pipeline/flow.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/errors.h"
#include "core/log.h"
#include "core/metrics.h"

struct pipeline_flow {
    const config_t *cfg;
    spool_t *spool;
    limits_t *limits;
    uint64_t high_bytes; /* congested from this size on */
    uint64_t low_bytes;  /* until the size drops below this */
    atomic_int congested;
    metrics_gauge_t *congested_gauge;
};

static const char rejected_help[] =
    "Readings, requests and connections turned away by flow control, by "
    "protocol and reason.";
static const char throttled_help[] =
    "Messages held and retried by their adapter because of flow control, "
    "by protocol and reason.";

int pipeline_flow_create(const config_t *cfg, spool_t *spool,
                         pipeline_flow_t **out)
{
    pipeline_flow_t *f = calloc(1, sizeof(*f));
    limits_options_t opts = {
        .table_size = cfg->limits.table_size,
        .max_connections = cfg->limits.max_connections,
        .listener_max =
            {
                [LIMITS_LISTENER_HTTP] = cfg->http.max_connections,
                [LIMITS_LISTENER_HTTPS] = cfg->http.max_connections,
                [LIMITS_LISTENER_MQTT] = cfg->mqtt.max_connections,
                [LIMITS_LISTENER_MQTTS] = cfg->mqtt.max_connections,
            },
        .connection_rate = cfg->limits.connection_rate_per_address,
        .connection_burst = cfg->limits.connection_burst_per_address,
    };

    if (f == NULL)
        return ING_ENOMEM;
    if (limits_create(&opts, &f->limits) != 0) {
        free(f);
        return ING_ENOMEM;
    }
    f->cfg = cfg;
    f->spool = spool;
    /* Percentages of max_size; a max_size of 0 (no limit, in tests) never
     * congests. */
    f->high_bytes = cfg->spool.max_size / 100 * cfg->spool.high_mark +
                    cfg->spool.max_size % 100 * cfg->spool.high_mark / 100;
    f->low_bytes = cfg->spool.max_size / 100 * cfg->spool.low_mark +
                   cfg->spool.max_size % 100 * cfg->spool.low_mark / 100;
    f->congested_gauge = metrics_gauge(
        "ingestd_spool_congested",
        "1 while the spool is past spool.high_mark and has not dropped "
        "below spool.low_mark yet.",
        NULL);
    metrics_gauge_set(f->congested_gauge, 0);
    *out = f;
    return 0;
}

void pipeline_flow_destroy(pipeline_flow_t *f)
{
    if (f == NULL)
        return;
    limits_destroy(f->limits);
    free(f);
}

limits_t *pipeline_flow_limits(pipeline_flow_t *f)
{
    return f->limits;
}

int pipeline_flow_congested(pipeline_flow_t *f)
{
    uint64_t size;
    int was, now;

    if (f->spool == NULL || f->high_bytes == 0)
        return 0;
    size = spool_size_bytes(f->spool);
    was = atomic_load(&f->congested);
    now = was ? size >= f->low_bytes : size >= f->high_bytes;
    /* Only the thread that flips the state logs it. */
    if (now != was && atomic_compare_exchange_strong(&f->congested, &was,
                                                     now)) {
        metrics_gauge_set(f->congested_gauge, now);
        if (now)
            log_warn("spool congested: turning new readings away",
                     "size=%llu high_mark=%llu",
                     (unsigned long long)size,
                     (unsigned long long)f->high_bytes);
        else
            log_info("spool below its low mark: accepting readings again",
                     "size=%llu low_mark=%llu", (unsigned long long)size,
                     (unsigned long long)f->low_bytes);
    }
    return now || spool_is_full(f->spool);
}

/* Fills `out` with the limits of device `dev`: its device type's, with the
 * registry's overrides applied. */
static void device_limits(const config_t *cfg, const auth_device_t *dev,
                          config_limits_t *out)
{
    const config_device_type_t *type = config_device_type(cfg, dev->type);
    uint64_t *fields[AUTH_LIMIT_COUNT] = {
        [AUTH_LIMIT_READINGS_PER_SECOND] = &out->readings_per_second,
        [AUTH_LIMIT_BURST] = &out->burst,
        [AUTH_LIMIT_BYTES_PER_SECOND] = &out->bytes_per_second,
        [AUTH_LIMIT_DAILY_READINGS] = &out->daily_readings,
    };

    memset(out, 0, sizeof(*out));
    if (type != NULL)
        *out = type->limits;
    for (int i = 0; i < AUTH_LIMIT_COUNT; i++) {
        if (dev->limits.set & (1u << i))
            *fields[i] = dev->limits.value[i];
    }
}

int pipeline_flow_take(pipeline_flow_t *f, const auth_device_t *dev,
                       uint64_t readings, uint64_t bytes,
                       uint64_t *retry_after_ms)
{
    config_limits_t lim;

    device_limits(f->cfg, dev, &lim);
    return limits_take_readings(f->limits, dev->id, &lim, readings, bytes,
                                limits_now_ms(), retry_after_ms);
}

void pipeline_flow_count(const char *protocol, const char *reason,
                         int retrying)
{
    char labels[96];

    snprintf(labels, sizeof(labels), "protocol=\"%s\",reason=\"%s\"",
             protocol, reason);
    metrics_counter_add(
        retrying ? metrics_counter("ingestd_throttled_total", throttled_help,
                                   labels)
                 : metrics_counter("ingestd_rejected_total", rejected_help,
                                   labels),
        1);
}
