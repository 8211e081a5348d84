"""The Grafana dashboard and provisioning files in deploy/grafana.

Debian 12 has no grafana package, so these tests check the dashboard's
JSON model without Grafana. Every metric and label its queries name must
be in a running ingestd's /metrics. Every query, run by a real
prometheus scraping that ingestd, must return data.
"""

import json
import re
import time
from pathlib import Path

import requests
import yaml

from test_prometheus import (QUERY_TIMEOUT_S, prometheus, query,  # noqa: F401
                             scrape_names, send_traffic)

GRAFANA = Path(__file__).resolve().parents[2] / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/ingestd.json"

# Values for the dashboard's variables when a test runs its queries.
VARIABLES = {"$__rate_interval": "1m", "$job": "ingestd", "$instance": ".+"}
# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
METRIC = re.compile(r"\b(ingestd_[a-z0-9_]+)\b")


def load_dashboard():
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def all_queries(dashboard):
    """Return (panel title, expr) for every target and query variable."""
    queries = [(panel["title"], target["expr"])
               for panel in graph_panels(dashboard)
               for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"variable {variable['name']}",
                            variable["query"]["query"]))
    return queries


def substitute(expr):
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def overlaps(a, b):
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and
            a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_dashboard_model_is_valid():
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 39
    assert dashboard["uid"] == "ingestd-overview"
    assert dashboard["title"]

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "instance" in variables
    assert "job" in variables

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"

    positions = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for title, other in positions:
            assert not overlaps(grid, other), (
                f"panels {title!r} and {panel['title']!r} overlap")
        positions.append((panel["title"], grid))

    for panel in graph_panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), (
                f"unbalanced parentheses in {panel['title']}: "
                f"{target['expr']}")


def test_dashboard_covers_required_views():
    exprs = " ".join(expr for _, expr in all_queries(load_dashboard()))
    for needle in ("ingestd_readings_total",
                   "histogram_quantile",
                   "ingestd_http_request_duration_seconds_bucket",
                   "ingestd_spool_size_bytes",
                   "ingestd_spool_max_bytes",
                   "ingestd_sink_lag_seconds",
                   "ingestd_sink_records_total",
                   "ingestd_mqtt_connections",
                   "ingestd_http_connections",
                   "ingestd_ws_connections"):
        assert needle in exprs, f"no panel queries {needle}"


def test_provisioning_files_are_valid():
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]

    dashboards = yaml.safe_load(
        (GRAFANA / "provisioning/dashboards/ingestd.yaml").read_text())
    assert dashboards["apiVersion"] == 1
    provider = dashboards["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"]


def test_dashboard_metrics_exist_in_ingestd(ingestd):
    send_traffic(ingestd)
    exported = scrape_names(ingestd)
    for title, expr in all_queries(load_dashboard()):
        for name in METRIC.findall(expr):
            assert name in exported, (
                f"{title}: {name} is not in ingestd's /metrics")
        used_labels = set(TARGET_LABELS)
        for name, matchers in SELECTOR.findall(expr):
            if name not in exported:
                continue
            labels = exported[name] | TARGET_LABELS
            used_labels |= labels
            for label in MATCHER.findall(matchers):
                assert label in labels, (
                    f"{title}: {name} has no label {label!r}; it has "
                    f"{sorted(exported[name])}")
        for grouping in GROUPING.findall(expr):
            for label in (g.strip() for g in grouping.split(",")):
                assert label in used_labels, (
                    f"{title}: grouping label {label!r} is on none of "
                    f"the selected series")


def test_dashboard_queries_return_data(ingestd, prometheus):  # noqa: F811
    send_traffic(ingestd)
    queries = [(title, substitute(expr))
               for title, expr in all_queries(load_dashboard())
               if not expr.startswith("label_values(")]
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while True:
        empty = [(title, expr) for title, expr in queries
                 if not query(prometheus, expr)]
        if not empty:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(empty)} dashboard queries returned no data within "
                f"{QUERY_TIMEOUT_S} s, for example {empty[:3]}")
        time.sleep(0.5)
    label_values = requests.get(
        prometheus + "/api/v1/label/instance/values",
        params={"match[]": 'ingestd_build_info{job="ingestd"}'},
        timeout=5).json()
    assert label_values["data"] == [f"127.0.0.1:{ingestd.admin_port}"]
