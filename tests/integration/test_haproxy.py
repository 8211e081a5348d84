"""Two ingestd instances behind the real HAProxy, with instances failing.

The HAProxy config is made from deploy/haproxy/haproxy.cfg: its defaults
and its api, mqtt and stats sections, with the listeners moved to free
ports on 127.0.0.1 and the servers replaced by the two instances. Both
instances share one device registry (registry.path) and have their own
data_dir, as instances on separate volumes would.

HTTP senders resend a reading after a connection error or a 5xx, and MQTT
QoS 1 senders reconnect through HAProxy and publish again what got no
PUBACK. During the load one instance is killed with SIGKILL and restarted,
then the other stops with SIGTERM. Every acknowledged reading must then be
in the union of both instances' file sink output.
"""

import collections
import csv
import io
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import requests

import mqtt_raw as raw
from conftest import add_device, binary, free_port, wait_ready, write_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy/haproxy/haproxy.cfg"
HAPROXY = "/usr/sbin/haproxy"

HTTP_SENDERS = 4
MQTT_SENDERS = 4
HTTP_DEVICES = [f"lb-http-{i}" for i in range(HTTP_SENDERS)]
MQTT_DEVICES = [f"lb-mqtt-{i}" for i in range(MQTT_SENDERS)]
MQTT_WINDOW = 4  # QoS 1 messages each MQTT sender keeps in flight

# Phases of the load, in seconds.
LOAD_BEFORE_KILL_S = 2.0
KILLED_FOR_S = 2.0
LOAD_BEFORE_TERM_S = 2.0
LOAD_AFTER_TERM_S = 2.0
# Bounds on waits that depend on HAProxy's checks (inter 2s, rise 3).
SERVER_UP_TIMEOUT_S = 30
# A sender gives up on a reading after this long without an ack.
SENDER_STOP_TIMEOUT_S = 30
OUTPUT_TIMEOUT_S = 60
# Each sender sends at most this many readings.
MAX_READINGS_PER_SENDER = 20000


def example_sections():
    """Return the example config as {section header: [option lines]},
    without comments, in file order."""
    sections = {}
    header = None
    for line in EXAMPLE.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not line[0].isspace():
            header = text
            sections[header] = []
        else:
            sections[header].append(text)
    return sections


def haproxy_config(ports, instances):
    """Build the test config from the example's sections.

    `ports` maps "api", "mqtt" and "stats" to the local ports HAProxy
    listens on. `instances` is a list of Instance.
    """
    sections = example_sections()
    out = ["global", "    log stdout format raw local0", "    maxconn 4096"]
    backends = {"backend ingestd_api": "port",
                "backend ingestd_mqtt": "mqtt_port"}
    for header, port_key in (("defaults", None),
                             ("frontend api", "api"),
                             ("backend ingestd_api", None),
                             ("frontend mqtt", "mqtt"),
                             ("backend ingestd_mqtt", None),
                             ("frontend stats", "stats")):
        assert header in sections, f"{EXAMPLE} has no section {header!r}"
        out.append(header)
        for option in sections[header]:
            if option.startswith("bind "):
                option = f"bind 127.0.0.1:{ports[port_key]}"
            elif option.startswith("server "):
                continue
            out.append("    " + option)
        if header in backends:
            for instance in instances:
                port = getattr(instance, backends[header])
                out.append(f"    server {instance.name} 127.0.0.1:{port} "
                           f"check port {instance.admin_port}")
    return "\n".join(out) + "\n"


class Instance:
    """One ingestd with fixed ports and data_dir, restartable by PID."""

    def __init__(self, name, folder, registry):
        self.name = name
        self.folder = folder
        self.port, self.admin_port = free_port(), free_port()
        self.mqtt_port = free_port()
        folder.mkdir(parents=True)
        self.config = write_config(folder, self.port, self.admin_port,
                                   mqtt_port=self.mqtt_port)
        # Both instances authenticate against one registry file.
        self.config.write_text(self.config.read_text() +
                               f"registry:\n  path: {registry}\n")
        self.log = folder / "ingestd.log"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [binary(), "serve", "-c", str(self.config)],
                stdout=log_file, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.admin_url, self.log)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self):
        """Send SIGTERM and return the exit code, killing after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def output_seqs(self):
        """Return the seq of every record in the file sink's output, and
        lines that are not complete JSON envelopes."""
        seqs, bad = [], []
        for path in sorted((self.folder / "data" / "out").glob("*.ndjson")):
            for line in path.read_text().splitlines():
                try:
                    seqs.append(json.loads(line)["payload"]["seq"])
                except (ValueError, KeyError, TypeError):
                    bad.append(line[:80])
        return seqs, bad


class Stats:
    """What the senders saw, shared between threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = []
        self.events = collections.Counter()
        self.errors = []

    def ack(self, seqs):
        with self.lock:
            self.acked.extend(seqs)

    def count(self, event):
        with self.lock:
            self.events[event] += 1

    def error(self, text):
        with self.lock:
            self.errors.append(text)


