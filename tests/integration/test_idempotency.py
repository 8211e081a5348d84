"""Idempotent ingest: a repeated key gets the original message ids and is
stored once, over HTTP, MQTT and WebSocket, across restarts and
after the spool deleted the delivered segment.

"Stored once" is checked in the file sink's output by counting distinct
message ids per key: after SIGKILL the sink may deliver a record twice
(at least once), but a second store would carry a new message id.
"""

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid

import requests
import websockets

import mqtt_raw
from conftest import (Server, add_device, binary, free_port, stop,
                      wait_ready, write_config)

SETTLE_S = 1.0  # lets the file sink write any second copy before counting


def start(folder, idempotency=None, spool=None, ports=None):
    """Start ingestd in `folder` with an idempotency section. `ports`
    (port, admin_port, mqtt_port) restarts a server on the same folder."""
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port, mqtt_port = ports or (free_port(), free_port(),
                                            free_port())
    config = folder / "ingestd.yaml"
    keys = {}
    if ports is None:
        config = write_config(folder, port, admin_port, spool=spool,
                              mqtt={"max_session_expiry": "1h"},
                              mqtt_port=mqtt_port)
        settings = dict({"window": "1h"}, **(idempotency or {}))
        with open(config, "a") as f:
            f.write("idempotency:\n")
            for k, v in settings.items():
                f.write(f"  {k}: {json.dumps(v)}\n")
        keys = {d: add_device(d, config) for d in ("dev-1", "dev-2")}
        (folder / "keys.json").write_text(json.dumps(keys))
    else:
        keys = json.loads((folder / "keys.json").read_text())
    log = folder / "ingestd.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(host="127.0.0.1", port=port, admin_port=admin_port,
                    base_url=f"http://127.0.0.1:{port}",
                    admin_url=f"http://127.0.0.1:{admin_port}", keys=keys,
                    data_dir=folder / "data", config=config, log=log,
                    proc=proc, mqtt_port=mqtt_port)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    return server


def ports_of(server):
    return (server.port, server.admin_port, server.mqtt_port)


def restart(server, stop_signal):
    """Stop `server` with "SIGTERM" or "SIGKILL" and start it again."""
    if stop_signal == "SIGKILL":
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=20)
    else:
        assert stop(server) == 0
    return start(server.data_dir.parent, ports=ports_of(server))


def post(server, body, key=None, device="dev-1"):
    headers = {"Authorization": f"Bearer {server.keys[device]}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(server.base_url + "/v1/data", json=body,
                         headers=headers, timeout=10)


def ids_for_key(server, key):
    """Distinct message ids the sink wrote under idempotency key `key`."""
    return {r["message_id"] for r in server.output_records()
            if r.get("idempotency_key") == key}


def records_with(server, marker):
    """Distinct message ids of records whose payload has `marker`."""
    return {r["message_id"] for r in server.output_records()
            if r["payload"].get("marker") == marker}


def metric(server, name):
    for line in server.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_http_retry_returns_same_ids(tmp_path):
    server = start(tmp_path / "s")
    try:
        body = [{"sensor_value": 1}, {"sensor_value": 2}]
        first = post(server, body, key="req-1")
        assert first.status_code == 202, first.text
        second = post(server, body, key="req-1")
        assert second.status_code == 202, second.text
        assert second.json() == first.json()
        server.wait_for_ids(first.json()["ids"])
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "req-1") == set(first.json()["ids"])
        # The same key from another device is that device's own key.
        other = post(server, body, key="req-1", device="dev-2")
        assert other.status_code == 202
        assert set(other.json()["ids"]).isdisjoint(first.json()["ids"])
        text = server.metrics()
        assert 'ingestd_idempotency_hits_total{protocol="http"} 1' in text
        assert metric(server, "ingestd_idempotency_keys") == 2
    finally:
        stop(server)


def test_http_invalid_key_rejected(tmp_path):
    server = start(tmp_path / "s")
    try:
        r = post(server, {"sensor_value": 1}, key="x" * 256)
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_idempotency_key"
    finally:
        stop(server)


