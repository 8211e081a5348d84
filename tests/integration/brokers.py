"""Real message brokers for the sink integration tests, on loopback.

Each broker runs from its Debian package on a free 127.0.0.1 port with its
data in a temporary folder, and is started and stopped by PID. A test
module imports the helper it needs; helpers for other brokers are added
here next to Redis.
"""

import dataclasses
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import binary, free_port

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
        """Start the server and wait until it replies to PING."""
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
        line per field name and value. Envelopes are compact JSON, so no
        value contains a newline. A value that looks like an entry id
        (digits, '-', digits) would be misread, so test device ids must
        not have that form.
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


# --- Kafka: librdkafka's mock cluster (tests/tools/kafka_mock.c) -----------

KCAT_TIMEOUT_S = 30


def kafka_mock_binary():
    """Return the kafka_mock path: $KAFKA_MOCK_BIN or beside ingestd."""
    return os.environ.get(
        "KAFKA_MOCK_BIN",
        os.path.join(os.path.dirname(binary()) or ".", "kafka_mock"))


@dataclasses.dataclass
class KafkaMessage:
    """One message read back with kcat."""

    partition: int
    offset: int
    key: str
    headers: dict
    value: str


class KafkaMock:
    """A running kafka_mock process: a 3-broker cluster on 127.0.0.1."""

    def __init__(self, folder, topics=("telemetry.default:3",)):
        require("kcat", "kcat")
        self.log = folder / "kafka_mock.log"
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(
                [kafka_mock_binary(), *topics], stdout=subprocess.PIPE,
                stderr=log_file)
        ready, _, _ = select.select([self.proc.stdout], [], [],
                                    START_TIMEOUT_S)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            self.stop()
            raise AssertionError(
                f"kafka_mock printed no bootstrap servers within "
                f"{START_TIMEOUT_S} s; its log:\n{self.log.read_text()}")
        self.bootstrap = line

    def brokers_down(self):
        """Take every broker down: connections close, new ones fail."""
        self.proc.send_signal(signal.SIGUSR1)

    def brokers_up(self):
        """Let every broker accept connections again."""
        self.proc.send_signal(signal.SIGUSR2)

    def kcat(self, *args):
        """Run kcat against the cluster and return its stdout."""
        proc = subprocess.run(["kcat", "-b", self.bootstrap, *args],
                              capture_output=True, timeout=KCAT_TIMEOUT_S)
        assert proc.returncode == 0, (
            f"kcat {' '.join(args)} exited with {proc.returncode}: "
            f"{proc.stderr!r}")
        return proc.stdout.decode()

    def message_count(self, topic):
        """Return the sum of the end offsets of the topic's partitions."""
        meta = json.loads(self.kcat("-L", "-J", "-t", topic))
        total = 0
        for p in meta["topics"][0]["partitions"]:
            last = self.kcat("-C", "-t", topic, "-p", str(p["partition"]),
                             "-o", "-1", "-c", "1", "-e", "-q", "-f", "%o")
            if last.strip():
                total += int(last) + 1
        return total

    def consume(self, topic):
        """Return every message in `topic`, read with kcat from offset 0.

        kcat reads a known count instead of stopping at the end of the
        partitions (-e), because with -e it stopped early on the mock
        cluster (librdkafka 2.0.2): after 15,879 of a partition's 56,000
        messages in one run.
        """
        count = self.message_count(topic)
        if count == 0:
            return []
        proc = subprocess.run(
            ["kcat", "-C", "-b", self.bootstrap, "-t", topic, "-o",
             "beginning", "-c", str(count), "-q", "-f",
             "%p\\t%o\\t%k\\t%h\\t%s\\n"],
            capture_output=True, timeout=KCAT_TIMEOUT_S)
        assert proc.returncode == 0, (
            f"kcat -C exited with {proc.returncode}: {proc.stderr!r}")
        messages = []
        for line in proc.stdout.decode().splitlines():
            partition, offset, key, headers, value = line.split("\t", 4)
            pairs = (h.split("=", 1) for h in headers.split(",") if h)
            messages.append(KafkaMessage(int(partition), int(offset), key,
                                         dict(pairs), value))
        return messages

    def stop(self):
        """Stop the cluster with SIGTERM, killing it after a timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc.stdout.close()


@pytest.fixture
def kafka(tmp_path):
    """A mock Kafka cluster with telemetry.default (3 partitions)."""
    cluster = KafkaMock(tmp_path)
    yield cluster
    cluster.stop()


# --- RabbitMQ: rabbitmq-server as the rabbitmq user -------------------------

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
RABBITMQ_START_TIMEOUT_S = 60


def free_dist_port():
    """Return a port that was free on every local address a moment ago.

    RabbitMQ checks its Erlang distribution port by binding it on the
    wildcard address, which fails when any 127.0.0.x address uses the
    port, even though the node itself listens on 127.0.0.1 only. Binding
    without listening opens nothing to other hosts.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class AmqpMessage:
    """One message read back from a queue with pika."""

    exchange: str
    routing_key: str
    message_id: str
    content_type: str
    delivery_mode: int
    headers: dict
    body: str


