"""The Redis sink against a real redis-server on loopback.

Readings sent over HTTP and MQTT must arrive in the stream with their
fields or on the pubsub channel. Stopping Redis under load, or SIGKILLing
ingestd while it forwards, must lose no acknowledged reading: every
acknowledged message id arrives (duplicates are allowed, counted and
printed). A record Redis rejects for good goes to the dead-letter file
without blocking the records behind it.
"""

import collections
import json
import re
import signal
import subprocess
import threading
import time

import requests

import sink_ingestd
from brokers import Redis
from conftest import add_device, binary, free_port, wait_ready, write_config

ARRIVAL_TIMEOUT_S = 60
DEVICES = ("dev-1", "dev-2", "dev-3")


class Ingestd:
    """ingestd with a file sink and a redis sink, restartable in place."""

    def __init__(self, folder, redis, **sink):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.config = write_config(folder, self.port, self.admin_port,
                                   http={"max_readings_per_request": 50})
        settings = {"name": "redis", "type": "redis",
                    "address": redis.address, "timeout": "2s",
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
        """Return the value of `name{sink="redis"}`, or None."""
        text = requests.get(self.admin_url + "/metrics", timeout=5).text
        m = re.search(rf'^{name}{{sink="redis"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else None

    def wait_metric(self, name, value, timeout_s=20):
        deadline = time.monotonic() + timeout_s
        while self.metric(name) != value:
            assert time.monotonic() < deadline, (
                f"{name} is {self.metric(name)}, expected {value}")
            time.sleep(0.05)


def reading(device_id, seq):
    return {"device_id": device_id, "sensor_value": seq % 101, "seq": seq}


def stream_ids(redis, key="telemetry:default"):
    return [e["message_id"] for e in redis.xrange(key)]


def wait_for_ids(get_ids, ids, timeout_s=ARRIVAL_TIMEOUT_S):
    """Wait until every id in `ids` is in get_ids(); return the last list."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = get_ids()
        missing = set(ids) - set(seen)
        if not missing:
            return seen
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(set(ids))} acknowledged readings did "
            f"not arrive, for example {sorted(missing)[:3]}")
        time.sleep(0.1)


def report_duplicates(ids, label):
    """Print how many ids arrived more than once, and return that count."""
    counts = collections.Counter(ids)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(f"{label}: {len(counts)} distinct readings, {duplicates} "
          f"duplicates")
    return duplicates


class Load:
    """Senders that post readings until stopped, recording acked ids."""

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
        seq = 0
        # Bounded: at most 2000 requests per sender.
        while not self.stop_event.is_set() and seq < 2000:
            seq += 1
            body = [reading(device_id, seq * 10 + i) for i in range(3)]
            try:
                r = session.post(self.server.url, json=body,
                                 headers=headers, timeout=5)
            except requests.RequestException:
                time.sleep(0.01)
                continue
            if r.status_code == 202:
                self.acked.extend(r.json()["ids"])
            elif r.status_code != 503:
                self.errors.append(f"{r.status_code} {r.text[:200]}")
            time.sleep(0.005)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a sender did not stop"


def test_redis_stream_fields(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    server = Ingestd(tmp_path / "ingestd", redis, maxlen=100000)
    server.start()
    try:
        ids = []
        for seq in range(30):
            ids += server.post(DEVICES[seq % 3], reading(DEVICES[seq % 3],
                                                         seq))
        wait_for_ids(lambda: stream_ids(redis), ids)
        entries = redis.xrange("telemetry:default")
        by_id = {e["message_id"]: e for e in entries}
        for message_id in ids:
            entry = by_id[message_id]
            envelope = json.loads(entry["envelope"])
            assert envelope["message_id"] == message_id
            assert entry["device_id"] == envelope["device_id"]
            assert entry["device_type"] == "default"
            assert envelope["payload"]["seq"] in range(30)
        # Per device, the stream keeps the order of the requests.
        for device in DEVICES:
            seqs = [json.loads(e["envelope"])["payload"]["seq"]
                    for e in entries if e["device_id"] == device]
            assert seqs == sorted(seqs)
        server.wait_metric("ingestd_sink_connected", 1)
        server.wait_metric("ingestd_sink_lag_bytes", 0)
        assert server.metric("ingestd_sink_records_total") == 30
        assert server.metric("ingestd_sink_lag_records") == 0
        assert server.metric("ingestd_sink_lag_seconds") == 0
        assert server.metric("ingestd_sink_in_flight") == 0
        ready = requests.get(server.admin_url + "/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json()["sinks"]["redis"]["connected"] is True
        assert ready.json()["sinks"]["out"]["type"] == "file"
        report_duplicates(stream_ids(redis), "stream")
    finally:
        assert server.finish() == 0
        redis.stop()


def test_redis_pubsub(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    out = tmp_path / "subscriber.txt"
    subscriber = redis.subscribe("telemetry:default", out)
    server = Ingestd(tmp_path / "ingestd", redis, mode="pubsub")
    server.start()
    try:
        ids = server.post("dev-1", [reading("dev-1", i) for i in range(10)])

        def received():
            # --raw prints "message", the channel and the payload per
            # message, each on its own line.
            lines = out.read_text().splitlines()
            return [json.loads(lines[i + 2])["message_id"]
                    for i in range(len(lines) - 2)
                    if lines[i] == "message"]

        wait_for_ids(received, ids, timeout_s=20)
        assert report_duplicates(received(), "pubsub") == 0
    finally:
        subscriber.kill()
        subscriber.wait(timeout=10)
        assert server.finish() == 0
        redis.stop()


def test_redis_outage_under_load(tmp_path):
    redis = Redis(tmp_path / "redis", persistent=True)
    redis.start()
    server = Ingestd(tmp_path / "ingestd", redis)
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.0)
            server.wait_metric("ingestd_sink_connected", 1)
            redis.stop()
            server.wait_metric("ingestd_sink_connected", 0)
            # A broker outage is shown, but ingestd stays ready: the
            # spool keeps accepting readings.
            ready = requests.get(server.admin_url + "/readyz", timeout=5)
            assert ready.status_code == 200
            assert ready.json()["sinks"]["redis"]["connected"] is False
            time.sleep(1.0)
            redis.start()
            server.wait_metric("ingestd_sink_connected", 1)
            time.sleep(1.0)
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        seen = wait_for_ids(lambda: stream_ids(redis), load.acked)
        report_duplicates(seen, "outage")
        assert server.metric("ingestd_sink_failures_total") > 0
    finally:
        assert server.finish() == 0
        redis.stop()


def test_redis_sigkill_while_forwarding(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    server = Ingestd(tmp_path / "ingestd", redis)
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.5)
            server.kill()
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        server.start()
        seen = wait_for_ids(lambda: stream_ids(redis), load.acked)
        report_duplicates(seen, "sigkill")
    finally:
        assert server.finish() == 0
        redis.stop()


def test_redis_clean_stop_drains_spool(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    # A slow sink with one record per batch, so that records are still in
    # the spool when SIGTERM arrives.
    server = Ingestd(tmp_path / "ingestd", redis, batch_records=1)
    server.start()
    try:
        ids = []
        for seq in range(20):
            ids += server.post("dev-2", [reading("dev-2", seq * 50 + i)
                                         for i in range(50)])
        assert server.finish() == 0
        # Everything acknowledged was delivered before the exit.
        seen = stream_ids(redis)
        missing = set(ids) - set(seen)
        assert not missing, f"{len(missing)} readings stayed in the spool"
        report_duplicates(seen, "drain")
    finally:
        server.finish()
        redis.stop()


def test_redis_wrongtype_dead_lettered(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    # dev-1's key contains a string, so XADD to it fails with WRONGTYPE.
    redis.cli("SET", "telemetry:dev-1", "x")
    server = Ingestd(tmp_path / "ingestd", redis,
                     topic="telemetry:{device_id}")
    server.start()
    try:
        poisoned, good = [], []
        for seq in range(10):
            poisoned += server.post("dev-1", reading("dev-1", seq))
            good += server.post("dev-2", reading("dev-2", seq))
        wait_for_ids(lambda: stream_ids(redis, "telemetry:dev-2"), good,
                     timeout_s=20)
        server.wait_metric("ingestd_sink_dead_lettered_total", 10)
        server.wait_metric("ingestd_sink_lag_bytes", 0)
        path = server.folder / "data" / "dead-letter" / "redis.ndjson"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["record"]["message_id"] for line in lines] == poisoned
        for line in lines:
            assert line["sink"] == "redis"
            assert line["reason"].startswith("redis: WRONGTYPE")
            assert line["record"]["device_id"] == "dev-1"
        assert redis.cli("GET", "telemetry:dev-1") == ["x"]
        assert report_duplicates(
            stream_ids(redis, "telemetry:dev-2"), "wrongtype") == 0
    finally:
        assert server.finish() == 0
        redis.stop()


def test_redis_receives_http_and_mqtt_readings(tmp_path):
    redis = Redis(tmp_path / "redis")
    redis.start()
    sink = {"name": "redis", "type": "redis", "address": redis.address}
    server = sink_ingestd.Ingestd(tmp_path / "ingestd", [sink])
    server.start()
    try:
        ids = []
        for seq in range(6):
            ids += server.post(DEVICES[seq % 3], reading(DEVICES[seq % 3],
                                                         seq))
        mqtt_seqs = [server.publish_mqtt("dev-2", reading("dev-2", 100 + i))
                     for i in range(3)]
        wait_for_ids(lambda: stream_ids(redis), ids)
        server.wait_metric("ingestd_sink_records_total", "redis", 9)
        envelopes = {}
        for entry in redis.xrange("telemetry:default"):
            envelope = json.loads(entry["envelope"])
            assert entry["message_id"] == envelope["message_id"]
            assert entry["device_id"] == envelope["device_id"]
            assert entry["device_type"] == "default"
            envelopes[envelope["message_id"]] = envelope
        for message_id in ids:
            assert envelopes[message_id]["protocol"] == "http"
        over_mqtt = [e for e in envelopes.values() if e["protocol"] == "mqtt"]
        assert sorted(e["payload"]["seq"] for e in over_mqtt) == mqtt_seqs
        for envelope in over_mqtt:
            assert envelope["device_id"] == "dev-2"
        assert report_duplicates(stream_ids(redis), "http and mqtt") == 0
    finally:
        assert server.finish() == 0
        redis.stop()
