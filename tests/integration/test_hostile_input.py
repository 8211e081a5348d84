"""Hostile and unusual input over HTTP against the real ingestd on loopback:
chunk extensions, odd request lines and headers, conflicting credentials,
and readings whose JSON must reach the sink byte for byte.

Raw sockets send what HTTP client libraries refuse to send. Every socket
read is bounded by SOCKET_TIMEOUT_S and every load by a byte count.
"""

import json
import socket
import time
import uuid

import pytest
import requests

import mqtt_raw as raw
from conftest import finish, start_server
from test_websocket import OP_TEXT, RawClient

SOCKET_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("hostile"))
    yield s
    finish(s)


def connect(server):
    sock = socket.create_connection((server.host, server.port),
                                    timeout=SOCKET_TIMEOUT_S)
    return sock, sock.makefile("rb")


def read_response(reader):
    """Read one response as (status line, headers, body), skipping 100
    Continue, or return None at EOF."""
    while True:
        status_line = reader.readline()
        if not status_line:
            return None
        headers = {}
        while True:
            line = reader.readline().rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if b" 100 " in status_line:
            continue
        body = reader.read(int(headers.get("content-length", "0")))
        return status_line.decode().rstrip("\r\n"), headers, body


def status_of(response):
    return int(response[0].split()[1])


def error_of(response):
    return json.loads(response[2])["error"]


