#include "app/app.h"
#include "app/notify.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pthread.h>
#include <uv.h>

#include "auth/auth.h"
#include "bridge/bridge.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/fsutil.h"
#include "core/log.h"
#include "core/metrics.h"
#include "http/http.h"
#include "mqtt/mqtt.h"
#include "net/tls.h"
#include "pipeline/pipeline.h"
#include "sinks/sink.h"
#include "spool/spool.h"

#define MAX_WORKERS 64
#define DRAIN_CHECK_MS 20

enum worker_command { WORKER_RUN = 0, WORKER_DRAIN = 1, WORKER_STOP = 2 };

typedef struct server server_t;

/* One event loop thread serving the device API on its own socket. */
typedef struct worker {
    server_t *server;
    int index;
    pthread_t thread;
    uv_loop_t loop;
    uv_async_t control;
    uv_timer_t drain_timer;
    pipeline_loop_t *pl;
    http_listener_t *listener;
    http_listener_t *https; /* NULL unless https.listen is set */
    mqtt_listener_t *mqtt;
    _Atomic int command;
    /* Guards `control` against uv_async_send after the worker closed it:
     * a late stop signal must not touch a closed handle. */
    pthread_mutex_t control_lock;
    int control_closed;
    int handled_command;
    int start_rc;
    char start_err[512];
    uv_sem_t started;
} worker_t;

struct server {
    config_t *cfg;
    auth_t *auth;
    spool_t *spool;
    pipeline_t *pipeline;
    sinks_t *sinks;
    bridges_t *bridges;
    tls_server_t *https_tls; /* contexts of https.listen, or NULL */
    tls_server_t *mqtts_tls; /* contexts of mqtts.listen, or NULL */
    worker_t *workers;
    int worker_count;

    uv_loop_t *main_loop;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t reload_timer;
    uv_timer_t stop_timer;
    uv_timer_t watchdog_timer; /* WATCHDOG=1 to systemd, when enabled */
    http_listener_t *admin;
    _Atomic int draining;
    metrics_histogram_t *fsync_seconds;
};

static server_t *the_server; /* for the spool's sync observer */

static void on_worker_handle_closed(uv_handle_t *h)
{
    (void)h;
}

static void close_control(worker_t *w)
{
    pthread_mutex_lock(&w->control_lock);
    w->control_closed = 1;
    uv_close((uv_handle_t *)&w->control, on_worker_handle_closed);
    pthread_mutex_unlock(&w->control_lock);
}

/* Called every DRAIN_CHECK_MS once draining: the worker ends after its
 * last connection closed and its last batch completed, because only then
 * has every accepted reading got its answer. */
static void on_drain_check(uv_timer_t *t)
{
    worker_t *w = t->data;
    int cmd = atomic_load(&w->command);

    if (cmd == WORKER_STOP && w->handled_command != WORKER_STOP) {
        w->handled_command = WORKER_STOP;
        if (w->listener != NULL) {
            size_t open = http_listener_connections(w->listener);
            if (open > 0)
                log_warn("closing connections at shutdown timeout",
                         "worker=%d connections=%zu", w->index, open);
            http_listener_close(w->listener);
            w->listener = NULL;
        }
        if (w->https != NULL) {
            http_listener_close(w->https);
            w->https = NULL;
        }
        if (w->mqtt != NULL) {
            mqtt_listener_close(w->mqtt);
            w->mqtt = NULL;
        }
    }
    if (w->listener != NULL && http_listener_connections(w->listener) > 0)
        return;
    if (w->https != NULL && http_listener_connections(w->https) > 0)
        return;
    if (w->mqtt != NULL && mqtt_listener_connections(w->mqtt) > 0)
        return;
    if (pipeline_loop_pending(w->pl) > 0)
        return;
    if (w->listener != NULL) {
        http_listener_close(w->listener);
        w->listener = NULL;
    }
    if (w->https != NULL) {
        http_listener_close(w->https);
        w->https = NULL;
    }
    if (w->mqtt != NULL) {
        mqtt_listener_close(w->mqtt);
        w->mqtt = NULL;
    }
    uv_timer_stop(t);
    uv_close((uv_handle_t *)t, on_worker_handle_closed);
    close_control(w);
    pipeline_loop_detach(w->pl);
    w->pl = NULL;
}

