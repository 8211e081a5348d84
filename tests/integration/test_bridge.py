"""Bridge mode against a real Mosquitto broker from Debian.

Each test starts its own mosquitto on a free 127.0.0.1 port with a
generated config (anonymous clients, persistence in the test's folder),
runs ingestd with a bridge to it, publishes with mosquitto_pub, and reads
the file sink's output. The SIGKILL test proves that a message the broker
acknowledged to its publisher reaches the output even when ingestd dies
while the broker is delivering it.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from conftest import (Server, add_device, binary, finish, free_port,
                      run_cli, stop, wait_ready, write_config)

BROKER_START_TIMEOUT_S = 10
WAIT_TIMEOUT_S = 20
SCHEMA_MAX = 100  # conftest.SCHEMA: sensor_value is 0 to 100


class Broker:
    """A mosquitto process on 127.0.0.1 with persistence in `folder`."""

    def __init__(self, folder, port=None):
        self.folder = folder
        self.port = port or free_port()
        self.proc = None
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {folder}/",
            # Sessions of a killed ingestd queue what arrives meanwhile;
            # the default limit of 1000 could drop part of a test stream.
            "max_queued_messages 100000",
            f"log_dest file {folder / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        # As root, mosquitto switches to the mosquitto user, which cannot
        # write to the test's folder.
        if os.geteuid() == 0:
            lines.append("user root")
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self):
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited with {self.proc.returncode}: "
                    f"{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port),
                                              timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self):
        path = self.folder / "mosquitto.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def publish(self, topic, message, qos=1, version="mqttv5"):
        """Publish one message; fail unless mosquitto_pub succeeded."""
        proc = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port),
             "-V", version, "-q", str(qos), "-t", topic, "-m", message],
            capture_output=True, text=True, timeout=15)
        assert proc.returncode == 0, (
            f"mosquitto_pub to {topic} failed: {proc.stderr}")


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def bridge_yaml(broker_port, **options):
    """Return a bridges section with one bridge named "main"."""
    settings = {"name": "main", "port": broker_port,
                "reconnect_min": "50ms", "reconnect_max": "500ms",
                **options}
    lines = ["bridges:"]
    for i, (key, value) in enumerate(settings.items()):
        lines.append(f"{'  - ' if i == 0 else '    '}{key}: "
                     f"{json.dumps(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def start_bridge_server(folder, broker_port, devices=("dev-1", "dev-2"),
                        disabled=("dev-off",), spool=None, sink=None,
                        **options):
    """Start ingestd with a bridge to the broker; return a Server."""
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config = write_config(folder, port, admin_port, spool=spool, sink=sink)
    text = config.read_text()
    # The bridge is the only MQTT in these tests: keep ingestd's own MQTT
    # listener, if this build has one, off the default port.
    if "\nmqtt:" not in text:
        text += "mqtt:\n  listen: \"\"\n"
    config.write_text(text + bridge_yaml(broker_port, **options))
    keys = {d: add_device(d, config) for d in (*devices, *disabled)}
    for d in disabled:
        run_cli("device", "disable", d, config=config)
    server = launch(folder, config, port, admin_port)
    server.keys = keys
    return server


def launch(folder, config, port, admin_port):
    """Run `ingestd serve` on an existing config; return a Server."""
    log = folder / "ingestd.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(host="127.0.0.1", port=port, admin_port=admin_port,
                    base_url=f"http://127.0.0.1:{port}",
                    admin_url=f"http://127.0.0.1:{admin_port}", keys={},
                    data_dir=folder / "data", config=config, log=log,
                    proc=proc)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    return server


def wait_until(condition, description, timeout_s=WAIT_TIMEOUT_S):
    """Poll `condition` until it returns a true value; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s: {description}")
        time.sleep(0.05)


