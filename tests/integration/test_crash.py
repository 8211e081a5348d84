"""SIGKILL ingestd under load and prove no acknowledged reading is lost.

Each round starts the server on the same data folder, runs concurrent
senders, and kills the server with SIGKILL at a random moment. A 202 means
durable, so every id acknowledged in any round must be in the file sink's
output once a last, clean run has drained the spool.
"""

import json
import random
import signal
import subprocess
import threading
import time

import requests

from conftest import add_device, binary, free_port, wait_ready, write_config

ROUNDS = 6
SENDERS = 6
DEVICES = [f"crash-{i}" for i in range(SENDERS)]


def reading(device_id, n):
    return {"device_id": device_id, "sensor_value": n % 101, "seq": n}


def sender(url, device_id, key, stop, acked, errors):
    """Post readings until `stop` is set, recording acknowledged ids."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    n = 0
    while not stop.is_set():
        n += 1
        if n % 3 == 0:
            body = [reading(device_id, n * 10 + i) for i in range(5)]
        else:
            body = reading(device_id, n)
        try:
            r = session.post(url, json=body, headers=headers, timeout=5)
        except requests.RequestException:
            # The server died mid-request: this batch was never
            # acknowledged, so it may or may not be stored.
            time.sleep(0.01)
            continue
        if r.status_code == 202:
            acked.extend(r.json()["ids"])
        elif r.status_code != 503:
            errors.append(f"{r.status_code} {r.text}")


def start(config, log, admin_url):
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    wait_ready(proc, admin_url, log)
    return proc


def output_ids(data_dir):
    """Return the ids in the sink output and every line that is not JSON."""
    ids, bad = set(), []
    for path in sorted((data_dir / "out").glob("*.ndjson")):
        for line in path.read_text().splitlines():
            try:
                ids.add(json.loads(line)["message_id"])
            except (ValueError, KeyError):
                bad.append((path.name, line[:80]))
    return ids, bad


def test_sigkill_loses_no_acknowledged_reading(tmp_path):
    rng = random.Random()
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port,
                          http={"max_readings_per_request": 50})
    keys = {d: add_device(d, config) for d in DEVICES}
    log = tmp_path / "ingestd.log"
    url = f"http://127.0.0.1:{port}/v1/data"
    admin_url = f"http://127.0.0.1:{admin_port}"
    acked, errors = [], []

    for _ in range(ROUNDS):
        proc = start(config, log, admin_url)
        stop = threading.Event()
        threads = [
            threading.Thread(target=sender,
                             args=(url, d, keys[d], stop, acked, errors))
            for d in DEVICES
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a sender did not stop"

    assert not errors, f"unexpected answers: {errors[:5]}"
    assert len(acked) > 0, "no reading was acknowledged in any round"

    # A clean run drains what the killed runs left in the spool.
    proc = start(config, log, admin_url)
    try:
        deadline = time.monotonic() + 60
        missing = set(acked)
        while missing and time.monotonic() < deadline:
            seen, _ = output_ids(tmp_path / "data")
            missing = set(acked) - seen
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)

    seen, bad = output_ids(tmp_path / "data")
    assert code == 0, f"ingestd exited with {code}"
    assert not bad, f"torn or invalid lines in the sink output: {bad[:3]}"
    missing = set(acked) - seen
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged readings are missing "
        f"after {ROUNDS} SIGKILLs, for example {sorted(missing)[:3]}")


def test_sigterm_under_load_answers_in_flight(tmp_path):
    """SIGTERM drains: exit 0, and every 202 is in the output."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    keys = {d: add_device(d, config) for d in DEVICES}
    log = tmp_path / "ingestd.log"
    url = f"http://127.0.0.1:{port}/v1/data"
    admin_url = f"http://127.0.0.1:{admin_port}"
    acked, errors = [], []

    proc = start(config, log, admin_url)
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender,
                         args=(url, d, keys[d], stop, acked, errors))
        for d in DEVICES
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=30)

    assert code == 0, f"ingestd exited with {code}; log:\n{log.read_text()}"
    assert not errors, f"unexpected answers: {errors[:5]}"
    assert len(acked) > 0, "no reading was acknowledged before SIGTERM"
    seen, bad = output_ids(tmp_path / "data")
    missing = set(acked) - seen
    if missing:
        # Records the sink had not written yet are still in the spool.
        proc = start(config, log, admin_url)
        deadline = time.monotonic() + 30
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            seen, bad = output_ids(tmp_path / "data")
            missing = set(acked) - seen
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not bad, f"invalid lines in the sink output: {bad[:3]}"
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged readings are missing "
        f"after SIGTERM")