static void on_worker_control(uv_async_t *a)
{
    worker_t *w = a->data;
    int cmd = atomic_load(&w->command);

    if (cmd >= WORKER_DRAIN && w->handled_command == WORKER_RUN) {
        w->handled_command = WORKER_DRAIN;
        if (w->listener != NULL)
            http_listener_drain(w->listener);
        if (w->https != NULL)
            http_listener_drain(w->https);
        if (w->mqtt != NULL)
            mqtt_listener_drain(w->mqtt);
        uv_timer_start(&w->drain_timer, on_drain_check, 0, DRAIN_CHECK_MS);
    }
}

/* Starts https.listen and mqtts.listen on the worker's loop when they
 * are set. On failure closes every listener of the worker. */
static int start_tls_listeners(worker_t *w)
{
    server_t *s = w->server;
    int rc = 0;

    if (s->https_tls != NULL)
        rc = http_https_start(&w->loop, s->cfg, s->auth, w->pl, s->https_tls,
                              &w->https, w->start_err,
                              sizeof(w->start_err));
    if (rc == 0 && s->mqtts_tls != NULL)
        rc = mqtt_listener_start_tls(w->mqtt, s->mqtts_tls, w->start_err,
                                     sizeof(w->start_err));
    if (rc == 0)
        return 0;
    if (w->https != NULL) {
        http_listener_close(w->https);
        w->https = NULL;
    }
    http_listener_close(w->listener);
    w->listener = NULL;
    mqtt_listener_close(w->mqtt);
    w->mqtt = NULL;
    return rc;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    server_t *s = w->server;

    w->start_rc = uv_loop_init(&w->loop);
    if (w->start_rc != 0) {
        snprintf(w->start_err, sizeof(w->start_err), "uv_loop_init: %s",
                 uv_strerror(w->start_rc));
        uv_sem_post(&w->started);
        return NULL;
    }
    uv_async_init(&w->loop, &w->control, on_worker_control);
    w->control.data = w;
    uv_timer_init(&w->loop, &w->drain_timer);
    w->drain_timer.data = w;
    w->pl = pipeline_loop_attach(s->pipeline, &w->loop);
    if (w->pl == NULL) {
        w->start_rc = ING_ENOMEM;
        snprintf(w->start_err, sizeof(w->start_err), "out of memory");
    } else {
        w->start_rc = http_api_start(&w->loop, s->cfg, s->auth, w->pl,
                                     &w->listener, w->start_err,
                                     sizeof(w->start_err));
    }
    if (w->start_rc == 0) {
        w->start_rc = mqtt_listener_start(&w->loop, s->cfg, s->auth, w->pl,
                                          &w->mqtt, w->start_err,
                                          sizeof(w->start_err));
        if (w->start_rc != 0) {
            http_listener_close(w->listener);
            w->listener = NULL;
        }
    }
    if (w->start_rc == 0)
        w->start_rc = start_tls_listeners(w);
    uv_sem_post(&w->started);
    if (w->start_rc != 0) {
        /* The main thread stops every worker; wait for that command. */
        uv_close((uv_handle_t *)&w->drain_timer, on_worker_handle_closed);
        close_control(w);
        if (w->pl != NULL)
            pipeline_loop_detach(w->pl);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        uv_loop_close(&w->loop);
        return NULL;
    }
    log_debug("worker started", "worker=%d", w->index);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&w->loop) != 0)
        log_warn("worker loop closed with open handles", "worker=%d",
                 w->index);
    log_debug("worker stopped", "worker=%d", w->index);
    return NULL;
}

static void command_workers(server_t *s, int cmd)
{
    for (int i = 0; i < s->worker_count; i++) {
        worker_t *w = &s->workers[i];
        if (w->start_rc != 0)
            continue;
        atomic_store(&w->command, cmd);
        pthread_mutex_lock(&w->control_lock);
        if (!w->control_closed)
            uv_async_send(&w->control);
        pthread_mutex_unlock(&w->control_lock);
    }
}

static const char *not_ready(void *arg)
{
    server_t *s = arg;

    if (atomic_load(&s->draining))
        return "shutting down";
    /* Past the high mark the spool turns readings away until it drops
     * below the low mark, so a load balancer sends devices elsewhere. */
    if (s->pipeline != NULL && pipeline_spool_full(s->pipeline))
        return "spool congested";
    if (spool_is_full(s->spool))
        return "spool full";
    return NULL;
}

static size_t describe_sinks(void *arg, char *buf, size_t size)
{
    server_t *s = arg;

    return sinks_describe(s->sinks, buf, size);
}

