"""The RabbitMQ sink against a real rabbitmq-server on loopback.

Readings sent over HTTP and MQTT must arrive in a queue bound to the exchange,
with their message id, headers and routing key. Stopping RabbitMQ under
load, or SIGKILLing ingestd while it forwards, must lose no acknowledged
reading: every acknowledged message id arrives (duplicates are allowed,
counted and printed). A message no queue is bound to receive goes to the
dead-letter file without blocking the records behind it.

One broker serves the whole module, because a node takes seconds to
start; each test uses its own exchange and queue.
"""

import json
import re
import signal
import subprocess
import time

import pytest
import requests

import sink_ingestd
from brokers import RabbitMQ
from conftest import add_device, binary, free_port, wait_ready, write_config
from test_sink_redis import Load, reading, report_duplicates, wait_for_ids

DEVICES = ("dev-1", "dev-2", "dev-3")


@pytest.fixture(scope="module")
def rabbitmq():
    broker = RabbitMQ()
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


class Ingestd:
    """ingestd with a file sink and a rabbitmq sink, restartable."""

    def __init__(self, folder, rabbitmq, **sink):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.config = write_config(folder, self.port, self.admin_port,
                                   http={"max_readings_per_request": 50})
        settings = {"name": "rabbit", "type": "rabbitmq",
                    "address": rabbitmq.address, "timeout": "2s",
                    "retry_min": "20ms", "retry_max": "500ms",
                    "batch_records": 64}
        settings.update(sink)
        with open(self.config, "a") as f:
            first = True
            for key, value in settings.items():
                f.write(f"  {'- ' if first else '  '}{key}: "
                        f"{json.dumps(value)}\n")
                first = False
            f.write("sinks_drain_timeout: 10s\n")
        self.keys = {d: add_device(d, self.config) for d in DEVICES}
        self.url = f"http://127.0.0.1:{self.port}/v1/data"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log = folder / "ingestd.log"
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [binary(), "serve", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.admin_url, self.log)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def finish(self):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def post(self, device_id, readings):
        r = requests.post(self.url, json=readings, timeout=10, headers={
            "Authorization": f"Bearer {self.keys[device_id]}"})
        assert r.status_code == 202, f"{r.status_code} {r.text}"
        return r.json()["ids"]

    def metric(self, name):
        """Return the value of `name{sink="rabbit"}`, or None."""
        text = requests.get(self.admin_url + "/metrics", timeout=5).text
        m = re.search(rf'^{name}{{sink="rabbit"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else None

    def wait_metric(self, name, value, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while self.metric(name) != value:
            assert time.monotonic() < deadline, (
                f"{name} is {self.metric(name)}, expected {value}")
            time.sleep(0.05)


class Reader:
    """Collects the messages of one queue across polls."""

    def __init__(self, rabbitmq, queue):
        self.rabbitmq = rabbitmq
        self.queue = queue
        self.messages = []

    def ids(self):
        self.messages += self.rabbitmq.get_all(self.queue)
        return [m.message_id for m in self.messages]


def test_rabbitmq_message_fields(tmp_path, rabbitmq):
    rabbitmq.bind_queue("fields", exchange="fields")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="fields")
    server.start()
    try:
        ids = []
        for seq in range(30):
            device = DEVICES[seq % 3]
            ids += server.post(device, reading(device, seq))
        reader = Reader(rabbitmq, "fields")
        wait_for_ids(reader.ids, ids)
        by_id = {m.message_id: m for m in reader.messages}
        for message_id in ids:
            message = by_id[message_id]
            envelope = json.loads(message.body)
            assert envelope["message_id"] == message_id
            assert message.exchange == "fields"
            assert message.routing_key == f"default.{envelope['device_id']}"
            assert message.content_type == "application/json"
            assert message.delivery_mode == 2
            assert message.headers == {
                "device_id": envelope["device_id"],
                "device_type": "default", "protocol": "http"}
        # Per device, the queue keeps the order of the requests.
        for device in DEVICES:
            seqs = [json.loads(m.body)["payload"]["seq"]
                    for m in reader.messages
                    if m.headers["device_id"] == device]
            assert seqs == sorted(seqs)
        server.wait_metric("ingestd_sink_connected", 1)
        server.wait_metric("ingestd_sink_lag_bytes", 0)
        assert server.metric("ingestd_sink_records_total") == 30
        assert server.metric("ingestd_sink_dead_lettered_total") == 0
        ready = requests.get(server.admin_url + "/readyz", timeout=5)
        assert ready.json()["sinks"]["rabbit"]["connected"] is True
        assert report_duplicates(reader.ids(), "fields") == 0
    finally:
        assert server.finish() == 0


def test_rabbitmq_outage_under_load(tmp_path, rabbitmq):
    rabbitmq.bind_queue("outage", exchange="outage")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="outage")
    server.start()
    reader = Reader(rabbitmq, "outage")
    try:
        with Load(server) as load:
            time.sleep(1.0)
            server.wait_metric("ingestd_sink_connected", 1)
            rabbitmq.stop()
            server.wait_metric("ingestd_sink_connected", 0)
            ready = requests.get(server.admin_url + "/readyz", timeout=5)
            assert ready.status_code == 200
            assert ready.json()["sinks"]["rabbit"]["connected"] is False
            time.sleep(1.0)
            rabbitmq.start()
            server.wait_metric("ingestd_sink_connected", 1)
            time.sleep(1.0)
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        # The queue and its persistent messages survived the restart.
        seen = wait_for_ids(reader.ids, load.acked)
        report_duplicates(seen, "outage")
        assert server.metric("ingestd_sink_failures_total") > 0
        assert server.metric("ingestd_sink_dead_lettered_total") == 0
    finally:
        assert server.finish() == 0


