"""MQTT over WebSocket at GET /mqtt against the real ingestd on loopback.

paho-mqtt 1.6.1 (Debian 12) is the client library, with
transport="websockets". Where it cannot show a reason code, a close code
or a frame boundary, WsClient sends hand-encoded MQTT packets in
hand-built WebSocket frames. mqtt.js is not tested because the project
takes its dependencies from Debian packages only, and Debian 12 has no
mqtt.js package.
"""

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import random
import time
import uuid

import paho.mqtt.client as paho
import pytest
import requests

import mqtt_raw as raw
from conftest import (Server, add_device, binary, finish, free_port, stop,
                      wait_ready, write_config)

MQTT_SETTINGS = {
    "receive_maximum": 4,
    "max_packet_size": "2KiB",
    "connect_timeout": "1s",
}

# Short WebSocket timers: /mqtt must ignore them, because the MQTT keep
# alive covers liveness there.
WS_SETTINGS = {
    "max_message_size": "1KiB",
    "idle_timeout": "1s",
    "ping_interval": "300ms",
}

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


# ---- servers ----

def start_mqtt_ws_server(folder, mqtt=None, mqtt_listen=True,
                         devices=("dev-1", "dev-2")):
    """Start ingestd with MQTT_SETTINGS and WS_SETTINGS; return a Server.

    With `mqtt_listen` false the config turns the MQTT TCP listener off.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port, mqtt_port = free_port(), free_port(), free_port()
    config = write_config(folder, port, admin_port,
                          mqtt=dict(MQTT_SETTINGS, **(mqtt or {})),
                          mqtt_port=mqtt_port)
    text = config.read_text()
    if not mqtt_listen:
        line = f"  listen: 127.0.0.1:{mqtt_port}\n"
        assert line in text
        text = text.replace(line, '  listen: ""\n')
        mqtt_port = 0
    text += "ws:\n" + "".join(f"  {k}: {v}\n" for k, v in WS_SETTINGS.items())
    config.write_text(text)
    keys = {d: add_device(d, config) for d in devices}
    log = folder / "ingestd.log"
    with open(log, "wb") as log_file:
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


@pytest.fixture(scope="module")
def mqttd(tmp_path_factory):
    """A server with small MQTT and WebSocket limits, shared by a module."""
    server = start_mqtt_ws_server(tmp_path_factory.mktemp("mqttws"))
    yield server
    finish(server)


@pytest.fixture
def mqttd_factory(tmp_path):
    servers = []

    def make(**kwargs):
        server = start_mqtt_ws_server(tmp_path / f"server{len(servers)}",
                                      **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        finish(server)


def seq():
    """Return a unique marker to find one reading in the output."""
    return uuid.uuid4().hex


def reading(marker, value=42.0):
    return json.dumps({"sensor_value": value, "seq": marker})


def wait_for_seq(server, marker, timeout_s=10):
    """Wait until a record with payload seq `marker` is in the output."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in server.output_records()
                 if r["payload"].get("seq") == marker]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"reading {marker} not in the output")
        time.sleep(0.1)


def metric_value(server, series):
    """Return the value of one series in /metrics, or None."""
    for line in server.metrics().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


# ---- a raw client: MQTT packets in WebSocket frames ----

