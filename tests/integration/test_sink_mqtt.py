"""The MQTT sink against a second mosquitto on loopback.

Readings sent over HTTP and MQTT must arrive at a subscriber of the
external broker with their topic, content type and message_id user
property. Restarting the broker under load, or SIGKILLing ingestd while
it forwards, must lose no acknowledged reading: the subscriber has a
persistent session and the broker persists its queues on SIGTERM, so
every acknowledged message id arrives. Duplicates are counted and
printed. A record the broker rejects for good goes to the dead-letter
file.
"""

import json
import time

from brokers import Mosquitto
from sink_ingestd import (DEVICES, Ingestd, Load, reading,
                          report_duplicates, wait_for_ids)

PROBE_TOPIC = "telemetry/probe"


def mqtt_sink(broker, **settings):
    sink = {"name": "mqtt", "type": "mqtt", "address": broker.address}
    sink.update(settings)
    return sink


def received(out_path):
    """Return the subscriber's messages as (topic, content type, user
    properties, envelope) tuples, without the probe messages."""
    messages = []
    for line in out_path.read_text().splitlines():
        parts = line.split("\t", 3)
        if len(parts) != 4 or parts[0] == PROBE_TOPIC:
            continue
        topic, content_type, properties, payload = parts
        messages.append((topic, content_type, properties,
                         json.loads(payload)))
    return messages


def received_ids(out_path):
    return [m[3]["message_id"] for m in received(out_path)]


class Subscriber:
    """mosquitto_sub on the external broker, stopped by PID on exit."""

    def __init__(self, broker, folder):
        self.out = folder / "subscriber.txt"
        self.proc = broker.subscribe("telemetry/#", self.out, "reader",
                                     PROBE_TOPIC)

    def ids(self):
        return received_ids(self.out)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_mqtt_properties_over_http_and_mqtt(tmp_path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker, tmp_path)
    server = Ingestd(tmp_path / "ingestd", [mqtt_sink(broker)])
    server.start()
    try:
        ids = []
        for seq in range(30):
            device = DEVICES[seq % 3]
            ids += server.post(device, reading(device, seq))
        mqtt_seqs = [server.publish_mqtt("dev-1", reading("dev-1", 100 + i))
                     for i in range(5)]
        wait_for_ids(subscriber.ids, ids)
        server.wait_metric("ingestd_sink_lag_bytes", "mqtt", 0)
        messages = received(subscriber.out)
        for topic, content_type, properties, envelope in messages:
            assert topic == f"telemetry/default/{envelope['device_id']}"
            assert content_type == "application/json"
            assert properties == f"message_id:{envelope['message_id']}"
        over_mqtt = [m[3] for m in messages if m[3]["protocol"] == "mqtt"]
        assert sorted(e["payload"]["seq"] for e in over_mqtt) == mqtt_seqs
        for device in DEVICES:
            seqs = [m[3]["payload"]["seq"] for m in messages
                    if m[3]["device_id"] == device]
            assert seqs == sorted(seqs)
        assert server.metric("ingestd_sink_records_total", "mqtt") == 35
        assert server.metric("ingestd_sink_connected", "mqtt") == 1
        assert report_duplicates(subscriber.ids(), "properties") == 0
    finally:
        assert server.finish() == 0
        subscriber.close()
        broker.stop()


def test_mqtt_broker_restart_under_load(tmp_path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker, tmp_path)
    server = Ingestd(tmp_path / "ingestd", [mqtt_sink(broker)])
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.0)
            server.wait_metric("ingestd_sink_connected", "mqtt", 1)
            # SIGTERM: mosquitto saves the messages it acknowledged and
            # queued for the reader's persistent session.
            broker.stop()
            server.wait_metric("ingestd_sink_connected", "mqtt", 0)
            time.sleep(3.0)
            broker.start()
            server.wait_metric("ingestd_sink_connected", "mqtt", 1)
            time.sleep(1.0)
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        seen = wait_for_ids(subscriber.ids, load.acked)
        report_duplicates(seen, "restart")
        assert server.metric("ingestd_sink_failures_total", "mqtt") > 0
    finally:
        assert server.finish() == 0
        subscriber.close()
        broker.stop()


def test_mqtt_sigkill_while_forwarding(tmp_path):
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker, tmp_path)
    server = Ingestd(tmp_path / "ingestd", [mqtt_sink(broker)])
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.5)
            server.kill()
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        server.start()
        seen = wait_for_ids(subscriber.ids, load.acked)
        report_duplicates(seen, "sigkill")
    finally:
        assert server.finish() == 0
        subscriber.close()
        broker.stop()


def test_mqtt_too_large_dead_lettered(tmp_path):
    broker = Mosquitto(tmp_path / "broker", message_size_limit=2048)
    broker.start()
    subscriber = Subscriber(broker, tmp_path)
    server = Ingestd(tmp_path / "ingestd", [mqtt_sink(broker)])
    server.start()
    try:
        big, good = [], []
        for seq in range(5):
            large = dict(reading("dev-1", seq), note="x" * 3000)
            big += server.post("dev-1", large)
            good += server.post("dev-2", reading("dev-2", seq))
        wait_for_ids(subscriber.ids, good, timeout_s=20)
        server.wait_metric("ingestd_sink_dead_lettered_total", "mqtt", 5)
        server.wait_metric("ingestd_sink_lag_bytes", "mqtt", 0)
        path = server.folder / "data" / "dead-letter" / "mqtt.ndjson"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["record"]["message_id"] for line in lines] == big
        for line in lines:
            assert line["sink"] == "mqtt"
            assert line["reason"].startswith("mqtt: PUBACK 0x95")
        assert not set(big) & set(subscriber.ids())
    finally:
        assert server.finish() == 0
        subscriber.close()
        broker.stop()
