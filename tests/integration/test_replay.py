"""Run tools/replay.py small against a real ingestd.

The replay tool checks every response itself and exits 0 only when each
valid request was accepted, each bad one was rejected with the expected
status, and every accepted id reached the file sink. These tests run it
against servers from conftest.py and also check that it fails when the
service responses differently than it expects.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import binary, run_cli

REPLAY = Path(__file__).resolve().parents[2] / "tools" / "replay.py"

# The conftest schema checks only device_id and sensor_value, so only these
# ways of breaking a reading are rejected by it.
INVALID_KINDS = "sensor_range,missing_value,wrong_type,bad_json"


def run_replay(server, *extra, timeout=120):
    """Run replay.py against `server` and return the process and the JSON
    report (None when it wrote none)."""
    report = server.data_dir.parent / f"report-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(REPLAY), "-c", str(server.config),
           "--ingestd", binary(), "--url", server.base_url,
           "--invalid-kinds", INVALID_KINDS,
           "--json-report", str(report), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    data = json.loads(report.read_text()) if report.exists() else None
    return proc, data


def test_replay_small_fleet_passes(ingestd_factory):
    server = ingestd_factory()
    devices_file = server.data_dir.parent / "devices.json"
    proc, report = run_replay(
        server, "--devices", "50", "--duration", "10", "--speed", "30",
        "--concurrency", "4", "--invalid-rate", "0.05",
        "--unknown-rate", "0.05", "--seed", "7",
        "--devices-file", str(devices_file),
        "--verify-output", str(server.data_dir / "out"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert report is not None, output
    assert report["unexpected_responses"] == 0, output
    assert report["requests_valid"] > 0, output
    assert report["accepted_readings"] > 0, output
    # Both kinds of bad requests were sent, and each was rejected.
    assert report["requests_invalid_on_purpose"] > 0, output
    assert report["requests_unknown_key"] > 0, output
    assert report["rejected_by_status"].get("400", 0) == \
        report["requests_invalid_on_purpose"], output
    assert report["rejected_by_status"].get("401", 0) == \
        report["requests_unknown_key"], output
    assert report["output"]["missing"] == 0, output
    assert report["output"]["mismatched"] == 0, output
    assert report["output"]["found"] == report["accepted_readings"], output

    stored = json.loads(devices_file.read_text())
    assert len(stored["devices"]) == 50
    assert all(d["key"].startswith("ik_") for d in stored["devices"])


def test_replay_reuses_devices_file(ingestd_factory):
    server = ingestd_factory()
    devices_file = server.data_dir.parent / "devices.json"
    first, _ = run_replay(
        server, "--devices", "5", "--duration", "2", "--speed", "30",
        "--seed", "1", "--devices-file", str(devices_file))
    assert first.returncode == 0, first.stdout + first.stderr
    before = json.loads(devices_file.read_text())["devices"]

    # A second `device add` of the same ids would fail, so a passing rerun
    # shows that the stored keys were used.
    second, report = run_replay(
        server, "--devices", "5", "--duration", "2", "--speed", "30",
        "--seed", "2", "--devices-file", str(devices_file))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing 5 devices" in second.stderr
    assert json.loads(devices_file.read_text())["devices"] == before
    assert report["accepted_requests"] > 0


def test_replay_fails_on_disabled_device(ingestd_factory):
    server = ingestd_factory()
    devices_file = server.data_dir.parent / "devices.json"
    first, _ = run_replay(
        server, "--devices", "3", "--duration", "1",
        "--devices-file", str(devices_file))
    assert first.returncode == 0, first.stdout + first.stderr
    device = json.loads(devices_file.read_text())["devices"][0]
    run_cli("device", "disable", device["id"], config=server.config)

    # Wait for the service to reload the registry, so that the device's
    # requests get 403.
    deadline = time.monotonic() + 15
    while True:
        r = requests.post(server.base_url + "/v1/data", data=b"{}",
                          headers={"X-API-Key": device["key"],
                                   "Content-Type": "application/json"},
                          timeout=5)
        if r.status_code == 403:
            break
        assert time.monotonic() < deadline, \
            f"disabled device still gets {r.status_code}"
        time.sleep(0.1)

    # The simulator expects the disabled device's valid readings to be
    # accepted, so the 403 responses must make it fail.
    proc, report = run_replay(
        server, "--devices", "3", "--duration", "3", "--speed", "60",
        "--invalid-rate", "0", "--unknown-rate", "0",
        "--devices-file", str(devices_file))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report["rejected_by_status"].get("403", 0) > 0, proc.stdout
    assert report["unexpected_responses"] > 0, proc.stdout
    assert "device_disabled" in report["rejected_by_code"], proc.stdout


def test_replay_skips_unreadable_output_lines(ingestd_factory):
    # A record nested deeper than Python's recursion limit, as another
    # client's could be, must not stop the check of this run's ids.
    server = ingestd_factory()
    out = server.data_dir / "out"
    out.mkdir(parents=True, exist_ok=True)
    deep = '{"payload":' + "[" * 5000 + "]" * 5000 + "}\n"
    (out / "other-client.ndjson").write_text(deep)
    proc, report = run_replay(
        server, "--devices", "5", "--duration", "3", "--speed", "30",
        "--concurrency", "2", "--invalid-rate", "0", "--unknown-rate", "0",
        "--seed", "3",
        "--devices-file", str(server.data_dir.parent / "devices.json"),
        "--verify-output", str(out))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert report is not None, output
    assert report["output"]["missing"] == 0, output
    assert report["output"]["unreadable_lines"] == 1, output
    assert "RecursionError" not in output