def head(server, extra="", target="/v1/data", key="dev-1",
         version=" HTTP/1.1"):
    """Return the head of a POST with a valid key and `extra` headers."""
    return (f"POST {target}{version}\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {server.keys[key]}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def send(server, data):
    """Send `data` on a new connection and return the first response."""
    sock, reader = connect(server)
    with sock:
        sock.sendall(data)
        return read_response(reader)


READING = b'{"device_id":"dev-1","sensor_value":1}'


# ---- Chunk extensions ----

def test_endless_chunk_extension_rejected(server):
    # Before the limit, llhttp read extension bytes until the body timeout
    # without counting them anywhere. The load stops at 4 MiB.
    sock, reader = connect(server)
    with sock:
        sock.sendall(head(server, "Transfer-Encoding: chunked\r\n") + b"1;")
        sock.settimeout(0.05)
        sent = 0
        while sent < 4 * 1024 * 1024:
            try:
                sock.sendall(b"a" * 4096)
                sent += 4096
            except (socket.timeout, ConnectionError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except socket.timeout:
                pass
        sock.settimeout(SOCKET_TIMEOUT_S)
        response = read_response(reader)
    assert response is not None, f"no response after {sent} bytes"
    assert status_of(response) == 400, response
    assert error_of(response) == "bad_request"
    assert b"chunk extension" in response[2]
    assert sent < 64 * 1024


def test_chunk_extensions_count_toward_body_limit(server):
    # Each extension is under 1 KiB, but together they pass the 8 KiB
    # max_body_bytes of the test config.
    body = b"".join(b"1;ext=" + b"x" * 900 + b"\r\n" + bytes([c]) + b"\r\n"
                    for c in READING) + b"0\r\n\r\n"
    response = send(server,
                    head(server, "Transfer-Encoding: chunked\r\n") + body)
    assert status_of(response) == 413, response
    assert error_of(response) == "body_too_large"


def test_short_chunk_extension_accepted(server):
    body = (f"{len(READING):x};name=value\r\n".encode() + READING +
            b"\r\n0\r\n\r\n")
    response = send(server,
                    head(server, "Transfer-Encoding: chunked\r\n") + body)
    assert status_of(response) == 202, response


# ---- Readings stored as sent ----

def output_lines(server):
    lines = []
    for path in sorted((server.data_dir / "out").glob("*.ndjson")):
        lines += [line for line in path.read_text().splitlines() if line]
    return lines


def wait_for_payload(server, message_id, timeout_s=10):
    """Return the raw text of the payload of record `message_id`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in output_lines(server):
            if f'"message_id":"{message_id}"' in line:
                start = line.index(',"payload":') + len(',"payload":')
                assert line.endswith("}")
                return line[start:-1]
        time.sleep(0.05)
    raise AssertionError(f"record {message_id} not in the sink output")


# Numbers that jansson would reformat, as (text sent, text expected).
EXACT_READINGS = [
    ('{"sensor_value": 0.1, "t2": 1.1, "e": 1E2}',
     '{"sensor_value":0.1,"t2":1.1,"e":1E2}'),
    ('{"sensor_value": -0, "timestamp": 1e3}',
     '{"sensor_value":-0,"timestamp":1e3}'),
    ('{"sensor_value": 1, "big": 3.14159265358979323846264338327950288,'
     ' "tiny": 1e-999}',
     '{"sensor_value":1,"big":3.14159265358979323846264338327950288,'
     '"tiny":1e-999}'),
    ('{ "sensor_value" : 2,\t"s": "keep  this \\u00e9 \\" [ ] "\n}',
     '{"sensor_value":2,"s":"keep  this \\u00e9 \\" [ ] "}'),
]


def post_raw(server, body, content_type="application/json", key="dev-1"):
    return requests.post(
        server.base_url + "/v1/data", data=body.encode(), timeout=10,
        headers={"Content-Type": content_type,
                 "Authorization": f"Bearer {server.keys[key]}"})


@pytest.mark.parametrize("sent,expected", EXACT_READINGS)
def test_single_reading_stored_as_sent(server, sent, expected):
    resp = post_raw(server, sent)
    assert resp.status_code == 202, resp.text
    assert wait_for_payload(server, resp.json()["ids"][0]) == expected


def test_array_readings_stored_as_sent(server):
    body = "[ " + " ,\n ".join(sent for sent, _ in EXACT_READINGS) + " ]"
    resp = post_raw(server, body)
    assert resp.status_code == 202, resp.text
    ids = resp.json()["ids"]
    for message_id, (_, expected) in zip(ids, EXACT_READINGS):
        assert wait_for_payload(server, message_id) == expected


def test_ndjson_readings_stored_as_sent(server):
    body = "\n".join(sent.replace("\n", " ") for sent, _ in EXACT_READINGS)
    resp = post_raw(server, body, content_type="application/x-ndjson")
    assert resp.status_code == 202, resp.text
    ids = resp.json()["ids"]
    for message_id, (_, expected) in zip(ids, EXACT_READINGS):
        assert wait_for_payload(server, message_id) == expected


@pytest.mark.parametrize("body,content_type", [
    ('{"device_id":"dev-2","device_id":"dev-1","sensor_value":1}',
     "application/json"),
    ('[{"sensor_value":1,"sensor_value":2}]', "application/json"),
    ('{"sensor_value":1}\n{"sensor_value":1,"sensor_value":1}',
     "application/x-ndjson"),
], ids=["device_id", "array", "ndjson"])
def test_duplicate_keys_rejected(server, body, content_type):
    resp = post_raw(server, body, content_type=content_type)
    assert resp.status_code == 400, resp.text
    text = resp.text
    assert "duplicate object key" in text


def test_nesting_over_limit_rejected(server):
    deep = "[" * 40 + "1" + "]" * 40
    resp = post_raw(server, '{"sensor_value":1,"x":' + deep + '}')
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "validation_failed"
    reason = body["readings"][0]["errors"][0]["reason"]
    assert "limits.max_json_depth" in reason


def test_nesting_at_limit_accepted(server):
    # The reading's own object is level 1, so 31 more levels fit in 32.
    deep = "[" * 31 + "1" + "]" * 31
    resp = post_raw(server, '{"sensor_value":1,"x":' + deep + '}')
    assert resp.status_code == 202, resp.text


def test_integer_beyond_int64_rejected(server):
    resp = post_raw(server, '{"sensor_value":1,"n":9223372036854775808}')
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_json"
    assert "too big integer" in resp.json()["message"]


def ws_request(server, text):
    """Send one text message on /v1/ws and return the decoded reply."""
    client = RawClient(server, key=server.keys["dev-1"])
    try:
        assert client.status == 101, client.head
        client.send(OP_TEXT, text.encode())
        opcode, payload = client.read_frame()
        assert opcode == OP_TEXT, (opcode, payload)
        return json.loads(payload)
    finally:
        client.close()


def test_ws_readings_stored_as_sent(server):
    text = ('{"id": "exact", "readings": [ ' +
            " , ".join(sent for sent, _ in EXACT_READINGS) + " ] }")
    reply = ws_request(server, text)
    assert reply["type"] == "ack", reply
    for message_id, (_, expected) in zip(reply["ids"], EXACT_READINGS):
        assert wait_for_payload(server, message_id) == expected


@pytest.mark.parametrize("text,expected", [
    ('{"reading" : {"sensor_value": 0.1}}', '{"sensor_value":0.1}'),
    ('{"sensor_value": 1E2 }', '{"sensor_value":1E2}'),
    ('[ {"sensor_value": -0} ]', '{"sensor_value":-0}'),
], ids=["envelope", "bare", "array"])
def test_ws_message_forms_stored_as_sent(server, text, expected):
    reply = ws_request(server, text)
    assert reply["type"] == "ack", reply
    assert wait_for_payload(server, reply["ids"][0]) == expected


def test_ws_duplicate_keys_rejected(server):
    reply = ws_request(
        server, '{"device_id":"dev-2","device_id":"dev-1","sensor_value":1}')
    assert reply["type"] == "error", reply
    assert reply["error"] == "invalid_json"
    assert "duplicate object key" in reply["message"]


def test_ws_empty_message_explained(server):
    reply = ws_request(server, "")
    assert reply["type"] == "error", reply
    assert reply["error"] == "empty_message"
    assert reply["message"] == "empty message; send a JSON reading"


def mqtt_publish(server, payload, qos=1):
    """Publish `payload` from dev-1 over MQTT 5; return the PUBACK."""
    with raw.Client(server.mqtt_port) as client:
        ack = client.connect(f"hostile-{uuid.uuid4().hex[:8]}", "dev-1",
                             server.keys["dev-1"])
        assert ack.reason == 0
        client.send(raw.publish("devices/dev-1/data", payload, qos=qos))
        return client.read()


def wait_for_marker(server, marker, timeout_s=10):
    """Return the raw payload text of the record containing `marker`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in output_lines(server):
            if marker in line:
                start = line.index(',"payload":') + len(',"payload":')
                return line[start:-1]
        time.sleep(0.05)
    raise AssertionError(f"no record with {marker} in the sink output")


def test_mqtt_readings_stored_as_sent(server):
    for sent, expected in EXACT_READINGS:
        marker = uuid.uuid4().hex
        tagged = sent.replace("{", '{"m": "' + marker + '", ', 1)
        for wrap in ("{}", "[ {} ]"):
            ack = mqtt_publish(server, wrap.replace("{}", tagged))
            assert ack.type == raw.PUBACK
            assert ack.reason == 0
            assert wait_for_marker(server, marker) == (
                expected.replace("{", '{"m":"' + marker + '",', 1))


def test_mqtt_duplicate_keys_rejected(server):
    ack = mqtt_publish(
        server, '{"device_id":"dev-2","device_id":"dev-1","sensor_value":1}')
    assert ack.type == raw.PUBACK
    assert ack.reason == 0x99  # payload format invalid
    assert "duplicate object key" in ack.reason_string


# ---- Request lines and headers ----

def test_request_line_without_version_rejected(server):
    response = send(server, b"POST /v1/data\r\n\r\n")
    assert status_of(response) == 400, response
    assert error_of(response) == "bad_request"
    assert b"HTTP version" in response[2]


def test_absolute_form_target_routed_by_path(server):
    body = READING
    data = head(server, f"Content-Length: {len(body)}\r\n",
                target=f"http://127.0.0.1:{server.port}/v1/data") + body
    response = send(server, data)
    assert status_of(response) == 202, response


@pytest.mark.parametrize("query", ["api_key=x", "key=x", "token=x",
                                   "a=1&access_token=x"])
def test_key_in_url_rejected(server, query):
    data = head(server, f"Content-Length: {len(READING)}\r\n",
                target=f"/v1/data?{query}") + READING
    response = send(server, data)
    assert status_of(response) == 400, response
    assert error_of(response) == "key_in_url"


def test_conflicting_credentials_rejected(server):
    extra = (f"X-API-Key: {server.keys['dev-2']}\r\n"
             f"Content-Length: {len(READING)}\r\n")
    response = send(server, head(server, extra) + READING)
    assert status_of(response) == 400, response
    assert error_of(response) == "conflicting_credentials"


def test_same_credential_twice_accepted(server):
    extra = (f"X-API-Key: {server.keys['dev-1']}\r\n"
             f"Content-Length: {len(READING)}\r\n")
    response = send(server, head(server, extra) + READING)
    assert status_of(response) == 202, response


def test_transfer_coding_besides_chunked_rejected(server):
    body = f"{len(READING):x}\r\n".encode() + READING + b"\r\n0\r\n\r\n"
    response = send(server, head(server,
                                 "Transfer-Encoding: gzip, chunked\r\n") +
                    body)
    assert response[0] == "HTTP/1.1 501 Not Implemented", response
    assert error_of(response) == "unsupported_transfer_coding"


def test_unknown_expectation_rejected(server):
    extra = f"Expect: 200-ok\r\nContent-Length: {len(READING)}\r\n"
    response = send(server, head(server, extra) + READING)
    assert response[0] == "HTTP/1.1 417 Expectation Failed", response
    assert error_of(response) == "expectation_failed"


def test_websocket_version_426_status_text(server):
    data = (b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 8\r\n\r\n")
    response = send(server, data)
    assert response[0] == "HTTP/1.1 426 Upgrade Required", response


def test_mqtt_second_connect_reason(server):
    with raw.Client(server.mqtt_port) as client:
        ack = client.connect(f"hostile-{uuid.uuid4().hex[:8]}", "dev-1",
                             server.keys["dev-1"])
        assert ack.reason == 0
        client.send(raw.connect("again", "dev-1", server.keys["dev-1"]))
        packet = client.read()
        assert packet.type == raw.DISCONNECT
        assert packet.reason == 0x82
        assert packet.reason_string == "a second CONNECT is a protocol error"
