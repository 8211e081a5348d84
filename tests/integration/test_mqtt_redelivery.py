"""QoS 1 redelivery by real MQTT clients after a lost PUBACK.

A TCP proxy on 127.0.0.1 sits between paho-mqtt and ingestd's MQTT
listener. On request it drops the connection right after ingestd sent a
PUBACK and before the client received it. paho reconnects with the same
client id, resends the unacknowledged PUBLISH with the DUP flag, and the
session must answer it with PUBACK without storing the reading again.

With clean session 1 (3.1.1) or clean start 1 (5.0), the reconnect starts
a new session that does not remember the packet id, so the resent
message is stored a second time. That is the expected behaviour, and
the negative control below checks it.
"""

import json
import socket
import struct
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho
import paho.mqtt.properties as paho_props
import paho.mqtt.packettypes as paho_types
import pytest

from conftest import finish, start_server

TOPIC = "devices/dev-1/data"
WAIT_S = 15  # bound on each wait for a packet, a reconnect or the sink
PUBLISH, PUBACK = 3, 4
DUP_FLAG = 0x08


@pytest.fixture(scope="module")
def mqttd(tmp_path_factory):
    """A server that keeps 3.1.1 and 5.0 sessions for up to an hour."""
    server = start_server(tmp_path_factory.mktemp("redelivery"),
                          mqtt={"max_session_expiry": "1h",
                                "receive_maximum": 16})
    yield server
    finish(server)


def seq():
    """Return a unique marker to find one reading in the output."""
    return uuid.uuid4().hex


def reading(marker):
    return json.dumps({"sensor_value": 12.5, "seq": marker})


def records_with_seq(server, marker):
    return [r for r in server.output_records()
            if r["payload"].get("seq") == marker]


def wait_for_seq(server, marker):
    """Wait until a record with payload seq `marker` is in the output."""
    deadline = time.monotonic() + WAIT_S
    while not records_with_seq(server, marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"reading {marker} not in the output "
                                 f"within {WAIT_S} s")
        time.sleep(0.05)