def reading(device_id, seq):
    return {"device_id": device_id, "sensor_value": len(seq) % 101,
            "seq": seq}


def http_sender(url, device_id, key, stop, deadline, stats):
    """Post readings until `stop` is set. A reading that got a connection
    error or a 5xx is sent again, the same reading, until it gets 202."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    for n in range(MAX_READINGS_PER_SENDER):
        if stop.is_set():
            return
        # Every fourth request is a batch of three readings.
        count = 3 if n % 4 == 3 else 1
        seqs = [f"{device_id}-{n}-{i}" for i in range(count)]
        body = [reading(device_id, s) for s in seqs]
        if count == 1:
            body = body[0]
        while True:
            if time.monotonic() > deadline:
                stats.error(f"{device_id}: {seqs} never acknowledged")
                return
            try:
                r = session.post(url, json=body, headers=headers, timeout=10)
            except requests.RequestException:
                stats.count("http_connection_error")
                session = requests.Session()
                time.sleep(0.05)
                continue
            if r.status_code == 202:
                stats.ack(seqs)
                break
            if r.status_code >= 500:
                stats.count(f"http_{r.status_code}")
                time.sleep(0.05)
                continue
            stats.error(f"{device_id}: {r.status_code} {r.text[:200]}")
            return


def mqtt_sender(port, device_id, key, version, stop, deadline, stats):
    """Publish at QoS 1 through HAProxy with up to MQTT_WINDOW messages in
    flight. After a lost connection, reconnect and publish every message
    without PUBACK again, under its packet id, until `stop` is set and
    nothing is pending."""
    pending = {}  # packet id -> seq
    n = 0
    connected_once = False
    while time.monotonic() < deadline:
        if stop.is_set() and not pending:
            return
        try:
            with raw.Client(port, version=version, timeout=3) as c:
                connack = c.connect(device_id, device_id, key)
                if connack.type != raw.CONNACK or connack.reason != 0:
                    stats.count("mqtt_connack_refused")
                    time.sleep(0.1)
                    continue
                if connected_once:
                    stats.count("mqtt_reconnect")
                connected_once = True
                for pid, seq in pending.items():
                    c.send(raw.publish(f"devices/{device_id}/data",
                                       json.dumps(reading(device_id, seq)),
                                       qos=1, packet_id=pid,
                                       version=version, dup=True))
                    stats.count("mqtt_republished")
                while time.monotonic() < deadline:
                    if stop.is_set() and not pending:
                        return
                    while (not stop.is_set() and len(pending) < MQTT_WINDOW
                           and n < MAX_READINGS_PER_SENDER):
                        n += 1
                        pid = n % 65535 + 1
                        seq = f"{device_id}-{n}"
                        pending[pid] = seq
                        c.send(raw.publish(f"devices/{device_id}/data",
                                           json.dumps(reading(device_id,
                                                              seq)),
                                           qos=1, packet_id=pid,
                                           version=version))
                    ack = c.read(timeout=3)
                    if ack.type != raw.PUBACK:
                        continue
                    if ack.reason != 0:
                        stats.error(f"{device_id}: PUBACK reason "
                                    f"{ack.reason:#x}")
                        return
                    seq = pending.pop(ack.packet_id, None)
                    if seq is not None:
                        stats.ack([seq])
        except (OSError, ConnectionError):
            # The instance behind HAProxy went away, or HAProxy found no
            # instance up. Messages without PUBACK are published again.
            time.sleep(0.1)
    if pending:
        stats.error(f"{device_id}: {len(pending)} messages never "
                    f"acknowledged, for example {list(pending.values())[:3]}")


def server_states(stats_url):
    """Return {(backend, server): status} from HAProxy's CSV stats."""
    text = requests.get(stats_url + ";csv", timeout=5).text
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return {(r["pxname"], r["svname"]): r["status"] for r in rows}


def wait_server_up(stats_url, server):
    """Wait until HAProxy's checks mark `server` UP in every backend."""
    deadline = time.monotonic() + SERVER_UP_TIMEOUT_S
    while True:
        try:
            states = server_states(stats_url)
        except requests.ConnectionError:
            # HAProxy has not opened its stats listener yet.
            states = {}
        mine = {k: v for k, v in states.items() if k[1] == server}
        if mine and all(v == "UP" for v in mine.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"HAProxy did not mark {server} UP within "
                f"{SERVER_UP_TIMEOUT_S} s: {mine}")
        time.sleep(0.2)


