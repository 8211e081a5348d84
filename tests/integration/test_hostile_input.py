"""Hostile and unusual input over HTTP against the real ingestd on loopback:
chunk extensions, odd request lines and headers, conflicting credentials,
and readings whose JSON must reach the sink byte for byte.

Raw sockets send what HTTP client libraries refuse to send. Every socket
read is bounded by SOCKET_TIMEOUT_S and every load by a byte count.
"""

import json
import socket
import time

import pytest
import requests

from conftest import finish, start_server

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
