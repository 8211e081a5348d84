"""The failed-authentication limit per source address, across HTTP,
WebSocket and MQTT.

The server allows 10 failures a minute and blocks for 3 s. Clients from
127.0.0.2 (loopback too) check that a block holds for one address only.
"""

import asyncio
import http.client
import json
import socket
import subprocess
import time

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

import mqtt_raw
from conftest import binary, finish, start_server, stop, wait_ready

MAX_FAILURES = 10
BLOCK_S = 3
BAD_KEY = "ik_" + "A" * 43


@pytest.fixture
def server(tmp_path):
    """A server with the limit under test. conftest writes a high limit, so
    the server restarts with the config edited."""
    s = start_server(tmp_path / "guard")
    finish(s)
    s.config.write_text(s.config.read_text().replace(
        "  max_failures_per_minute: 100000\n",
        f"  max_failures_per_minute: {MAX_FAILURES}\n"
        f"  block_duration: {BLOCK_S}s\n"))
    with open(s.log, "ab") as log_file:
        s.proc = subprocess.Popen([binary(), "serve", "-c", str(s.config)],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_ready(s.proc, s.admin_url, s.log)
    except BaseException:
        stop(s)
        raise
    yield s
    finish(s)


def post(server, key, source="127.0.0.1"):
    """POST one reading from `source` and return (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("POST", "/v1/data", body=json.dumps({"sensor_value": 1}),
                     headers={"Content-Type": "application/json",
                              "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def block_address(server):
    for i in range(MAX_FAILURES):
        status, _, _ = post(server, BAD_KEY)
        assert status == 401, f"attempt {i + 1} got {status}"


def test_http_block_after_failures(server):
    good = server.keys["dev-1"]
    block_address(server)
    status, headers, body = post(server, BAD_KEY)
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= BLOCK_S
    assert json.loads(body)["error"] == "too_many_auth_failures"
    # The credential is not even checked while blocked.
    status, _, _ = post(server, good)
    assert status == 429
    # Another source address is not affected.
    status, _, body = post(server, good, source="127.0.0.2")
    assert status == 202, body
    metrics = server.metrics()
    assert "ingestd_auth_blocked_total 2" in metrics
    assert "ingestd_auth_guard_entries 1" in metrics
    # The block ends after block_duration, and a success does not clear
    # the failures that come after it.
    deadline = time.monotonic() + BLOCK_S + 10
    while post(server, good)[0] != 202:
        assert time.monotonic() < deadline, "the block never ended"
        time.sleep(0.25)


def test_mqtt_and_ws_blocked(server):
    block_address(server)
    with mqtt_raw.Client(server.mqtt_port) as c:
        ack = c.connect("blocked", "dev-1", server.keys["dev-1"])
        assert ack.reason == 0x9F, ack
        assert "too_many_auth_failures" in ack.reason_string
    with mqtt_raw.Client(server.mqtt_port, version=mqtt_raw.V311) as c:
        c.send(mqtt_raw.connect("blocked-311", "dev-1",
                                server.keys["dev-1"],
                                version=mqtt_raw.V311))
        assert c.closed()

    async def ws_first_message():
        async with websockets.connect(
                f"ws://127.0.0.1:{server.port}/v1/ws", open_timeout=5,
                close_timeout=5, ping_interval=None) as ws:
            await ws.send(json.dumps({"type": "auth",
                                      "key": server.keys["dev-1"]}))
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return info.value.code

    assert asyncio.run(asyncio.wait_for(ws_first_message(), 20)) == 1008

    # MQTT from another address still connects.
    sock = socket.create_connection(("127.0.0.1", server.mqtt_port),
                                    timeout=5,
                                    source_address=("127.0.0.2", 0))
    client = mqtt_raw.Client.__new__(mqtt_raw.Client)
    client.version, client.sock, client.buf = mqtt_raw.V5, sock, b""
    with client:
        ack = client.connect("other-address", "dev-1", server.keys["dev-1"])
        assert ack.reason == 0, ack


def test_mqtt_failures_count(server):
    for i in range(MAX_FAILURES):
        with mqtt_raw.Client(server.mqtt_port) as c:
            ack = c.connect(f"bad-{i}", "dev-1", BAD_KEY)
            assert ack.reason == 0x86, ack
    status, _, _ = post(server, server.keys["dev-1"])
    assert status == 429
