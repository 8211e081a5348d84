"""Starts ingestd with flow-control settings for the flow-control tests.

conftest.write_config has no keys for device type limits, the limits
section or a broker sink, so this module writes its own config file and
reuses the rest of conftest (registry, start, readiness, stop).
"""

import json
import subprocess

import requests

from conftest import (DEFAULT_HTTP, SCHEMA, Server, add_device, binary,
                      free_port, run_cli, stop, wait_ready, yaml_value)


def section(name, settings):
    """Return the YAML lines of a mapping `name` with scalar values."""
    if not settings:
        return []
    return [f"{name}:"] + [f"  {k}: {yaml_value(v)}"
                           for k, v in settings.items()]


def write_flow_config(folder, port, admin_port, mqtt_port, *, http=None,
                      mqtt=None, spool=None, limits=None, types=None,
                      sink=None):
    """Write a config into `folder` and return its path.

    `types` maps device type names to their limits mapping (None for no
    limits); "default" is always present. `sink` is a list of YAML lines
    of one sink entry, such as a Redis sink; the default is a file sink.
    """
    http_settings = dict(DEFAULT_HTTP, **(http or {}))
    http_settings["listen"] = f"127.0.0.1:{port}"
    mqtt_settings = dict(mqtt or {}, listen=f"127.0.0.1:{mqtt_port}")
    lines = ["log:", "  level: info", f"data_dir: {folder / 'data'}"]
    lines += section("http", http_settings)
    lines += ["admin:", f"  listen: 127.0.0.1:{admin_port}"]
    lines += section("mqtt", mqtt_settings)
    lines += section("spool", spool)
    lines += section("limits", limits)
    lines += ["auth:", "  max_failures_per_minute: 100000",
              "shutdown_timeout: 5s", "device_types:"]
    all_types = {"default": None, **(types or {})}
    for name, type_limits in all_types.items():
        lines += [f"  {name}:", f"    schema_inline: {json.dumps(SCHEMA)}"]
        if type_limits:
            lines += ["    limits:"]
            lines += [f"      {k}: {yaml_value(v)}"
                      for k, v in type_limits.items()]
    lines += ["sinks:"]
    lines += sink or ["  - name: out", "    type: file",
                      f"    path: {folder / 'data' / 'out'}"]
    path = folder / "ingestd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_flow_server(folder, devices=None, **settings):
    """Start ingestd in `folder` and return a conftest.Server.

    `devices` maps device ids to their device type.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port, mqtt_port = free_port(), free_port(), free_port()
    config = write_flow_config(folder, port, admin_port, mqtt_port,
                               **settings)
    keys = {}
    for device, device_type in (devices or {"dev-1": "default"}).items():
        out = run_cli("device", "add", device, "--type", device_type,
                      config=config)
        keys[device] = [line.strip() for line in out.splitlines()
                        if line.strip().startswith("ik_")][0]
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


def metric(server, name, **labels):
    """Return the value of one series from /metrics, or 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}}" if labels else name
    for line in server.metrics().splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def post(server, device, readings, session=None, timeout=10):
    """POST `readings` (a list) as JSON for `device` and return the
    response."""
    return (session or requests).post(
        server.base_url + "/v1/data", data=json.dumps(readings),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {server.keys[device]}"},
        timeout=timeout)


__all__ = ["start_flow_server", "write_flow_config", "metric", "post",
           "add_device"]
