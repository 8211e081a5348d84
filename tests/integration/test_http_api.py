"""Integration tests of the HTTP API and admin listener against the real
ingestd binary on loopback.

Framing cases (both Content-Length and Transfer-Encoding, missing length,
pipelining, timeouts) use raw sockets, because HTTP client libraries refuse
to send such requests. Socket reads are bounded by SOCKET_TIMEOUT_S.
"""

import json
import socket
import subprocess

import pytest
import requests

from conftest import add_device, binary, free_port, write_config

SOCKET_TIMEOUT_S = 5


def reading(device_id="dev-1", value=42.5, **extra):
    """Return one reading that passes the test schema."""
    return {"device_id": device_id, "sensor_value": value, **extra}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def post(server, body, key=None, content_type="application/json",
         headers=None):
    """POST `body` (bytes, str or a JSON value) to /v1/data."""
    h = {"Content-Type": content_type}
    if key is not None:
        h.update(auth(key))
    h.update(headers or {})
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return requests.post(server.base_url + "/v1/data", data=body,
                         headers=h, timeout=10)


def assert_error(resp, status, code):
    """Check the status and the JSON error body of a response."""
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert body["error"] == code
    assert body["message"]
    return body


# ---- raw socket helpers ----

class RawResponse:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


def connect(server):
    sock = socket.create_connection((server.host, server.port),
                                    timeout=SOCKET_TIMEOUT_S)
    return sock, sock.makefile("rb")


def read_response(reader):
    """Read one response (skipping 100 Continue), or return None at EOF."""
    while True:
        line = reader.readline()
        if not line:
            return None
        status = int(line.split()[1])
        headers = {}
        while True:
            line = reader.readline().rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            continue
        body = reader.read(int(headers.get("content-length", "0")))
        return RawResponse(status, headers, body)


def at_eof(sock, reader):
    """Return True when the server closed the connection."""
    try:
        return reader.read(1) == b""
    except ConnectionResetError:
        return True


