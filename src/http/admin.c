/* The admin listener's routes: GET /metrics, /healthz and /readyz. */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/metrics.h"
#include "http/http_internal.h"

/* Admin requests carry no body and no credentials, so every check passes;
 * the listener is meant for loopback or a private network. */
static void admin_check(http_conn_t *c, http_request_t *r)
{
}

/* Answers with {"status": state, "reason": reason, "sinks": {...}}, where
 * `sinks` is JSON text or NULL to leave it out. */
static void respond_status(http_conn_t *c, int status, const char *state,
                           const char *reason, const char *sinks)
{
    json_t *body = json_object();
    http_response_t resp = {0};
    int rc = -1;

    if (body != NULL) {
        json_object_set_new(body, "status", json_string(state));
        if (reason != NULL)
            json_object_set_new(body, "reason", json_string(reason));
        if (sinks != NULL)
            json_object_set_new(body, "sinks", json_loads(sinks, 0, NULL));
        rc = http_response_json(&resp, status, body);
        json_decref(body);
    }
    if (rc != 0) {
        http_conn_close(c);
        return;
    }
    http_conn_respond(c, &resp);
}

/* Sets ingestd_ready from the check behind /readyz, so that an alert
 * rule can see readiness in the scraped metrics. */
static void update_ready_gauge(http_conn_t *c)
{
    const http_admin_hooks_t *hooks = &c->listener->hooks;
    int ready = hooks->not_ready == NULL ||
                hooks->not_ready(hooks->arg) == NULL;

    metrics_gauge_set(metrics_gauge("ingestd_ready",
                                    "1 when /readyz answers 200, else 0; "
                                    "updated at each scrape.",
                                    NULL),
                      ready);
}

static void handle_metrics(http_conn_t *c, http_request_t *r)
{
    http_response_t resp = {0};
    size_t len;
    char *text;

    update_ready_gauge(c);
    text = metrics_render(&len);

    if (text == NULL) {
        http_conn_error(c, 500, "out_of_memory",
                        "rendering the metrics ran out of memory; retry",
                        NULL);
        return;
    }
    resp.status = 200;
    resp.content_type = "text/plain; version=0.0.4";
    resp.body = text;
    resp.body_len = len;
    http_conn_respond(c, &resp);
}

static void handle_healthz(http_conn_t *c, http_request_t *r)
{
    respond_status(c, 200, "ok", NULL, NULL);
}

static void handle_readyz(http_conn_t *c, http_request_t *r)
{
    const http_admin_hooks_t *hooks = &c->listener->hooks;
    const char *reason = NULL;
    char sinks[4096];
    const char *shown = NULL;

    if (hooks->not_ready != NULL)
        reason = hooks->not_ready(hooks->arg);
    /* Sink state is information only: a broker outage does not make
     * ingestd unready, because the spool keeps accepting readings. */
    if (hooks->describe_sinks != NULL &&
        hooks->describe_sinks(hooks->arg, sinks, sizeof(sinks)) > 0)
        shown = sinks;
    if (reason != NULL)
        respond_status(c, 503, "not ready", reason, shown);
    else
        respond_status(c, 200, "ready", NULL, shown);
}

const http_route_t http_admin_routes[] = {
    {"/metrics", "GET", admin_check, handle_metrics},
    {"/healthz", "GET", admin_check, handle_healthz},
    {"/readyz", "GET", admin_check, handle_readyz},
};
const size_t http_admin_route_count =
    sizeof(http_admin_routes) / sizeof(http_admin_routes[0]);