def metric(server, name, **labels):
    """Return the value of one series from /metrics, or None."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(label_text)}\}} "
                         r"(\S+)$", re.M)
    match = pattern.search(server.metrics())
    return float(match.group(1)) if match else None


def wait_connected(server, up=True):
    wait_until(lambda: metric(server, "ingestd_bridge_connected",
                              bridge="main") == (1 if up else 0),
               f"bridge connected gauge to become {int(up)}")


def seqs_of(records):
    return [r["payload"]["seq"] for r in records if "seq" in r["payload"]]


def reading(seq, value=None):
    return json.dumps({"sensor_value": seq % 101 if value is None else value,
                       "seq": seq})


def test_bridge_stores_readings(broker, tmp_path):
    server = start_bridge_server(
        tmp_path / "ingestd", broker.port,
        topics="devices/{device_id}/data, legacy/{device_id}")
    try:
        wait_connected(server)
        broker.publish("devices/dev-1/data", reading(1), qos=1,
                       version="mqttv5")
        broker.publish("devices/dev-2/data", reading(2), qos=1,
                       version="mqttv311")
        broker.publish("devices/dev-1/data", reading(3), qos=0,
                       version="mqttv5")
        broker.publish("devices/dev-2/data", reading(4), qos=0,
                       version="mqttv311")
        batch = json.dumps([json.loads(reading(5)), json.loads(reading(6))])
        broker.publish("devices/dev-1/data", batch)
        broker.publish("legacy/dev-2", reading(7))

        records = wait_until(
            lambda: (r := server.output_records()) and len(r) >= 7 and r,
            "seven readings in the output")
        by_seq = {r["payload"]["seq"]: r for r in records}
        assert sorted(by_seq) == [1, 2, 3, 4, 5, 6, 7]
        for seq, device in [(1, "dev-1"), (2, "dev-2"), (3, "dev-1"),
                            (4, "dev-2"), (5, "dev-1"), (6, "dev-1"),
                            (7, "dev-2")]:
            assert by_seq[seq]["device_id"] == device
            assert by_seq[seq]["protocol"] == "mqtt-bridge"
            assert by_seq[seq]["device_type"] == "default"
            assert by_seq[seq]["content_type"] == "application/json"
        assert metric(server, "ingestd_bridge_messages_total",
                      bridge="main", result="stored") == 6
        assert metric(server, "ingestd_bridge_received_bytes_total",
                      bridge="main") > 0
    finally:
        finish(server)


def test_bridge_rejects_and_acknowledges_bad_messages(broker, tmp_path):
    server = start_bridge_server(
        tmp_path / "ingestd", broker.port,
        feedback_topic="devices/{device_id}/errors")
    try:
        wait_connected(server)
        feedback = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
             "-t", "devices/+/errors", "-v", "-C", "2", "-W", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # mosquitto_sub has no ready signal: wait until the broker logs
        # its subscription before publishing.
        wait_until(lambda: broker.log().count("New client connected") >= 2,
                   "mosquitto_sub to connect")
        time.sleep(0.3)
        broker.publish("devices/dev-1/data", reading(1, value=SCHEMA_MAX + 20))
        broker.publish("devices/dev-1/data", "not json")
        broker.publish("devices/dev-2/data", "")
        broker.publish("devices/nobody/data", reading(2))
        broker.publish("devices/dev-off/data", reading(3))
        broker.publish("devices/dev-1/data",
                       json.dumps({"device_id": "dev-2", "sensor_value": 1,
                                   "seq": 4}))
        # A valid message after the bad ones proves that none of them
        # blocks the subscription.
        broker.publish("devices/dev-1/data", reading(5))
        wait_until(lambda: 5 in seqs_of(server.output_records()),
                   "the valid reading after the rejected ones")
        out, err = feedback.communicate(timeout=20)

        assert seqs_of(server.output_records()) == [5]
        expected = {"invalid": 2, "invalid_json": 1, "unknown_device": 1,
                    "device_disabled": 1, "forbidden": 1, "stored": 1}
        for result, count in expected.items():
            assert metric(server, "ingestd_bridge_messages_total",
                          bridge="main", result=result) == count, result

        lines = out.splitlines()
        assert len(lines) == 2, f"feedback messages: {out!r} {err!r}"
        topic, body = lines[0].split(" ", 1)
        assert topic == "devices/dev-1/errors"
        doc = json.loads(body)
        assert doc["error"] == "validation_failed"
        assert doc["readings"][0]["errors"][0]["pointer"] == "/sensor_value"
        topic, body = lines[1].split(" ", 1)
        assert topic == "devices/dev-1/errors"
        assert json.loads(body)["error"] == "invalid_json"

        # Acknowledged means gone: after a restart of ingestd on the same
        # session, the broker redelivers none of the rejected messages.
        finish(server)
        server = launch(server.data_dir.parent, server.config,
                        free_port(), server.admin_port)
        wait_connected(server)
        broker.publish("devices/dev-2/data", reading(6))
        wait_until(lambda: 6 in seqs_of(server.output_records()),
                   "a reading after the restart")
        assert metric(server, "ingestd_bridge_messages_total",
                      bridge="main", result="invalid") == 0
        assert metric(server, "ingestd_bridge_messages_total",
                      bridge="main", result="stored") == 1
    finally:
        finish(server)


def test_bridge_reconnects_after_broker_restart(broker, tmp_path):
    server = start_bridge_server(tmp_path / "ingestd", broker.port)
    try:
        wait_connected(server)
        broker.publish("devices/dev-1/data", reading(1))
        wait_until(lambda: 1 in seqs_of(server.output_records()),
                   "the reading before the broker restart")

        broker.stop()
        wait_connected(server, up=False)
        broker.start()
        wait_connected(server)
        broker.publish("devices/dev-1/data", reading(2))
        wait_until(lambda: 2 in seqs_of(server.output_records()),
                   "the reading after the broker restart")

        assert metric(server, "ingestd_bridge_reconnects_total",
                      bridge="main") >= 1
        log = server.log.read_text()
        assert 'msg="bridge lost its broker connection"' in log
        assert log.count('msg="bridge connected and subscribed"') >= 2
    finally:
        finish(server)


def test_bridge_holds_message_while_spool_full(broker, tmp_path):
    # NOTE: like the HTTP spool-full test, this relies on the sink, which
    # syncs every record on its own, falling behind HTTP batches that the
    # spool syncs whole, so that the 128 KiB spool fills for a moment.
    server = start_bridge_server(
        tmp_path / "ingestd", broker.port,
        spool={"max_size": "128KiB", "segment_size": "64KiB"},
        sink={"fsync": "true", "batch_records": 1})
    try:
        wait_connected(server)
        batch = json.dumps([{"sensor_value": 1, "pad": "z" * 300}] * 20)
        headers = {"Content-Type": "application/json",
                   "Authorization": f"Bearer {server.keys['dev-2']}"}
        status = None
        with requests.Session() as session:
            for _ in range(300):
                status = session.post(server.base_url + "/v1/data",
                                      data=batch, headers=headers,
                                      timeout=10).status_code
                if status != 202:
                    break
        assert status == 503, f"the spool did not fill: {status}"
        broker.publish("devices/dev-1/data", reading(1))

        wait_until(lambda: 1 in seqs_of(server.output_records()),
                   "the held message once the sink freed the spool")
        assert metric(server, "ingestd_bridge_store_retries_total",
                      bridge="main") >= 1
        assert metric(server, "ingestd_bridge_messages_total",
                      bridge="main", result="stored") == 1
        assert 'msg="bridge message not stored; holding it unacknowledged"' \
            in server.log.read_text()
    finally:
        finish(server)


def publish_lines(port, topic, lines, version="mqttv5", pace_s=0.0):
    """Publish each line at QoS 1 with one mosquitto_pub -l process.

    `lines` may be any iterable, at most 65534 long so that message ids
    do not wrap. Returns the number of lines sent and the set of line
    indexes whose PUBACK the publisher received, read from
    mosquitto_pub's debug output (message ids count lines from 1)."""
    proc = subprocess.Popen(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", version,
         "-q", "1", "-t", topic, "-l", "-d"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()))
    reader.start()
    sent = 0
    try:
        for line in lines:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            sent += 1
            if pace_s:
                time.sleep(pace_s)
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
    out = "".join(output)
    assert sent < 65535, "message ids would wrap"
    acked = {int(m) - 1 for m in re.findall(r"received PUBACK \(Mid: (\d+), "
                                             r"RC:0\)", out)}
    assert proc.returncode == 0, f"mosquitto_pub failed: {out[-2000:]}"
    return sent, acked


