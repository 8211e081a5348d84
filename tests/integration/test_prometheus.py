"""ingestd's metrics, checked with the real prometheus and promtool.

promtool (from Debian's prometheus package) lints the /metrics output and
checks and unit-tests deploy/prometheus/. A real prometheus then scrapes a
running ingestd every second on 127.0.0.1, with the alert rules loaded,
and the tests read the results through its HTTP API.
"""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
import requests
import websockets

import mqtt_raw as raw
from conftest import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy/prometheus"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS_READY_TIMEOUT_S = 60
QUERY_TIMEOUT_S = 30


def send_traffic(server, readings=5):
    """Send accepted and rejected readings over HTTP, WebSocket and MQTT.

    ingestd creates most series on first use, so a scrape shows the MQTT,
    WebSocket and rejection series only after this traffic.
    """
    key = server.keys["dev-1"]
    url = server.base_url + "/v1/data"
    headers = {"Authorization": f"Bearer {key}"}
    for i in range(readings):
        r = requests.post(url, json={"sensor_value": i}, headers=headers,
                          timeout=5)
        assert r.status_code == 202, r.text
    r = requests.post(url, json={"sensor_value": 500}, headers=headers,
                      timeout=5)
    assert r.status_code == 400, r.text
    r = requests.post(url, json={"sensor_value": 1},
                      headers={"Authorization": "Bearer ik_unknown"},
                      timeout=5)
    assert r.status_code == 401, r.text
    r = requests.post(url, json={"sensor_value": 1},
                      headers=dict(headers, **{"X-Padding": "x" * 4096}),
                      timeout=5)
    assert r.status_code == 431, r.text

    async def send_over_websocket():
        async with websockets.connect(
                f"ws://127.0.0.1:{server.port}/v1/ws",
                extra_headers=headers, open_timeout=5, close_timeout=5,
                ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "data", "id": "p1",
                                      "readings": [{"sensor_value": 3}]}))
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    reply = asyncio.run(asyncio.wait_for(send_over_websocket(), 20))
    assert reply.get("type") == "ack", reply

    with raw.Client(server.mqtt_port, version=raw.V5) as c:
        connack = c.connect("dev-1", "dev-1", "ik_unknown")
        assert connack.reason == 0x86, connack

    with raw.Client(server.mqtt_port, version=raw.V5) as c:
        connack = c.connect("dev-1", "dev-1", key)
        assert connack.reason == 0, connack
        c.send(raw.publish("devices/dev-1/data", '{"sensor_value": 4}',
                           qos=1, packet_id=1))
        puback = c.read()
        assert (puback.type, puback.reason) == (raw.PUBACK, 0), puback
        c.send(raw.disconnect())


def scrape_names(server):
    """Return the sample names in ingestd's /metrics output, with the label
    names seen on each: {name: set of label names}."""
    names = {}
    for line in server.metrics().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name = line.split(" ")[0]
        labels = set()
        if rest:
            body = rest.rsplit("}", 1)[0]
            for pair in body.split('",'):
                if "=" in pair:
                    labels.add(pair.split("=", 1)[0].strip(","))
        names.setdefault(name.strip(), set()).update(labels)
    return names