def test_rabbitmq_sigkill_while_forwarding(tmp_path, rabbitmq):
    rabbitmq.bind_queue("sigkill", exchange="sigkill")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="sigkill")
    server.start()
    reader = Reader(rabbitmq, "sigkill")
    try:
        with Load(server) as load:
            time.sleep(1.5)
            server.kill()
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        server.start()
        seen = wait_for_ids(reader.ids, load.acked)
        report_duplicates(seen, "sigkill")
    finally:
        assert server.finish() == 0


def test_rabbitmq_unroutable_dead_lettered(tmp_path, rabbitmq):
    # Only dev-2's routing key is bound, so dev-1's messages are returned
    # as unroutable.
    rabbitmq.bind_queue("routed", exchange="routed",
                        binding_key="default.dev-2")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="routed")
    server.start()
    reader = Reader(rabbitmq, "routed")
    try:
        unroutable, good = [], []
        for seq in range(10):
            unroutable += server.post("dev-1", reading("dev-1", seq))
            good += server.post("dev-2", reading("dev-2", seq))
        wait_for_ids(reader.ids, good, timeout_s=20)
        server.wait_metric("ingestd_sink_dead_lettered_total", 10)
        server.wait_metric("ingestd_sink_lag_bytes", 0)
        path = server.folder / "data" / "dead-letter" / "rabbit.ndjson"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["record"]["message_id"] for line in lines] == unroutable
        for line in lines:
            assert line["sink"] == "rabbit"
            assert line["reason"] == ('no queue bound to exchange "routed" '
                                      'for routing key "default.dev-1"')
        assert report_duplicates(reader.ids(), "unroutable") == 0
    finally:
        assert server.finish() == 0


def test_rabbitmq_existing_direct_exchange(tmp_path, rabbitmq):
    # Declaring this exchange as a durable topic exchange fails with 406
    # PRECONDITION_FAILED, so the sink checks it with a passive declare
    # and publishes to it as it is.
    rabbitmq.bind_queue("direct", exchange="direct", exchange_type="direct",
                        durable_exchange=False, binding_key="default.dev-3")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="direct")
    server.start()
    reader = Reader(rabbitmq, "direct")
    try:
        ids = server.post("dev-3", [reading("dev-3", i) for i in range(5)])
        wait_for_ids(reader.ids, ids, timeout_s=20)
        server.wait_metric("ingestd_sink_lag_bytes", 0)
        assert server.metric("ingestd_sink_dead_lettered_total") == 0
        assert report_duplicates(reader.ids(), "direct") == 0
    finally:
        assert server.finish() == 0


def test_rabbitmq_wrong_password_retries(tmp_path, rabbitmq):
    rabbitmq.bind_queue("login", exchange="login")
    server = Ingestd(tmp_path / "ingestd", rabbitmq, exchange="login",
                     username="guest", password="not-the-password")
    server.start()
    try:
        ids = server.post("dev-1", reading("dev-1", 1))
        server.wait_metric("ingestd_sink_connected", 0)
        deadline = time.monotonic() + 20
        while not server.metric("ingestd_sink_failures_total"):
            assert time.monotonic() < deadline, "no failed batch counted"
            time.sleep(0.05)
        # A login failure keeps the reading in the spool, not dead.
        assert server.metric("ingestd_sink_dead_lettered_total") == 0
        assert server.metric("ingestd_sink_lag_bytes") > 0
        assert "rabbitmq login failed" in server.log.read_text()
        assert Reader(rabbitmq, "login").ids() == []
        assert ids
    finally:
        server.finish()


def test_rabbitmq_receives_http_and_mqtt_readings(tmp_path, rabbitmq):
    rabbitmq.bind_queue("http-and-mqtt", exchange="http-and-mqtt")
    sink = {"name": "rabbit", "type": "rabbitmq",
            "address": rabbitmq.address, "exchange": "http-and-mqtt"}
    server = sink_ingestd.Ingestd(tmp_path / "ingestd", [sink])
    server.start()
    try:
        ids = []
        for seq in range(6):
            device = DEVICES[seq % 3]
            ids += server.post(device, reading(device, seq))
        mqtt_seqs = [server.publish_mqtt("dev-2", reading("dev-2", 100 + i))
                     for i in range(3)]
        reader = Reader(rabbitmq, "http-and-mqtt")
        wait_for_ids(reader.ids, ids)
        server.wait_metric("ingestd_sink_records_total", "rabbit", 9)
        reader.ids()
        envelopes = {}
        for message in reader.messages:
            envelope = json.loads(message.body)
            device = envelope["device_id"]
            assert message.message_id == envelope["message_id"]
            assert message.routing_key == f"default.{device}"
            assert message.headers == {
                "device_id": device, "device_type": "default",
                "protocol": envelope["protocol"]}
            envelopes[message.message_id] = envelope
        for message_id in ids:
            assert envelopes[message_id]["protocol"] == "http"
        over_mqtt = [e for e in envelopes.values() if e["protocol"] == "mqtt"]
        assert sorted(e["payload"]["seq"] for e in over_mqtt) == mqtt_seqs
        for envelope in over_mqtt:
            assert envelope["device_id"] == "dev-2"
        assert report_duplicates(reader.ids(), "http and mqtt") == 0
    finally:
        assert server.finish() == 0