static void on_reload_timer(uv_timer_t *t)
{
    server_t *s = t->data;
    int rc = auth_reload_if_changed(s->auth);

    if (rc == 1)
        log_info("registry reloaded", "devices=%zu", auth_device_count(s->auth));
    else if (rc < 0)
        log_write_limited("registry-poll", 3, LOG_LEVEL_ERROR,
                          "registry reload failed", "path=%s",
                          s->cfg->registry.path);
}

static void on_stop_timeout(uv_timer_t *t)
{
    server_t *s = t->data;

    log_warn("shutdown timeout reached; closing remaining connections",
             "timeout_ms=%llu",
             (unsigned long long)s->cfg->shutdown_timeout_ms);
    command_workers(s, WORKER_STOP);
}

static void close_main_handles(server_t *s)
{
    uv_close((uv_handle_t *)&s->sig_term, NULL);
    uv_close((uv_handle_t *)&s->sig_int, NULL);
    uv_close((uv_handle_t *)&s->sig_hup, NULL);
    uv_close((uv_handle_t *)&s->reload_timer, NULL);
    uv_close((uv_handle_t *)&s->stop_timer, NULL);
    uv_close((uv_handle_t *)&s->watchdog_timer, NULL);
    if (s->admin != NULL) {
        http_listener_close(s->admin);
        s->admin = NULL;
    }
}

/* Stops the MQTT bridges before anything they use: each drains, so that
 * the messages it stored get their acknowledgement, then disconnects. */
static void stop_bridges(server_t *s)
{
    if (s->bridges == NULL)
        return;
    bridges_stop(s->bridges, s->cfg->shutdown_timeout_ms);
    s->bridges = NULL;
    log_info("bridges stopped", "bridges=%zu", s->cfg->bridge_count);
}

/* Stops the bridges and joins the workers on a helper thread, so the main
 * loop keeps serving /metrics and /readyz while they drain. */
static void join_workers(void *arg)
{
    server_t *s = arg;

    stop_bridges(s);
    for (int i = 0; i < s->worker_count; i++)
        pthread_join(s->workers[i].thread, NULL);
    /* The sinks keep delivering what the workers stored, so that a clean
     * stop with healthy destinations leaves the spool empty. */
    sinks_drain(s->sinks, s->cfg->sinks_drain_timeout_ms);
}

static void after_join(uv_work_t *req, int status)
{
    server_t *s = req->data;

    (void)status;
    free(req);
    log_info("workers stopped", "workers=%d", s->worker_count);
    close_main_handles(s);
}

static void on_join_work(uv_work_t *req)
{
    join_workers(req->data);
}

/* Loads the TLS certificates, key, CAs and CRL again for new
 * connections. Open connections keep the context they started with. */
static void reload_tls(server_t *s)
{
    tls_server_t *servers[] = {s->https_tls, s->mqtts_tls};
    char err[512];

    for (size_t i = 0; i < sizeof(servers) / sizeof(servers[0]); i++) {
        if (servers[i] == NULL)
            continue;
        if (tls_server_reload(servers[i], err, sizeof(err)) == 0)
            log_info("tls certificates reloaded on SIGHUP", "listener=%s",
                     tls_server_name(servers[i]));
        else
            log_error("tls reload on SIGHUP failed; the previous "
                      "certificates stay in use",
                      "listener=%s error=\"%s\"",
                      tls_server_name(servers[i]), err);
    }
}

static void on_signal(uv_signal_t *h, int signum)
{
    server_t *s = h->data;

    if (signum == SIGHUP) {
        if (auth_reload(s->auth) == 0)
            log_info("registry reloaded on SIGHUP", "devices=%zu",
                     auth_device_count(s->auth));
        else
            log_error("registry reload on SIGHUP failed", "path=%s",
                      s->cfg->registry.path);
        reload_tls(s);
        return;
    }
    if (atomic_exchange(&s->draining, 1)) {
        log_warn("second stop signal; closing connections now", "signal=%d",
                 signum);
        command_workers(s, WORKER_STOP);
        return;
    }
    log_info("stopping: draining connections", "signal=%s workers=%d",
             signum == SIGTERM ? "SIGTERM" : "SIGINT", s->worker_count);
    notify_stopping("draining connections and sinks");
    command_workers(s, WORKER_DRAIN);
    uv_timer_start(&s->stop_timer, on_stop_timeout,
                   s->cfg->shutdown_timeout_ms, 0);
    uv_work_t *req = calloc(1, sizeof(*req));
    if (req == NULL) {
        join_workers(s);
        close_main_handles(s);
        return;
    }
    req->data = s;
    uv_queue_work(s->main_loop, req, on_join_work, after_join);
}

