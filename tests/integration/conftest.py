"""Fixtures that run the real ingestd binary on loopback.

The binary comes from $INGESTD_BIN (default ./build/ingestd); nothing is
built here. Each server gets its own temporary folder with a config file,
a device registry, a spool and a file sink, and free ports found by
binding port 0.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

READY_TIMEOUT_S = 10
STOP_TIMEOUT_S = 20

# Readings are validated against this schema for device type "default".
SCHEMA = {
    "type": "object",
    "required": ["sensor_value"],
    "properties": {
        "device_id": {"type": "string"},
        "sensor_value": {"type": "number", "minimum": 0, "maximum": 100},
    },
}

# Settings that keep the limit tests small and quick. Each test module may
# start a server with its own overrides.
DEFAULT_HTTP = {
    "workers": 2,
    "max_header_bytes": "2KiB",
    "max_body_bytes": "8KiB",
    "max_readings_per_request": 20,
    "header_timeout": "1s",
    "body_timeout": "1s",
    "idle_timeout": "2s",
    "retry_after": "3s",
}


def binary():
    """Return the path of the ingestd binary under test."""
    return os.environ.get("INGESTD_BIN", "./build/ingestd")


# Ports already handed out in this test run. The kernel may give the same
# free port to two binds in a row once the first socket is closed, and a
# config with one port for two listeners fails to load.
_ports_given = set()


def free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago and that
    this run has not handed out before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


@dataclasses.dataclass
class Server:
    """A running ingestd and what a test needs to talk to it."""

    host: str
    port: int
    admin_port: int
    base_url: str
    admin_url: str
    keys: dict
    data_dir: Path
    config: Path
    log: Path
    proc: subprocess.Popen
    mqtt_port: int = 0

    def output_records(self):
        """Return every envelope the file sink wrote so far."""
        records = []
        for path in sorted((self.data_dir / "out").glob("*.ndjson")):
            for line in path.read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
        return records

    def wait_for_ids(self, ids, timeout_s=10):
        """Wait until the sink wrote every message id in `ids`."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {r["message_id"] for r in self.output_records()}
            if set(ids) <= seen:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ids missing from the sink output: {set(ids) - seen}")
            time.sleep(0.1)

    def metrics(self):
        """Return the /metrics text."""
        return requests.get(self.admin_url + "/metrics", timeout=5).text


def yaml_value(value):
    """Format a scalar or a JSON-compatible value as inline YAML."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def write_config(folder, port, admin_port, http=None, spool=None,
                 sink=None, mqtt=None, mqtt_port=None):
    """Write a config file into `folder` and return its path.

    The MQTT listener always gets its own port (`mqtt_port`, or a free
    one), so that servers never share the default 1883.
    """
    http_settings = dict(DEFAULT_HTTP, **(http or {}))
    http_settings["listen"] = f"127.0.0.1:{port}"
    lines = [
        "log:",
        "  level: debug",
        f"data_dir: {folder / 'data'}",
        "http:",
    ]
    lines += [f"  {k}: {yaml_value(v)}" for k, v in http_settings.items()]
    lines += ["admin:", f"  listen: 127.0.0.1:{admin_port}"]
    mqtt_settings = dict(mqtt or {})
    mqtt_settings["listen"] = f"127.0.0.1:{mqtt_port or free_port()}"
    lines += ["mqtt:"]
    lines += [f"  {k}: {yaml_value(v)}" for k, v in mqtt_settings.items()]
    if spool:
        lines += ["spool:"]
        lines += [f"  {k}: {yaml_value(v)}" for k, v in spool.items()]
    # Tests poll with keys the service has not loaded yet, and every test
    # client is 127.0.0.1, so the failed-authentication limit is set high
    # here. test_auth_guard.py tests the limit itself.
    lines += ["auth:", "  max_failures_per_minute: 100000"]
    lines += [
        "shutdown_timeout: 5s",
        "device_types:",
        "  default:",
        f"    schema_inline: {json.dumps(SCHEMA)}",
        "sinks:",
        "  - name: out",
        "    type: file",
        f"    path: {folder / 'data' / 'out'}",
    ]
    lines += [f"    {k}: {yaml_value(v)}" for k, v in (sink or {}).items()]
    path = folder / "ingestd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args, config):
    """Run an ingestd command and return its stdout, failing on error."""
    proc = subprocess.run([binary(), *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, (
        f"ingestd {' '.join(args)} exited with {proc.returncode}: "
        f"{proc.stderr}")
    return proc.stdout


def add_device(device_id, config):
    """Register a device and return its API key."""
    out = run_cli("device", "add", device_id, config=config)
    keys = [line.strip() for line in out.splitlines()
            if line.strip().startswith("ik_")]
    assert len(keys) == 1, f"no key in the output of device add: {out!r}"
    return keys[0]


def wait_ready(proc, admin_url, log):
    """Wait until /readyz returns 200, at most READY_TIMEOUT_S."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"ingestd exited with {proc.returncode} before it was "
                f"ready; its log:\n{log.read_text()}")
        try:
            r = requests.get(admin_url + "/readyz", timeout=1)
            if r.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(
        f"ingestd was not ready within {READY_TIMEOUT_S} s; its log:\n"
        f"{log.read_text()}")


def stop(server):
    """Send SIGTERM and return the exit code (killing after a timeout)."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=STOP_TIMEOUT_S)
        return None


def start_server(folder, http=None, spool=None, sink=None,
                 devices=("dev-1", "dev-2"), disabled=("dev-off",),
                 mqtt=None):
    """Start ingestd in `folder` and return a Server once it is ready."""
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port, mqtt_port = free_port(), free_port(), free_port()
    config = write_config(folder, port, admin_port, http, spool, sink,
                          mqtt=mqtt, mqtt_port=mqtt_port)
    keys = {d: add_device(d, config) for d in (*devices, *disabled)}
    for d in disabled:
        run_cli("device", "disable", d, config=config)
    log = folder / "ingestd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(host="127.0.0.1", port=port, admin_port=admin_port,
                    base_url=f"http://127.0.0.1:{port}",
                    admin_url=f"http://127.0.0.1:{admin_port}", keys=keys,
                    data_dir=folder / "data", config=config, log=log,
                    proc=proc, mqtt_port=mqtt_port)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    return server


def finish(server):
    """Stop `server` and fail unless it exited with 0."""
    code = stop(server)
    assert code == 0, (
        f"ingestd exited with {code} after SIGTERM; its log:\n"
        f"{server.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def ingestd(tmp_path_factory):
    """A server with the default test settings, shared by a module."""
    server = start_server(tmp_path_factory.mktemp("ingestd"))
    yield server
    finish(server)


@pytest.fixture
def ingestd_factory(tmp_path):
    """Starts servers with custom settings and stops them after the test."""
    servers = []

    def make(**kwargs):
        server = start_server(tmp_path / f"server{len(servers)}", **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        finish(server)
