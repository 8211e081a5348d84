"""The Kafka sink against librdkafka's mock cluster (tests/tools/kafka_mock).

Readings go in over HTTP and MQTT and are read back with kcat. The tests
check the message key and headers, per-device order, a broker outage under
load and a SIGKILL of ingestd while it forwards. A message over the
producer's size limit must land in the dead-letter file without holding up
the records behind it. Delivery is at least once: duplicates are counted
and printed, never failed.
"""

import collections
import json
import signal
import subprocess
import threading
import time

import requests

import sink_ingestd
from brokers import kafka  # noqa: F401  (a pytest fixture)
from conftest import (add_device, binary, free_port, stop, wait_ready,
                      write_config)

TOPIC = "telemetry.default"
DEVICES = ["kafka-1", "kafka-2", "kafka-3"]
ARRIVAL_TIMEOUT_S = 60
LOAD_SECONDS = 4
OUTAGE_SECONDS = 5
# Each sender stops after this many requests even if LOAD_SECONDS has not
# passed, so that the load stays bounded on a fast machine.
MAX_REQUESTS_PER_SENDER = 2000


def kafka_sink_lines(bootstrap, **extra):
    """Return the YAML lines of a kafka sink entry for the sinks list."""
    settings = {
        "name": "kafka",
        "type": "kafka",
        "address": bootstrap,
        "timeout": "3s",
        "retry_min": "50ms",
        "retry_max": "1s",
        "linger": "5ms",
    }
    settings.update(extra)
    lines = [f"  - name: {settings.pop('name')}"]
    lines += [f"    {k}: {v}" for k, v in settings.items()]
    return lines


class Ingestd:
    """ingestd with a file sink and a kafka sink, restartable in place."""

    def __init__(self, folder, bootstrap, **sink):
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.config = write_config(folder, self.port, self.admin_port,
                                   http={"max_readings_per_request": 50})
        with open(self.config, "a") as f:
            f.write("\n".join(kafka_sink_lines(bootstrap, **sink)) + "\n")
        self.url = f"http://127.0.0.1:{self.port}/v1/data"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.data_dir = folder / "data"
        self.log = folder / "ingestd.log"
        self.keys = {d: add_device(d, self.config) for d in DEVICES}
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [binary(), "serve", "-c", str(self.config)], stdout=log_file,
                stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.admin_url, self.log)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def finish(self):
        code = stop(self)
        assert code == 0, (
            f"ingestd exited with {code} after SIGTERM; its log:\n"
            f"{self.log.read_text()[-4000:]}")

    def post(self, device_id, readings):
        """Post readings and return their message ids."""
        r = requests.post(self.url, json=readings, timeout=10, headers={
            "Authorization": f"Bearer {self.keys[device_id]}"})
        assert r.status_code == 202, f"{r.status_code} {r.text}"
        return r.json()["ids"]


def reading(device_id, seq, **extra):
    return dict({"device_id": device_id, "sensor_value": seq % 101,
                 "seq": seq}, **extra)


def wait_for_ids(kafka, ids, timeout_s=ARRIVAL_TIMEOUT_S):
    """Wait until every id in `ids` is in the topic; return the messages."""
    deadline = time.monotonic() + timeout_s
    while True:
        messages = kafka.consume(TOPIC)
        seen = {m.headers.get("message_id") for m in messages}
        missing = set(ids) - seen
        if not missing:
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(missing)} of {len(set(ids))} acknowledged readings "
                f"are missing from {TOPIC} after {timeout_s} s, such as "
                f"{sorted(missing)[:5]}")
        time.sleep(0.5)


def report_duplicates(messages, label):
    """Print and return how many messages repeat an earlier message id."""
    counts = collections.Counter(m.headers.get("message_id")
                                 for m in messages)
    duplicates = sum(c - 1 for c in counts.values())
    print(f"{label}: {len(messages)} messages, {len(counts)} distinct ids, "
          f"{duplicates} duplicates")
    return duplicates


def check_device_order(messages):
    """Check that each device's readings are in one partition, in order.

    Retries may repeat a run of records, so the check is on the order of
    each seq's first appearance, which must follow the order of sending.
    """
    by_device = collections.defaultdict(list)
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        by_device[m.key].append(m)
    for device_id, device_messages in by_device.items():
        partitions = {m.partition for m in device_messages}
        assert len(partitions) == 1, (
            f"{device_id} is spread over partitions {sorted(partitions)}")
        first_seen = []
        for m in device_messages:
            seq = json.loads(m.value)["payload"]["seq"]
            if seq not in first_seen:
                first_seen.append(seq)
        assert first_seen == sorted(first_seen), (
            f"{device_id}: readings out of order: {first_seen[:20]}")


class Senders:
    """Threads that post readings, one device each, until stopped."""

    def __init__(self, server):
        self.server = server
        self.stop_event = threading.Event()
        self.acked = []
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(d,))
                        for d in DEVICES]

    def run(self, device_id):
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.server.keys[device_id]}"}
        for n in range(MAX_REQUESTS_PER_SENDER):
            if self.stop_event.is_set():
                return
            body = [reading(device_id, n * 5 + i) for i in range(5)]
            try:
                r = session.post(self.server.url, json=body, headers=headers,
                                 timeout=5)
            except requests.RequestException:
                # The server died mid-request: not acknowledged, so the
                # readings may or may not be stored.
                time.sleep(0.05)
                continue
            if r.status_code == 202:
                self.acked.extend(r.json()["ids"])
            elif r.status_code != 503:
                self.errors.append(f"{r.status_code} {r.text}")
            time.sleep(0.005)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


