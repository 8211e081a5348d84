"""A minimal MQTT 3.1.1 / 5.0 client built from hand-encoded packets.

The tests use it where a client library cannot send a malformed packet or
does not show a reason code. It speaks only what the tests need: CONNECT,
PUBLISH, PUBREL, SUBSCRIBE, PINGREQ, DISCONNECT and raw bytes.
"""

import socket
import struct
import time

V311 = 4
V5 = 5

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 2, 3, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGRESP, DISCONNECT = 9, 11, 13, 14

PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS_MAXIMUM = 0x22
PROP_TOPIC_ALIAS = 0x23
PROP_RETAIN_AVAILABLE = 0x25
PROP_USER_PROPERTY = 0x26
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_CONTENT_TYPE = 0x03

# Property id -> value kind, for decoding what the server sends.
_KINDS = {
    0x01: "byte", 0x02: "u32", 0x03: "str", 0x08: "str", 0x09: "bin",
    0x0B: "var", 0x11: "u32", 0x12: "str", 0x13: "u16", 0x15: "str",
    0x16: "bin", 0x17: "byte", 0x18: "u32", 0x19: "byte", 0x1A: "str",
    0x1C: "str", 0x1F: "str", 0x21: "u16", 0x22: "u16", 0x23: "u16",
    0x24: "byte", 0x25: "byte", 0x26: "pair", 0x27: "u32", 0x28: "byte",
    0x29: "byte", 0x2A: "byte",
}


def varint(n):
    """Encode a variable byte integer."""
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s):
    """Encode a UTF-8 string with its 2-byte length."""
    data = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(data)) + data


def props(items):
    """Encode a property list from (id, value) pairs."""
    body = bytearray()
    for pid, value in items:
        body += varint(pid)
        kind = _KINDS[pid]
        if kind == "byte":
            body.append(value)
        elif kind == "u16":
            body += struct.pack("!H", value)
        elif kind == "u32":
            body += struct.pack("!I", value)
        elif kind == "var":
            body += varint(value)
        elif kind == "pair":
            body += string(value[0]) + string(value[1])
        else:
            body += string(value)
    return varint(len(body)) + bytes(body)


def packet(first_byte, body):
    """Frame a packet: fixed header byte, remaining length and body."""
    return bytes([first_byte]) + varint(len(body)) + body


def connect(client_id, username=None, password=None, version=V5,
            keepalive=60, clean=True, properties=()):
    """Encode a CONNECT."""
    flags = 0x02 if clean else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = string("MQTT") + bytes([version, flags])
    body += struct.pack("!H", keepalive)
    if version == V5:
        body += props(properties)
    body += string(client_id)
    if username is not None:
        body += string(username)
    if password is not None:
        body += string(password)
    return packet(0x10, body)


