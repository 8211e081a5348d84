"""Real message brokers for the sink integration tests, on loopback.

Each broker runs from its Debian package on a free 127.0.0.1 port with its
data in a temporary folder, and is started and stopped by PID. A test
module imports the helper it needs; helpers for other brokers are added
here next to Redis.
"""

import shutil
import signal
import subprocess
import time

import pytest

from conftest import free_port

START_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10


def require(program, package):
    """Skip the test when `program` is missing (install `package`)."""
    if shutil.which(program) is None:
        pytest.skip(f"{program} not found: run scripts/install-deps.sh test "
                    f"(package {package})")


class Redis:
    """A redis-server on 127.0.0.1 with its data in `folder`.

    By default nothing is persisted, so a stopped server comes back empty.
    With persistent=True every write is appended to an AOF file and
    fsynced, so entries survive stop() and start().
    """

    def __init__(self, folder, persistent=False):
        require("redis-server", "redis-server")
        require("redis-cli", "redis-tools")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.proc = None
        self.log = folder / "redis.log"

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        """Start the server and wait until it answers PING."""
        args = ["redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.folder), "--logfile", str(self.log)]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.proc.returncode}: "
                    f"{self.log.read_text() if self.log.exists() else ''}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"redis-server not ready within "
                             f"{START_TIMEOUT_S} s")

    def ping(self):
        try:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), "PING"],
                capture_output=True, text=True, timeout=2).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "PONG"

    def stop(self):
        """Stop the server by its PID: SIGTERM, then SIGKILL on timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def cli(self, *args):
        """Run redis-cli --raw with `args` and return its output lines."""
        proc = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--raw", *args],
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    def xrange(self, key):
        """Return the entries of stream `key` as a list of field dicts.

        With --raw, redis-cli prints each entry as its id and then one
        line per field name and value; no value contains a newline,
        because envelopes are compact JSON.
        """
        lines = self.cli("XRANGE", key, "-", "+")
        entries = []
        i = 0
        while i < len(lines):
            fields = {}
            i += 1  # the entry id
            while i + 1 < len(lines) and not _is_entry_id(lines[i]):
                fields[lines[i]] = lines[i + 1]
                i += 2
            entries.append(fields)
        return entries

    def subscribe(self, channel, out_path):
        """Start redis-cli SUBSCRIBE in the background, writing to
        `out_path`, and return its Popen once it is subscribed."""
        out = open(out_path, "wb")
        proc = subprocess.Popen(
            ["redis-cli", "-p", str(self.port), "--raw", "SUBSCRIBE",
             channel], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            count = self.cli("PUBSUB", "NUMSUB", channel)
            if len(count) == 2 and count[1] == "1":
                return proc
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)
        raise AssertionError("redis-cli SUBSCRIBE did not subscribe")


def _is_entry_id(line):
    """Return True for a stream entry id such as 1714564800000-0."""
    head, sep, tail = line.partition("-")
    return sep == "-" and head.isdigit() and tail.isdigit()