def test_two_instances_split_shared_subscription(broker, tmp_path):
    count = 300
    first = start_bridge_server(tmp_path / "a", broker.port,
                                client_id="ingestd-test-a")
    second = start_bridge_server(tmp_path / "b", broker.port,
                                 client_id="ingestd-test-b")
    try:
        wait_connected(first)
        wait_connected(second)
        lines = [reading(i) for i in range(count)]
        sent, acked = publish_lines(broker.port, "devices/dev-1/data", lines)
        assert sent == count
        assert acked == set(range(count))

        def union():
            seen = (set(seqs_of(first.output_records())) |
                    set(seqs_of(second.output_records())))
            return seen if len(seen) == count else None

        seen = wait_until(union, f"all {count} readings in the union")
        assert seen == set(range(count))
        got_first = len(seqs_of(first.output_records()))
        got_second = len(seqs_of(second.output_records()))
        assert got_first > 0, "the first instance got no message"
        assert got_second > 0, "the second instance got no message"
        assert got_first + got_second == count, "a message was stored twice"
    finally:
        finish(first)
        finish(second)


def test_sigkill_loses_no_acknowledged_message(broker, tmp_path):
    """Kill ingestd while the broker delivers; nothing acked is lost.

    The bridge uses a persistent session (clean start off, session
    expiry 1h) and the default shared group. While ingestd is dead the
    broker keeps its in-flight and new messages in that session and
    delivers them when the restarted ingestd resumes it. The publisher
    runs until the last kill is done, so every kill hits a stream."""
    rounds, max_lines = 6, 60000
    rng = random.Random()
    folder = tmp_path / "ingestd"
    server = start_bridge_server(folder, broker.port)
    config, admin_port = server.config, server.admin_port
    stop_publishing = threading.Event()
    result = {}

    def stream():
        for i in range(max_lines):
            if stop_publishing.is_set():
                return
            yield reading(i)

    def publisher():
        result["sent"], result["acked"] = publish_lines(
            broker.port, "devices/dev-1/data", stream(), pace_s=0.0005)

    pub = threading.Thread(target=publisher)
    try:
        wait_connected(server)
        pub.start()
        for _ in range(rounds):
            # Each kill hits a bridge that resumed its session, so that
            # the broker is delivering to it at that moment.
            wait_connected(server)
            time.sleep(rng.uniform(0.3, 0.9))
            assert pub.is_alive(), "the stream ended before the last kill"
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(timeout=10)
            time.sleep(rng.uniform(0.05, 0.3))
            server = launch(folder, config, free_port(), admin_port)
        stop_publishing.set()
        pub.join(timeout=120)
        assert not pub.is_alive(), "the publisher did not finish"
        sent, acked = result["sent"], result["acked"]
        assert sent > 0, "nothing was published"
        assert acked == set(range(sent)), (
            f"the broker acknowledged {len(acked)} of {sent} publishes")

        def all_stored():
            seen = set(seqs_of(server.output_records()))
            return seen >= acked and seen

        try:
            seen = wait_until(all_stored, "every acknowledged message",
                              timeout_s=30)
        except AssertionError:
            seen = set(seqs_of(server.output_records()))
        missing = sorted(acked - seen)
        assert not missing, (
            f"{len(missing)} of {len(acked)} acknowledged messages are "
            f"missing after {rounds} SIGKILLs, for example {missing[:5]}")
        log = server.log.read_text()
        assert log.count('msg="bridge connected and subscribed"') > rounds
    finally:
        stop_publishing.set()
        pub.join(timeout=120)
        finish(server)
