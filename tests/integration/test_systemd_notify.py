"""sd_notify: READY=1, WATCHDOG=1 and STOPPING=1 as systemd receives them.

The test plays the service manager: it binds a unix datagram socket, sets
NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID the way systemd does for a
Type=notify unit with WatchdogSec, and reads what ingestd sends.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import binary, free_port, write_config

# Upper bounds for the waits below, not expected durations.
MESSAGE_TIMEOUT_S = 15
STOP_TIMEOUT_S = 30
# 200 ms makes ingestd ping every 100 ms.
WATCHDOG_USEC = 200_000


class NotifySocket:
    """A unix datagram socket that collects sd_notify messages."""

    def __init__(self):
        # sockaddr_un paths are limited to 108 bytes, so the socket lives
        # in a short folder of its own, not in pytest's tmp_path.
        self.folder = Path(tempfile.mkdtemp(prefix="ingestd-notify-"))
        self.path = self.folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages = []

    def wait_for(self, assignment, timeout_s=MESSAGE_TIMEOUT_S):
        """Read datagrams until one has the line `assignment`; return it."""
        deadline = time.monotonic() + timeout_s
        for message in self.messages:
            if assignment in message.split("\n"):
                return message
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {assignment} within {timeout_s} s; received: "
                    f"{self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            message = data.decode()
            self.messages.append(message)
            if assignment in message.split("\n"):
                return message

    def drain(self):
        """Read every datagram already queued."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self):
        """Close and remove the socket."""
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify_socket():
    """A NotifySocket removed after the test."""
    ns = NotifySocket()
    yield ns
    ns.close()


def start(tmp_path, notify_path, watchdog_pid="self"):
    """Start `ingestd serve` the way systemd starts a Type=notify unit.

    WATCHDOG_PID names the process that should ping. systemd sets it to
    the main PID, which the shell's $$ is once it execs ingestd; any
    other value names another process.
    """
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, port, admin_port)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path),
               WATCHDOG_USEC=str(WATCHDOG_USEC))
    pid_expr = "$$" if watchdog_pid == "self" else str(watchdog_pid)
    log = open(tmp_path / "ingestd.log", "wb")
    proc = subprocess.Popen(
        ["/bin/sh", "-c",
         f'WATCHDOG_PID={pid_expr} exec "$0" serve -c "$1"',
         binary(), str(config)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, port, admin_port


def stop(proc):
    """SIGTERM `proc` and return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
        return None


def test_notify_ready_watchdog_stopping(tmp_path, notify_socket):
    proc, port, admin_port = start(tmp_path, notify_socket.path)
    try:
        ready = notify_socket.wait_for("READY=1")
        assert "STATUS=accepting readings on 127.0.0.1:%d" % port in (
            ready.split("\n"))
        # READY=1 comes after every listener accepts.
        r = requests.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=5)
        assert r.status_code == 200
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

        notify_socket.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING=1")
        assert any(line.startswith("STATUS=draining")
                   for line in stopping.split("\n"))
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "ingestd.log").read_text()[-4000:]


def test_notify_watchdog_for_other_pid(tmp_path, notify_socket):
    # PID 1 is not ingestd, so ingestd must not ping.
    proc, _, _ = start(tmp_path, notify_socket.path, watchdog_pid=1)
    try:
        notify_socket.wait_for("READY=1")
        # Ten watchdog periods: enough for pings to show up if sent.
        time.sleep(10 * WATCHDOG_USEC / 2 / 1e6)
        notify_socket.drain()
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "ingestd.log").read_text()[-4000:]
    assert not any("WATCHDOG=1" in m.split("\n")
                   for m in notify_socket.messages), notify_socket.messages


def test_notify_socket_missing_is_harmless(tmp_path):
    # A NOTIFY_SOCKET with no socket bound to it must not stop the service.
    missing = tmp_path / "no-such.sock"
    proc, _, admin_port = start(tmp_path, missing)
    try:
        deadline = time.monotonic() + MESSAGE_TIMEOUT_S
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = requests.get(
                    f"http://127.0.0.1:{admin_port}/readyz",
                    timeout=1).status_code
            except requests.ConnectionError:
                status = None
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "ingestd.log").read_text()[-4000:]
    assert "sending a notification to the service manager failed" in (
        (tmp_path / "ingestd.log").read_text())