def test_example_config_is_valid():
    proc = subprocess.run([HAPROXY, "-c", "-f", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_acknowledged_reading_lost_behind_haproxy(tmp_path):
    registry = tmp_path / "registry.db"
    a = Instance("ingestd-1", tmp_path / "a", registry)
    b = Instance("ingestd-2", tmp_path / "b", registry)
    keys = {d: add_device(d, a.config)
            for d in HTTP_DEVICES + MQTT_DEVICES}

    ports = {"api": free_port(), "mqtt": free_port(), "stats": free_port()}
    cfg = tmp_path / "haproxy.cfg"
    haproxy_log = tmp_path / "haproxy.log"
    cfg.write_text(haproxy_config(ports, [a, b]))
    stats_url = f"http://127.0.0.1:{ports['stats']}/stats"
    url = f"http://127.0.0.1:{ports['api']}/v1/data"

    haproxy = None
    stats = Stats()
    stop = threading.Event()
    threads = []
    codes = {}
    try:
        a.start()
        b.start()
        with open(haproxy_log, "wb") as log_file:
            haproxy = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"],
                                       stdout=log_file,
                                       stderr=subprocess.STDOUT)
        wait_server_up(stats_url, a.name)
        wait_server_up(stats_url, b.name)

        deadline = time.monotonic() + 120
        for d in HTTP_DEVICES:
            threads.append(threading.Thread(
                target=http_sender,
                args=(url, d, keys[d], stop, deadline, stats)))
        for i, d in enumerate(MQTT_DEVICES):
            version = raw.V5 if i % 2 else raw.V311
            threads.append(threading.Thread(
                target=mqtt_sender,
                args=(ports["mqtt"], d, keys[d], version, stop, deadline,
                      stats)))
        for t in threads:
            t.start()

        time.sleep(LOAD_BEFORE_KILL_S)
        a.kill()
        time.sleep(KILLED_FOR_S)
        # Restart the killed instance before stopping the other, so one
        # is always up. Its spool recovers and its sink resumes.
        a.start()
        wait_server_up(stats_url, a.name)
        time.sleep(LOAD_BEFORE_TERM_S)
        codes["b first stop"] = b.terminate()
        time.sleep(LOAD_AFTER_TERM_S)
        stop.set()
        for t in threads:
            t.join(timeout=SENDER_STOP_TIMEOUT_S + 120)
            assert not t.is_alive(), "a sender did not stop"

        # Start the stopped instance again, so that anything its drain
        # left in the spool reaches its output too.
        b.start()
        acked = set(stats.acked)
        output_deadline = time.monotonic() + OUTPUT_TIMEOUT_S
        while time.monotonic() < output_deadline:
            seen = set(a.output_seqs()[0]) | set(b.output_seqs()[0])
            if acked <= seen:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        if haproxy is not None:
            haproxy.terminate()
            try:
                haproxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                haproxy.kill()
                haproxy.wait(timeout=10)
        codes["a"] = a.terminate()
        codes["b"] = b.terminate()

    a_seqs, a_bad = a.output_seqs()
    b_seqs, b_bad = b.output_seqs()
    all_seqs = collections.Counter(a_seqs + b_seqs)
    acked = collections.Counter(stats.acked)
    missing = set(acked) - set(all_seqs)
    duplicates = {s: n for s, n in all_seqs.items() if n > 1}
    http_acked = sum(1 for s in acked if s.startswith("lb-http-"))
    mqtt_acked = sum(1 for s in acked if s.startswith("lb-mqtt-"))
    print(f"acknowledged: {http_acked} over HTTP, {mqtt_acked} over MQTT; "
          f"records: {len(a_seqs)} in {a.name}, {len(b_seqs)} in {b.name}; "
          f"duplicate readings: {len(duplicates)} "
          f"({sum(duplicates.values()) - len(duplicates)} extra records); "
          f"client retries: {dict(stats.events)}")

    assert not stats.errors, f"sender errors: {stats.errors[:5]}"
    assert codes == {"b first stop": 0, "a": 0, "b": 0}, (
        f"exit codes after SIGTERM: {codes}")
    assert not a_bad, f"invalid lines in {a.name}'s output: {a_bad[:3]}"
    assert not b_bad, f"invalid lines in {b.name}'s output: {b_bad[:3]}"
    assert http_acked > 0, "no reading was acknowledged over HTTP"
    assert mqtt_acked > 0, "no message was acknowledged over MQTT"
    assert a_seqs, f"{a.name} stored nothing: HAProxy sent it no traffic"
    assert b_seqs, f"{b.name} stored nothing: HAProxy sent it no traffic"
    assert stats.events["mqtt_reconnect"] > 0, (
        "no MQTT sender had to reconnect, so no connection was cut")
    assert not missing, (
        f"{len(missing)} of {len(acked)} acknowledged readings are in "
        f"neither output, for example {sorted(missing)[:5]}")
