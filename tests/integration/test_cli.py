"""The command line, and registry changes seen by a running service."""

import signal
import subprocess
import time

import requests

from conftest import (add_device, binary, free_port, run_cli, start_server,
                      wait_ready, write_config)

READING = {"sensor_value": 1}


def cli(*args):
    return subprocess.run([binary(), *args], capture_output=True, text=True,
                          timeout=30)


def post(server, key):
    return requests.post(server.base_url + "/v1/data", json=READING,
                         headers={"Authorization": f"Bearer {key}"},
                         timeout=5)


def wait_status(server, key, status, timeout_s=10):
    """Post until the answer has `status`; return the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = post(server, key)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_help_and_version():
    help_out = cli("--help")
    assert help_out.returncode == 0
    assert "device rotate-key" in help_out.stdout
    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("ingestd ")


def test_unknown_command_is_usage_error():
    r = cli("frobnicate")
    assert r.returncode == 2
    assert 'unknown command "frobnicate"' in r.stderr


def test_check_config_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("http:\n  max_body_bytes: lots\n")
    r = cli("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert f"{bad}:2: http.max_body_bytes" in r.stderr
    assert "expected a size" in r.stderr


def test_check_config_accepts_example():
    r = cli("check-config", "-c", "config/ingestd.yaml")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_device_commands(tmp_path):
    server = start_server(tmp_path / "s", devices=("cli-1",), disabled=())
    try:
        config = server.config
        listing = run_cli("device", "list", config=config)
        assert "cli-1" in listing
        assert "enabled" in listing
        # The key is shown only by add and rotate-key, never by list.
        assert server.keys["cli-1"] not in listing

        dup = cli("device", "add", "cli-1", "-c", str(config))
        assert dup.returncode == 1
        assert "already exists" in dup.stderr

        bad_id = cli("device", "add", "bad id!", "-c", str(config))
        assert bad_id.returncode == 2
        assert "invalid device id" in bad_id.stderr

        bad_type = cli("device", "add", "cli-2", "--type", "nope", "-c",
                       str(config))
        assert bad_type.returncode == 2
        assert 'device type "nope" is not configured' in bad_type.stderr

        missing = cli("device", "disable", "ghost", "-c", str(config))
        assert missing.returncode == 1
        assert 'device "ghost" not found' in missing.stderr
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0


def test_running_service_sees_registry_changes(tmp_path):
    server = start_server(tmp_path / "s", devices=("live-1",), disabled=())
    try:
        config = server.config
        old_key = server.keys["live-1"]
        assert post(server, old_key).status_code == 202

        # A device added while the service runs can send without a restart.
        new_key = add_device("live-2", config)
        assert wait_status(server, new_key, 202).status_code == 202

        run_cli("device", "disable", "live-1", config=config)
        r = wait_status(server, old_key, 403)
        assert r.status_code == 403
        assert r.json()["error"] == "device_disabled"

        run_cli("device", "enable", "live-1", config=config)
        assert wait_status(server, old_key, 202).status_code == 202

        # With a grace period both keys work.
        out = run_cli("device", "rotate-key", "live-1", "--grace", "1h",
                      config=config)
        rotated = [line for line in out.splitlines()
                   if line.startswith("ik_")][0]
        assert wait_status(server, rotated, 202).status_code == 202
        assert post(server, old_key).status_code == 202

        # With no grace the previous key stops working.
        out = run_cli("device", "rotate-key", "live-1", "--grace", "0s",
                      config=config)
        latest = [line for line in out.splitlines()
                  if line.startswith("ik_")][0]
        assert wait_status(server, latest, 202).status_code == 202
        r = wait_status(server, rotated, 401)
        assert r.status_code == 401
        assert r.json()["error"] == "invalid_credentials"
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0


def test_sighup_reloads_registry_at_once(tmp_path):
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    # Polling off: only SIGHUP can make a new device visible.
    with open(config, "a") as f:
        f.write("registry:\n  reload_interval: 0s\n")
    log = tmp_path / "ingestd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{admin_port}", log)
        key = add_device("hup-1", config)
        url = f"http://127.0.0.1:{port}/v1/data"
        headers = {"Authorization": f"Bearer {key}"}
        time.sleep(0.5)
        before = requests.post(url, json=READING, headers=headers, timeout=5)
        assert before.status_code == 401

        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while True:
            after = requests.post(url, json=READING, headers=headers,
                                  timeout=5)
            if after.status_code == 202 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert after.status_code == 202
        assert "registry reloaded on SIGHUP" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