def metric(server, name, labels):
    """Return the value of the sample `name{labels}`, or 0 if absent."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{selector}}} "
    for line in server.metrics().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def duplicate_count(server):
    return metric(server, "ingestd_mqtt_messages_total",
                  {"qos": "1", "result": "duplicate"})


def split_packets(buffer):
    """Remove the complete MQTT packets from the front of `buffer`.

    Returns a list of whole packets (fixed header included). Bytes of an
    incomplete packet stay in `buffer`.
    """
    packets = []
    while len(buffer) >= 2:
        length, multiplier, pos = 0, 1, 1
        while True:
            if pos >= len(buffer):
                return packets
            byte = buffer[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
            if pos > 4:
                raise ValueError("remaining length longer than 4 bytes")
        if len(buffer) < pos + length:
            return packets
        packets.append(bytes(buffer[:pos + length]))
        del buffer[:pos + length]
    return packets


def packet_id(packet):
    """Return the packet id of a PUBLISH (QoS > 0) or PUBACK packet."""
    pos = 1
    while packet[pos] & 0x80:
        pos += 1
    pos += 1
    if packet[0] >> 4 == PUBLISH:
        (topic_len,) = struct.unpack_from("!H", packet, pos)
        pos += 2 + topic_len
    return struct.unpack_from("!H", packet, pos)[0]


class DropProxy:
    """Forward MQTT between clients and ingestd, and lose one PUBACK on
    request.

    Each accepted connection gets its own upstream connection. Packets
    are forwarded whole. After drop_next_puback(), the next PUBACK from
    the server is not forwarded. The proxy closes both sockets of that
    connection instead, so the client never sees it. Every PUBLISH from a
    client is recorded as (connection number, first byte, packet id).
    """

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.armed = False
        self.dropped = threading.Event()
        self.dropped_id = None
        self.connections = 0
        self.publishes = []
        self.sockets = []
        self.running = True
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def drop_next_puback(self):
        with self.lock:
            self.armed = True
            self.dropped.clear()

    def accept_loop(self):
        while self.running:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            upstream = socket.create_connection(
                ("127.0.0.1", self.upstream_port), timeout=WAIT_S)
            upstream.settimeout(None)
            with self.lock:
                self.connections += 1
                number = self.connections
                self.sockets += [client, upstream]
            for target, args in ((self.pump_to_server,
                                  (client, upstream, number)),
                                 (self.pump_to_client, (upstream, client))):
                threading.Thread(target=target, args=args,
                                 daemon=True).start()

    @staticmethod
    def close_pair(a, b):
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pump_to_server(self, client, upstream, number):
        buffer = bytearray()
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buffer += data
                for packet in split_packets(buffer):
                    if packet[0] >> 4 == PUBLISH and packet[0] & 0x06:
                        with self.changed:
                            self.publishes.append(
                                (number, packet[0], packet_id(packet)))
                            self.changed.notify_all()
                    upstream.sendall(packet)
        except OSError:
            pass
        self.close_pair(client, upstream)

    def pump_to_client(self, upstream, client):
        buffer = bytearray()
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                buffer += data
                for packet in split_packets(buffer):
                    if packet[0] >> 4 == PUBACK and self.take_drop(packet):
                        # Close before the PUBACK reaches the client.
                        self.close_pair(client, upstream)
                        self.dropped.set()
                        return
                    client.sendall(packet)
        except OSError:
            pass
        self.close_pair(client, upstream)

    def wait_for_publish(self, number):
        """Wait until a QoS 1 or 2 PUBLISH came in on connection `number`."""
        with self.changed:
            assert self.changed.wait_for(
                lambda: any(n == number for n, _, _ in self.publishes),
                timeout=WAIT_S), (
                f"no PUBLISH on connection {number} within {WAIT_S} s: "
                f"{self.publishes}")

    def resent_flags(self):
        """Return the first bytes of the PUBLISH packets sent again on the
        second connection with the packet id of the dropped PUBACK."""
        with self.lock:
            return [flags for number, flags, pid in self.publishes
                    if number == 2 and pid == self.dropped_id]

    def take_drop(self, packet):
        with self.lock:
            if not self.armed:
                return False
            self.armed = False
            self.dropped_id = packet_id(packet)
            return True

    def close(self):
        self.running = False
        self.thread.join(timeout=WAIT_S)
        self.listener.close()
        with self.lock:
            sockets = list(self.sockets)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def proxy(mqttd):
    p = DropProxy(mqttd.mqtt_port)
    yield p
    p.close()


class PahoDevice:
    """A paho-mqtt client of dev-1 that records CONNACKs and PUBACKs.

    `persistent` picks clean session 0 (3.1.1), or clean start 0 with a
    Session Expiry Interval of 600 s (5.0). Otherwise every connect,
    reconnects included, starts a new session. paho reconnects on its own
    from the loop_start() thread, 1 to 2 s after a lost connection.
    """

    def __init__(self, server, port, protocol, persistent):
        self.port = port
        self.protocol = protocol
        self.persistent = persistent
        self.lock = threading.Lock()
        self.connacks = []
        self.acked_mids = []
        self.changed = threading.Condition(self.lock)
        client_id = f"redeliver-{seq()}"
        if protocol == paho.MQTTv5:
            self.client = paho.Client(client_id=client_id, protocol=protocol)
        else:
            self.client = paho.Client(client_id=client_id, protocol=protocol,
                                      clean_session=not persistent)
        self.client.username_pw_set("dev-1", server.keys["dev-1"])
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self.on_connect
        self.client.on_publish = self.on_publish

    def on_connect(self, client, userdata, flags, rc, properties=None):
        # paho passes a ReasonCodes object in 5.0 and an int in 3.1.1.
        reason = getattr(rc, "value", rc)
        with self.changed:
            self.connacks.append((int(flags["session present"]), reason))
            self.changed.notify_all()

    def on_publish(self, client, userdata, mid):
        with self.changed:
            self.acked_mids.append(mid)
            self.changed.notify_all()

    def wait(self, predicate, what):
        with self.changed:
            assert self.changed.wait_for(predicate, timeout=WAIT_S), (
                f"{what} within {WAIT_S} s; CONNACKs (session present, "
                f"reason) {self.connacks}, acknowledged mids "
                f"{self.acked_mids}")

    def start(self):
        if self.protocol == paho.MQTTv5:
            props = paho_props.Properties(paho_types.PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if self.persistent else 0
            self.client.connect("127.0.0.1", self.port, keepalive=30,
                                clean_start=not self.persistent,
                                properties=props)
        else:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        self.wait(lambda: len(self.connacks) == 1, "no CONNACK")
        assert self.connacks[0][1] == 0

    def publish(self, payload):
        info = self.client.publish(TOPIC, payload, qos=1)
        assert info.rc == paho.MQTT_ERR_SUCCESS
        return info.mid

    def wait_acked(self, mid):
        self.wait(lambda: mid in self.acked_mids, f"no PUBACK for mid {mid}")

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


def publish_through_lost_puback(server, proxy, protocol, persistent):
    """Publish one reading whose first PUBACK the proxy drops, and return
    (its marker, the device after the redelivery was acknowledged)."""
    device = PahoDevice(server, proxy.port, protocol, persistent)
    device.start()
    marker = seq()
    proxy.drop_next_puback()
    mid = device.publish(reading(marker))
    assert proxy.dropped.wait(WAIT_S), "ingestd sent no PUBACK to drop"
    device.wait(lambda: len(device.connacks) >= 2, "paho did not reconnect")
    device.wait_acked(mid)
    return marker, device


def fence(server, device):
    """Store one more reading over the same connection and wait for it in
    the output. ingestd acknowledges and the file sink writes in arrival
    order, so after this any second copy of an earlier reading would
    already be in the output."""
    marker = seq()
    device.wait_acked(device.publish(reading(marker)))
    wait_for_seq(server, marker)


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5],
                         ids=["v311", "v5"])
def test_paho_redelivery_stored_once(mqttd, proxy, protocol):
    duplicates_before = duplicate_count(mqttd)
    marker, device = publish_through_lost_puback(mqttd, proxy, protocol,
                                                 persistent=True)
    try:
        fence(mqttd, device)
    finally:
        device.stop()

    # The resumed session was found, and paho resent the same packet id
    # with DUP on the second connection.
    assert device.connacks[1] == (1, 0)
    resent = proxy.resent_flags()
    assert resent, f"no PUBLISH resent on reconnect: {proxy.publishes}"
    assert resent[0] & DUP_FLAG, f"resent without DUP: {resent}"

    records = records_with_seq(mqttd, marker)
    assert len(records) == 1, records
    assert duplicate_count(mqttd) - duplicates_before == 1


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5],
                         ids=["v311", "v5"])
def test_paho_new_session_stores_again(mqttd, proxy, protocol):
    duplicates_before = duplicate_count(mqttd)
    marker, device = publish_through_lost_puback(mqttd, proxy, protocol,
                                                 persistent=False)
    try:
        fence(mqttd, device)
    finally:
        device.stop()

    # paho still resends with DUP, but the new session has no record of
    # the packet id, so ingestd stores the message as a new one.
    assert device.connacks[1] == (0, 0)
    resent = proxy.resent_flags()
    assert resent, f"no PUBLISH resent on reconnect: {proxy.publishes}"
    assert resent[0] & DUP_FLAG, f"resent without DUP: {resent}"

    records = records_with_seq(mqttd, marker)
    assert len(records) == 2, records
    assert records[0]["message_id"] != records[1]["message_id"]
    assert duplicate_count(mqttd) - duplicates_before == 0


def mosquitto_pub_lines(server, proxy, version, persistent, lines):
    """Run mosquitto_pub in line mode (-l) through `proxy`, feeding the
    first line, then the rest once the client reconnected and published
    again. Returns its debug output.

    mosquitto_pub 2.0.11 with -m exits with "The connection was lost"
    instead of reconnecting, but in line mode its loop reconnects and
    libmosquitto resends the unacknowledged message.
    """
    args = ["mosquitto_pub", "-d", "-h", "127.0.0.1", "-p", str(proxy.port),
            "-V", version, "-q", "1", "-i", f"redeliver-{seq()}",
            "-u", "dev-1", "-P", server.keys["dev-1"], "-t", TOPIC, "-l"]
    if persistent:
        args += ["-c"]
        if version == "mqttv5":
            args += ["-x", "600"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        proxy.drop_next_puback()
        proc.stdin.write(lines[0] + "\n")
        proc.stdin.flush()
        assert proxy.dropped.wait(WAIT_S), "ingestd sent no PUBACK to drop"
        proxy.wait_for_publish(2)
        for line in lines[1:]:
            proc.stdin.write(line + "\n")
        # End of input makes mosquitto_pub disconnect once every message
        # is acknowledged.
        proc.stdin.close()
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
    output = proc.stdout.read()
    proc.stdout.close()
    assert proc.returncode == 0, output
    return output


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("persistent", [True, False],
                         ids=["session", "new_session"])
def test_mosquitto_pub_redelivery(mqttd, proxy, version, persistent):
    duplicates_before = duplicate_count(mqttd)
    marker, fence_marker = seq(), seq()
    output = mosquitto_pub_lines(mqttd, proxy, version, persistent,
                                 [reading(marker), reading(fence_marker)])
    wait_for_seq(mqttd, fence_marker)

    resent = proxy.resent_flags()
    assert resent, f"no PUBLISH resent on reconnect: {proxy.publishes}"
    assert resent[0] & DUP_FLAG, f"resent without DUP: {resent}"
    assert f"received PUBACK (Mid: {proxy.dropped_id}, RC:0)" in output

    records = records_with_seq(mqttd, marker)
    if persistent:
        assert len(records) == 1, records
        assert duplicate_count(mqttd) - duplicates_before == 1
    else:
        # A new session does not remember the packet id, so the resent
        # message is stored again.
        assert len(records) == 2, records
        assert duplicate_count(mqttd) - duplicates_before == 0
