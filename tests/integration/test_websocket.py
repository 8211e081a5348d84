"""WebSocket endpoint GET /v1/ws: handshake, authentication, messages,
protocol errors, shutdown and a SIGKILL crash test.

Clients are python3-websockets 10.4 (Debian 12), whose asyncio client runs
under asyncio.run in each test with bounded timeouts. Frames that the
library refuses to send (invalid UTF-8, unmasked frames) go over a raw
socket with our own framing.
"""

import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatusCode

from conftest import (add_device, binary, free_port, run_cli, stop,
                      wait_ready, write_config, Server)

TIMEOUT_S = 20

# Short timers so that ping, idle and authentication timeouts show within
# a test. Clients of the websockets library reply pings on their own.
WS_SETTINGS = {
    "max_message_size": "4KiB",
    "idle_timeout": "2s",
    "ping_interval": "500ms",
    "auth_timeout": "1s",
}

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def write_ws_config(folder, port, admin_port, ws=None, **kwargs):
    """Write a config file with a ws section and return its path."""
    path = write_config(folder, port, admin_port, **kwargs)
    lines = ["ws:"]
    lines += [f"  {k}: {v}" for k, v in dict(WS_SETTINGS, **(ws or {})).items()]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return path


def start_ws_server(folder, ws=None, devices=("dev-1", "dev-2"),
                    disabled=("dev-off",), **kwargs):
    """Start ingestd with WS_SETTINGS and return a Server once ready."""
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config = write_ws_config(folder, port, admin_port, ws=ws, **kwargs)
    keys = {d: add_device(d, config) for d in (*devices, *disabled)}
    for d in disabled:
        run_cli("device", "disable", d, config=config)
    log = folder / "ingestd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(host="127.0.0.1", port=port, admin_port=admin_port,
                    base_url=f"http://127.0.0.1:{port}",
                    admin_url=f"http://127.0.0.1:{admin_port}", keys=keys,
                    data_dir=folder / "data", config=config, log=log,
                    proc=proc)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    return server


