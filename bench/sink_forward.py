#!/usr/bin/python3
"""Benchmark the NATS JetStream, MQTT and Redis sinks: records per second
forwarded from the spool to a real broker on 127.0.0.1.

For each broker named on the command line (nats, mqtt, redis):

1. The broker gets a free port but is not started yet
   (tests/integration/brokers.py: nats-server -js with a file store,
   mosquitto with persistence, redis-server without persistence).
2. ingestd starts with a file sink and the broker's sink, and
   BENCH_RECORDS readings are posted over HTTP, 50 per request. The sink
   cannot deliver, so every record stays in the spool for it.
3. The broker starts. The time from that start until the sink's
   ingestd_sink_lag_bytes on /metrics is 0 gives the records per second.
   The rate after the first committed batch is printed too, without the
   reconnect (the sink retries at most every 200 ms here).

The MQTT broker has no subscriber, so mosquitto acknowledges each QoS 1
message and drops it. The NATS sink's stream keeps every message on disk.

Run it through bench/sinks.sh, which builds ingestd and nats_consume
first.
Environment (all optional):
  INGESTD_BIN     the ingestd binary (default ./build/ingestd)
  BENCH_RECORDS   readings to forward (default 50000, at most 1000000)
  BENCH_BATCH     the sink's batch_records (default 512)
  BENCH_TMPDIR    parent of the temporary folder (default /var/tmp)
"""

import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import requests  # noqa: E402

from brokers import Mosquitto, Nats, Redis, nats_consume_binary  # noqa: E402,E501
from sink_ingestd import Ingestd  # noqa: E402

READINGS_PER_REQUEST = 50
POSTERS = 4
FORWARD_TIMEOUT_S = 600
POLL_S = 0.02


def whole_number(name, default, low, high):
    text = os.environ.get(name, str(default))
    if not text.isdigit() or not low <= int(text) <= high:
        sys.exit(f"sink_forward.py: {name} must be a whole number from "
                 f"{low} to {high}, got {text!r}")
    return int(text)


def preload(server, records):
    """Post `records` readings over HTTP with a few threads."""
    per_poster = records // POSTERS
    counts = [per_poster] * POSTERS
    counts[0] += records - per_poster * POSTERS
    devices = list(server.keys)
    errors = []

    def post(index, count):
        device = devices[index % len(devices)]
        session = requests.Session()
        headers = {"Authorization": f"Bearer {server.keys[device]}"}
        sent = 0
        while sent < count:
            n = min(READINGS_PER_REQUEST, count - sent)
            body = [{"device_id": device, "sensor_value": (sent + i) % 101,
                     "seq": sent + i} for i in range(n)]
            r = session.post(server.url, json=body, headers=headers,
                             timeout=30)
            if r.status_code != 202:
                errors.append(f"{r.status_code} {r.text[:200]}")
                return
            sent += n

    threads = [threading.Thread(target=post, args=(i, c))
               for i, c in enumerate(counts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=FORWARD_TIMEOUT_S)
    if errors:
        sys.exit(f"sink_forward.py: posting failed: {errors[0]}")


def make_broker(kind, folder):
    if kind == "nats":
        broker = Nats(folder)
        return broker, {"type": "nats", "address": broker.address,
                        "stream": "BENCH"}
    if kind == "mqtt":
        broker = Mosquitto(folder)
        return broker, {"type": "mqtt", "address": broker.address}
    broker = Redis(folder)
    return broker, {"type": "redis", "address": broker.address}


def run(kind, records, batch, tmp):
    broker, sink = make_broker(kind, tmp / kind / "broker")
    sink.update(name=kind, batch_records=batch, timeout="10s",
                retry_min="20ms", retry_max="200ms")
    server = Ingestd(tmp / kind / "ingestd", [sink])
    server.start()
    try:
        preload(server, records)
        server.wait_metric("ingestd_sink_lag_bytes", "out", 0, 120)
        lag = server.metric("ingestd_sink_lag_bytes", kind)
        start = time.monotonic()
        broker.start()
        first = None
        while True:
            if first is None and server.metric(
                    "ingestd_sink_records_total", kind):
                first = (time.monotonic(),
                         server.metric("ingestd_sink_records_total", kind))
            if server.metric("ingestd_sink_lag_bytes", kind) == 0:
                break
            if time.monotonic() - start > FORWARD_TIMEOUT_S:
                sys.exit(f"sink_forward.py: {kind} did not catch up "
                         f"within {FORWARD_TIMEOUT_S} s")
            time.sleep(POLL_S)
        end = time.monotonic()
        total = server.metric("ingestd_sink_records_total", kind)
        if total < records:
            sys.exit(f"sink_forward.py: {kind} committed {total:.0f} of "
                     f"{records} records")
        steady = ""
        if first is not None and end > first[0]:
            steady = (f", {(total - first[1]) / (end - first[0]):,.0f} "
                      f"records/s after the first batch")
        print(f"{kind}: {records} records ({lag / 1e6:.1f} MB of spool) "
              f"in {end - start:.2f} s: {records / (end - start):,.0f} "
              f"records/s from the broker start{steady}")
        if kind == "nats" and os.access(nats_consume_binary(), os.X_OK):
            stored = broker.count("BENCH")
            print(f"nats: the stream stores {stored} messages")
    finally:
        server.finish()
        broker.stop()


def main():
    kinds = sys.argv[1:] or ["nats", "mqtt", "redis"]
    for kind in kinds:
        if kind not in ("nats", "mqtt", "redis"):
            sys.exit(f"sink_forward.py: unknown broker {kind!r}; use nats, "
                     f"mqtt or redis")
    records = whole_number("BENCH_RECORDS", 50000, 1, 1000000)
    batch = whole_number("BENCH_BATCH", 512, 1, 100000)
    parent = os.environ.get("BENCH_TMPDIR", "/var/tmp")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ingestd-sinks-",
                                        dir=parent))
    try:
        for kind in kinds:
            run(kind, records, batch, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