class RabbitMQ:
    """A rabbitmq-server node on 127.0.0.1, run as the rabbitmq user.

    The node has its own name, ports, Erlang port mapper (epmd) and data
    in a temporary folder that the rabbitmq user owns, so that it neither
    uses nor disturbs a system RabbitMQ. Messages in durable queues
    survive stop() and start(). Call close() at the end to stop epmd and
    remove the folder.
    """

    def __init__(self):
        if not os.path.exists(RABBITMQ_SERVER):
            pytest.skip("rabbitmq-server not found: run "
                        "scripts/install-deps.sh test (package "
                        "rabbitmq-server)")
        require("epmd", "erlang-base")
        pytest.importorskip("pika", reason="install python3-pika")
        # A folder in /tmp, because pytest's are closed to other users.
        self.folder = tempfile.mkdtemp(prefix="ingestd-rabbitmq-")
        self.port = free_port()
        self.dist_port = free_dist_port()
        self.epmd_port = free_port()
        self.node = f"ingestd-test-{self.port}@localhost"
        self.log = os.path.join(self.folder, "server.log")
        self._write_files()
        self.env = self._environment()
        self.proc = None
        # Our own epmd, started before the node so that the node does not
        # start a daemonized one that we could not stop by PID.
        self.epmd = self._spawn(["epmd", "-port", str(self.epmd_port),
                                 "-address", "127.0.0.1"], "epmd.log")

    def _write_files(self):
        """Write the node's config files, owned by the rabbitmq user."""
        user = pwd.getpwnam("rabbitmq")
        with open(os.path.join(self.folder, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                    "loopback_users.guest = true\n"
                    "log.console = false\n"
                    "log.file.level = info\n")
        with open(os.path.join(self.folder, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        open(os.path.join(self.folder, "rabbitmq-env.conf"), "w").close()
        for root, dirs, files in os.walk(self.folder):
            for name in [root, *(os.path.join(root, n)
                                 for n in dirs + files)]:
                os.chown(name, user.pw_uid, user.pw_gid)

    def _environment(self):
        """Return the environment of the node and of rabbitmqctl."""
        def path(name):
            return os.path.join(self.folder, name)

        loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": self.folder,  # the Erlang cookie goes here
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_BASE": self.folder,
            "RABBITMQ_MNESIA_BASE": path("mnesia"),
            "RABBITMQ_LOG_BASE": path("log"),
            "RABBITMQ_FEATURE_FLAGS_FILE": path("feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": path("enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": path("plugins"),
            "RABBITMQ_CONFIG_FILE": path("rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": path("advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": path("rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": path("pid"),
            # The Erlang distribution listens on loopback only.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback,
            "RABBITMQ_CTL_ERL_ARGS": loopback,
        }

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _spawn(self, args, log_name):
        with open(os.path.join(self.folder, log_name), "ab") as log:
            return subprocess.Popen(args, env=self.env, user="rabbitmq",
                                    group="rabbitmq", extra_groups=[],
                                    cwd=self.folder, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def ctl(self, *args, timeout=30):
        """Run rabbitmqctl against the node as the rabbitmq user."""
        return subprocess.run([RABBITMQCTL, "-n", self.node, *args],
                              env=self.env, user="rabbitmq",
                              group="rabbitmq", extra_groups=[],
                              cwd=self.folder, capture_output=True,
                              text=True, timeout=timeout)

    def start(self):
        """Start the node and wait until it accepts AMQP connections.

        Another process may have taken the distribution port since
        free_dist_port() chose it, such as for an outgoing connection. The
        node then stops at once with dist_port_already_used, and is
        started again on a new distribution port, at most twice.
        """
        for _ in range(2):
            if self._start_once():
                return
            self.dist_port = free_dist_port()
            self.env = self._environment()
        if not self._start_once():
            raise AssertionError(
                f"rabbitmq-server exited with {self.proc.returncode}: "
                f"{self.server_log()}")

    def _start_once(self):
        """Start the node and wait for it. Return False when it stopped
        because its distribution port is in use."""
        log_start = (os.path.getsize(self.log)
                     if os.path.exists(self.log) else 0)
        self.proc = self._spawn([RABBITMQ_SERVER], "server.log")
        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as f:
                    f.seek(log_start)
                    if "dist_port_already_used" in f.read():
                        return False
                raise AssertionError(
                    f"rabbitmq-server exited with {self.proc.returncode}: "
                    f"{self.server_log()}")
            # await_startup fails at once while the node is not yet
            # registered with epmd, so it is retried until the deadline.
            left = max(1, int(deadline - time.monotonic()))
            try:
                done = self.ctl("await_startup", "--timeout", str(left),
                                timeout=left + 10)
            except subprocess.TimeoutExpired:
                break
            if done.returncode == 0 and self._port_open():
                return True
            time.sleep(0.5)
        self.stop()
        raise AssertionError(
            f"rabbitmq-server not ready within {RABBITMQ_START_TIMEOUT_S} "
            f"s: {self.server_log()}")

    def _port_open(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port),
                                          timeout=1):
                return True
        except OSError:
            return False

    def server_log(self):
        with open(self.log, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self):
        """Stop the node by its PID: the start script turns SIGTERM into
        a clean shutdown. The whole process group is killed on timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S * 3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self):
        """Stop the node and its epmd, and remove the folder."""
        self.stop()
        if self.epmd.poll() is None:
            self.epmd.send_signal(signal.SIGTERM)
            try:
                self.epmd.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _connection(self):
        import pika  # noqa: PLC0415 - skipped above when missing

        params = pika.ConnectionParameters(
            host="127.0.0.1", port=self.port, connection_attempts=1,
            socket_timeout=10, blocked_connection_timeout=10)
        return pika.BlockingConnection(params)

    def bind_queue(self, queue, exchange="telemetry", binding_key="#",
                   exchange_type="topic", durable_exchange=True):
        """Declare a durable queue and bind it to `exchange`, by default a
        durable topic exchange, declared as the sink declares it."""
        conn = self._connection()
        try:
            ch = conn.channel()
            ch.exchange_declare(exchange, exchange_type=exchange_type,
                                durable=durable_exchange)
            ch.queue_declare(queue, durable=True)
            ch.queue_bind(queue, exchange, routing_key=binding_key)
        finally:
            conn.close()

    def queue_length(self, queue):
        """Return the number of messages ready in `queue`."""
        conn = self._connection()
        try:
            declared = conn.channel().queue_declare(queue, passive=True)
            return declared.method.message_count
        finally:
            conn.close()

    def get_all(self, queue, limit=100000):
        """Remove and return up to `limit` messages from `queue`."""
        conn = self._connection()
        messages = []
        try:
            ch = conn.channel()
            while len(messages) < limit:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    break
                messages.append(AmqpMessage(
                    method.exchange, method.routing_key,
                    props.message_id or "", props.content_type or "",
                    props.delivery_mode or 0, dict(props.headers or {}),
                    body.decode()))
        finally:
            conn.close()
        return messages


# --- NATS: nats-server with JetStream, read back with nats_consume ---------

def nats_consume_binary():
    """Return the nats_consume path: $NATS_CONSUME_BIN or beside ingestd."""
    return os.environ.get(
        "NATS_CONSUME_BIN",
        os.path.join(os.path.dirname(binary()) or ".", "nats_consume"))


def _wait_port(port, proc, name, log):
    """Wait until `port` on 127.0.0.1 accepts connections."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{name} exited with {proc.returncode}: "
                f"{log.read_text() if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{name} not ready within {START_TIMEOUT_S} s")


def _stop_process(proc):
    """Stop `proc` by its PID: SIGTERM, then SIGKILL on timeout."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


class Nats:
    """A nats-server with JetStream on 127.0.0.1, its file store in
    `folder`, so streams and messages survive stop() and start().

    `max_payload` sets the server's maximum message size in bytes.
    """

    def __init__(self, folder, max_payload=None):
        require("nats-server", "nats-server")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "nats.log"
        self.config = folder / "nats.conf"
        self.config.write_text(
            f"max_payload: {max_payload}\n" if max_payload else "")
        self.proc = None

    @property
    def address(self):
        return f"nats://127.0.0.1:{self.port}"

    def start(self):
        """Start the server and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            ["nats-server", "-c", str(self.config), "-a", "127.0.0.1",
             "-p", str(self.port), "-js", "-sd", str(self.folder / "store"),
             "-l", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "nats-server", self.log)

    def stop(self):
        _stop_process(self.proc)

    def consume(self, *args):
        proc = subprocess.run([nats_consume_binary(), self.address, *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (
            f"nats_consume {' '.join(args)} exited with "
            f"{proc.returncode}: {proc.stderr}")
        return proc.stdout

    def count(self, stream):
        """Return the number of messages stored in `stream`."""
        return int(self.consume(stream, "count"))

    def messages(self, stream):
        """Return every message in `stream` as dicts with seq, subject,
        headers and data (the envelope, parsed)."""
        messages = []
        for line in self.consume(stream).splitlines():
            message = json.loads(line)
            message["data"] = json.loads(message["data"])
            messages.append(message)
        return messages


# --- MQTT: a second mosquitto as the MQTT sink's external broker -----------

class Mosquitto:
    """A mosquitto on 127.0.0.1 with persistence in `folder`.

    A stop with SIGTERM saves the messages queued for persistent sessions,
    and start() loads them again, so a subscriber with a persistent
    session misses nothing acknowledged across a restart. Queues are not
    limited. `message_size_limit` caps a PUBLISH payload in bytes.
    """

    def __init__(self, folder, message_size_limit=None):
        require("mosquitto", "mosquitto")
        require("mosquitto_sub", "mosquitto-clients")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "mosquitto.log"
        self.config = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1",
                 "allow_anonymous true",
                 "persistence true",
                 f"persistence_location {folder}/",
                 "max_queued_messages 0",
                 f"log_dest file {self.log}"]
        if message_size_limit:
            lines.append(f"message_size_limit {message_size_limit}")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "mosquitto", self.log)

    def stop(self):
        _stop_process(self.proc)

    def subscribe(self, topic, out_path, client_id, probe_topic):
        """Start mosquitto_sub with a persistent session (QoS 1, session
        expiry 1 h) writing "topic TAB content type TAB user properties
        TAB payload" lines to `out_path`; return its Popen once a probe
        message on `probe_topic` (which `topic` must match) arrived. It
        reconnects by itself after a broker restart."""
        out = open(out_path, "ab")
        proc = subprocess.Popen(
            ["mosquitto_sub", "-V", "mqttv5", "-h", "127.0.0.1", "-p",
             str(self.port), "-i", client_id, "-c", "-x", "3600", "-q",
             "1", "-t", topic, "-F", "%t\t%C\t%P\t%p"],
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port),
                 "-q", "1", "-t", probe_topic, "-m", "probe"],
                capture_output=True, timeout=STOP_TIMEOUT_S)
            if probe_topic in out_path.read_text():
                return proc
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
                raise AssertionError("mosquitto_sub did not subscribe")
            time.sleep(0.2)