def raw_request(key, body, extra="", method="POST", path="/v1/data",
                version="HTTP/1.1", content_type="application/json"):
    """Build one request with Content-Length."""
    if isinstance(body, str):
        body = body.encode()
    head = (f"{method} {path} {version}\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


# ---- 202 ----

def test_single_reading_accepted(ingestd):
    resp = post(ingestd, reading(), ingestd.keys["dev-1"])
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == 1
    assert len(body["ids"]) == 1
    ingestd.wait_for_ids(body["ids"])
    record = next(r for r in ingestd.output_records()
                  if r["message_id"] == body["ids"][0])
    assert record["device_id"] == "dev-1"
    assert record["payload"] == reading()


def test_array_accepted_in_order(ingestd):
    readings = [reading(value=v) for v in (1, 2, 3)]
    resp = post(ingestd, readings, ingestd.keys["dev-1"])
    assert resp.status_code == 202, resp.text
    ids = resp.json()["ids"]
    assert resp.json()["accepted"] == 3
    assert len(set(ids)) == 3
    ingestd.wait_for_ids(ids)
    by_id = {r["message_id"]: r for r in ingestd.output_records()}
    assert [by_id[i]["payload"]["sensor_value"] for i in ids] == [1, 2, 3]


@pytest.mark.parametrize("content_type", ["application/x-ndjson",
                                          "application/ndjson"])
def test_ndjson_accepted(ingestd, content_type):
    body = (json.dumps(reading(value=5)) + "\n\n" +
            json.dumps(reading(value=6)) + "\r\n")
    resp = post(ingestd, body, ingestd.keys["dev-1"], content_type)
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == 2


def test_x_api_key_header_accepted(ingestd):
    resp = post(ingestd, reading("dev-2"),
                headers={"X-API-Key": ingestd.keys["dev-2"]},
                content_type="application/json; charset=utf-8")
    assert resp.status_code == 202, resp.text


def test_reading_without_device_id_accepted(ingestd):
    resp = post(ingestd, {"sensor_value": 7}, ingestd.keys["dev-1"])
    assert resp.status_code == 202, resp.text


# ---- 400 ----

def test_invalid_json_rejected(ingestd):
    resp = post(ingestd, '{"device_id": "dev-1",\n "sensor_value": }',
                ingestd.keys["dev-1"])
    body = assert_error(resp, 400, "invalid_json")
    assert "line 2 column" in body["message"]


def test_schema_violation_names_pointer(ingestd):
    readings = [reading(value=10), reading(value=120)]
    resp = post(ingestd, readings, ingestd.keys["dev-1"])
    body = assert_error(resp, 400, "validation_failed")
    assert body["message"].startswith("1 of 2 readings failed validation")
    assert len(body["readings"]) == 1
    assert body["readings"][0]["index"] == 1
    pointers = [e["pointer"] for e in body["readings"][0]["errors"]]
    assert pointers == ["/sensor_value"]


def test_ndjson_bad_line_reported_by_index(ingestd):
    body = json.dumps(reading()) + "\n{not json\n" + json.dumps(reading())
    resp = post(ingestd, body, ingestd.keys["dev-1"],
                "application/x-ndjson")
    body = assert_error(resp, 400, "validation_failed")
    assert [r["index"] for r in body["readings"]] == [1]
    reason = body["readings"][0]["errors"][0]["reason"]
    assert "invalid JSON" in reason


def test_array_element_not_object_rejected(ingestd):
    resp = post(ingestd, [reading(), 5], ingestd.keys["dev-1"])
    body = assert_error(resp, 400, "validation_failed")
    assert body["readings"][0]["index"] == 1
    assert "must be an object" in body["readings"][0]["errors"][0]["reason"]


@pytest.mark.parametrize("payload", [b"", b"[]", b"\n\n"])
def test_empty_body_rejected(ingestd, payload):
    content_type = ("application/x-ndjson" if payload == b"\n\n"
                    else "application/json")
    resp = post(ingestd, payload, ingestd.keys["dev-1"], content_type)
    assert_error(resp, 400, "empty_body")


def test_chunk_without_crlf_after_data_rejected(ingestd):
    """Bytes other than CRLF after chunk data are bad framing: accepting
    them lets a request be smuggled behind the chunk."""
    reading = b'{"sensor_value": 1}'
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(
            b"POST /v1/data HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + ingestd.keys["dev-1"].encode() +
            b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" +
            f"{len(reading):x}".encode() + b"\r\n" + reading +
            b"ZZ0\r\n\r\n")
        resp = read_response(reader)
        assert resp.status == 400
        assert resp.headers["connection"] == "close"
        assert resp.json()["error"] == "bad_request"


def test_both_content_length_and_chunked_rejected(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(
            b"POST /v1/data HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + ingestd.keys["dev-1"].encode() +
            b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n")
        resp = read_response(reader)
        assert resp.status == 400
        assert resp.headers["connection"] == "close"
        assert resp.json()["error"] == "bad_request"
        assert at_eof(sock, reader)


def test_malformed_request_line_rejected(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(b"HELLO\x01 / HTTP/1.1\r\n\r\n")
        resp = read_response(reader)
        assert resp.status == 400
        assert resp.json()["error"] == "bad_request"
        assert at_eof(sock, reader)


# ---- 401, 403 ----

def test_missing_key_rejected(ingestd):
    resp = post(ingestd, reading())
    assert_error(resp, 401, "missing_credentials")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_key_rejected(ingestd):
    resp = post(ingestd, reading(), "ik_" + "A" * 43)
    assert_error(resp, 401, "invalid_credentials")


def test_overlong_key_rejected(ingestd):
    resp = post(ingestd, reading(), "ik_" + "A" * 500)
    assert_error(resp, 401, "invalid_credentials")


def test_disabled_device_rejected(ingestd):
    resp = post(ingestd, reading("dev-off"), ingestd.keys["dev-off"])
    assert_error(resp, 403, "device_disabled")


def test_device_mismatch_rejected(ingestd):
    readings = [reading("dev-1"), reading("dev-2")]
    resp = post(ingestd, readings, ingestd.keys["dev-1"])
    body = assert_error(resp, 403, "device_mismatch")
    assert [r["index"] for r in body["readings"]] == [1]


# ---- 404, 405, 411, 413, 415, 431 ----

def test_unknown_path_rejected(ingestd):
    resp = requests.post(ingestd.base_url + "/v2/data", data="{}",
                         headers=auth(ingestd.keys["dev-1"]), timeout=5)
    body = assert_error(resp, 404, "not_found")
    assert "/v1/data" in body["message"]


def test_wrong_method_rejected(ingestd):
    resp = requests.get(ingestd.base_url + "/v1/data", timeout=5)
    assert_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"


def test_post_without_length_rejected(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(
            b"POST /v1/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
            ingestd.keys["dev-1"].encode() +
            b"\r\nContent-Type: application/json\r\n\r\n")
        resp = read_response(reader)
        assert resp.status == 411
        body = resp.json()
        assert body["error"] == "length_required"
        assert "Content-Length" in body["message"]
        assert at_eof(sock, reader)


def test_body_over_limit_rejected(ingestd):
    big = [reading(pad="x" * 1000) for _ in range(10)]
    resp = post(ingestd, big, ingestd.keys["dev-1"])
    assert_error(resp, 413, "body_too_large")


def test_chunked_body_over_limit_rejected(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(
            b"POST /v1/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
            ingestd.keys["dev-1"].encode() +
            b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"[" + b" " * 4000
        for _ in range(3):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        resp = read_response(reader)
        assert resp.status == 413
        assert resp.json()["error"] == "body_too_large"
        assert resp.headers["connection"] == "close"


def test_too_many_readings_rejected(ingestd):
    resp = post(ingestd, [reading() for _ in range(21)],
                ingestd.keys["dev-1"])
    body = assert_error(resp, 413, "too_many_readings")
    assert "21" in body["message"]


@pytest.mark.parametrize("content_type", ["text/plain",
                                          "application/json; charset=latin1"])
def test_unsupported_media_type_rejected(ingestd, content_type):
    resp = post(ingestd, json.dumps(reading()), ingestd.keys["dev-1"],
                content_type)
    body = assert_error(resp, 415, "unsupported_media_type")
    assert "application/x-ndjson" in body["message"]


def test_headers_over_limit_rejected(ingestd):
    resp = post(ingestd, reading(), ingestd.keys["dev-1"],
                headers={"X-Padding": "p" * 3000})
    assert_error(resp, 431, "headers_too_large")


# ---- 100-continue ----

def curl_post(server, key, body, tmp_path):
    """POST `body` with curl and Expect: 100-continue; return
    (status, verbose output)."""
    path = tmp_path / "body.json"
    path.write_text(body)
    proc = subprocess.run(
        ["curl", "-sS", "-v", "-o", str(tmp_path / "answer"), "-w",
         "%{http_code}", "--max-time", "10", "-H",
         "Content-Type: application/json", "-H", f"Authorization: Bearer {key}",
         "-H", "Expect: 100-continue", "--data-binary", f"@{path}",
         server.base_url + "/v1/data"],
        capture_output=True, text=True, timeout=20)
    return int(proc.stdout), proc.stderr


def test_expect_continue_accepted(ingestd, tmp_path):
    body = json.dumps([reading(pad="y" * 150) for _ in range(10)])
    assert len(body) > 1024
    status, verbose = curl_post(ingestd, ingestd.keys["dev-1"], body,
                                tmp_path)
    assert status == 202, verbose
    assert "HTTP/1.1 100 Continue" in verbose


def test_expect_continue_rejected_without_continue(ingestd, tmp_path):
    body = json.dumps([reading(pad="y" * 150) for _ in range(10)])
    status, verbose = curl_post(ingestd, "ik_" + "B" * 43, body, tmp_path)
    assert status == 401, verbose
    assert "100 Continue" not in verbose


def test_expect_continue_rejection_closes(ingestd):
    body = json.dumps(reading())
    request = raw_request("ik_bad", body, "Expect: 100-continue\r\n")
    head, payload = request.split(b"\r\n\r\n", 1)
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(head + b"\r\n\r\n")
        resp = read_response(reader)
        assert resp.status == 401
        assert resp.headers["connection"] == "close"
        # A client that sends the body anyway gets no second response.
        sock.sendall(payload)
        assert at_eof(sock, reader)


def test_duplicate_content_length_rejected(ingestd):
    request = raw_request(ingestd.keys["dev-1"], "{}", "Content-Length: 2\r\n")
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(request)
        resp = read_response(reader)
        assert resp.status == 400
        assert resp.json()["error"] == "bad_request"
        assert "Content-Length" in resp.json()["message"]
        assert at_eof(sock, reader)


# ---- connection handling ----

def test_pipelined_requests_in_order(ingestd):
    key = ingestd.keys["dev-1"]
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(raw_request(key, json.dumps(reading(value=11))) +
                     raw_request("ik_bad", json.dumps(reading())) +
                     raw_request(key, json.dumps([reading(value=12)] * 2)))
        first = read_response(reader)
        second = read_response(reader)
        third = read_response(reader)
    assert first.status == 202
    assert first.json()["accepted"] == 1
    assert second.status == 401
    assert third.status == 202
    assert third.json()["accepted"] == 2


def test_chunked_body_accepted(ingestd):
    payload = json.dumps([reading(value=21), reading(value=22)]).encode()
    half = len(payload) // 2
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(
            b"POST /v1/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
            ingestd.keys["dev-1"].encode() +
            b"\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
        for part in (payload[:half], payload[half:]):
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        sock.sendall(b"0\r\n\r\n")
        resp = read_response(reader)
    assert resp.status == 202
    assert resp.json()["accepted"] == 2


def test_keep_alive_connection_reused(ingestd):
    key = ingestd.keys["dev-1"]
    sock, reader = connect(ingestd)
    with sock:
        for value in (31, 32, 33):
            sock.sendall(raw_request(key, json.dumps(reading(value=value))))
            resp = read_response(reader)
            assert resp.status == 202
            assert "connection" not in resp.headers


def test_http10_closes_without_keep_alive(ingestd):
    key = ingestd.keys["dev-1"]
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(raw_request(key, json.dumps(reading()),
                                 version="HTTP/1.0"))
        resp = read_response(reader)
        assert resp.status == 202
        assert resp.headers["connection"] == "close"
        assert at_eof(sock, reader)


def test_http10_keep_alive_reused(ingestd):
    key = ingestd.keys["dev-1"]
    sock, reader = connect(ingestd)
    with sock:
        for _ in range(2):
            sock.sendall(raw_request(key, json.dumps(reading()),
                                     "Connection: keep-alive\r\n",
                                     version="HTTP/1.0"))
            resp = read_response(reader)
            assert resp.status == 202
            assert resp.headers["connection"] == "keep-alive"


def test_header_timeout_closes_slow_client(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(b"POST /v1/data HTTP/1.1\r\nHost: x\r\n")
        resp = read_response(reader)
        assert resp.status == 408
        assert resp.json()["error"] == "request_timeout"
        assert at_eof(sock, reader)


def test_body_timeout_closes_slow_client(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(raw_request(ingestd.keys["dev-1"], "x" * 100)[:-90])
        resp = read_response(reader)
        assert resp.status == 408
        assert resp.json()["error"] == "request_timeout"
        assert at_eof(sock, reader)


def test_idle_connection_closed_silently(ingestd):
    sock, reader = connect(ingestd)
    with sock:
        sock.sendall(raw_request(ingestd.keys["dev-1"],
                                 json.dumps(reading())))
        assert read_response(reader).status == 202
        # The server closes after idle_timeout (2 s), within the 5 s
        # socket timeout, and sends nothing first.
        assert reader.read() == b""


# ---- limits that need their own server ----

def test_spool_full_returns_503(ingestd_factory):
    # The sink syncs every record on its own while the spool syncs a whole
    # request at once, so the sink falls behind and the 128 KiB spool
    # fills. NOTE: this relies on that speed difference; a sink that kept
    # up with 200 requests in a row would make the test fail.
    server = ingestd_factory(spool={"max_size": "128KiB",
                                    "segment_size": "64KiB"},
                             sink={"fsync": "true", "batch_records": 1})
    batch = [reading(pad="z" * 300) for _ in range(20)]
    resp = None
    with requests.Session() as session:
        for _ in range(200):
            resp = session.post(server.base_url + "/v1/data",
                                data=json.dumps(batch),
                                headers={"Content-Type": "application/json",
                                         **auth(server.keys["dev-1"])},
                                timeout=10)
            if resp.status_code != 202:
                break
    body = assert_error(resp, 503, "spool_full")
    assert "retry" in body["message"]
    assert resp.headers["Retry-After"] == "3"


def test_max_connections_turns_away(ingestd_factory):
    server = ingestd_factory(http={"workers": 1, "max_connections": 2})
    open_conns = [connect(server) for _ in range(2)]
    try:
        sock, reader = connect(server)
        with sock:
            resp = read_response(reader)
            assert resp.status == 503
            assert resp.json()["error"] == "too_many_connections"
            assert resp.headers["retry-after"] == "3"
    finally:
        for s, _ in open_conns:
            s.close()


def test_listen_address_in_use_reported(tmp_path):
    # A second ingestd of the same user would share the port through
    # SO_REUSEPORT. A socket bound without SO_REUSEPORT blocks the port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        config = write_config(tmp_path, port, free_port())
        add_device("dev-1", config)
        proc = subprocess.run([binary(), "serve", "-c", str(config)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"listen 127.0.0.1:{port}: Address already in use" in proc.stderr


# ---- admin listener ----

def test_admin_endpoints(ingestd):
    r = requests.get(ingestd.admin_url + "/healthz", timeout=5)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    r = requests.get(ingestd.admin_url + "/readyz", timeout=5)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    # The sink state is shown for information; lag_records moves with load.
    assert body["sinks"]["out"]["type"] == "file"
    assert body["sinks"]["out"]["connected"] is True
    assert body["sinks"]["out"]["lag_records"] >= 0
    r = requests.get(ingestd.admin_url + "/nope", timeout=5)
    assert_error(r, 404, "not_found")
    r = requests.post(ingestd.admin_url + "/metrics", timeout=5)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "GET"


def test_metrics_count_requests(ingestd):
    assert post(ingestd, reading(), ingestd.keys["dev-1"]).status_code == 202
    r = requests.get(ingestd.admin_url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4"
    text = r.text
    assert 'ingestd_http_requests_total{listener="api",status="202"}' in text
    assert ('ingestd_readings_total{protocol="http",result="accepted"}'
            in text)
    assert "ingestd_http_request_duration_seconds_bucket" in text
    assert 'ingestd_http_connections{listener="api"}' in text
    assert 'ingestd_http_bytes_received_total{listener="api"}' in text