def encode_frame(opcode, payload, fin=True):
    """Build one masked client frame."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def upgrade_request(port, protocols="mqtt", path="/mqtt"):
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WsClient(raw.Client):
    """mqtt_raw's client over WebSocket: each send() is one binary frame,
    and read() takes MQTT bytes from the binary frames received.

    `close_code` is set once the server's close frame arrived, and `pings`
    counts the server's pings.
    """

    def __init__(self, server, version=raw.V5, protocols="mqtt",
                 timeout=5):
        self.version = version
        self.buf = b""
        self.close_code = None
        self.pings = 0
        self.sock = socket.create_connection(("127.0.0.1", server.port),
                                             timeout=timeout)
        self.sock.sendall(upgrade_request(server.port, protocols))
        head = b""
        # One byte at a time, so that no frame is read with the head.
        while not head.endswith(b"\r\n\r\n"):
            byte = self.sock.recv(1)
            if not byte:
                raise ConnectionError(f"closed in the handshake: {head!r}")
            head += byte
        self.head = head.decode()
        self.status = int(self.head.split()[1])
        self.headers = {}
        for line in self.head.split("\r\n")[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()

    def send(self, data):
        self.send_frame(OP_BINARY, data)

    def send_frame(self, opcode, payload, fin=True):
        self.sock.sendall(encode_frame(opcode, payload, fin))

    def _read_exact(self, n, deadline):
        data = b""
        while len(data) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    def read_frame(self, deadline):
        """Return (opcode, payload) of the next frame from the server."""
        b0, b1 = self._read_exact(2, deadline)
        assert not b1 & 0x80, "a server frame was masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8, deadline))[0]
        return b0 & 0x0F, self._read_exact(n, deadline)

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            opcode, payload = self.read_frame(deadline)
            if opcode in (OP_BINARY, OP_CONT):
                self.buf += payload
            elif opcode == OP_CLOSE:
                self.close_code = (struct.unpack("!H", payload[:2])[0]
                                   if payload else None)
                raise ConnectionError("close frame from the server")
            elif opcode == OP_PING:
                self.pings += 1
                self.send_frame(OP_PONG, payload)
            else:
                raise AssertionError(f"unexpected frame opcode {opcode}")

    def read_close(self, timeout=5):
        """Skip MQTT packets until the close frame; return its code."""
        assert self.closed(timeout), "the server did not close"
        return self.close_code


def ws_connected(server, device="dev-1", version=raw.V5, client_id=None,
                 **kwargs):
    """Return a WsClient after a successful CONNECT."""
    c = WsClient(server, version)
    assert c.status == 101, c.head
    ack = c.connect(client_id or seq(), device, server.keys[device],
                    **kwargs)
    assert ack.type == raw.CONNACK
    assert ack.reason == 0
    return c


# ---- paho-mqtt over WebSocket ----

@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_ws_publish_stored(mqttd, protocol, qos):
    marker = seq()
    done = threading.Event()
    result = {}
    c = paho.Client(client_id=f"paho-ws-{marker}", protocol=protocol,
                    transport="websockets")
    c.ws_set_options(path="/mqtt")
    c.username_pw_set("dev-1", mqttd.keys["dev-1"])

    def on_connect(client_, userdata, flags, rc, props=None):
        result["connack"] = rc
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", mqttd.port, keepalive=30)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        assert result["connack"] == 0
        info = c.publish("devices/dev-1/data", reading(marker), qos=qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()
    [record] = wait_for_seq(mqttd, marker)
    assert record["protocol"] == "mqtt"
    assert record["device_id"] == "dev-1"
    assert record["mqtt"]["topic"] == "devices/dev-1/data"
    assert record["mqtt"]["qos"] == qos


# ---- handshake ----

@pytest.mark.parametrize("offered,selected", [
    ("mqtt", "mqtt"),
    ("mqttv3.1", "mqttv3.1"),
    ("chat, mqtt", "mqtt"),
    ("mqttv3.1, mqtt", "mqtt"),
])
def test_subprotocol_selected(mqttd, offered, selected):
    with WsClient(mqttd, protocols=offered) as c:
        assert c.status == 101, c.head
        assert c.headers["sec-websocket-protocol"] == selected
        ack = c.connect(seq(), "dev-1", mqttd.keys["dev-1"])
        assert ack.type == raw.CONNACK
        assert ack.reason == 0


def test_subprotocol_in_two_headers(mqttd):
    request = upgrade_request(mqttd.port, protocols="chat")
    request = request[:-2] + b"Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    head = b""
    with socket.create_connection(("127.0.0.1", mqttd.port), timeout=5) as s:
        s.sendall(request)
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, f"closed in the handshake: {head!r}"
            head += chunk
    head = head.decode()
    assert head.startswith("HTTP/1.1 101 "), head
    assert "Sec-WebSocket-Protocol: mqtt\r\n" in head


@pytest.mark.parametrize("offered", [None, "chat", "MQTT", "mqttv5", ""])
def test_unsupported_subprotocol_rejected(mqttd, offered):
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    if offered is not None:
        headers["Sec-WebSocket-Protocol"] = offered
    r = requests.get(mqttd.base_url + "/mqtt", headers=headers, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == "unsupported_subprotocol"
    assert "mqtt" in r.json()["message"]


def test_mqtt_path_needs_get(mqttd):
    r = requests.post(mqttd.base_url + "/mqtt", data=b"", timeout=5)
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET"


# ---- framing ----

def test_packet_split_across_frames(mqttd):
    marker = seq()
    packet = raw.connect(seq(), "dev-1", mqttd.keys["dev-1"])
    with WsClient(mqttd) as c:
        c.send(packet[:5])
        c.send(packet[5:])
        ack = c.read()
        assert ack.type == raw.CONNACK
        assert ack.reason == 0
        packet = raw.publish("devices/dev-1/data", reading(marker), qos=1,
                             packet_id=7)
        c.send(packet[:1])
        c.send(packet[1:])
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.packet_id == 7
        assert ack.reason == 0
    wait_for_seq(mqttd, marker)


def test_two_packets_in_one_frame(mqttd):
    markers = [seq(), seq()]
    with WsClient(mqttd) as c:
        c.send(raw.connect(seq(), "dev-1", mqttd.keys["dev-1"]) +
               raw.publish("devices/dev-1/data", reading(markers[0]),
                           qos=1, packet_id=1))
        assert c.read().type == raw.CONNACK
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.packet_id == 1
        c.send(raw.publish("devices/dev-1/data", reading(markers[1]),
                           qos=1, packet_id=2) + raw.pingreq())
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.packet_id == 2
        assert c.read().type == raw.PINGRESP
    for marker in markers:
        wait_for_seq(mqttd, marker)


def test_packet_in_fragmented_message(mqttd):
    marker = seq()
    packet = raw.publish("devices/dev-1/data", reading(marker), qos=1,
                         packet_id=9)
    with ws_connected(mqttd) as c:
        c.send_frame(OP_BINARY, packet[:10], fin=False)
        c.send_frame(OP_CONT, packet[10:20], fin=False)
        c.send_frame(OP_CONT, packet[20:])
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.packet_id == 9
    wait_for_seq(mqttd, marker)


def test_text_frame_closes_1003(mqttd):
    with ws_connected(mqttd) as c:
        c.send_frame(OP_TEXT, b"\x30\x00")
        assert c.read_close() == 1003


def test_text_frame_before_connect_closes_1003(mqttd):
    with WsClient(mqttd) as c:
        assert c.status == 101
        # Valid UTF-8, because wslay closes invalid text with 1007 first.
        c.send_frame(OP_TEXT, reading(seq()).encode())
        assert c.read_close() == 1003


# ---- sessions ----

@pytest.mark.parametrize("version,expected", [(raw.V5, 0x86),
                                              (raw.V311, 0x04)])
def test_bad_password_connack_then_close(mqttd, version, expected):
    with WsClient(mqttd, version) as c:
        ack = c.connect(seq(), "dev-1", "ik_" + "A" * 43)
        assert ack.type == raw.CONNACK
        assert ack.reason == expected
        assert c.read_close() == 1000


def test_disconnect_closes_1000(mqttd):
    with ws_connected(mqttd) as c:
        c.send(raw.disconnect())
        assert c.read_close() == 1000


def wait_ws_connections(server, expected, timeout_s=5):
    """Wait until the open WebSocket MQTT connections are `expected`."""
    series = 'ingestd_mqtt_connections{transport="ws"}'
    deadline = time.monotonic() + timeout_s
    while (metric_value(server, series) or 0) != expected:
        assert time.monotonic() < deadline, (
            f"{series} is {metric_value(server, series)}, expected "
            f"{expected}")
        time.sleep(0.05)


def test_client_close_ends_session(mqttd):
    # Connections of earlier tests may still be closing on the server.
    wait_ws_connections(mqttd, 0)
    with ws_connected(mqttd) as c:
        wait_ws_connections(mqttd, 1)
        c.send_frame(OP_CLOSE, struct.pack("!H", 1000))
        assert c.read_close() == 1000
    wait_ws_connections(mqttd, 0)


@pytest.mark.parametrize("first", ["tcp", "ws"])
def test_takeover_between_tcp_and_ws(mqttd, first):
    cid = seq()

    def open_client(kind):
        if kind == "ws":
            return ws_connected(mqttd, client_id=cid)
        c = raw.Client(mqttd.mqtt_port)
        ack = c.connect(cid, "dev-1", mqttd.keys["dev-1"])
        assert ack.reason == 0
        return c

    old = open_client(first)
    try:
        with open_client("ws" if first == "tcp" else "tcp") as new:
            pkt = old.read()
            assert pkt.type == raw.DISCONNECT
            assert pkt.reason == 0x8E
            assert old.closed()
            if first == "ws":
                assert old.close_code == 1000
            new.send(raw.pingreq())
            assert new.read().type == raw.PINGRESP
    finally:
        old.close()


# ---- limits and timers ----

def test_max_packet_size_disconnects(mqttd):
    # 3000 bytes are over mqtt.max_packet_size (2 KiB). Split into two
    # messages, each fits the WebSocket limit, so the MQTT check applies.
    packet = raw.publish("devices/dev-1/data", "x" * 3000, qos=1)
    with ws_connected(mqttd) as c:
        c.send(packet[:1500])
        c.send(packet[1500:])
        pkt = c.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x95
        assert c.read_close() == 1000


def test_message_over_limit_closes_1009(mqttd):
    # The message limit of /mqtt is the larger of ws.max_message_size and
    # mqtt.max_packet_size, here 2 KiB.
    with ws_connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", "x" * 3000, qos=1))
        assert c.read_close() == 1009


def test_endless_fragments_close_1009(mqttd):
    # Empty continuation frames carry no payload, but a message made of
    # them must still end: each frame counts toward the message's limits.
    with ws_connected(mqttd) as c:
        c.send_frame(OP_BINARY, b"\x30", fin=False)
        c.sock.sendall(encode_frame(OP_CONT, b"", fin=False) * 2000)
        assert c.read_close() == 1009


def test_receive_maximum_v311_waits(mqttd):
    markers = [seq() for _ in range(7)]
    with ws_connected(mqttd, version=raw.V311) as c:
        # Seven QoS 1 messages with a limit of 4 in flight: the server
        # pauses reading and resumes as the spool completes them.
        c.send(b"".join(raw.publish("devices/dev-1/data", reading(marker),
                                    qos=1, packet_id=i + 1,
                                    version=raw.V311)
                        for i, marker in enumerate(markers)))
        ids = [c.read().packet_id for _ in markers]
    assert ids == list(range(1, 8))
    for marker in markers:
        wait_for_seq(mqttd, marker)


def test_no_websocket_pings_or_idle_timeout(mqttd):
    # ws.ping_interval is 300 ms and ws.idle_timeout 1 s. On /mqtt only
    # the MQTT keep alive of 30 s counts.
    with ws_connected(mqttd, keepalive=30) as c:
        time.sleep(2)
        c.send(raw.pingreq())
        assert c.read().type == raw.PINGRESP
        assert c.pings == 0


def test_mqtt_keepalive_enforced(mqttd):
    with ws_connected(mqttd, keepalive=1) as c:
        pkt = c.read(timeout=5)
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x8D
        assert c.read_close() == 1000


def test_connect_timeout_closes(mqttd):
    with WsClient(mqttd) as c:
        assert c.status == 101
        assert c.read_close(timeout=5) == 1000


def test_metrics_label_transport(mqttd):
    with ws_connected(mqttd):
        text = mqttd.metrics()
    assert 'ingestd_mqtt_connections{transport="ws"}' in text
    assert 'ingestd_mqtt_connections_total{transport="ws"}' in text


# ---- servers of their own ----

def test_works_with_mqtt_listener_off(mqttd_factory):
    server = mqttd_factory(mqtt_listen=False)
    marker = seq()
    with ws_connected(server) as c:
        c.send(raw.publish("devices/dev-1/data", reading(marker), qos=1,
                           packet_id=1))
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.reason == 0
    wait_for_seq(server, marker)


def test_drain_disconnects_then_closes_1001(mqttd_factory):
    server = mqttd_factory()
    marker = seq()
    c5 = ws_connected(server)
    c3 = ws_connected(server, version=raw.V311)
    try:
        c5.send(raw.publish("devices/dev-1/data", reading(marker), qos=1,
                            packet_id=5))
        server.proc.send_signal(signal.SIGTERM)
        pkt = c5.read()
        if pkt.type == raw.PUBACK:
            # The message was read before the drain, so its PUBACK comes
            # before the DISCONNECT.
            assert pkt.packet_id == 5
            assert pkt.reason == 0
            pkt = c5.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x8B
        assert c5.read_close() == 1001
        assert c3.read_close() == 1001
        # Waiting here keeps the fixture from sending a second SIGTERM.
        assert server.proc.wait(timeout=20) == 0
    finally:
        c5.close()
        c3.close()


# ---- SIGKILL ----

CRASH_ROUNDS = 3
CRASH_RAW_SENDERS = 3
CRASH_WINDOW = 8  # QoS 1 messages a raw sender keeps in flight


def crash_payload(device_id, marker):
    return json.dumps({"sensor_value": 1, "seq": marker,
                       "device_id": device_id})


def crash_raw_sender(server, device_id, stop_event, acked, version):
    """Publish QoS 1 over WebSocket with a window of unacknowledged
    messages, recording each seq whose PUBACK arrived."""
    n = 0
    while not stop_event.is_set():
        try:
            with WsClient(server, version, timeout=2) as c:
                if c.status != 101:
                    time.sleep(0.05)
                    continue
                ack = c.connect(device_id, device_id, server.keys[device_id])
                if ack.reason != 0:
                    time.sleep(0.05)
                    continue
                pending = {}
                while not stop_event.is_set():
                    while len(pending) < CRASH_WINDOW:
                        n += 1
                        pid = n % 65535 + 1
                        marker = f"{device_id}-{n}"
                        pending[pid] = marker
                        c.send(raw.publish(f"devices/{device_id}/data",
                                           crash_payload(device_id, marker),
                                           qos=1, packet_id=pid,
                                           version=version))
                    ack = c.read(timeout=2)
                    if ack.type == raw.PUBACK and ack.reason == 0:
                        acked.append(pending.pop(ack.packet_id))
        except (OSError, ConnectionError, ValueError, IndexError):
            # The server died: messages without PUBACK may or may not be
            # stored, and a handshake cut short is no HTTP response.
            time.sleep(0.05)


def crash_paho_sender(server, device_id, stop_event, acked):
    """Publish with paho 3.1.1 over WebSocket and record the seqs whose
    PUBACK arrived."""
    while not stop_event.is_set():
        sent, acked_mids = {}, []
        c = paho.Client(client_id=device_id, protocol=paho.MQTTv311,
                        transport="websockets")
        c.ws_set_options(path="/mqtt")
        c.username_pw_set(device_id, server.keys[device_id])
        # paho calls on_publish under its own lock, so the callback only
        # notes the mid; seqs are matched after the connection ended.
        c.on_publish = lambda client_, userdata, mid: acked_mids.append(mid)
        try:
            c.connect("127.0.0.1", server.port, keepalive=10)
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        c.loop_start()
        n = 0
        try:
            while not stop_event.is_set() and n < 60000:
                n += 1
                marker = f"{device_id}-p{time.monotonic_ns()}"
                info = c.publish(f"devices/{device_id}/data",
                                 crash_payload(device_id, marker), qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    break
                sent[info.mid] = marker
                if len(sent) - len(acked_mids) > 20:
                    time.sleep(0.01)
        finally:
            c.loop_stop()
            c.disconnect()
        acked.extend(sent[mid] for mid in acked_mids if mid in sent)
        time.sleep(0.05)


def output_seqs(data_dir):
    seqs, bad = set(), []
    for path in sorted((data_dir / "out").glob("*.ndjson")):
        for line in path.read_text().splitlines():
            try:
                seqs.add(json.loads(line)["payload"]["seq"])
            except (ValueError, KeyError):
                bad.append(line[:80])
    return seqs, bad


def test_sigkill_loses_no_acknowledged_message(tmp_path):
    rng = random.Random()
    devices = [f"ws-crash-{i}" for i in range(CRASH_RAW_SENDERS + 1)]
    acked = []
    server = None
    for round_no in range(CRASH_ROUNDS):
        if server is None:
            server = start_mqtt_ws_server(
                tmp_path, devices=devices, mqtt={"receive_maximum": 64})
        else:
            with open(server.log, "ab") as log_file:
                server.proc = subprocess.Popen(
                    [binary(), "serve", "-c", str(server.config)],
                    stdout=log_file, stderr=subprocess.STDOUT)
            wait_ready(server.proc, server.admin_url, server.log)
        stop_event = threading.Event()
        threads = []
        for i, d in enumerate(devices):
            if i < CRASH_RAW_SENDERS:
                version = raw.V5 if (i + round_no) % 2 else raw.V311
                threads.append(threading.Thread(
                    target=crash_raw_sender,
                    args=(server, d, stop_event, acked, version)))
            else:
                threads.append(threading.Thread(
                    target=crash_paho_sender,
                    args=(server, d, stop_event, acked)))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.5, 1.5))
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
        stop_event.set()
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a sender did not stop"

    assert len(acked) > 0, "no message was acknowledged in any round"
    with open(server.log, "ab") as log_file:
        server.proc = subprocess.Popen(
            [binary(), "serve", "-c", str(server.config)],
            stdout=log_file, stderr=subprocess.STDOUT)
    wait_ready(server.proc, server.admin_url, server.log)
    try:
        deadline = time.monotonic() + 60
        missing = set(acked)
        while missing and time.monotonic() < deadline:
            seen, _ = output_seqs(server.data_dir)
            missing = set(acked) - seen
            time.sleep(0.2)
    finally:
        code = stop(server)

    seen, bad = output_seqs(server.data_dir)
    assert code == 0, f"ingestd exited with {code}"
    assert not bad, f"torn or invalid lines in the sink output: {bad[:3]}"
    missing = set(acked) - seen
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged messages are missing "
        f"after {CRASH_ROUNDS} SIGKILLs, for example {sorted(missing)[:3]}")