def publish(topic, payload, qos=0, packet_id=1, version=V5, dup=False,
            retain=False, properties=()):
    """Encode a PUBLISH."""
    first = 0x30 | (qos << 1)
    if dup:
        first |= 0x08
    if retain:
        first |= 0x01
    body = string(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == V5:
        body += props(properties)
    data = payload.encode() if isinstance(payload, str) else payload
    return packet(first, body + data)


def pubrel(packet_id):
    """Encode a PUBREL (the short form, valid in both versions)."""
    return packet(0x62, struct.pack("!H", packet_id))


def subscribe(packet_id, filters, version=V5):
    """Encode a SUBSCRIBE for (filter, qos) pairs."""
    body = struct.pack("!H", packet_id)
    if version == V5:
        body += props(())
    for topic_filter, qos in filters:
        body += string(topic_filter) + bytes([qos])
    return packet(0x82, body)


def pingreq():
    return packet(0xC0, b"")


def disconnect(version=V5, reason=0):
    if version == V5:
        return packet(0xE0, bytes([reason, 0]))
    return packet(0xE0, b"")


def decode_props(data, pos):
    """Decode a property list at `pos`; return (dict, new pos)."""
    length, pos = read_varint(data, pos)
    end = pos + length
    out = {}
    while pos < end:
        pid, pos = read_varint(data, pos)
        kind = _KINDS[pid]
        if kind == "byte":
            value, pos = data[pos], pos + 1
        elif kind == "u16":
            value, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif kind == "u32":
            value, pos = struct.unpack_from("!I", data, pos)[0], pos + 4
        elif kind == "var":
            value, pos = read_varint(data, pos)
        elif kind == "pair":
            k, pos = read_string(data, pos)
            v, pos = read_string(data, pos)
            value = (k, v)
        else:
            value, pos = read_string(data, pos)
        if kind == "pair":
            out.setdefault(pid, []).append(value)
        else:
            out[pid] = value
    return out, pos


def read_varint(data, pos):
    value, shift = 0, 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def read_string(data, pos):
    n = struct.unpack_from("!H", data, pos)[0]
    return data[pos + 2:pos + 2 + n].decode(), pos + 2 + n


class Packet:
    """A decoded server packet: type, flags, body and parsed fields."""

    def __init__(self, first, body, version):
        self.type = first >> 4
        self.flags = first & 0x0F
        self.body = body
        self.reason = 0
        self.props = {}
        self.packet_id = None
        self.topic = None
        self.payload = None
        self.codes = []
        self._parse(version)

    def _parse(self, version):
        b = self.body
        if self.type == CONNACK:
            self.session_present = bool(b[0] & 1)
            self.reason = b[1]
            if version == V5 and len(b) > 2:
                self.props, _ = decode_props(b, 2)
        elif self.type in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            self.packet_id = struct.unpack_from("!H", b, 0)[0]
            if version == V5 and len(b) > 2:
                self.reason = b[2]
                if len(b) > 3:
                    self.props, _ = decode_props(b, 3)
        elif self.type in (SUBACK, UNSUBACK):
            self.packet_id = struct.unpack_from("!H", b, 0)[0]
            pos = 2
            if version == V5:
                self.props, pos = decode_props(b, pos)
            self.codes = list(b[pos:])
        elif self.type == DISCONNECT:
            if b:
                self.reason = b[0]
                if len(b) > 1:
                    self.props, _ = decode_props(b, 1)
        elif self.type == PUBLISH:
            self.topic, pos = read_string(b, 0)
            qos = (self.flags >> 1) & 3
            if qos:
                self.packet_id = struct.unpack_from("!H", b, pos)[0]
                pos += 2
            if version == V5:
                self.props, pos = decode_props(b, pos)
            self.payload = b[pos:]

    @property
    def reason_string(self):
        return self.props.get(PROP_REASON_STRING)

    def __repr__(self):
        return (f"Packet(type={self.type}, reason=0x{self.reason:02x}, "
                f"id={self.packet_id}, props={self.props})")


class Client:
    """A blocking socket that sends raw bytes and reads whole packets."""

    def __init__(self, port, version=V5, timeout=5):
        self.version = version
        self.sock = socket.create_connection(("127.0.0.1", port),
                                             timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk

    def read(self, timeout=5):
        """Read one packet; raise ConnectionError when the server closed."""
        deadline = time.monotonic() + timeout
        self._fill(2, deadline)
        n, mult, pos = 0, 1, 1
        while True:
            self._fill(pos + 1, deadline)
            b = self.buf[pos]
            n += (b & 0x7F) * mult
            mult *= 128
            pos += 1
            if not b & 0x80:
                break
        self._fill(pos + n, deadline)
        first, body = self.buf[0], self.buf[pos:pos + n]
        self.buf = self.buf[pos + n:]
        return Packet(first, body, self.version)

    def closed(self, timeout=5):
        """Return True if the server closes within `timeout`, skipping any
        packets it sends first."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.read(timeout=deadline - time.monotonic())
        except ConnectionError:
            return True
        except OSError:
            return time.monotonic() < deadline
        return False

    def connect(self, client_id, username, password, **kwargs):
        """Send CONNECT and return the CONNACK."""
        self.send(connect(client_id, username, password,
                          version=self.version, **kwargs))
        return self.read()

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
