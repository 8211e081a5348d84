#!/usr/bin/python3
"""Capture the MQTT packets that real clients send, as codec test vectors.

Runs mosquitto_pub and mosquitto_sub (Debian package mosquitto-clients)
against a minimal fake broker on 127.0.0.1 that replies just enough for
each client to finish. Every packet a client sends is written as one hex
line to tests/unit/data/mqtt_<scenario>.hex, and the whole byte stream to
tests/fuzz/corpus/mqtt/<scenario>.bin as a fuzzing seed.

Usage: /usr/bin/python3 tests/unit/data/capture_mqtt.py
"""
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus", "mqtt")
CLIENT_TIMEOUT = 15  # seconds a client may run before it is killed

TOPIC = "devices/dev-1/data"
V5_PUBLISH_PROPS = [
    "-D", "publish", "content-type", "application/json",
    "-D", "publish", "user-property", "unit", "celsius",
    "-D", "publish", "user-property", "site", "lab",
    "-D", "publish", "message-expiry-interval", "300",
    "-D", "publish", "payload-format-indicator", "1",
    "-D", "publish", "response-topic", "devices/dev-1/reply",
    "-D", "publish", "correlation-data", "req-42",
]
V5_CONNECT_PROPS = [
    "-D", "connect", "session-expiry-interval", "60",
    "-D", "connect", "receive-maximum", "20",
    "-D", "connect", "maximum-packet-size", "65536",
    "-D", "connect", "topic-alias-maximum", "8",
    "-D", "connect", "request-problem-information", "1",
    "-D", "connect", "request-response-information", "1",
    "-D", "connect", "user-property", "fw", "1.2.3",
]
WILL = ["--will-topic", "devices/dev-1/status", "--will-payload", "offline",
        "--will-qos", "1", "--will-retain"]
V5_WILL_PROPS = [
    "-D", "will", "will-delay-interval", "10",
    "-D", "will", "content-type", "text/plain",
    "-D", "will", "user-property", "reason", "lost",
]
PAYLOAD = '{"temperature":21.5}'

# (scenario, client argv after host and port, PUBLISH to deliver after
# SUBACK as (qos, topic, payload) or None)
SCENARIOS = [
    ("v311_pub_qos0", ["mosquitto_pub", "-V", "mqttv311", "-i", "dev-1",
                       "-t", TOPIC, "-m", PAYLOAD, "-q", "0"], None),
    ("v311_pub_qos1", ["mosquitto_pub", "-V", "mqttv311", "-i", "dev-1",
                       "-u", "dev-1", "-P", "ik_secret", "-t", TOPIC,
                       "-m", PAYLOAD, "-q", "1"], None),
    ("v311_pub_qos2", ["mosquitto_pub", "-V", "mqttv311", "-i", "dev-1",
                       "-t", TOPIC, "-m", PAYLOAD, "-q", "2", "-r"], None),
    ("v311_pub_will", ["mosquitto_pub", "-V", "mqttv311", "-i", "dev-1",
                       "-u", "dev-1", "-P", "ik_secret"] + WILL +
     ["-t", TOPIC, "-m", PAYLOAD, "-q", "1"], None),
    ("v311_sub_qos2", ["mosquitto_sub", "-V", "mqttv311", "-i", "dev-1",
                       "-t", "devices/dev-1/config", "-t", "fleet/+/cmd",
                       "-t", "fleet/#", "-q", "2", "-C", "1", "-W", "10"],
     (2, "devices/dev-1/config", b'{"rate":5}')),
    ("v311_sub_qos1", ["mosquitto_sub", "-V", "mqttv311", "-i", "dev-1",
                       "-t", "devices/dev-1/config", "-q", "1", "-C", "1",
                       "-W", "10"],
     (1, "devices/dev-1/config", b'{"rate":5}')),
    ("v311_unsub", ["mosquitto_sub", "-V", "mqttv311", "-i", "dev-1", "-c",
                    "-t", "fleet/#", "-U", "fleet/#", "-E"], None),
    ("v311_ping", ["mosquitto_sub", "-V", "mqttv311", "-i", "dev-1",
                   "-k", "5", "-t", "fleet/#", "-W", "7"], None),
    ("v5_pub_qos0", ["mosquitto_pub", "-V", "mqttv5", "-i", "dev-1",
                     "-t", TOPIC, "-m", PAYLOAD, "-q", "0"] +
     V5_PUBLISH_PROPS, None),
    ("v5_pub_qos1", ["mosquitto_pub", "-V", "mqttv5", "-i", "dev-1",
                     "-u", "dev-1", "-P", "ik_secret", "-t", TOPIC,
                     "-m", PAYLOAD, "-q", "1"] + V5_CONNECT_PROPS +
     V5_PUBLISH_PROPS, None),
    ("v5_pub_qos2", ["mosquitto_pub", "-V", "mqttv5", "-i", "dev-2", "-t", TOPIC,
                     "-m", PAYLOAD, "-q", "2"] + V5_PUBLISH_PROPS, None),
    ("v5_pub_will", ["mosquitto_pub", "-V", "mqttv5", "-i", "dev-1"] +
     WILL + V5_WILL_PROPS + ["-t", TOPIC, "-m", PAYLOAD, "-q", "1"], None),
    ("v5_sub_qos2", ["mosquitto_sub", "-V", "mqttv5", "-i", "dev-1",
                     "-t", "devices/dev-1/config", "-t", "fleet/+/cmd",
                     "-t", "$share/group/fleet/#", "-q", "2", "-C", "1",
                     "-W", "10",
                     "-D", "subscribe", "subscription-identifier", "7",
                     "-D", "subscribe", "user-property", "k", "v"],
     (2, "devices/dev-1/config", b'{"rate":5}')),
    ("v5_sub_qos1", ["mosquitto_sub", "-V", "mqttv5", "-i", "dev-1",
                     "-t", "devices/dev-1/config", "-q", "1", "-C", "1",
                     "-W", "10"],
     (1, "devices/dev-1/config", b'{"rate":5}')),
    ("v5_unsub", ["mosquitto_sub", "-V", "mqttv5", "-i", "dev-1", "-c",
                  "-t", "fleet/#", "-U", "fleet/#", "-E",
                  "-D", "unsubscribe", "user-property", "k", "v"], None),
    ("v5_ping", ["mosquitto_sub", "-V", "mqttv5", "-i", "dev-1", "-k", "5",
                 "-t", "fleet/#", "-W", "7"], None),
]