def test_reading_field_across_requests(tmp_path):
    server = start(tmp_path / "s")
    try:
        a = post(server, {"sensor_value": 1, "msg_id": "r-1"})
        assert a.status_code == 202, a.text
        b = post(server, [{"sensor_value": 1, "msg_id": "r-1"},
                          {"sensor_value": 2, "msg_id": "r-2"},
                          {"sensor_value": 3, "msg_id": 17}])
        assert b.status_code == 202, b.text
        ids = b.json()["ids"]
        assert b.json()["accepted"] == 3
        assert ids[0] == a.json()["ids"][0]
        assert ids[1] != ids[0]
        c = post(server, {"sensor_value": 3, "msg_id": 17})
        assert c.json()["ids"] == [ids[2]]
        server.wait_for_ids(ids)
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "r-1") == {ids[0]}
        assert ids_for_key(server, "r-2") == {ids[1]}
        assert ids_for_key(server, "17") == {ids[2]}
    finally:
        stop(server)


def test_failed_validation_not_recorded(tmp_path):
    server = start(tmp_path / "s")
    try:
        bad = post(server, {"sensor_value": 120}, key="fix-me")
        assert bad.status_code == 400
        bad = post(server, {"sensor_value": 130, "msg_id": "m-fix"})
        assert bad.status_code == 400
        good = post(server, {"sensor_value": 12}, key="fix-me")
        assert good.status_code == 202, good.text
        good2 = post(server, {"sensor_value": 13, "msg_id": "m-fix"})
        assert good2.status_code == 202, good2.text
        assert good2.json()["ids"] != good.json()["ids"]
        server.wait_for_ids(good.json()["ids"] + good2.json()["ids"])
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "fix-me") == set(good.json()["ids"])
        assert ids_for_key(server, "m-fix") == set(good2.json()["ids"])
    finally:
        stop(server)


def check_restart(tmp_path, stop_signal):
    server = start(tmp_path / "s")
    try:
        first = post(server, [{"sensor_value": 5}, {"sensor_value": 6}],
                     key=f"restart-{stop_signal}")
        assert first.status_code == 202
        reading = post(server, {"sensor_value": 7, "msg_id": f"m-{stop_signal}"})
        assert reading.status_code == 202
        server = restart(server, stop_signal)
        again = post(server, [{"sensor_value": 5}, {"sensor_value": 6}],
                     key=f"restart-{stop_signal}")
        assert again.status_code == 202, again.text
        assert again.json() == first.json()
        again = post(server, {"sensor_value": 7, "msg_id": f"m-{stop_signal}"})
        assert again.json() == reading.json()
        server.wait_for_ids(first.json()["ids"] + reading.json()["ids"])
        time.sleep(SETTLE_S)
        assert ids_for_key(server, f"restart-{stop_signal}") == set(
            first.json()["ids"])
        assert ids_for_key(server, f"m-{stop_signal}") == set(reading.json()["ids"])
    finally:
        stop(server)


def test_repeat_after_sigterm(tmp_path):
    check_restart(tmp_path, "SIGTERM")


def test_repeat_after_sigkill(tmp_path):
    check_restart(tmp_path, "SIGKILL")


def spool_segments(server):
    return sorted(p.name for p in (server.data_dir / "spool").glob("*.seg"))


def test_repeat_after_segment_deleted_and_kill(tmp_path):
    """The key's record was delivered and its spool segment deleted, so
    only the idempotency log still contains the key after SIGKILL."""
    server = start(tmp_path / "s", spool={"segment_size": "64KiB"})
    try:
        first = post(server, {"sensor_value": 5}, key="deleted-seg")
        assert first.status_code == 202
        oldest = spool_segments(server)[0]
        filler = [{"sensor_value": 1, "pad": "x" * 300} for _ in range(20)]
        for _ in range(40):
            if oldest not in spool_segments(server):
                break
            assert post(server, filler).status_code == 202
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while oldest in spool_segments(server):
            assert time.monotonic() < deadline, "segment never deleted"
            time.sleep(0.1)
        server = restart(server, "SIGKILL")
        again = post(server, {"sensor_value": 5}, key="deleted-seg")
        assert again.json() == first.json()
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "deleted-seg") == set(first.json()["ids"])
    finally:
        stop(server)


