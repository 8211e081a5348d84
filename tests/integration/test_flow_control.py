"""Flow control end to end: rate limits and quotas per protocol, device
limits from the registry, connection limits and storms, and the spool's
high and low marks.

Every check uses a real client (requests, raw MQTT packets, websockets,
redis-server) against the real binary on loopback. Loads are bounded in
count; waits are bounded in time.
"""

import asyncio
import datetime
import json
import signal
import socket
import threading
import time

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed

import mqtt_raw as raw
from brokers import Redis
from conftest import finish, free_port, run_cli
from flow_server import metric, post, start_flow_server

METER = {"readings_per_second": 5, "burst": 5}


@pytest.fixture
def flow_factory(tmp_path):
    """Starts servers with flow_server settings and stops them after."""
    servers = []

    def make(**kwargs):
        server = start_flow_server(tmp_path / f"server{len(servers)}",
                                   **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        finish(server)


def reading(value=1.0):
    return {"sensor_value": value}


def mqtt_client(server, device, version=raw.V5, client_id=None):
    """Connect a raw MQTT client as `device` and return it."""
    c = raw.Client(server.mqtt_port, version=version)
    ack = c.connect(client_id or f"{device}-{time.monotonic_ns()}", device,
                    server.keys[device])
    assert ack.type == raw.CONNACK
    assert ack.reason == 0, ack
    return c


def seconds_to_utc_midnight():
    now = datetime.datetime.now(datetime.timezone.utc)
    tomorrow = (now + datetime.timedelta(days=1)).replace(
        hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


# ---- rate limits and quotas, per protocol ----

def test_http_rate_limit_answers_429(flow_factory):
    server = flow_factory(devices={"m1": "meter", "free": "default"},
                          types={"meter": METER})
    statuses = [post(server, "m1", [reading()]).status_code
                for _ in range(5)]
    assert statuses == [202] * 5
    resp = post(server, "m1", [reading()])
    assert resp.status_code == 429
    assert resp.json()["error"] == "rate_limited"
    assert resp.headers["Retry-After"] == "1"
    # A device type without limits is not affected.
    for _ in range(20):
        assert post(server, "free", [reading()]).status_code == 202
    assert metric(server, "ingestd_rejected_total", protocol="http",
                  reason="rate_limited") == 1


def test_http_daily_quota_answers_429(flow_factory):
    server = flow_factory(devices={"q1": "quota"},
                          types={"quota": {"daily_readings": 3}})
    assert post(server, "q1", [reading(), reading()]).status_code == 202
    # Two more would exceed 3, and the request is all or nothing.
    resp = post(server, "q1", [reading(), reading()])
    assert resp.status_code == 429
    assert resp.json()["error"] == "quota_exceeded"
    retry = int(resp.headers["Retry-After"])
    assert abs(retry - seconds_to_utc_midnight()) < 5
    assert post(server, "q1", [reading()]).status_code == 202
    assert post(server, "q1", [reading()]).status_code == 429
    assert metric(server, "ingestd_rejected_total", protocol="http",
                  reason="quota_exceeded") == 2


def test_registry_overrides_type_limits(flow_factory):
    server = flow_factory(devices={"m2": "meter"},
                          types={"meter": {"readings_per_second": 1000}})
    run_cli("device", "set-limits", "m2", "--readings-per-second", "2",
            "--burst", "2", config=server.config)
    shown = run_cli("device", "show", "m2", config=server.config)
    assert "limit readings_per_second 2" in shown
    assert "limit daily_readings      from the device type" in shown
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        statuses = [post(server, "m2", [reading()]).status_code
                    for _ in range(3)]
        if statuses[-1] == 429:
            break
        assert time.monotonic() < deadline, "override not applied"
        time.sleep(0.5)
    run_cli("device", "set-limits", "m2", "--clear", config=server.config)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        time.sleep(1.1)
        statuses = [post(server, "m2", [reading()]).status_code
                    for _ in range(4)]
        if statuses == [202] * 4:
            break
        assert time.monotonic() < deadline, "override not cleared"


def test_set_limits_rejects_bad_values(flow_factory):
    server = flow_factory(devices={"m3": "default"})
    import subprocess
    from conftest import binary
    proc = subprocess.run(
        [binary(), "device", "set-limits", "m3", "--burst", "lots", "-c",
         str(server.config)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--burst: expected a whole number" in proc.stderr
    proc = subprocess.run(
        [binary(), "device", "set-limits", "nobody", "--burst", "3", "-c",
         str(server.config)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "not found" in proc.stderr


def test_mqtt5_rate_limit_and_quota_codes(flow_factory):
    server = flow_factory(devices={"m1": "meter", "q1": "quota"},
                          types={"meter": METER,
                                 "quota": {"daily_readings": 2}})
    with mqtt_client(server, "m1") as c:
        for i in range(1, 9):
            c.send(raw.publish("devices/m1/data", json.dumps(reading()),
                               qos=1, packet_id=i))
        acks = [c.read() for _ in range(8)]
    codes = [a.reason for a in acks]
    assert codes[:5] == [0] * 5
    # PUBACK may not carry 0x96 (Message rate too high), so a rate limit
    # is 0x97 too, and the reason string distinguishes it from the quota.
    assert codes[5:] == [0x97] * 3
    assert acks[5].reason_string.startswith("rate_limited")
    with mqtt_client(server, "q1") as c:
        for i in range(1, 4):
            c.send(raw.publish("devices/q1/data", json.dumps(reading()),
                               qos=1, packet_id=i))
        codes = [c.read().reason for _ in range(3)]
    assert codes == [0, 0, 0x97]
    assert metric(server, "ingestd_rejected_total", protocol="mqtt",
                  reason="rate_limited") == 3


@pytest.mark.parametrize("version,qos", [(raw.V311, 1), (raw.V5, 0)])
def test_mqtt_held_messages_wait_not_drop(flow_factory, version, qos):
    # 3.1.1 has no reason code to ask for a retry and QoS 0 has no
    # acknowledgement, so messages over the rate wait for tokens and are
    # all stored.
    server = flow_factory(devices={"m1": "slow"},
                          types={"slow": {"readings_per_second": 10,
                                          "burst": 2}})
    count = 12
    with mqtt_client(server, "m1", version=version) as c:
        for i in range(1, count + 1):
            c.send(raw.publish("devices/m1/data",
                               json.dumps(reading(float(i))), qos=qos,
                               packet_id=i, version=version))
        if qos == 1:
            acks = [c.read(timeout=10) for _ in range(count)]
            assert [a.packet_id for a in acks] == list(range(1, count + 1))
    deadline = time.monotonic() + 10
    while len(server.output_records()) < count:
        assert time.monotonic() < deadline, "held messages not stored"
        time.sleep(0.1)
    values = sorted(r["payload"]["sensor_value"]
                    for r in server.output_records())
    assert values == [float(i) for i in range(1, count + 1)]
    assert metric(server, "ingestd_throttled_total", protocol="mqtt",
                  reason="rate_limited") >= 1
    assert metric(server, "ingestd_rejected_total", protocol="mqtt",
                  reason="rate_limited") == 0


def ws_url(server):
    return f"ws://127.0.0.1:{server.port}/v1/ws"


def test_websocket_rate_limit_error_then_resume(flow_factory):
    server = flow_factory(devices={"m1": "slow"},
                          types={"slow": {"readings_per_second": 1,
                                          "burst": 1}})

    async def main():
        headers = {"Authorization": f"Bearer {server.keys['m1']}"}
        async with websockets.connect(ws_url(server), extra_headers=headers,
                                      open_timeout=5) as ws:
            replies = []
            for i in range(3):
                await ws.send(json.dumps({"id": i, "readings": [reading()]}))
            for _ in range(3):
                replies.append(json.loads(
                    await asyncio.wait_for(ws.recv(), 10)))
            return replies

    replies = asyncio.run(main())
    assert replies[0]["type"] == "ack"
    assert replies[1]["type"] == "error"
    assert replies[1]["error"] == "rate_limited"
    assert replies[1]["retry_after"] == 1
    # The third message is read only after the pause, when a token is
    # back, so it is stored.
    assert replies[2]["type"] == "ack"


# ---- connection limits ----

def test_mqtt_device_connection_limit(flow_factory):
    server = flow_factory(devices={"d1": "default"},
                          limits={"max_connections_per_device": 1})
    first = mqtt_client(server, "d1", client_id="d1-a")
    try:
        with raw.Client(server.mqtt_port) as c:
            ack = c.connect("d1-b", "d1", server.keys["d1"])
            assert ack.reason == 0x97
            assert c.closed()
        with raw.Client(server.mqtt_port, version=raw.V311) as c:
            ack = c.connect("d1-c", "d1", server.keys["d1"])
            assert ack.reason == 0x03
        # The same client id takes the session over, as MQTT requires.
        with raw.Client(server.mqtt_port) as c:
            ack = c.connect("d1-a", "d1", server.keys["d1"])
            assert ack.reason == 0
            gone = first.read()
            assert gone.type == raw.DISCONNECT
            assert gone.reason == 0x8E
    finally:
        first.close()
    # Once both are closed the device may connect again. The server may
    # still be closing the old session on the first tries, and each of
    # those is rejected and counted too.
    deadline = time.monotonic() + 5
    early = 0
    while True:
        with raw.Client(server.mqtt_port) as c:
            if c.connect("d1-d", "d1", server.keys["d1"]).reason == 0:
                break
        early += 1
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert metric(server, "ingestd_rejected_total", protocol="mqtt",
                  reason="device_connection_limit") == 2 + early


def test_websocket_device_connection_limit(flow_factory):
    server = flow_factory(devices={"d1": "default"},
                          limits={"max_connections_per_device": 1})

    async def main():
        headers = {"Authorization": f"Bearer {server.keys['d1']}"}
        async with websockets.connect(ws_url(server), extra_headers=headers,
                                      open_timeout=5) as first:
            await first.send(json.dumps({"readings": [reading()]}))
            assert json.loads(await first.recv())["type"] == "ack"
            async with websockets.connect(ws_url(server),
                                          extra_headers=headers,
                                          open_timeout=5) as second:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(second.recv(), 5)
                return closed.value.rcvd.code

    assert asyncio.run(main()) == 1008
    assert metric(server, "ingestd_rejected_total", protocol="ws",
                  reason="device_connection_limit") == 1


def test_total_connection_limit_spans_listeners(flow_factory):
    server = flow_factory(devices={"d1": "default"},
                          limits={"max_connections": 2})
    mqtt = mqtt_client(server, "d1")
    held = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        resp = requests.get(server.base_url + "/v1/data", timeout=5)
        assert resp.status_code == 503
        assert resp.json()["error"] == "too_many_connections"
        with raw.Client(server.mqtt_port) as c:
            assert c.closed()
    finally:
        held.close()
        mqtt.close()
    assert metric(server, "ingestd_rejected_total", protocol="http",
                  reason="too_many_connections") >= 1


STORM_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 8)]
STORM_PER_ADDRESS = 500  # 3,000 connects in all


def storm(server, address, results):
    """Open STORM_PER_ADDRESS connections from `address` as fast as
    possible, each sending one request, and count the response statuses."""
    key = server.keys["storm"]
    body = json.dumps([reading()])
    request = (f"POST /v1/data HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               f"{body}").encode()
    counts = {}
    for _ in range(STORM_PER_ADDRESS):
        status = "error"
        try:
            with socket.create_connection((server.host, server.port),
                                          timeout=10,
                                          source_address=(address, 0)) as s:
                s.sendall(request)
                head = s.recv(64)
                status = head.split(b" ")[1].decode() if head else "closed"
        except OSError:
            status = "error"
        counts[status] = counts.get(status, 0) + 1
    results[address] = counts


def test_connection_storm_keeps_good_clients(flow_factory):
    server = flow_factory(devices={"storm": "default", "good": "default"},
                          http={"workers": 2},
                          limits={"connection_rate_per_address": 50,
                                  "connection_burst_per_address": 50})
    results = {}
    threads = [threading.Thread(target=storm, args=(server, a, results))
               for a in STORM_ADDRESSES]
    start = time.monotonic()
    for t in threads:
        t.start()

    good = []
    with requests.Session() as session:
        while any(t.is_alive() for t in threads):
            good.append(post(server, "good", [reading()], session=session)
                        .status_code)
            time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - start

    total = {}
    for counts in results.values():
        for status, n in counts.items():
            total[status] = total.get(status, 0) + n
    print(f"storm: {total} in {elapsed:.1f} s; good client: "
          f"{len(good)} requests")
    assert sum(total.values()) == len(STORM_ADDRESSES) * STORM_PER_ADDRESS
    assert set(total) <= {"202", "429"}, total
    for address, counts in results.items():
        # At most the burst plus the rate over the storm's duration.
        assert counts.get("202", 0) <= 50 + 50 * (elapsed + 1), address
        assert counts.get("429", 0) > 0, address
    # The good client keeps one connection, so no rate applies to it.
    assert good and all(s == 202 for s in good)
    assert metric(server, "ingestd_rejected_total", protocol="http",
                  reason="connection_rate") == total["429"]


def test_mqtt_connection_rate_connack_9f(flow_factory):
    server = flow_factory(devices={"d1": "default"},
                          limits={"connection_rate_per_address": 1,
                                  "connection_burst_per_address": 2})
    codes = []
    for i in range(4):
        with raw.Client(server.mqtt_port) as c:
            codes.append(c.connect(f"c{i}", "d1", server.keys["d1"]).reason)
    assert codes[:2] == [0, 0]
    assert 0x9F in codes[2:]


# ---- spool high and low marks ----

def test_spool_marks_pause_and_resume(flow_factory, tmp_path):
    # A Redis sink whose server is not running yet delivers nothing, so
    # the spool only grows until it passes its high mark.
    redis = Redis(tmp_path / "redis")
    server = flow_factory(
        devices={"d1": "default", "d2": "default"},
        spool={"max_size": "256KiB", "segment_size": "64KiB",
               "high_mark": 60, "low_mark": 30},
        sink=["  - name: r", "    type: redis",
              f"    address: {redis.address}", "    timeout: 1s",
              "    retry_min: 100ms", "    retry_max: 300ms"])
    batch = [{"sensor_value": 1, "pad": "z" * 400} for _ in range(15)]
    resp = None
    accepted = 0
    with requests.Session() as session:
        for _ in range(100):
            resp = post(server, "d1", batch, session=session)
            if resp.status_code != 202:
                break
            accepted += 1
    assert resp.status_code == 503
    assert resp.json()["error"] == "spool_full"
    assert accepted >= 10
    ready = requests.get(server.admin_url + "/readyz", timeout=5)
    assert ready.status_code == 503
    assert "spool congested" in ready.text
    assert metric(server, "ingestd_spool_congested") == 1

    # A 3.1.1 PUBACK has no reason code, so the message waits unread.
    waiting = mqtt_client(server, "d2", version=raw.V311)
    waiting.send(raw.publish("devices/d2/data", json.dumps(reading()),
                             qos=1, packet_id=7, version=raw.V311))
    with pytest.raises(socket.timeout):
        waiting.read(timeout=1)
    # A 5.0 QoS 1 message gets Quota exceeded.
    with mqtt_client(server, "d2") as c:
        c.send(raw.publish("devices/d2/data", json.dumps(reading()), qos=1,
                           packet_id=1))
        assert c.read().reason == 0x97

    try:
        redis.start()
        ack = waiting.read(timeout=30)
        assert ack.type == raw.PUBACK
        assert ack.packet_id == 7
        deadline = time.monotonic() + 30
        while post(server, "d1", [reading()]).status_code != 202:
            assert time.monotonic() < deadline, "spool never drained"
            time.sleep(0.2)
        assert requests.get(server.admin_url + "/readyz",
                            timeout=5).status_code == 200
        assert metric(server, "ingestd_spool_congested") == 0
        assert metric(server, "ingestd_rejected_total", protocol="http",
                      reason="spool_full") >= 1
    finally:
        waiting.close()
        redis.stop()