/* Runs on the main loop, so a stuck main loop stops the pings and lets
 * systemd restart the service after WatchdogSec. */
static void on_watchdog_timer(uv_timer_t *t)
{
    (void)t;
    notify_watchdog();
}

static void observe_fsync(double seconds)
{
    if (the_server != NULL)
        metrics_histogram_observe(the_server->fsync_seconds, seconds);
}

static int64_t gauge_devices(void *arg)
{
    return (int64_t)auth_device_count(arg);
}

static void register_metrics(server_t *s)
{
    char labels[64];

    snprintf(labels, sizeof(labels), "version=\"%s\"", INGESTD_VERSION);
    metrics_gauge_set(metrics_gauge("ingestd_build_info",
                                    "Always 1; the version label names the "
                                    "running build.",
                                    labels),
                      1);
    s->fsync_seconds = metrics_histogram(
        "ingestd_spool_fsync_seconds",
        "Duration of each spool fdatasync, which covers one commit group.",
        NULL);
    metrics_gauge_set(metrics_gauge("ingestd_spool_max_bytes",
                                    "Configured spool.max_size; new "
                                    "readings get 503 at this size.",
                                    NULL),
                      (int64_t)s->cfg->spool.max_size);
    metrics_gauge_func("ingestd_registry_devices",
                       "Devices in the loaded registry snapshot.", NULL,
                       gauge_devices, s->auth);
}

static int resolve_workers(const config_t *cfg)
{
    int n = cfg->http.workers;

    if (n <= 0) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        n = cores > 0 ? (int)cores : 1;
    }
    return n > MAX_WORKERS ? MAX_WORKERS : n;
}

/* Opens the registry, creating an empty one on first start so that the
 * service runs before any device was added. */
static int open_auth(server_t *s, char *err, size_t errlen)
{
    auth_options_t opts = {0};
    struct stat st;
    char *dir;
    int rc;

    /* The registry usually lives in data_dir, which a first start makes. */
    dir = strdup(s->cfg->registry.path);
    if (dir == NULL)
        return ING_ENOMEM;
    if (strrchr(dir, '/') != NULL && strrchr(dir, '/') != dir)
        *strrchr(dir, '/') = '\0';
    if (fs_mkdir_p(dir) != 0) {
        snprintf(err, errlen, "cannot create folder %s: %s", dir,
                 strerror(errno));
        free(dir);
        return ING_EIO;
    }
    free(dir);
    if (stat(s->cfg->registry.path, &st) != 0 && errno == ENOENT) {
        registry_t *reg;
        if (registry_open(s->cfg->registry.path, &reg, err, errlen) != 0)
            return ING_EDB;
        registry_close(reg);
        log_info("created an empty device registry", "path=%s",
                 s->cfg->registry.path);
    }
    rc = auth_open(s->cfg->registry.path, &s->auth, err, errlen);
    if (rc != 0)
        return rc;
    opts.jwt_leeway_s = (int64_t)(s->cfg->jwt.leeway_ms / 1000);
    opts.jwt_max_lifetime_s = (int64_t)(s->cfg->jwt.max_lifetime_ms / 1000);
    opts.jwt_audience = s->cfg->jwt.audience;
    opts.jwt_issuer = s->cfg->jwt.issuer;
    opts.max_failures_per_minute = s->cfg->auth.max_failures_per_minute;
    opts.block_duration_ms = s->cfg->auth.block_duration_ms;
    opts.guard_table_size = (size_t)s->cfg->auth.guard_table_size;
    rc = auth_set_options(s->auth, &opts);
    if (rc != 0)
        snprintf(err, errlen, "applying the jwt and auth settings failed: %s",
                 ing_strerror(rc));
    return rc;
}

/* With idempotency off, the cursor of its spool reader from an earlier
 * run would hold back segment deletion for ever, and the index it served
 * is not used, so it is removed before the spool loads the cursors. */
static void drop_idempotency_cursor(const config_t *cfg,
                                    const char *spool_dir)
{
    char path[4200];

    if (cfg->idempotency.enabled)
        return;
    snprintf(path, sizeof(path), "%s/cursors/idempotency", spool_dir);
    if (unlink(path) == 0)
        log_info("removed the idempotency spool cursor, since idempotency "
                 "is off",
                 "file=%s", path);
    else if (errno != ENOENT)
        log_warn("removing the idempotency spool cursor failed; it holds "
                 "back spool cleanup until deleted",
                 "file=%s error=\"%s\"", path, strerror(errno));
}