def read_packet(sock):
    """Return one whole packet from `sock`, or None at end of stream."""
    head = sock.recv(1)
    if not head:
        return None
    raw = bytearray(head)
    length = 0
    for i in range(4):
        byte = sock.recv(1)
        if not byte:
            return None
        raw += byte
        length |= (byte[0] & 0x7F) << (7 * i)
        if byte[0] & 0x80 == 0:
            break
    while length > 0:
        chunk = sock.recv(length)
        if not chunk:
            return None
        raw += chunk
        length -= len(chunk)
    return bytes(raw)


def body_of(packet):
    """Return the bytes after the fixed header."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1:]


def with_length(first, body):
    """Return a packet made of a first byte, remaining length and body."""
    out = bytearray([first])
    n = len(body)
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def subscribe_reply(body, v5, unsubscribe):
    """Build a SUBACK granting every requested QoS, or an UNSUBACK."""
    pos = 2
    if v5:
        # Skip the property length and properties (one-byte length is
        # enough for what the clients above send).
        pos += 1 + body[pos]
    codes = bytearray()
    while pos < len(body):
        n = body[pos] << 8 | body[pos + 1]
        pos += 2 + n
        if not unsubscribe:
            codes.append(body[pos] & 0x03)
            pos += 1
        else:
            codes.append(0)
    head = body[:2] + (b"\x00" if v5 else b"")
    if unsubscribe:
        return with_length(0xB0, head + (bytes(codes) if v5 else b""))
    return with_length(0x90, head + bytes(codes))


def serve(conn, deliver):
    """Reply to one client and return the packets it sent."""
    packets = []
    v5 = False
    while True:
        packet = read_packet(conn)
        if packet is None:
            break
        packets.append(packet)
        kind = packet[0] >> 4
        body = body_of(packet)
        if kind == 1:
            v5 = body[6] == 5
            conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
        elif kind == 3:
            qos = (packet[0] >> 1) & 3
            n = body[0] << 8 | body[1]
            if qos:
                pid = body[2 + n:4 + n]
                conn.sendall(bytes([0x40 if qos == 1 else 0x50, 2]) + pid)
        elif kind == 5:
            conn.sendall(b"\x62\x02" + body[:2])
        elif kind == 6:
            conn.sendall(b"\x70\x02" + body[:2])
        elif kind in (8, 10):
            conn.sendall(subscribe_reply(body, v5, kind == 10))
            if kind == 8 and deliver is not None:
                qos, topic, payload = deliver
                var = len(topic).to_bytes(2, "big") + topic.encode()
                if qos:
                    var += b"\x00\x01"
                if v5:
                    var += b"\x00"
                conn.sendall(with_length(0x30 | qos << 1, var + payload))
        elif kind == 12:
            conn.sendall(b"\xd0\x00")
        elif kind == 14:
            break
    return packets


def capture(name, argv, deliver):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(CLIENT_TIMEOUT)
    port = listener.getsockname()[1]
    cmd = argv[:1] + ["-h", "127.0.0.1", "-p", str(port)] + argv[1:]
    client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        conn, _ = listener.accept()
        conn.settimeout(CLIENT_TIMEOUT)
        with conn:
            packets = serve(conn, deliver)
        client.wait(timeout=CLIENT_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        listener.close()

    with open(os.path.join(HERE, "mqtt_%s.hex" % name), "w") as out:
        for packet in packets:
            out.write(packet.hex() + "\n")
    with open(os.path.join(CORPUS, name + ".bin"), "wb") as out:
        out.write(b"".join(packets))
    print("%s: %d packets" % (name, len(packets)))


def main():
    os.makedirs(CORPUS, exist_ok=True)
    requested = sys.argv[1:]
    for name, argv, deliver in SCENARIOS:
        if not requested or name in requested:
            capture(name, argv, deliver)


if __name__ == "__main__":
    main()