def test_repeat_after_window_is_stored(tmp_path):
    server = start(tmp_path / "s", idempotency={"window": "2s"})
    try:
        first = post(server, {"sensor_value": 5}, key="short")
        time.sleep(2.5)
        second = post(server, {"sensor_value": 5}, key="short")
        assert second.status_code == 202
        assert second.json()["ids"] != first.json()["ids"]
        server.wait_for_ids(first.json()["ids"] + second.json()["ids"])
        time.sleep(SETTLE_S)
        assert len(ids_for_key(server, "short")) == 2
    finally:
        stop(server)


def test_evicted_key_is_stored_again(tmp_path):
    server = start(tmp_path / "s", idempotency={"max_keys": 2})
    try:
        first = post(server, {"sensor_value": 1, "msg_id": "e-1"})
        post(server, {"sensor_value": 2, "msg_id": "e-2"})
        post(server, {"sensor_value": 3, "msg_id": "e-3"})
        again = post(server, {"sensor_value": 1, "msg_id": "e-1"})
        assert again.json()["ids"] != first.json()["ids"]
        assert metric(server, "ingestd_idempotency_evictions_total") >= 1
    finally:
        stop(server)


def test_concurrent_requests_one_key(tmp_path):
    server = start(tmp_path / "s")
    try:
        barrier = threading.Barrier(8)
        results = []

        def send():
            barrier.wait(timeout=10)
            results.append(post(server, [{"sensor_value": 9}] * 3,
                                key="together"))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        statuses = sorted(r.status_code for r in results)
        assert len(statuses) == 8
        assert set(statuses) <= {202, 409}, statuses
        bodies = {json.dumps(r.json()) for r in results
                  if r.status_code == 202}
        assert len(bodies) == 1
        for r in results:
            if r.status_code == 409:
                assert r.json()["error"] == "idempotency_key_in_progress"
                assert "Retry-After" in r.headers
        ids = json.loads(bodies.pop())["ids"]
        server.wait_for_ids(ids)
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "together") == set(ids)
    finally:
        stop(server)


def mqtt_client(server, client_id, clean=True):
    c = mqtt_raw.Client(server.mqtt_port)
    props = () if clean else ((mqtt_raw.PROP_SESSION_EXPIRY, 600),)
    ack = c.connect(client_id, "dev-1", server.keys["dev-1"], clean=clean,
                    properties=props)
    assert ack.reason == 0, ack
    return c


def test_mqtt_user_property_repeat(tmp_path):
    server = start(tmp_path / "s")
    try:
        topic = "devices/dev-1/data"
        payload = json.dumps({"sensor_value": 4, "marker": "mqtt-prop"})
        prop = ((mqtt_raw.PROP_USER_PROPERTY, ("idempotency-key", "mk-1")),)
        with mqtt_client(server, "prop-client") as c:
            for packet_id in (1, 2):
                c.send(mqtt_raw.publish(topic, payload, qos=1,
                                        packet_id=packet_id,
                                        properties=prop))
                ack = c.read()
                assert ack.type == mqtt_raw.PUBACK
                assert ack.reason == 0, ack
        time.sleep(SETTLE_S)
        assert len(ids_for_key(server, "mk-1")) == 1
        assert len(records_with(server, "mqtt-prop")) == 1
        text = server.metrics()
        assert 'ingestd_idempotency_hits_total{protocol="mqtt"} 1' in text
    finally:
        stop(server)