static int start_storage(server_t *s, char *err, size_t errlen)
{
    char spool_dir[4096];
    spool_options_t opts = {0};
    int rc;

    if (fs_mkdir_p(s->cfg->data_dir) != 0) {
        snprintf(err, errlen, "cannot create data_dir %s: %s",
                 s->cfg->data_dir, strerror(errno));
        return ING_EIO;
    }
    snprintf(spool_dir, sizeof(spool_dir), "%s/spool", s->cfg->data_dir);
    opts.dir = spool_dir;
    drop_idempotency_cursor(s->cfg, spool_dir);
    opts.fsync = s->cfg->spool.durability == SPOOL_DURABILITY_FSYNC;
    opts.segment_size = s->cfg->spool.segment_size;
    opts.max_size = s->cfg->spool.max_size;
    /* A record is one envelope: the largest reading any protocol accepts
     * plus room for the envelope's own fields. */
    opts.max_record = s->cfg->http.max_body_bytes;
    if (s->cfg->ws.max_message_size > opts.max_record)
        opts.max_record = s->cfg->ws.max_message_size;
    if (s->cfg->mqtt.max_packet_size > opts.max_record)
        opts.max_record = s->cfg->mqtt.max_packet_size;
    opts.max_record += 4096;
    rc = spool_open(&opts, &s->spool, err, errlen);
    if (rc != 0)
        return rc;
    spool_set_sync_observer(s->spool, observe_fsync);
    if (!opts.fsync)
        log_warn("spool durability is none: acknowledged readings can be "
                 "lost on power loss or kernel crash",
                 "dir=%s", spool_dir);
    rc = pipeline_create(s->cfg, s->spool, &s->pipeline, err, errlen);
    if (rc != 0)
        return rc;
    rc = sinks_start(s->cfg, s->spool, &s->sinks, err, errlen);
    if (rc != 0)
        return rc;
    return bridges_start(s->cfg, s->auth, s->pipeline, &s->bridges, err,
                         errlen);
}

/* Loads the TLS contexts of the listeners that are on, so that a bad
 * certificate stops the start before anything listens. */
static int create_tls(server_t *s, char *err, size_t errlen)
{
    int rc = 0;

    if (s->cfg->https.listen != NULL)
        rc = tls_server_create(s->cfg, s->auth, "https", "http/1.1",
                               &s->https_tls, err, errlen);
    if (rc == 0 && s->cfg->mqtts.listen != NULL)
        rc = tls_server_create(s->cfg, s->auth, "mqtts", "mqtt",
                               &s->mqtts_tls, err, errlen);
    return rc;
}

static int start_workers(server_t *s, char *err, size_t errlen)
{
    s->worker_count = resolve_workers(s->cfg);
    s->workers = calloc((size_t)s->worker_count, sizeof(*s->workers));
    if (s->workers == NULL)
        return ING_ENOMEM;
    for (int i = 0; i < s->worker_count; i++) {
        worker_t *w = &s->workers[i];
        w->server = s;
        w->index = i;
        uv_sem_init(&w->started, 0);
        pthread_mutex_init(&w->control_lock, NULL);
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            snprintf(err, errlen, "cannot start worker thread %d", i);
            s->worker_count = i;
            return ING_ENOMEM;
        }
        uv_sem_wait(&w->started);
        uv_sem_destroy(&w->started);
        if (w->start_rc != 0) {
            snprintf(err, errlen, "%s", w->start_err);
            s->worker_count = i + 1;
            return w->start_rc;
        }
    }
    return 0;
}

static void stop_everything(server_t *s)
{
    stop_bridges(s);
    if (s->sinks != NULL)
        sinks_stop(s->sinks, s->cfg->shutdown_timeout_ms);
    if (s->pipeline != NULL)
        pipeline_destroy(s->pipeline);
    if (s->spool != NULL)
        spool_close(s->spool);
    if (s->auth != NULL)
        auth_close(s->auth);
    tls_server_free(s->https_tls);
    tls_server_free(s->mqtts_tls);
    s->https_tls = s->mqtts_tls = NULL;
    the_server = NULL;
}

