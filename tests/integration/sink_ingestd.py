"""ingestd with broker sinks, and load helpers, for the NATS and MQTT sink
tests.

The server has the file sink "out" and the broker sinks given to it,
takes readings over HTTP and over its MQTT listener, and can be SIGKILLed
and started again on the same data folder.
"""

import collections
import json
import re
import signal
import subprocess
import threading
import time

import requests

from conftest import add_device, binary, free_port, wait_ready, write_config

ARRIVAL_TIMEOUT_S = 60
DEVICES = ("dev-1", "dev-2", "dev-3")


class Ingestd:
    """ingestd with the file sink and the sinks in `sinks` (dicts of
    settings, each with name and type), restartable in place."""

    def __init__(self, folder, sinks):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.admin_port = free_port(), free_port()
        self.mqtt_port = free_port()
        self.config = write_config(folder, self.port, self.admin_port,
                                   http={"max_readings_per_request": 50},
                                   mqtt_port=self.mqtt_port)
        with open(self.config, "a") as f:
            for sink in sinks:
                settings = {"timeout": "2s", "retry_min": "20ms",
                            "retry_max": "500ms", "batch_records": 64}
                settings.update(sink)
                first = True
                for key, value in settings.items():
                    f.write(f"  {'- ' if first else '  '}{key}: "
                            f"{json.dumps(value)}\n")
                    first = False
            f.write("sinks_drain_timeout: 10s\n")
        self.keys = {d: add_device(d, self.config) for d in DEVICES}
        self.url = f"http://127.0.0.1:{self.port}/v1/data"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.log = folder / "ingestd.log"
        self.proc = None

    def start(self):
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [binary(), "serve", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.admin_url, self.log)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def finish(self):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def post(self, device_id, readings):
        r = requests.post(self.url, json=readings, timeout=10, headers={
            "Authorization": f"Bearer {self.keys[device_id]}"})
        assert r.status_code == 202, f"{r.status_code} {r.text}"
        return r.json()["ids"]

    def publish_mqtt(self, device_id, reading_value):
        """Publish one reading at QoS 1 to the MQTT listener as
        `device_id`; return its payload seq, since MQTT returns no id."""
        proc = subprocess.run(
            ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p",
             str(self.mqtt_port), "-i", f"pub-{device_id}", "-u", device_id,
             "-P", self.keys[device_id], "-q", "1", "-t",
             f"devices/{device_id}/data", "-m", json.dumps(reading_value)],
            capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        return reading_value["seq"]

    def metric(self, name, sink):
        """Return the value of `name{sink="<sink>"}`, or None."""
        text = requests.get(self.admin_url + "/metrics", timeout=5).text
        m = re.search(rf'^{name}{{sink="{sink}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else None

    def wait_metric(self, name, sink, value, timeout_s=20):
        deadline = time.monotonic() + timeout_s
        while self.metric(name, sink) != value:
            assert time.monotonic() < deadline, (
                f"{name}{{sink={sink}}} is {self.metric(name, sink)}, "
                f"expected {value}")
            time.sleep(0.05)


def reading(device_id, seq):
    return {"device_id": device_id, "sensor_value": seq % 101, "seq": seq}


def wait_for_ids(get_ids, ids, timeout_s=ARRIVAL_TIMEOUT_S):
    """Wait until every id in `ids` is in get_ids(); return the last list."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = get_ids()
        missing = set(ids) - set(seen)
        if not missing:
            return seen
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(set(ids))} acknowledged readings did "
            f"not arrive, for example {sorted(missing)[:3]}")
        time.sleep(0.5)


def report_duplicates(ids, label):
    """Print how many ids arrived more than once, and return that count."""
    counts = collections.Counter(ids)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(f"{label}: {len(counts)} distinct readings, {duplicates} "
          f"duplicates")
    return duplicates


class Load:
    """Senders that post readings until stopped, recording acked ids."""

    def __init__(self, server):
        self.server = server
        self.stop_event = threading.Event()
        self.acked = []
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(d,))
                        for d in DEVICES]

    def run(self, device_id):
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.server.keys[device_id]}"}
        seq = 0
        # Bounded: at most 2000 requests per sender.
        while not self.stop_event.is_set() and seq < 2000:
            seq += 1
            body = [reading(device_id, seq * 10 + i) for i in range(3)]
            try:
                r = session.post(self.server.url, json=body,
                                 headers=headers, timeout=5)
            except requests.RequestException:
                time.sleep(0.01)
                continue
            if r.status_code == 202:
                self.acked.extend(r.json()["ids"])
            elif r.status_code != 503:
                self.errors.append(f"{r.status_code} {r.text[:200]}")
            time.sleep(0.005)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a sender did not stop"