def start_prometheus(folder, targets, rule_files=()):
    """Start prometheus scraping `targets` (host:port) as job "ingestd"
    every second, and return (process, base URL) once it is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                   "scrape_timeout": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{
            "job_name": "ingestd",
            "static_configs": [{"targets": list(targets)}],
        }],
    }
    # JSON is valid YAML, so no YAML library is needed.
    config_path = folder / "prometheus.yml"
    config_path.write_text(json.dumps(config, indent=2))

    log = folder / "prometheus.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}",
             f"--storage.tsdb.path={folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT)

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + PROMETHEUS_READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {proc.returncode}; its log:\n"
                f"{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/-/ready", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_prometheus(proc)
            raise AssertionError(
                f"prometheus was not ready within "
                f"{PROMETHEUS_READY_TIMEOUT_S} s; its log:\n"
                f"{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_prometheus(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def query(url, expr):
    """Run an instant query and return its result list."""
    r = requests.get(url + "/api/v1/query", params={"query": expr},
                     timeout=5)
    body = r.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_for_value(url, expr, predicate, description):
    """Poll `expr` until `predicate(float value)` holds for its first
    sample, for at most QUERY_TIMEOUT_S; return that value."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    result = []
    while time.monotonic() < deadline:
        result = query(url, expr)
        if result and predicate(float(result[0]["value"][1])):
            return float(result[0]["value"][1])
        time.sleep(0.25)
    raise AssertionError(
        f"{description}: {expr} did not reach the expected value within "
        f"{QUERY_TIMEOUT_S} s; last result: {result}")


@pytest.fixture(scope="module")
def prometheus(ingestd, tmp_path_factory):
    """A prometheus scraping the module's ingestd, with alerts.yml."""
    proc, url = start_prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [f"127.0.0.1:{ingestd.admin_port}"],
        rule_files=[DEPLOY / "alerts.yml"])
    yield url
    stop_prometheus(proc)


def test_metrics_pass_promtool_lint(ingestd):
    send_traffic(ingestd)
    text = ingestd.metrics()
    proc = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_series_exist_after_traffic(ingestd):
    send_traffic(ingestd)
    names = scrape_names(ingestd)
    for name in ("ingestd_readings_total", "ingestd_mqtt_connections",
                 "ingestd_ws_connections", "ingestd_http_rejected_total",
                 "ingestd_auth_results_total", "ingestd_ready"):
        assert name in names, f"{name} is missing from /metrics"


def test_alert_rules_pass_promtool_check():
    proc = subprocess.run([PROMTOOL, "check", "rules",
                           str(DEPLOY / "alerts.yml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_unit_tests_pass():
    proc = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"],
                          cwd=DEPLOY, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_config_passes_promtool():
    proc = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"],
                          cwd=DEPLOY, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_ingestd(ingestd, prometheus):
    wait_for_value(prometheus, 'up{job="ingestd"}', lambda v: v == 1,
                   "scrape of ingestd")
    before = query(prometheus, 'sum(ingestd_readings_total{job="ingestd",'
                               'protocol="http",result="accepted"})')
    start = float(before[0]["value"][1]) if before else 0.0
    send_traffic(ingestd, readings=7)
    wait_for_value(
        prometheus,
        'sum(ingestd_readings_total{job="ingestd",protocol="http",'
        'result="accepted"})',
        lambda v: v >= start + 7, "accepted HTTP readings")
    wait_for_value(prometheus, 'ingestd_ready{job="ingestd"}',
                   lambda v: v == 1, "readiness gauge")
    wait_for_value(
        prometheus,
        'ingestd_spool_size_bytes{job="ingestd"} / '
        'ingestd_spool_max_bytes{job="ingestd"}',
        lambda v: 0 <= v < 1, "spool use ratio")


def test_alert_rules_evaluate_against_ingestd(ingestd, prometheus):
    wait_for_value(prometheus, 'up{job="ingestd"}', lambda v: v == 1,
                   "scrape of ingestd")
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while True:
        body = requests.get(prometheus + "/api/v1/rules", timeout=5).json()
        rules = [rule for group in body["data"]["groups"]
                 for rule in group["rules"]]
        unhealthy = [(r["name"], r["health"], r.get("lastError"))
                     for r in rules if r["health"] != "ok"]
        if rules and not unhealthy:
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"alert rules not all evaluated without error within "
                f"{QUERY_TIMEOUT_S} s: {unhealthy or 'no rules loaded'}")
        time.sleep(0.25)
    assert len(rules) == 10, [r["name"] for r in rules]
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], f"alerts fire against a healthy ingestd: {firing}"