static void start_main_handles(server_t *s)
{
    uv_signal_init(s->main_loop, &s->sig_term);
    uv_signal_init(s->main_loop, &s->sig_int);
    uv_signal_init(s->main_loop, &s->sig_hup);
    s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_signal, SIGINT);
    uv_signal_start(&s->sig_hup, on_signal, SIGHUP);
    uv_timer_init(s->main_loop, &s->reload_timer);
    uv_timer_init(s->main_loop, &s->stop_timer);
    uv_timer_init(s->main_loop, &s->watchdog_timer);
    s->reload_timer.data = s->stop_timer.data = s;
    if (s->cfg->registry.reload_interval_ms > 0)
        uv_timer_start(&s->reload_timer, on_reload_timer,
                       s->cfg->registry.reload_interval_ms,
                       s->cfg->registry.reload_interval_ms);
}

/* Tells systemd that every listener accepts, and starts the watchdog
 * pings when the unit sets WatchdogSec. */
static void notify_started(server_t *s)
{
    char status[256];
    uint64_t period_ms = notify_watchdog_period_ms();

    snprintf(status, sizeof(status), "accepting readings on %s",
             s->cfg->http.listen);
    notify_ready(status);
    if (period_ms > 0)
        uv_timer_start(&s->watchdog_timer, on_watchdog_timer, period_ms,
                       period_ms);
}

int app_serve(const char *config_path)
{
    server_t server = {0};
    server_t *s = &server;
    char err[1024];
    int rc;

    /* Writes to a closed connection must fail with EPIPE, not kill us. */
    signal(SIGPIPE, SIG_IGN);
    if (config_load(config_path, &s->cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 2;
    }
    log_threshold = s->cfg->log_level;
    the_server = s;
    s->main_loop = uv_default_loop();

    rc = open_auth(s, err, sizeof(err));
    if (rc == 0)
        rc = create_tls(s, err, sizeof(err));
    if (rc == 0)
        rc = start_storage(s, err, sizeof(err));
    if (rc == 0) {
        register_metrics(s);
        start_main_handles(s);
        rc = start_workers(s, err, sizeof(err));
    }
    if (rc == 0 && s->cfg->admin.listen != NULL && s->cfg->admin.listen[0]) {
        http_admin_hooks_t hooks = {.not_ready = not_ready,
                                    .describe_sinks = describe_sinks,
                                    .arg = s};
        rc = http_admin_start(s->main_loop, s->cfg->admin.listen, &hooks,
                              &s->admin, err, sizeof(err));
    }
    if (rc != 0) {
        log_error("start failed", "error=\"%s\"", err);
        fprintf(stderr, "ingestd: %s\n", err);
        notify_status("start failed");
        if (s->workers != NULL) {
            atomic_store(&s->draining, 1);
            command_workers(s, WORKER_STOP);
            join_workers(s);
        }
        if (s->sig_term.loop != NULL)
            close_main_handles(s);
        uv_run(s->main_loop, UV_RUN_DEFAULT);
        stop_everything(s);
        free(s->workers);
        config_free(s->cfg);
        return rc == ING_ECONFIG ? 2 : 1;
    }

    log_info("ingestd started", "version=%s listen=%s admin=%s workers=%d "
             "devices=%zu durability=%s",
             INGESTD_VERSION, s->cfg->http.listen,
             s->cfg->admin.listen && s->cfg->admin.listen[0]
                 ? s->cfg->admin.listen
                 : "off",
             s->worker_count, auth_device_count(s->auth),
             s->cfg->spool.durability == SPOOL_DURABILITY_FSYNC ? "fsync"
                                                                 : "none");
    notify_started(s);
    uv_run(s->main_loop, UV_RUN_DEFAULT);

    stop_everything(s);
    uv_loop_close(s->main_loop);
    free(s->workers);
    log_info("ingestd stopped", "version=%s", INGESTD_VERSION);
    config_free(s->cfg);
    return 0;
}

int app_check_config(const char *config_path)
{
    char err[1024];
    config_t *cfg;
    pipeline_t *p;

    if (config_load(config_path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s\n", err);
        return 2;
    }
    /* Compiling the schemas is part of the check: a schema that uses an
     * unsupported keyword must fail here, not at start. */
    if (pipeline_create(cfg, NULL, &p, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s: %s\n", config_path, err);
        config_free(cfg);
        return 2;
    }
    pipeline_destroy(p);
    /* Reading the certificate and key here catches a key that does not
     * match, or a file the service cannot read, before a restart. */
    if (tls_check_config(cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "ingestd: %s: %s\n", config_path, err);
        config_free(cfg);
        return 2;
    }
    printf("%s: OK (listen %s, %zu device types, %zu sinks, data in %s)\n",
           config_path, cfg->http.listen, cfg->device_type_count,
           cfg->sink_count, cfg->data_dir);
    config_free(cfg);
    return 0;
}
