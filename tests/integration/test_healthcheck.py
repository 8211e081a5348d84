"""`ingestd healthcheck`: the probe for container HEALTHCHECK lines.

It GETs /healthz (or /readyz with --ready) from admin.listen and exits 0
on 200, 1 on any other status or no response, and 2 on a usage or config error.
Fake admin servers here are plain sockets on 127.0.0.1.
"""

import socket
import subprocess
import threading

import pytest

from conftest import binary, free_port, write_config

# The probe gives up after 5 s; the process gets a margin on top.
CLI_TIMEOUT_S = 30


def healthcheck(config, *args):
    """Run `ingestd healthcheck` and return the completed process."""
    return subprocess.run([binary(), "healthcheck", *args, "-c", str(config)],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)


class FakeAdmin:
    """Accepts connections on 127.0.0.1 and replies with `response`.

    With `response` None it reads the request and never replies, to test
    the probe's timeout. Records each request's first line.
    """

    def __init__(self, response):
        self.response = response
        self.requests = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(CLI_TIMEOUT_S)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve_one, daemon=True)
        self.thread.start()

    def serve_one(self):
        """Serve one connection."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(CLI_TIMEOUT_S)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data.split(b"\r\n", 1)[0].decode())
            if self.response is None:
                # Keep the connection open until the probe gives up.
                conn.recv(1)
                return
            conn.sendall(self.response)

    def close(self):
        """Stop listening and wait for the serving thread."""
        self.sock.close()
        self.thread.join(timeout=CLI_TIMEOUT_S)


def config_for_admin(tmp_path, admin_listen):
    """Write a config whose admin.listen is `admin_listen`."""
    admin_port = free_port()
    config = write_config(tmp_path, free_port(), admin_port)
    line = f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
    text = config.read_text()
    assert line in text, "write_config changed its admin section"
    config.write_text(text.replace(
        line, f"admin:\n  listen: \"{admin_listen}\"\n"))
    return config


def test_healthcheck_live_server(ingestd):
    proc = healthcheck(ingestd.config)
    assert proc.returncode == 0, proc.stderr
    assert "GET /healthz" in proc.stdout
    assert "returned 200" in proc.stdout


def test_healthcheck_ready_flag(ingestd):
    proc = healthcheck(ingestd.config, "--ready")
    assert proc.returncode == 0, proc.stderr
    assert "GET /readyz" in proc.stdout


def test_healthcheck_nothing_listening(tmp_path):
    config = config_for_admin(tmp_path, f"127.0.0.1:{free_port()}")
    proc = healthcheck(config)
    assert proc.returncode == 1, proc.stdout
    assert "connect to 127.0.0.1:" in proc.stderr


def test_healthcheck_503_fails(tmp_path):
    admin = FakeAdmin(b"HTTP/1.1 503 Service Unavailable\r\n"
                      b"Content-Length: 0\r\n\r\n")
    try:
        config = config_for_admin(tmp_path, f"127.0.0.1:{admin.port}")
        proc = healthcheck(config, "--ready")
    finally:
        admin.close()
    assert proc.returncode == 1, proc.stdout
    assert "returned 503" in proc.stderr
    assert admin.requests == ["GET /readyz HTTP/1.1"]


def test_healthcheck_wildcard_probes_loopback(tmp_path):
    admin = FakeAdmin(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        config = config_for_admin(tmp_path, f"0.0.0.0:{admin.port}")
        proc = healthcheck(config)
    finally:
        admin.close()
    assert proc.returncode == 0, proc.stderr
    assert admin.requests == ["GET /healthz HTTP/1.1"]


def test_healthcheck_garbage_response(tmp_path):
    admin = FakeAdmin(b"SSH-2.0-OpenSSH\r\n")
    try:
        config = config_for_admin(tmp_path, f"127.0.0.1:{admin.port}")
        proc = healthcheck(config)
    finally:
        admin.close()
    assert proc.returncode == 1, proc.stdout
    assert "invalid HTTP status line" in proc.stderr


def test_healthcheck_silent_server_times_out(tmp_path):
    admin = FakeAdmin(None)
    try:
        config = config_for_admin(tmp_path, f"127.0.0.1:{admin.port}")
        proc = healthcheck(config)
    finally:
        admin.close()
    assert proc.returncode == 1, proc.stdout
    assert "timed out" in proc.stderr


def test_healthcheck_admin_off(tmp_path):
    config = config_for_admin(tmp_path, "")
    proc = healthcheck(config)
    assert proc.returncode == 2, proc.stdout
    assert "admin listener is off" in proc.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["extra"]])
def test_healthcheck_bad_argument(ingestd, args):
    proc = healthcheck(ingestd.config, *args)
    assert proc.returncode == 2, proc.stdout
    assert "unexpected argument" in proc.stderr
