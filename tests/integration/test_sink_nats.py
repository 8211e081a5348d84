"""The NATS JetStream sink against a real nats-server on loopback.

Readings sent over HTTP and MQTT must arrive in the stream, which the sink
creates, with their headers. Stopping the server under load, or
SIGKILLing ingestd while it forwards, must lose no acknowledged reading:
every acknowledged message id arrives, and duplicates are counted and
printed. A record over the server's max_payload goes to the dead-letter
file. Two sinks sending the same records show that the stream stores
each Nats-Msg-Id once.
"""

import json
import time

import requests

from brokers import Nats
from sink_ingestd import (DEVICES, Ingestd, Load, reading,
                          report_duplicates, wait_for_ids)

STREAM = "TELEMETRY"


def nats_sink(nats, name="nats", **settings):
    sink = {"name": name, "type": "nats", "address": nats.address,
            "stream": STREAM}
    sink.update(settings)
    return sink


def stream_ids(nats):
    return [m["data"]["message_id"] for m in nats.messages(STREAM)]


def test_nats_headers_over_http_and_mqtt(tmp_path):
    nats = Nats(tmp_path / "nats")
    nats.start()
    server = Ingestd(tmp_path / "ingestd", [nats_sink(nats)])
    server.start()
    try:
        ids = []
        for seq in range(30):
            device = DEVICES[seq % 3]
            ids += server.post(device, reading(device, seq))
        mqtt_seqs = [server.publish_mqtt("dev-2", reading("dev-2", 100 + i))
                     for i in range(5)]
        wait_for_ids(lambda: stream_ids(nats), ids)
        server.wait_metric("ingestd_sink_lag_bytes", "nats", 0)
        messages = nats.messages(STREAM)
        by_id = {m["data"]["message_id"]: m for m in messages}
        for message_id in ids:
            message = by_id[message_id]
            envelope = message["data"]
            device = envelope["device_id"]
            assert message["subject"] == f"telemetry.default.{device}"
            assert message["headers"]["device_id"] == device
            assert message["headers"]["device_type"] == "default"
            assert message["headers"]["content_type"] == "application/json"
            assert message["headers"]["Nats-Msg-Id"] == message_id
            assert envelope["protocol"] == "http"
        over_mqtt = [m for m in messages
                     if m["data"]["protocol"] == "mqtt"]
        assert sorted(m["data"]["payload"]["seq"] for m in over_mqtt) == \
            mqtt_seqs
        for message in over_mqtt:
            assert message["subject"] == "telemetry.default.dev-2"
            assert message["headers"]["Nats-Msg-Id"] == \
                message["data"]["message_id"]
        # The stream keeps each device's readings in request order.
        for device in DEVICES:
            seqs = [m["data"]["payload"]["seq"] for m in messages
                    if m["data"]["device_id"] == device]
            assert seqs == sorted(seqs)
        assert "subjects=telemetry.*.>" in server.log.read_text()
        assert server.metric("ingestd_sink_records_total", "nats") == 35
        assert server.metric("ingestd_sink_connected", "nats") == 1
        ready = requests.get(server.admin_url + "/readyz", timeout=5)
        assert ready.json()["sinks"]["nats"]["connected"] is True
        assert report_duplicates(stream_ids(nats), "headers") == 0
    finally:
        assert server.finish() == 0
        nats.stop()


def test_nats_outage_under_load(tmp_path):
    nats = Nats(tmp_path / "nats")
    nats.start()
    server = Ingestd(tmp_path / "ingestd", [nats_sink(nats)])
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.0)
            server.wait_metric("ingestd_sink_connected", "nats", 1)
            nats.stop()
            server.wait_metric("ingestd_sink_connected", "nats", 0)
            # Longer than the sink's 2 s wait for a reconnect, so that
            # batches fail and are retried.
            time.sleep(3.0)
            nats.start()
            server.wait_metric("ingestd_sink_connected", "nats", 1)
            time.sleep(1.0)
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        seen = wait_for_ids(lambda: stream_ids(nats), load.acked)
        report_duplicates(seen, "outage")
        assert server.metric("ingestd_sink_failures_total", "nats") > 0
    finally:
        assert server.finish() == 0
        nats.stop()


def test_nats_sigkill_while_forwarding(tmp_path):
    nats = Nats(tmp_path / "nats")
    nats.start()
    server = Ingestd(tmp_path / "ingestd", [nats_sink(nats)])
    server.start()
    try:
        with Load(server) as load:
            time.sleep(1.5)
            server.kill()
        assert not load.errors, f"unexpected answers: {load.errors[:5]}"
        assert load.acked, "no reading was acknowledged"
        server.start()
        seen = wait_for_ids(lambda: stream_ids(nats), load.acked)
        # The records sent again after the restart carry the same
        # Nats-Msg-Id within the 2 minute window, so the stream stores
        # each once.
        assert report_duplicates(seen, "sigkill") == 0
    finally:
        assert server.finish() == 0
        nats.stop()


def test_nats_too_large_dead_lettered(tmp_path):
    nats = Nats(tmp_path / "nats", max_payload=2048)
    nats.start()
    server = Ingestd(tmp_path / "ingestd", [nats_sink(nats)])
    server.start()
    try:
        big, good = [], []
        for seq in range(5):
            large = dict(reading("dev-1", seq), note="x" * 3000)
            big += server.post("dev-1", large)
            good += server.post("dev-2", reading("dev-2", seq))
        wait_for_ids(lambda: stream_ids(nats), good, timeout_s=20)
        server.wait_metric("ingestd_sink_dead_lettered_total", "nats", 5)
        server.wait_metric("ingestd_sink_lag_bytes", "nats", 0)
        path = server.folder / "data" / "dead-letter" / "nats.ndjson"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line["record"]["message_id"] for line in lines] == big
        for line in lines:
            assert line["sink"] == "nats"
            assert line["reason"].startswith("nats: message too large")
        assert not set(big) & set(stream_ids(nats))
    finally:
        assert server.finish() == 0
        nats.stop()


def test_nats_stream_drops_duplicate_msg_id(tmp_path):
    # Two sinks publish every record to the same stream with the same
    # Nats-Msg-Id, so each record is sent twice within the window.
    nats = Nats(tmp_path / "nats")
    nats.start()
    server = Ingestd(tmp_path / "ingestd",
                     [nats_sink(nats, "nats-a"), nats_sink(nats, "nats-b")])
    server.start()
    try:
        ids = []
        for seq in range(20):
            ids += server.post("dev-3", [reading("dev-3", seq * 5 + i)
                                         for i in range(5)])
        server.wait_metric("ingestd_sink_lag_bytes", "nats-a", 0)
        server.wait_metric("ingestd_sink_lag_bytes", "nats-b", 0)
        assert server.metric("ingestd_sink_records_total", "nats-a") == 100
        assert server.metric("ingestd_sink_records_total", "nats-b") == 100
        duplicates = (
            server.metric("ingestd_sink_nats_duplicates_total", "nats-a") +
            server.metric("ingestd_sink_nats_duplicates_total", "nats-b"))
        print(f"dedup: {duplicates:.0f} PubAcks marked duplicate")
        assert duplicates == 100
        assert nats.count(STREAM) == 100
        assert report_duplicates(stream_ids(nats), "dedup") == 0
        assert sorted(stream_ids(nats)) == sorted(ids)
    finally:
        assert server.finish() == 0
        nats.stop()
