#!/usr/bin/python3
"""Benchmark the RabbitMQ sink: records per second forwarded from the spool.

1. A rabbitmq-server node starts on 127.0.0.1 (tests/integration/brokers.py
   runs it as the rabbitmq user with its own ports and data folder), with a
   durable queue bound to the durable topic exchange "bench" by "#".
2. ingestd starts with a file sink and a rabbitmq sink whose address is a
   closed port on 127.0.0.1, and BENCH_RECORDS readings are posted over
   HTTP. The rabbitmq sink cannot deliver, so every record stays in the
   spool for it.
3. ingestd is stopped, the sink is pointed at the node, and ingestd starts
   again. The time from that start until the sink's lag on /metrics is 0
   gives the records per second. The rate after the first committed batch
   is printed too, without the start.
4. The queue must then contain at least BENCH_RECORDS messages, or the
   script exits 1.

Run it through bench/sinks.sh rabbitmq, which builds ingestd first.
Environment (all optional):
  INGESTD_BIN     the ingestd binary (default ./build/ingestd)
  BENCH_RECORDS   readings to forward (default 100000, at most 1000000)
  BENCH_DEVICES   devices the readings are spread over (default 16)
  BENCH_BATCH     the sink's batch_records (default 512)
  BENCH_TMPDIR    parent of the temporary folder (default /var/tmp)
"""

import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from brokers import RabbitMQ  # noqa: E402
from conftest import add_device, free_port  # noqa: E402

START_TIMEOUT_S = 20
STOP_TIMEOUT_S = 30
FORWARD_TIMEOUT_S = 600
READINGS_PER_REQUEST = 500


def env_int(name, default, low, high):
    text = os.environ.get(name, str(default))
    if not text.isdigit() or not low <= int(text) <= high:
        sys.exit(f"sink_rabbitmq.py: {name} must be a whole number from "
                 f"{low} to {high}, got {text!r}")
    return int(text)


def write_config(folder, port, admin, address, batch):
    path = folder / "ingestd.yaml"
    path.write_text(f"""log:
  level: warn
data_dir: {folder / 'data'}
http:
  listen: 127.0.0.1:{port}
  max_readings_per_request: {READINGS_PER_REQUEST}
  max_body_bytes: 1MiB
admin:
  listen: 127.0.0.1:{admin}
mqtt:
  listen: 127.0.0.1:{free_port()}
spool:
  max_size: 4GiB
default_device_type: default
device_types:
  default:
    schema_inline: {{"type": "object", "required": ["sensor_value"]}}
sinks:
  - name: file
    type: file
    path: {folder / 'data' / 'out'}
  - name: rabbit
    type: rabbitmq
    address: "{address}"
    exchange: bench
    timeout: 5s
    retry_min: 10ms
    retry_max: 100ms
    batch_records: {batch}
sinks_drain_timeout: 1s
""")
    return path


def metric(admin, series):
    """Return the value of one series on /metrics, or None."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return None
    finally:
        conn.close()
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def ready(admin):
    """Return True when /readyz returns 200."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=1)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class Ingestd:
    def __init__(self, binary, config, admin, log):
        self.admin = admin
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([binary, "serve", "-c",
                                          str(config)], stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready(admin):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"sink_rabbitmq.py: ingestd did not start; see "
                         f"{log}")
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)


def post_readings(port, keys, records):
    """Post `records` readings spread over the devices of `keys`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    devices = sorted(keys)
    sent = 0
    request = 0
    while sent < records:
        device = devices[request % len(devices)]
        count = min(READINGS_PER_REQUEST, records - sent)
        body = json.dumps([{"device_id": device, "sensor_value": i % 100,
                            "seq": sent + i} for i in range(count)])
        conn.request("POST", "/v1/data", body, {
            "Authorization": f"Bearer {keys[device]}",
            "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 202:
            sys.exit(f"sink_rabbitmq.py: POST returned {response.status}")
        sent += count
        request += 1
    conn.close()


def forward(binary, config, admin, log, records):
    """Start ingestd and return (seconds to lag 0, seconds after the first
    commit, records committed at the first sample)."""
    lag = 'ingestd_sink_lag_bytes{sink="rabbit"}'
    committed = 'ingestd_sink_records_total{sink="rabbit"}'
    start = time.monotonic()
    server = Ingestd(binary, config, admin, log)
    first_time = first_count = None
    deadline = start + FORWARD_TIMEOUT_S
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                sys.exit(f"sink_rabbitmq.py: lag not 0 after "
                         f"{FORWARD_TIMEOUT_S} s")
            count = metric(admin, committed) or 0
            if first_time is None and count > 0:
                first_time, first_count = now, count
            if metric(admin, lag) == 0 and count >= records:
                return now - start, now - (first_time or start), \
                    first_count or 0
            time.sleep(0.05)
    finally:
        server.stop()


def main():
    records = env_int("BENCH_RECORDS", 100000, 1, 1000000)
    devices = env_int("BENCH_DEVICES", 16, 1, 1000)
    batch = env_int("BENCH_BATCH", 512, 1, 100000)
    binary = os.path.abspath(os.environ.get("INGESTD_BIN",
                                            "./build/ingestd"))
    folder = pathlib.Path(tempfile.mkdtemp(
        prefix="ingestd-rabbitmq-bench-",
        dir=os.environ.get("BENCH_TMPDIR", "/var/tmp")))
    broker = RabbitMQ()
    try:
        broker.start()
        broker.bind_queue("bench", exchange="bench")
        port, admin = free_port(), free_port()
        log = folder / "ingestd.log"
        config = write_config(folder, port, admin,
                              f"127.0.0.1:{free_port()}", batch)
        keys = {f"bench-{d}": add_device(f"bench-{d}", config)
                for d in range(1, devices + 1)}
        server = Ingestd(binary, config, admin, log)
        print(f"== posting {records} readings", file=sys.stderr)
        try:
            post_readings(port, keys, records)
        finally:
            server.stop()
        write_config(folder, port, admin, broker.address, batch)
        print("== forwarding to rabbitmq", file=sys.stderr)
        total, after_first, first = forward(binary, config, admin, log,
                                            records)
        queued = broker.queue_length("bench")
        print(f"rabbitmq sink: {records} records in {total:.2f} s = "
              f"{records / total:.0f} records/s from start; "
              f"{(records - first) / after_first:.0f} records/s after the "
              f"first commit (batch_records {batch}, {devices} devices)")
        if queued < records:
            sys.exit(f"sink_rabbitmq.py: the queue contains {queued} "
                     f"messages, expected at least {records}")
        print(f"queue: {queued} messages ({queued - records} duplicates)")
    finally:
        broker.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