def wait_for_marker(server, marker, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not records_with(server, marker):
        assert time.monotonic() < deadline, f"{marker} never stored"
        time.sleep(0.05)


def test_mqtt_qos1_dup_after_reconnect(tmp_path):
    server = start(tmp_path / "s")
    try:
        topic = "devices/dev-1/data"
        payload = json.dumps({"sensor_value": 4, "marker": "dup-1"})
        c = mqtt_client(server, "dup-client", clean=False)
        c.send(mqtt_raw.publish(topic, payload, qos=1, packet_id=7))
        # The connection drops before the client read its PUBACK.
        c.close()
        wait_for_marker(server, "dup-1")
        with mqtt_client(server, "dup-client", clean=False) as c:
            c.send(mqtt_raw.publish(topic, payload, qos=1, packet_id=7,
                                    dup=True))
            ack = c.read()
            assert (ack.type, ack.packet_id, ack.reason) == (
                mqtt_raw.PUBACK, 7, 0)
            # Without DUP, the same packet id is a new message.
            c.send(mqtt_raw.publish(
                topic, json.dumps({"sensor_value": 5, "marker": "dup-2"}),
                qos=1, packet_id=7))
            assert c.read().reason == 0
        wait_for_marker(server, "dup-2")
        time.sleep(SETTLE_S)
        assert len(records_with(server, "dup-1")) == 1
        assert len(records_with(server, "dup-2")) == 1
    finally:
        stop(server)


def test_websocket_envelope_repeat(tmp_path):
    server = start(tmp_path / "s")

    async def exchange():
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        headers = {"Authorization": f"Bearer {server.keys['dev-1']}"}
        message = {"id": 1, "idempotency_key": "w-1",
                   "readings": [{"sensor_value": 1}, {"sensor_value": 2}]}
        async with websockets.connect(url, extra_headers=headers,
                                      open_timeout=5, close_timeout=5,
                                      ping_interval=None) as ws:
            replies = []
            for n in (1, 2):
                message["id"] = n
                await ws.send(json.dumps(message))
                replies.append(json.loads(
                    await asyncio.wait_for(ws.recv(), 10)))
            bad = dict(message, id=3, idempotency_key=5)
            await ws.send(json.dumps(bad))
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return replies

    try:
        first, second, bad = asyncio.run(asyncio.wait_for(exchange(), 30))
        assert first["type"] == "ack", first
        assert second["type"] == "ack", second
        assert second["id"] == 2
        assert second["ids"] == first["ids"]
        assert bad["type"] == "error"
        assert bad["error"] == "invalid_envelope"
        server.wait_for_ids(first["ids"])
        time.sleep(SETTLE_S)
        assert ids_for_key(server, "w-1") == set(first["ids"])
    finally:
        stop(server)


def test_disabled_ignores_keys(tmp_path):
    server = start(tmp_path / "s", idempotency={"enabled": False})
    try:
        a = post(server, {"sensor_value": 1, "msg_id": "same"}, key="k")
        b = post(server, {"sensor_value": 1, "msg_id": "same"}, key="k")
        assert a.status_code == b.status_code == 202
        assert a.json()["ids"] != b.json()["ids"]
        assert not (server.data_dir / "idempotency").exists()
    finally:
        stop(server)


def test_envelope_carries_key(tmp_path):
    server = start(tmp_path / "s")
    try:
        r = post(server, {"sensor_value": 1}, key=str(uuid.uuid4()))
        server.wait_for_ids(r.json()["ids"])
        record = [x for x in server.output_records()
                  if x["message_id"] == r.json()["ids"][0]][0]
        keys = list(record)
        assert keys.index("idempotency_key") < keys.index("payload")
    finally:
        stop(server)


def test_turning_off_removes_its_spool_cursor(tmp_path):
    """The index's spool cursor would hold back spool cleanup for ever once
    idempotency is off, so a start with it off removes the cursor."""
    from conftest import wait_ready, write_config

    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    key = add_device("dev-1", config)
    cursor = tmp_path / "data" / "spool" / "cursors" / "idempotency"
    log = tmp_path / "ingestd.log"

    def run_once():
        with open(log, "ab") as log_file:
            proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                    stdout=log_file,
                                    stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, f"http://127.0.0.1:{admin_port}", log)
            r = requests.post(f"http://127.0.0.1:{port}/v1/data",
                              json={"sensor_value": 1},
                              headers={"Authorization": f"Bearer {key}",
                                       "Idempotency-Key": str(uuid.uuid4())},
                              timeout=5)
            assert r.status_code == 202
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    run_once()
    assert cursor.exists()
    with open(config, "a") as f:
        f.write("idempotency:\n  enabled: false\n")
    run_once()
    assert not cursor.exists()
    assert "removed the idempotency spool cursor" in log.read_text()