def finish(server):
    code = stop(server)
    assert code == 0, (
        f"ingestd exited with {code} after SIGTERM; its log:\n"
        f"{server.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_ws_server(tmp_path_factory.mktemp("ws"))
    yield s
    finish(s)


@pytest.fixture
def ws_factory(tmp_path):
    servers = []

    def make(**kwargs):
        s = start_ws_server(tmp_path / f"server{len(servers)}", **kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        finish(s)


def run(coro):
    """Run `coro` to completion, failing after TIMEOUT_S."""
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def ws_url(server, path="/v1/ws"):
    return f"ws://127.0.0.1:{server.port}{path}"


def connect(server, key=None, header="Authorization", **kwargs):
    """Open a websockets connection, with the key in `header` if given."""
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" \
            else key
    return websockets.connect(ws_url(server), extra_headers=headers,
                              open_timeout=5, close_timeout=5,
                              ping_interval=None, **kwargs)


async def request(ws, message):
    """Send `message` (JSON-encoded unless str or bytes) and return the
    decoded reply."""
    if not isinstance(message, (str, bytes)):
        message = json.dumps(message)
    await ws.send(message)
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def expect_close(ws):
    """Read until the server closes; return (code, reason)."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return info.value.code, info.value.reason


def reading(value=42.5, **extra):
    return dict({"sensor_value": value}, **extra)


def handshake_headers(**override):
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in override.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


# ---- Raw frames ----

def encode_frame(opcode, payload, fin=True, mask=True):
    """Build one frame; client frames are masked unless `mask` is false."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


class RawClient:
    """A WebSocket client on a plain socket, for frames that a library
    would not send."""

    def __init__(self, server, key=None, after_request=b""):
        self.sock = socket.create_connection((server.host, server.port),
                                             timeout=5)
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /v1/ws HTTP/1.1",
            f"Host: 127.0.0.1:{server.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
        ]
        if key is not None:
            lines.append(f"Authorization: Bearer {key}")
        request_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.sock.sendall(request_bytes + after_request)
        head = b""
        # One byte at a time, so that no frame is read with the head.
        while not head.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            assert byte, f"connection closed during the handshake: {head!r}"
            head += byte
        self.head = head.decode()
        self.status = int(self.head.split()[1])

    def expected_accept(self):
        digest = hashlib.sha1(self.key.encode() + ACCEPT_GUID).digest()
        return base64.b64encode(digest).decode()

    def send(self, opcode, payload, **kwargs):
        self.sock.sendall(encode_frame(opcode, payload, **kwargs))

    def read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of "
                               f"{n} bytes")
            data += chunk
        return data

    def read_frame(self):
        """Return (opcode, payload) of the next frame from the server."""
        b0, b1 = self.read_exact(2)
        assert not b1 & 0x80, "a server frame was masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.read_exact(8))[0]
        return b0 & 0x0F, self.read_exact(n)

    def read_close(self):
        """Skip data and ping frames; return the close code and reason."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if payload else None
                return code, payload[2:].decode()

    def close(self):
        self.sock.close()


# ---- Handshake ----

def test_handshake_returns_accept_key(server):
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        assert client.status == 101, client.head
        assert f"Sec-WebSocket-Accept: {client.expected_accept()}\r\n" in \
            client.head
        assert "Upgrade: websocket\r\n" in client.head
        assert "Content-Length" not in client.head
    finally:
        client.close()


def test_frames_sent_with_handshake_are_read(server):
    payload = json.dumps(reading(1)).encode()
    client = RawClient(server, key=server.keys["dev-1"],
                       after_request=encode_frame(OP_TEXT, payload))
    try:
        assert client.status == 101, client.head
        opcode, reply = client.read_frame()
        assert opcode == OP_TEXT
        assert json.loads(reply)["type"] == "ack", reply
    finally:
        client.close()


@pytest.mark.parametrize("missing,header_named", [
    ("Upgrade", "Upgrade"),
    ("Connection", "Connection"),
    ("Sec-WebSocket-Key", "Sec-WebSocket-Key"),
    ("Sec-WebSocket-Version", "Sec-WebSocket-Version"),
])
def test_handshake_missing_header_400(server, missing, header_named):
    headers = handshake_headers(**{missing.replace("-", "_"): None})
    r = requests.get(server.base_url + "/v1/ws", headers=headers, timeout=5)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_handshake"
    assert header_named in body["message"]


def test_handshake_invalid_key_400(server):
    headers = handshake_headers(Sec_WebSocket_Key="c2hvcnQ=")
    r = requests.get(server.base_url + "/v1/ws", headers=headers, timeout=5)
    assert r.status_code == 400, r.text
    assert "Sec-WebSocket-Key" in r.json()["message"]


def test_handshake_wrong_version_426(server):
    headers = handshake_headers(Sec_WebSocket_Version="8")
    r = requests.get(server.base_url + "/v1/ws", headers=headers, timeout=5)
    assert r.status_code == 426, r.text
    assert r.headers["Sec-WebSocket-Version"] == "13"
    assert r.json()["error"] == "unsupported_version"


def test_post_to_ws_is_405(server):
    r = requests.post(server.base_url + "/v1/ws", json={}, timeout=5)
    assert r.status_code == 405, r.text
    assert r.headers["Allow"] == "GET"


@pytest.mark.parametrize("query", ["key=ik_abc", "x=1&api_key=ik_abc",
                                   "API_KEY=ik_abc"])
def test_key_in_url_400(server, query):
    r = requests.get(f"{server.base_url}/v1/ws?{query}",
                     headers=handshake_headers(), timeout=5)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "key_in_url"
    assert "header" in body["message"]
    assert "auth" in body["message"]


def test_unknown_header_key_401(server):
    async def main():
        with pytest.raises(InvalidStatusCode) as info:
            async with connect(server, "ik_" + "A" * 43):
                pass
        return info.value.status_code

    assert run(main()) == 401


def test_disabled_device_header_key_403(server):
    async def main():
        with pytest.raises(InvalidStatusCode) as info:
            async with connect(server, server.keys["dev-off"]):
                pass
        return info.value.status_code

    assert run(main()) == 403


# ---- Authentication ----

def test_header_auth_ack_lands_in_sink(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            return await request(ws, reading(12, device_id="dev-1"))

    reply = run(main())
    assert reply["type"] == "ack", reply
    assert reply["id"] is None
    assert len(reply["ids"]) == 1
    server.wait_for_ids(reply["ids"])
    record = next(r for r in server.output_records()
                  if r["message_id"] == reply["ids"][0])
    assert record["protocol"] == "ws"
    assert record["device_id"] == "dev-1"
    assert record["payload"] == reading(12, device_id="dev-1")


def test_x_api_key_header_auth(server):
    async def main():
        async with connect(server, server.keys["dev-2"],
                           header="X-API-Key") as ws:
            return await request(ws, reading(3))

    reply = run(main())
    assert reply["type"] == "ack", reply


def test_first_message_auth(server):
    async def main():
        async with connect(server) as ws:
            ok = await request(ws, {"type": "auth",
                                    "key": server.keys["dev-2"]})
            ack = await request(ws, reading(4))
            return ok, ack

    ok, ack = run(main())
    assert ok == {"type": "auth_ok", "device_id": "dev-2"}
    assert ack["type"] == "ack", ack
    server.wait_for_ids(ack["ids"])


@pytest.mark.parametrize("first", [
    json.dumps({"type": "auth", "key": "ik_" + "B" * 43}),
    json.dumps({"type": "auth", "key": 5}),
    json.dumps(reading(5)),
    "not json",
])
def test_bad_first_message_closes_1008(server, first):
    async def main():
        async with connect(server) as ws:
            await ws.send(first)
            return await expect_close(ws)

    code, reason = run(main())
    assert code == 1008
    assert reason


def test_disabled_device_first_message_closes_1008(server):
    async def main():
        async with connect(server) as ws:
            await ws.send(json.dumps({"type": "auth",
                                      "key": server.keys["dev-off"]}))
            return await expect_close(ws)

    code, reason = run(main())
    assert code == 1008
    assert "disabled" in reason


def test_binary_first_message_closes_1008(server):
    async def main():
        async with connect(server) as ws:
            await ws.send(b"\x01\x02")
            return await expect_close(ws)

    code, _ = run(main())
    assert code == 1008


def test_auth_timeout_closes_1008(server):
    async def main():
        async with connect(server) as ws:
            return await expect_close(ws)

    code, reason = run(main())
    assert code == 1008
    assert "timed out" in reason


def test_disabling_device_closes_open_connection(ws_factory):
    s = ws_factory()

    async def main():
        async with connect(s, s.keys["dev-1"]) as ws:
            first = await request(ws, reading(1))
            run_cli("device", "disable", "dev-1", config=s.config)
            # SIGHUP reloads the registry at once.
            s.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            await ws.send(json.dumps(reading(2)))
            return first, await expect_close(ws)

    first, (code, reason) = run(main())
    assert first["type"] == "ack", first
    assert code == 1008
    assert "disabled" in reason


# ---- Messages ----

def test_array_of_readings(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            return await request(ws, [reading(1), reading(2), reading(3)])

    reply = run(main())
    assert reply["type"] == "ack", reply
    assert len(reply["ids"]) == 3
    assert len(set(reply["ids"])) == 3
    server.wait_for_ids(reply["ids"])


def test_envelope_correlation_ids(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            many = await request(ws, {"id": "batch-7",
                                      "readings": [reading(1), reading(2)]})
            one = await request(ws, {"id": 42, "reading": reading(3)})
            bad = await request(ws, {"id": "v-1",
                                     "readings": [reading(500)]})
            return many, one, bad

    many, one, bad = run(main())
    assert many["type"] == "ack" and many["id"] == "batch-7", many
    assert len(many["ids"]) == 2
    assert one["type"] == "ack" and one["id"] == 42, one
    assert len(one["ids"]) == 1
    assert bad["type"] == "error" and bad["id"] == "v-1", bad


def test_invalid_envelope(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            both = await request(ws, {"id": "e", "reading": reading(),
                                      "readings": []})
            not_array = await request(ws, {"readings": {}})
            bad_id = await request(ws, {"id": [1], "readings": [reading()]})
            scalar = await request(ws, "17")
            empty = await request(ws, [])
            return both, not_array, bad_id, scalar, empty

    both, not_array, bad_id, scalar, empty = run(main())
    assert both["error"] == "invalid_envelope" and both["id"] == "e", both
    assert not_array["error"] == "invalid_envelope", not_array
    assert bad_id["error"] == "invalid_envelope", bad_id
    assert scalar["error"] == "invalid_message", scalar
    assert empty["error"] == "empty_message", empty


def test_acks_keep_message_order_with_many_in_flight(server):
    count = 120

    def message(i):
        if i % 7 == 3:
            return {"id": f"m{i}", "reading": reading(500 + i)}
        return {"id": f"m{i}", "readings": [reading(i % 100), reading(1)]}

    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            # Everything goes out before the first reply is read, so
            # the server has many messages in flight and must stop
            # reading at its limit without dropping any.
            for i in range(count):
                await ws.send(json.dumps(message(i)))
            return [json.loads(await asyncio.wait_for(ws.recv(), 10))
                    for _ in range(count)]

    replies = run(main())
    assert [a["id"] for a in replies] == [f"m{i}" for i in range(count)]
    acked = []
    for i, a in enumerate(replies):
        expected = "error" if i % 7 == 3 else "ack"
        assert a["type"] == expected, (i, a)
        if expected == "ack":
            assert len(a["ids"]) == 2, a
            acked += a["ids"]
    server.wait_for_ids(acked)


def test_validation_error_names_json_pointer(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            bad = await request(ws, [reading(5), reading(120.5),
                                     {"sensor_value": "x"}, 7])
            good = await request(ws, reading(6))
            return bad, good

    bad, good = run(main())
    assert bad["type"] == "error", bad
    assert bad["error"] == "validation_failed"
    assert bad["id"] is None
    assert "nothing was stored" in bad["message"]
    by_index = {r["index"]: r["errors"] for r in bad["readings"]}
    assert sorted(by_index) == [1, 2, 3]
    assert by_index[1][0]["pointer"] == "/sensor_value"
    assert "100" in by_index[1][0]["reason"]
    assert by_index[2][0]["pointer"] == "/sensor_value"
    assert good["type"] == "ack", good


def test_device_mismatch(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            return await request(ws, [reading(1, device_id="dev-1"),
                                      reading(2, device_id="dev-2")])

    reply = run(main())
    assert reply["type"] == "error", reply
    assert reply["error"] == "device_mismatch"
    assert reply["readings"][0]["index"] == 1


def test_invalid_json_gives_position(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            bad = await request(ws, '{"sensor_value": 1,, }')
            good = await request(ws, reading(1))
            return bad, good

    bad, good = run(main())
    assert bad["type"] == "error", bad
    assert bad["error"] == "invalid_json"
    assert isinstance(bad["position"], int)
    assert "column" in bad["message"]
    assert good["type"] == "ack", good


def test_too_many_readings(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            return await request(ws, [{"sensor_value": 1}] * 21)

    reply = run(main())
    assert reply["error"] == "too_many_readings", reply


def test_binary_message_gets_error_frame(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            bad = await request(ws, b"\x00\x01")
            good = await request(ws, reading(1))
            return bad, good

    bad, good = run(main())
    assert bad["type"] == "error", bad
    assert bad["error"] == "binary_not_supported"
    assert "text" in bad["message"]
    assert good["type"] == "ack", good


def test_fragmented_message(server):
    text = json.dumps({"id": "frag", "readings": [reading(i)
                                                  for i in range(10)]})
    parts = [text[i:i + 16] for i in range(0, len(text), 16)]

    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            await ws.send(iter(parts))
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    reply = run(main())
    assert reply["type"] == "ack", reply
    assert reply["id"] == "frag"
    assert len(reply["ids"]) == 10


# ---- Protocol errors ----

def test_invalid_utf8_closes_1007(server):
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        client.send(OP_TEXT, b'{"sensor_value": "\xff\xfe"}')
        code, _ = client.read_close()
        assert code == 1007
    finally:
        client.close()


@pytest.mark.parametrize("frame", [
    encode_frame(OP_TEXT, b'{"sensor_value": 1}', mask=False),
    bytes([0xC1]) + encode_frame(OP_TEXT, b"{}")[1:],  # RSV1 set
    encode_frame(0x3, b"x"),  # reserved opcode
    encode_frame(0x0, b"x"),  # continuation with nothing to continue
], ids=["unmasked", "rsv1", "opcode3", "continuation"])
def test_protocol_error_closes_1002(server, frame):
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        client.sock.sendall(frame)
        code, _ = client.read_close()
        assert code == 1002
    finally:
        client.close()


def test_message_too_big_closes_1009(server):
    # 4 KiB is the limit; the message is split into fragments that are
    # small on their own.
    text = json.dumps([reading(i % 100, pad="x" * 200) for i in range(20)])
    assert len(text) > 4096
    parts = [text[i:i + 1000] for i in range(0, len(text), 1000)]

    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            await ws.send(iter(parts))
            return await expect_close(ws)

    code, _ = run(main())
    assert code == 1009


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS line for pid {pid}")


def send_fragments(client, count, payload=b" "):
    """Open a text message and send up to `count` continuation frames
    without FIN, in blocks; stop once the server stops reading."""
    client.send(OP_TEXT, b"[", fin=False)
    block = encode_frame(0x0, payload, fin=False) * 1000
    try:
        for _ in range(count // 1000):
            client.sock.sendall(block)
    except OSError:
        pass  # the server closed the connection: the limit worked


@pytest.mark.parametrize("payload", [b" ", b""], ids=["one_byte", "empty"])
def test_too_many_fragments_closes_1009(ws_factory, payload):
    # The message stays under max_message_size, also with the cost of each
    # frame, but 2,000 frames are over the default ws.max_fragments of
    # 1,024.
    server = ws_factory(ws={"max_message_size": "1MiB"})
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        client.send(OP_TEXT, b"[", fin=False)
        client.sock.sendall(encode_frame(0x0, payload, fin=False) * 2000)
        code, reason = client.read_close()
        assert code == 1009
        assert reason == "too many fragments"
    finally:
        client.close()


def test_fragments_count_toward_message_size(server):
    # 60 one-byte fragments stay under max_fragments, but each frame costs
    # the server memory beyond its payload, so the 4 KiB limit is reached.
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        client.send(OP_TEXT, b"[", fin=False)
        client.sock.sendall(encode_frame(0x0, b" ", fin=False) * 60)
        code, reason = client.read_close()
        assert code == 1009
        assert reason == "message too big"
    finally:
        client.close()


def test_fragment_flood_keeps_server_memory(ws_factory):
    # Before the fragment limit, each one-byte fragment kept about 90
    # bytes of server memory: 4 x 100,000 fragments grew RSS by ~36 MB.
    s = ws_factory(ws={"max_message_size": "1MiB"})
    before = vm_rss_kib(s.proc.pid)
    clients = [RawClient(s, key=s.keys["dev-1"]) for _ in range(4)]
    try:
        for client in clients:
            send_fragments(client, 100_000)
        time.sleep(0.5)
        grown = vm_rss_kib(s.proc.pid) - before
        assert grown < 12 * 1024, f"VmRSS grew by {grown} KiB"
    finally:
        for client in clients:
            client.close()
    good = requests.post(f"{s.base_url}/v1/data", json=reading(1),
                         headers={"X-API-Key": s.keys["dev-2"]}, timeout=10)
    assert good.status_code == 202, good.text


def test_client_close_gets_close_reply(server):
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        client.send(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
        code, reason = client.read_close()
        assert code == 1000
        assert reason == "bye"
        # After the close handshake the server ends the TCP connection.
        assert client.sock.recv(1) == b""
    finally:
        client.close()


# ---- Ping, pong and timeouts ----

def test_client_ping_gets_pong(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            waiter = await ws.ping(b"hello")
            await asyncio.wait_for(waiter, 5)
            return True

    assert run(main())


def test_server_pings_then_closes_idle_connection(server):
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        # The client never replies, so after ping_interval (0.5 s) a ping
        # arrives and after idle_timeout (2 s) the close frame.
        opcode, _ = client.read_frame()
        assert opcode == OP_PING
        code, reason = client.read_close()
        assert code == 1001
        assert reason == "idle timeout"
    finally:
        client.close()


def test_pong_keeps_connection_open(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            # Longer than idle_timeout: the library's pongs count as
            # traffic, so the connection stays open.
            await asyncio.sleep(3)
            return await request(ws, reading(1))

    reply = run(main())
    assert reply["type"] == "ack", reply


# ---- Metrics ----

def test_metrics_count_ws_traffic(server):
    async def main():
        async with connect(server, server.keys["dev-1"]) as ws:
            await request(ws, reading(1))
            await request(ws, reading(900))

    run(main())
    text = server.metrics()
    assert 'ingestd_ws_messages_total{result="ack"}' in text
    assert 'ingestd_ws_messages_total{result="invalid"}' in text
    assert 'ingestd_ws_closes_total{code="1000"}' in text
    assert 'ingestd_readings_total{protocol="ws",result="accepted"}' in text
    assert "ingestd_ws_connections " in text
    assert "ingestd_ws_bytes_received_total " in text
    assert "ingestd_ws_bytes_sent_total " in text


# ---- Shutdown and crash ----

def test_sigterm_closes_with_1001_after_acks(ws_factory):
    s = ws_factory(ws={"idle_timeout": "30s", "ping_interval": "10s"})

    async def main():
        async with connect(s, s.keys["dev-1"]) as ws:
            first = await request(ws, reading(1))
            for i in range(5):
                await ws.send(json.dumps({"id": i, "reading": reading(i)}))
            s.proc.send_signal(signal.SIGTERM)
            replies = []
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    replies.append(json.loads(
                        await asyncio.wait_for(ws.recv(), 10)))
            return first, replies, info.value

    first, replies, closed = run(main())
    assert first["type"] == "ack", first
    assert closed.code == 1001
    assert closed.reason == "server shutting down"
    # Messages the server read before it stopped get replies, in order.
    assert [a["id"] for a in replies] == list(range(len(replies)))
    for a in replies:
        assert a["type"] == "ack" or a["error"] == "shutting_down", a
    assert s.proc.wait(timeout=20) == 0
    acked = first["ids"] + [i for a in replies if a["type"] == "ack"
                            for i in a["ids"]]
    records = {r["message_id"] for r in s.output_records()}
    assert set(acked) <= records


CRASH_ROUNDS = 4
CRASH_SENDERS = 4
CRASH_WINDOW = 5  # messages in flight per sender


async def crash_sender(port, key, acked):
    """Send messages with CRASH_WINDOW in flight until the connection dies,
    recording the ids of every ack."""
    try:
        async with websockets.connect(
                f"ws://127.0.0.1:{port}/v1/ws", open_timeout=5,
                close_timeout=1, ping_interval=None,
                extra_headers={"Authorization": f"Bearer {key}"}) as ws:
            n = 0
            while True:
                for _ in range(CRASH_WINDOW):
                    n += 1
                    body = [reading(n % 101, seq=n)] * (1 + n % 3)
                    await ws.send(json.dumps({"id": n, "readings": body}))
                for _ in range(CRASH_WINDOW):
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if reply["type"] == "ack":
                        acked.extend(reply["ids"])
                    else:
                        assert reply["error"] in ("spool_full",
                                                   "shutting_down"), reply
    except (ConnectionClosed, OSError, asyncio.TimeoutError):
        # The server died: the messages without an ack may or may not be
        # stored.
        return


def output_ids(data_dir):
    ids = set()
    for path in sorted((data_dir / "out").glob("*.ndjson")):
        for line in path.read_text().splitlines():
            ids.add(json.loads(line)["message_id"])
    return ids


def start_proc(config, log, admin_url):
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    wait_ready(proc, admin_url, log)
    return proc


def test_sigkill_under_ws_load_loses_no_ack(tmp_path):
    rng = random.Random()
    port, admin_port = free_port(), free_port()
    config = write_ws_config(tmp_path, port, admin_port,
                             ws={"max_message_size": "64KiB"})
    devices = [f"wscrash-{i}" for i in range(CRASH_SENDERS)]
    keys = {d: add_device(d, config) for d in devices}
    log = tmp_path / "ingestd.log"
    admin_url = f"http://127.0.0.1:{admin_port}"
    acked = []

    for _ in range(CRASH_ROUNDS):
        proc = start_proc(config, log, admin_url)

        async def round_main():
            loop = asyncio.get_running_loop()
            loop.call_later(rng.uniform(0.3, 1.5), proc.send_signal,
                            signal.SIGKILL)
            await asyncio.gather(*(crash_sender(port, keys[d], acked)
                                   for d in devices))

        run(round_main())
        proc.wait(timeout=10)

    assert acked, "no reading was acknowledged in any round"
    proc = start_proc(config, log, admin_url)
    try:
        deadline = time.monotonic() + 60
        missing = set(acked)
        while missing and time.monotonic() < deadline:
            missing = set(acked) - output_ids(tmp_path / "data")
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, f"ingestd exited with {code}"
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged readings are missing "
        f"after {CRASH_ROUNDS} SIGKILLs, for example {sorted(missing)[:3]}")