def test_kafka_key_headers_and_order(kafka, tmp_path):
    server = Ingestd(tmp_path / "ingestd", kafka.bootstrap)
    server.start()
    try:
        ids = []
        for batch in range(10):
            for device_id in DEVICES:
                body = [reading(device_id, batch * 10 + i) for i in range(10)]
                ids += server.post(device_id, body)
        messages = wait_for_ids(kafka, ids)
    finally:
        server.finish()

    report_duplicates(messages, "in order")
    by_id = {m.headers["message_id"]: m for m in messages}
    for message_id in ids:
        m = by_id[message_id]
        envelope = json.loads(m.value)
        assert m.key == envelope["device_id"]
        assert envelope["message_id"] == message_id
        assert m.headers["device_type"] == "default"
        assert m.headers["protocol"] == "http"
        assert m.headers["content_type"] == envelope["content_type"]
    check_device_order(messages)


def test_kafka_broker_outage_under_load(kafka, tmp_path):
    server = Ingestd(tmp_path / "ingestd", kafka.bootstrap)
    server.start()
    try:
        with Senders(server) as senders:
            time.sleep(LOAD_SECONDS / 4)
            kafka.brokers_down()
            # Longer than the sink's timeout, so batches time out and are
            # retried, beside those that librdkafka keeps queued until it
            # reconnects.
            time.sleep(OUTAGE_SECONDS)
            kafka.brokers_up()
            time.sleep(LOAD_SECONDS / 4)
        assert not senders.errors, senders.errors[:5]
        assert senders.acked, "no reading was acknowledged"
        messages = wait_for_ids(kafka, senders.acked)
    finally:
        server.finish()

    print(f"outage: {len(senders.acked)} readings acknowledged")
    report_duplicates(messages, "outage")
    check_device_order(messages)


def test_kafka_sigkill_while_forwarding(kafka, tmp_path):
    server = Ingestd(tmp_path / "ingestd", kafka.bootstrap)
    server.start()
    with Senders(server) as senders:
        time.sleep(LOAD_SECONDS / 2)
        # Slow the brokers' acknowledgements by taking them down, so that
        # the kill finds records sent but not yet committed.
        kafka.brokers_down()
        time.sleep(0.5)
        server.kill()
    kafka.brokers_up()
    assert not senders.errors, senders.errors[:5]
    assert senders.acked, "no reading was acknowledged"
    server.start()
    try:
        messages = wait_for_ids(kafka, senders.acked)
    finally:
        server.finish()

    print(f"sigkill: {len(senders.acked)} readings acknowledged")
    report_duplicates(messages, "sigkill")
    check_device_order(messages)


def test_kafka_oversized_message_dead_lettered(kafka, tmp_path):
    # The producer's limit is librdkafka's minimum, so one padded reading
    # is too large while the normal ones fit.
    server = Ingestd(tmp_path / "ingestd", kafka.bootstrap,
                     kafka_properties="message.max.bytes=1000")
    server.start()
    try:
        before = server.post("kafka-1", [reading("kafka-1", 1)])
        big = server.post("kafka-1", [reading("kafka-1", 2, pad="x" * 2000)])
        after = server.post("kafka-1", [reading("kafka-1", 3)])
        messages = wait_for_ids(kafka, before + after)
    finally:
        server.finish()

    ids = {m.headers["message_id"] for m in messages}
    assert big[0] not in ids
    dead_letter = server.data_dir / "dead-letter" / "kafka.ndjson"
    lines = [json.loads(line) for line in
             dead_letter.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0]["sink"] == "kafka"
    assert lines[0]["record"]["message_id"] == big[0]
    assert "message too large" in lines[0]["reason"]


def test_kafka_receives_http_and_mqtt_readings(kafka, tmp_path):
    sink = {"name": "kafka", "type": "kafka", "address": kafka.bootstrap}
    server = sink_ingestd.Ingestd(tmp_path / "ingestd", [sink])
    server.start()
    try:
        ids = []
        for seq, device_id in enumerate(sink_ingestd.DEVICES):
            ids += server.post(device_id, reading(device_id, seq))
        mqtt_seqs = [server.publish_mqtt("dev-2", reading("dev-2", 100 + i))
                     for i in range(3)]
        wait_for_ids(kafka, ids)
        server.wait_metric("ingestd_sink_records_total", "kafka", 6)
        messages = kafka.consume(TOPIC)
    finally:
        assert server.finish() == 0

    assert report_duplicates(messages, "http and mqtt") == 0
    for m in messages:
        envelope = json.loads(m.value)
        assert m.key == envelope["device_id"]
        assert m.headers["message_id"] == envelope["message_id"]
        assert m.headers["protocol"] == envelope["protocol"]
    by_id = {m.headers["message_id"]: json.loads(m.value) for m in messages}
    for message_id in ids:
        assert by_id[message_id]["protocol"] == "http"
    over_mqtt = [e for e in by_id.values() if e["protocol"] == "mqtt"]
    assert sorted(e["payload"]["seq"] for e in over_mqtt) == mqtt_seqs
    for envelope in over_mqtt:
        assert envelope["device_id"] == "dev-2"
