"""SIGKILL ingestd while MQTT clients publish at QoS 1.

A PUBACK promises that the reading is durable, but MQTT gives the device
no message id back. Each reading therefore carries a unique seq, and every
seq whose PUBACK arrived in any round must be in the file sink's output
once a last, clean run has drained the spool.
"""

import json
import signal
import threading
import time
import random

import paho.mqtt.client as paho

import mqtt_raw as raw
from conftest import add_device, free_port, write_config
from test_crash import start

ROUNDS = 4
RAW_SENDERS = 3
PAHO_SENDERS = 2
DEVICES = [f"mq-crash-{i}" for i in range(RAW_SENDERS + PAHO_SENDERS)]
WINDOW = 8  # QoS 1 messages a raw sender keeps in flight


def payload(device_id, marker):
    return json.dumps({"sensor_value": 1, "seq": marker,
                       "device_id": device_id})


def raw_sender(port, device_id, key, stop, acked, version):
    """Publish over raw sockets with a window of unacknowledged QoS 1
    messages, recording each seq whose PUBACK arrived."""
    n = 0
    while not stop.is_set():
        try:
            with raw.Client(port, version=version, timeout=2) as c:
                if c.connect(device_id, device_id, key).reason != 0:
                    time.sleep(0.05)
                    continue
                pending = {}
                while not stop.is_set():
                    while len(pending) < WINDOW:
                        n += 1
                        pid = n % 65535 + 1
                        marker = f"{device_id}-{n}"
                        pending[pid] = marker
                        c.send(raw.publish(f"devices/{device_id}/data",
                                           payload(device_id, marker),
                                           qos=1, packet_id=pid,
                                           version=version))
                    ack = c.read(timeout=2)
                    if ack.type == raw.PUBACK and ack.reason == 0:
                        acked.append(pending.pop(ack.packet_id))
        except (OSError, ConnectionError):
            # The server died: messages without PUBACK may or may not
            # be stored.
            time.sleep(0.05)


def paho_sender(port, device_id, key, stop, acked):
    """Publish with paho 3.1.1 and record seqs acknowledged by PUBACK."""
    while not stop.is_set():
        sent, acked_mids = {}, []
        c = paho.Client(client_id=device_id, protocol=paho.MQTTv311)
        c.username_pw_set(device_id, key)
        # paho calls on_publish under its own lock, so the callback only
        # notes the mid; seqs are matched after the connection ended.
        c.on_publish = lambda client_, userdata, mid: acked_mids.append(mid)
        try:
            c.connect("127.0.0.1", port, keepalive=10)
        except OSError:
            time.sleep(0.05)
            continue
        c.loop_start()
        n = 0
        try:
            while not stop.is_set() and n < 60000:
                n += 1
                marker = f"{device_id}-p{time.monotonic_ns()}"
                info = c.publish(f"devices/{device_id}/data",
                                 payload(device_id, marker), qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    break
                sent[info.mid] = marker
                if len(sent) - len(acked_mids) > 20:
                    time.sleep(0.01)
        finally:
            c.loop_stop()
            c.disconnect()
        acked.extend(sent[mid] for mid in acked_mids if mid in sent)
        time.sleep(0.05)


def output_seqs(data_dir):
    seqs, bad = set(), []
    for path in sorted((data_dir / "out").glob("*.ndjson")):
        for line in path.read_text().splitlines():
            try:
                seqs.add(json.loads(line)["payload"]["seq"])
            except (ValueError, KeyError):
                bad.append(line[:80])
    return seqs, bad


def test_sigkill_loses_no_acknowledged_mqtt_message(tmp_path):
    rng = random.Random()
    port, admin_port, mqtt_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path, port, admin_port, mqtt_port=mqtt_port)
    keys = {d: add_device(d, config) for d in DEVICES}
    log = tmp_path / "ingestd.log"
    admin_url = f"http://127.0.0.1:{admin_port}"
    acked = []

    for round_no in range(ROUNDS):
        proc = start(config, log, admin_url)
        stop = threading.Event()
        threads = []
        for i, d in enumerate(DEVICES):
            if i < RAW_SENDERS:
                version = raw.V5 if (i + round_no) % 2 else raw.V311
                args = (mqtt_port, d, keys[d], stop, acked, version)
                threads.append(threading.Thread(target=raw_sender,
                                                args=args))
            else:
                args = (mqtt_port, d, keys[d], stop, acked)
                threads.append(threading.Thread(target=paho_sender,
                                                args=args))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.5, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a sender did not stop"

    assert len(acked) > 0, "no message was acknowledged in any round"
    proc = start(config, log, admin_url)
    try:
        deadline = time.monotonic() + 60
        missing = set(acked)
        while missing and time.monotonic() < deadline:
            seen, _ = output_seqs(tmp_path / "data")
            missing = set(acked) - seen
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)

    seen, bad = output_seqs(tmp_path / "data")
    assert code == 0, f"ingestd exited with {code}"
    assert not bad, f"torn or invalid lines in the sink output: {bad[:3]}"
    missing = set(acked) - seen
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged messages are missing "
        f"after {ROUNDS} SIGKILLs, for example {sorted(missing)[:3]}")
