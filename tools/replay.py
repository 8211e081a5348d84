#!/usr/bin/python3
"""Simulate a fleet of devices sending readings to ingestd over HTTP.

The simulator registers devices with `ingestd device add`. It then sends a
time-compressed mix of readings: temperature sensors every 10 s, humidity
sensors every 30 s and battery monitors every 60 s of simulated time. Values
follow diurnal curves with slow drift and noise. A few percent of readings
are invalid on purpose and a few requests come from unknown keys. Every
response is compared with what the request deserved, so the exit status
doubles as a test: 0 only when every valid request was accepted and every
bad one was rejected with the right status.

Uses only the standard library and python3-requests (run it with Debian's
/usr/bin/python3). See docs/replay.md.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import glob
import heapq
import json
import math
import os
import queue
import random
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time

import requests

# Simulated device kinds: reporting period in simulated seconds and the
# share of the fleet.
KINDS = {
    "temperature": {"period_s": 10.0, "share": 0.60},
    "humidity": {"period_s": 30.0, "share": 0.25},
    "battery": {"period_s": 60.0, "share": 0.15},
}

# Request shapes and their shares: one JSON reading, a JSON array, NDJSON.
SHAPES = (("single", 0.70), ("array", 0.15), ("ndjson", 0.15))
MAX_BATCH = 10

# Ways to make a reading invalid on purpose. "bad_json" breaks the
# encoding and the others break the default schema. A schema that checks
# only device_id and sensor_value rejects sensor_range, missing_value,
# wrong_type and bad_json, so --invalid-kinds can limit the set to those.
INVALID_KINDS = ("sensor_range", "field_range", "missing_value",
                 "missing_timestamp", "wrong_type", "bad_timestamp",
                 "bad_json")

# HTTP statuses and error codes that each expectation allows.
EXPECT_ACCEPT = "accept"
EXPECT_INVALID = "invalid"
EXPECT_UNKNOWN = "unknown"

KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class ReplayError(Exception):
    """A setup step failed (registration, configuration, readiness)."""


# ---- configuration and registration ---------------------------------------


def listen_from_config(path):
    """Return the `http.listen` value of an ingestd YAML config, or None.

    Only the two-level `http:` / `listen:` layout is read; the standard
    library has no YAML parser, and --url overrides this anyway.
    """
    in_http = False
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            if not line[0].isspace():
                in_http = line.strip() == "http:"
                continue
            match = re.match(r"\s+listen:\s*['\"]?([^'\"\s]+)", line)
            if in_http and match:
                return match.group(1)
    return None


def url_from_listen(listen):
    """Turn a listen address such as 0.0.0.0:8080 into a loopback URL."""
    host, _, port = listen.rpartition(":")
    if host in ("", "*", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def default_ingestd_bin():
    """Find the ingestd binary: $INGESTD_BIN, build/ingestd, then PATH."""
    env = os.environ.get("INGESTD_BIN")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    built = os.path.join(repo, "build", "ingestd")
    if os.access(built, os.X_OK):
        return built
    return shutil.which("ingestd") or built


def register_device(ingestd_bin, config, device_id, device_type):
    """Run `ingestd device add` and return the API key it printed."""
    cmd = [ingestd_bin, "device", "add", device_id, "-c", config]
    if device_type:
        cmd += ["--type", device_type]
    last_error = ""
    # The registry is one SQLite file; a busy database is retried a few
    # times, every other failure is final.
    for attempt in range(3):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=30, check=False)
        except subprocess.TimeoutExpired:
            last_error = "timed out after 30 s"
            continue
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                if line.startswith("ik_"):
                    return line.strip()
            raise ReplayError(f"`{' '.join(cmd)}` printed no API key line: "
                              f"{proc.stdout.strip()!r}")
        last_error = proc.stderr.strip() or f"exit status {proc.returncode}"
        if "locked" not in last_error and "busy" not in last_error:
            break
        time.sleep(0.2 * (attempt + 1))
    raise ReplayError(f"registering device {device_id} failed: {last_error}")


def assign_kind(rng):
    """Pick a simulated device kind by the shares in KINDS."""
    x = rng.random()
    for name, kind in KINDS.items():
        if x < kind["share"]:
            return name
        x -= kind["share"]
    return "temperature"


def load_or_register(args, rng):
    """Return the device list, reusing --devices-file and registering the
    rest with a bounded pool of `ingestd device add` processes."""
    devices = []
    path = args.devices_file
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            devices = json.load(f)["devices"]
        print(f"replay: reusing {len(devices)} devices from {path}",
              file=sys.stderr)
    if len(devices) >= args.devices:
        return devices[:args.devices]

    missing = args.devices - len(devices)
    prefix = args.id_prefix or f"sim-{secrets.token_hex(3)}-"
    start = len(devices)
    new = [{"id": f"{prefix}{i:05d}", "kind": assign_kind(rng)}
           for i in range(start, start + missing)]
    print(f"replay: registering {missing} devices with "
          f"{args.register_jobs} parallel `ingestd device add`",
          file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(args.register_jobs) as pool:
        futures = {pool.submit(register_device, args.ingestd, args.config,
                               d["id"], args.device_type): d for d in new}
        for fut in concurrent.futures.as_completed(futures):
            futures[fut]["key"] = fut.result()
    devices += new

    if not path:
        path = f"replay-devices-{prefix.rstrip('-')}.json"
    # The file contains API keys, so only its owner may read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"config": os.path.abspath(args.config),
                   "devices": devices}, f, indent=1)
    print(f"replay: device ids and keys stored in {path} "
          "(pass --devices-file to reuse them)", file=sys.stderr)
    return devices


def wait_until_known(url, devices, timeout_s):
    """Wait until ingestd accepts every device's key.

    The service reloads its registry every registry.reload_interval, so new
    keys get 401 for a moment. Each probe sends an empty JSON object. With a
    known key it gets 400 (invalid reading), so nothing is stored.
    """
    deadline = time.monotonic() + timeout_s
    pending = list(devices)
    with requests.Session() as session:
        while pending:
            still = []
            for dev in pending:
                try:
                    resp = session.post(
                        url, data=b"{}", timeout=5,
                        headers={"X-API-Key": dev["key"],
                                 "Content-Type": "application/json"})
                    if resp.status_code == 401:
                        still.append(dev)
                except requests.RequestException:
                    still.append(dev)
            pending = still
            if pending and time.monotonic() > deadline:
                raise ReplayError(
                    f"{len(pending)} devices still get 401 after "
                    f"{timeout_s:.0f} s, for example {pending[0]['id']}; is "
                    f"ingestd at {url} using the same registry as the "
                    "config given with -c?")
            if pending:
                time.sleep(0.5)


# ---- readings -------------------------------------------------------------


class DeviceModel:
    """Simulated signal of one device: a diurnal curve, a random walk
    drift and noise, all in simulated time."""

    def __init__(self, device, rng):
        self.id = device["id"]
        self.key = device["key"]
        self.kind = device["kind"]
        self.period_s = KINDS[self.kind]["period_s"]
        self.rng = rng
        # A device's local time differs from UTC by its longitude.
        self.phase_h = rng.uniform(-12, 12)
        self.base_temp = rng.uniform(12, 26)
        self.temp_swing = rng.uniform(2, 8)
        self.base_humidity = rng.uniform(35, 65)
        self.battery = rng.uniform(60, 100)
        self.drain_per_hour = rng.uniform(0.05, 0.5)
        self.drift = 0.0

    def diurnal(self, t):
        """Return -1..1, peaking at 15:00 local time."""
        hours = (t / 3600.0 + self.phase_h) % 24
        return math.sin(2 * math.pi * (hours - 9) / 24)

    def reading(self, t):
        """Return one valid reading for simulated epoch time `t` (seconds)."""
        rng = self.rng
        self.drift = max(-5.0, min(5.0, self.drift + rng.gauss(0, 0.05)))
        self.battery = max(5.0, self.battery -
                           self.drain_per_hour * self.period_s / 3600.0)
        temp = (self.base_temp + self.temp_swing * self.diurnal(t) +
                self.drift + rng.gauss(0, 0.2))
        humidity = (self.base_humidity - 12 * self.diurnal(t) -
                    self.drift + rng.gauss(0, 1.0))
        humidity = max(0.0, min(100.0, humidity))
        r = {"device_id": self.id, "timestamp": format_timestamp(t, rng)}
        if self.kind == "temperature":
            # The 0..100 signal maps -20..60 degrees C.
            r["sensor_value"] = clamp_percent((temp + 20) / 0.8)
            r["temperature"] = round(temp, 2)
            r["battery"] = round(self.battery, 1)
        elif self.kind == "humidity":
            r["sensor_value"] = clamp_percent(humidity)
            r["humidity"] = round(humidity, 1)
            r["temperature"] = round(temp, 2)
        else:
            # A battery monitor's signal is its load, higher by day.
            load = 45 + 30 * self.diurnal(t) + rng.gauss(0, 3)
            r["sensor_value"] = clamp_percent(load)
            r["battery"] = round(self.battery, 1)
        return r


def clamp_percent(x):
    return round(max(0.0, min(100.0, x)), 2)


def format_timestamp(t, rng):
    """Format epoch seconds as RFC 3339 (UTC or with an offset) or as an
    integer of epoch milliseconds."""
    x = rng.random()
    if x < 0.4:
        return int(t * 1000)
    if x < 0.9:
        dt = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{dt.microsecond // 1000:03d}Z"
    offset = datetime.timezone(datetime.timedelta(hours=rng.choice(
        (-5, 1, 2, 9))))
    return datetime.datetime.fromtimestamp(t, offset).isoformat(
        timespec="seconds")


def make_invalid(reading, kinds, rng):
    """Break a reading on purpose in one of `kinds`. Return (kind, value),
    where value is a dict that violates the schema or, for bad_json, a
    string that is not JSON."""
    kind = rng.choice(kinds)
    r = dict(reading)
    if kind == "sensor_range":
        r["sensor_value"] = rng.choice((-3.5, 100.5, 250))
    elif kind == "field_range":
        field, value = rng.choice((("temperature", 180.0),
                                   ("temperature", -95.0),
                                   ("humidity", 104.2), ("battery", -1)))
        r[field] = value
    elif kind == "missing_value":
        del r["sensor_value"]
    elif kind == "missing_timestamp":
        del r["timestamp"]
    elif kind == "wrong_type":
        r["sensor_value"] = rng.choice((str(r["sensor_value"]), None,
                                        [r["sensor_value"]], True))
    elif kind == "bad_timestamp":
        r["timestamp"] = rng.choice(("2026-13-40T25:61:00Z", "yesterday",
                                     "17:00:00"))
    else:
        text = json.dumps(r, separators=(",", ":"))
        return kind, rng.choice((text[:-1], text[:-1] + ",}",
                                 text.replace('"', "'", 2)))
    return kind, r


@dataclasses.dataclass
class Job:
    """One request to send and what its response must be."""

    body: bytes
    content_type: str
    headers: dict
    expect: str
    readings: int
    invalid_indices: frozenset
    whole_body_broken: bool
    # For accepted requests: (device_id, sensor_value) of each reading in
    # request order, matched against the ids of the 202 response.
    sent: list


class Generator:
    """Turn due device events into Jobs. Used by one thread only, so that a
    seed reproduces the same run."""

    def __init__(self, args, devices, rng):
        self.args = args
        self.rng = rng
        self.models = [DeviceModel(d, random.Random(rng.random()))
                       for d in devices]
        self.unknown_seq = 0

    def pick_shape(self):
        x = self.rng.random()
        for shape, share in SHAPES:
            if x < share:
                return shape
            x -= share
        return "single"

    def job(self, model, sim_t):
        rng = self.rng
        shape = self.pick_shape()
        count = 1 if shape == "single" else rng.randint(2, MAX_BATCH)
        unknown = rng.random() < self.args.unknown_rate
        device_id, key = model.id, model.key
        if unknown:
            self.unknown_seq += 1
            device_id = f"unknown-{self.unknown_seq:06d}"
            key = "ik_" + "".join(rng.choice(KEY_ALPHABET) for _ in range(40))

        # A batch carries the device's buffered readings, oldest first.
        parts, sent, invalid = [], [], set()
        broken = False
        for i in range(count):
            t = sim_t - (count - 1 - i) * model.period_s
            reading = model.reading(t)
            reading["device_id"] = device_id
            value = reading
            if not unknown and rng.random() < self.args.invalid_rate:
                kind, value = make_invalid(reading, self.args.invalid_kinds,
                                           rng)
                invalid.add(i)
                if kind == "bad_json" and shape != "ndjson":
                    broken = True
            if isinstance(value, str):
                parts.append(value)
            else:
                parts.append(json.dumps(value, separators=(",", ":")))
            sent.append((device_id, reading["sensor_value"]))

        if shape == "single":
            body, ctype = parts[0], "application/json"
        elif shape == "array":
            body, ctype = "[" + ",".join(parts) + "]", "application/json"
        else:
            body, ctype = "\n".join(parts) + "\n", "application/x-ndjson"

        if rng.random() < 0.5:
            headers = {"Authorization": f"Bearer {key}"}
        else:
            headers = {"X-API-Key": key}
        if unknown:
            expect = EXPECT_UNKNOWN
        elif invalid:
            expect = EXPECT_INVALID
        else:
            expect = EXPECT_ACCEPT
        return Job(body=body.encode(), content_type=ctype, headers=headers,
                   expect=expect, readings=count,
                   invalid_indices=frozenset(invalid),
                   whole_body_broken=broken, sent=sent)


# ---- sending and checking -------------------------------------------------


class Stats:
    """Counters shared by the sender threads, guarded by one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.readings = 0
        self.by_expect = {EXPECT_ACCEPT: 0, EXPECT_INVALID: 0,
                          EXPECT_UNKNOWN: 0}
        self.accepted_requests = 0
        self.accepted_readings = 0
        self.rejected_by_status = {}
        self.rejected_by_code = {}
        self.retried_503 = 0
        self.gave_up_503 = 0
        self.transport_errors = 0
        self.unexpected = []
        self.unexpected_count = 0
        self.latencies = []
        self.accepted_ids = {}  # message id -> (device_id, sensor_value)
        self.max_lag_s = 0.0

    def add_unexpected(self, job, message):
        self.unexpected_count += 1
        if len(self.unexpected) < 10:
            snippet = job.body[:160].decode(errors="replace")
            self.unexpected.append(f"{message}; body starts {snippet!r}")


def check_response(job, resp, stats):
    """Compare one final response with the request's expectation and count
    it. Call with stats.lock held."""
    status = resp.status_code
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if status == 202:
        stats.accepted_requests += 1
    else:
        stats.rejected_by_status[status] = \
            stats.rejected_by_status.get(status, 0) + 1
        code = doc.get("error") if isinstance(doc, dict) else None
        code = code or "(no error code)"
        stats.rejected_by_code[code] = stats.rejected_by_code.get(code, 0) + 1

    if job.expect == EXPECT_ACCEPT:
        if status != 202:
            stats.add_unexpected(job, f"valid request got {status}: "
                                 f"{resp.text[:200]!r}")
            return
        if not isinstance(doc, dict):
            doc = {}
        ids = doc.get("ids")
        if doc.get("accepted") != job.readings or not isinstance(ids, list) \
                or len(ids) != job.readings:
            stats.add_unexpected(job, f"202 for {job.readings} readings "
                                 f"has {resp.text[:200]!r}")
            return
        stats.accepted_readings += job.readings
        for message_id, sent in zip(ids, job.sent):
            stats.accepted_ids[message_id] = sent
        return

    if job.expect == EXPECT_UNKNOWN:
        if status != 401:
            stats.add_unexpected(job, f"unknown key got {status}, expected "
                                 f"401: {resp.text[:200]!r}")
        return

    # An invalid reading rejects the whole request (all-or-nothing batches).
    code = doc.get("error") if isinstance(doc, dict) else None
    if status != 400:
        stats.add_unexpected(job, f"invalid request got {status}, expected "
                             f"400: {resp.text[:200]!r}")
    elif job.whole_body_broken:
        if code != "invalid_json":
            stats.add_unexpected(job, f"broken JSON got error {code!r}, "
                                 "expected invalid_json")
    elif code == "validation_failed":
        reported = {r.get("index") for r in doc.get("readings", [])}
        if reported != set(job.invalid_indices):
            stats.add_unexpected(
                job, f"400 lists readings {sorted(reported)}, expected "
                f"{sorted(job.invalid_indices)}")
    elif code != "invalid_json":
        # An unparsable NDJSON line may be reported either way; any other
        # code is a wrong response.
        stats.add_unexpected(job, f"invalid request got error {code!r}")


def retry_delay(resp, remaining_s):
    """Seconds to wait before retrying a 503, from Retry-After, bounded by
    5 s and by the time left."""
    try:
        delay = float(resp.headers.get("Retry-After", "1"))
    except ValueError:
        delay = 1.0
    return max(0.0, min(delay, 5.0, remaining_s))


def sender(url, jobs, stats, args, hard_deadline):
    """Send jobs from the queue over one keep-alive session until a None
    arrives."""
    with requests.Session() as session:
        while True:
            job = jobs.get()
            if job is None:
                return
            headers = dict(job.headers)
            headers["Content-Type"] = job.content_type
            for attempt in range(args.max_retries + 1):
                started = time.monotonic()
                try:
                    resp = session.post(url, data=job.body, headers=headers,
                                        timeout=args.timeout)
                except requests.RequestException as e:
                    with stats.lock:
                        stats.transport_errors += 1
                        stats.add_unexpected(job, f"request failed: {e}")
                    break
                elapsed = time.monotonic() - started
                with stats.lock:
                    stats.latencies.append(elapsed)
                if resp.status_code == 503 and attempt < args.max_retries:
                    remaining = hard_deadline - time.monotonic()
                    if remaining > 0:
                        with stats.lock:
                            stats.retried_503 += 1
                        time.sleep(retry_delay(resp, remaining))
                        continue
                with stats.lock:
                    if resp.status_code == 503:
                        stats.gave_up_503 += 1
                    check_response(job, resp, stats)
                break


def run_fleet(args, url, devices, rng, stats):
    """Schedule device events for --duration seconds and feed the senders.

    Simulated time runs --speed times faster than wall time and ends at the
    moment the run ends, so every timestamp is in the past.
    """
    gen = Generator(args, devices, rng)
    jobs = queue.Queue(maxsize=args.concurrency * 2)
    start = time.monotonic()
    end = start + args.duration
    # Senders may finish retries and slow responses after the schedule ends.
    hard_deadline = end + args.timeout * (args.max_retries + 1)
    sim_origin = time.time() - args.duration * args.speed

    threads = [threading.Thread(target=sender, daemon=True,
                                args=(url, jobs, stats, args, hard_deadline))
               for _ in range(args.concurrency)]
    for t in threads:
        t.start()

    # Each device starts at a random point of its period, so the fleet does
    # not report in lockstep.
    heap = [(rng.uniform(0, m.period_s) / args.speed, i)
            for i, m in enumerate(gen.models)]
    heapq.heapify(heap)
    try:
        while heap:
            due, i = heap[0]
            now = time.monotonic() - start
            if due >= args.duration:
                break
            if args.max_requests and stats.requests >= args.max_requests:
                break
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            heapq.heappop(heap)
            model = gen.models[i]
            job = gen.job(model, sim_origin + due * args.speed)
            with stats.lock:
                stats.requests += 1
                stats.readings += job.readings
                stats.by_expect[job.expect] += 1
                stats.max_lag_s = max(stats.max_lag_s, now - due)
            # Blocks while the senders are busy, so load stays bounded and
            # the lag shows that the server (or this client) fell behind.
            jobs.put(job)
            heapq.heappush(heap, (due + model.period_s / args.speed, i))
    finally:
        for _ in threads:
            jobs.put(None)
        for t in threads:
            t.join(max(0.0, hard_deadline - time.monotonic()) + 1)
    return time.monotonic() - start


# ---- output verification --------------------------------------------------


class OutputReader:
    """Read the file sink's NDJSON output incrementally. Files are tracked
    by inode, so a rotated (renamed) file is not read twice."""

    def __init__(self, folder):
        self.folder = folder
        self.offsets = {}
        self.seen = {}  # message id -> envelope, for ids we look for
        self.duplicates = 0
        self.unreadable = 0  # lines json cannot parse, such as deep nesting
        self.partial = {}

    def poll(self, wanted):
        paths = glob.glob(os.path.join(self.folder, "**", "*.ndjson"),
                          recursive=True)
        for path in paths:
            try:
                st = os.stat(path)
                with open(path, "rb") as f:
                    key = (st.st_dev, st.st_ino)
                    f.seek(self.offsets.get(key, 0))
                    data = f.read()
            except OSError:
                continue  # rotated away between glob and open
            # Keep an incomplete last line until the sink finishes it.
            end = data.rfind(b"\n") + 1
            self.offsets[key] = self.offsets.get(key, 0) + end
            for line in data[:end].splitlines():
                self.take(line, wanted)

    def take(self, line, wanted):
        try:
            env = json.loads(line)
        except (ValueError, RecursionError):
            # Records of other clients may nest deeper than Python's
            # recursion limit; they cannot be ours, so they are skipped.
            self.unreadable += 1
            return
        message_id = env.get("message_id") if isinstance(env, dict) else None
        if message_id not in wanted:
            return
        if message_id in self.seen:
            self.duplicates += 1
        else:
            self.seen[message_id] = env


def verify_output(folder, accepted, timeout_s):
    """Wait until every accepted id is in the output, at most timeout_s.

    Returns (found, missing ids, mismatched ids, duplicates, unreadable
    lines).
    """
    reader = OutputReader(folder)
    deadline = time.monotonic() + timeout_s
    while True:
        reader.poll(accepted)
        if len(reader.seen) == len(accepted) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    missing = [i for i in accepted if i not in reader.seen]
    mismatched = []
    for message_id, env in reader.seen.items():
        device_id, value = accepted[message_id]
        payload = env.get("payload") or {}
        if env.get("device_id") != device_id or \
                payload.get("sensor_value") != value:
            mismatched.append(message_id)
    return (len(reader.seen), missing, mismatched, reader.duplicates,
            reader.unreadable)


# ---- report ---------------------------------------------------------------


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1,
                max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def report(stats, elapsed_s, verify, args):
    """Print the results and return the exit status."""
    lat = sorted(stats.latencies)
    out = {
        "duration_s": round(elapsed_s, 1),
        "requests": stats.requests,
        "readings": stats.readings,
        "requests_valid": stats.by_expect[EXPECT_ACCEPT],
        "requests_invalid_on_purpose": stats.by_expect[EXPECT_INVALID],
        "requests_unknown_key": stats.by_expect[EXPECT_UNKNOWN],
        "accepted_requests": stats.accepted_requests,
        "accepted_readings": stats.accepted_readings,
        "rejected_by_status": {str(k): v for k, v in
                               sorted(stats.rejected_by_status.items())},
        "rejected_by_code": dict(sorted(stats.rejected_by_code.items())),
        "retried_503": stats.retried_503,
        "gave_up_503": stats.gave_up_503,
        "transport_errors": stats.transport_errors,
        "latency_ms": {"p50": round(percentile(lat, 50) * 1000, 2),
                       "p99": round(percentile(lat, 99) * 1000, 2),
                       "max": round((lat[-1] if lat else 0) * 1000, 2)},
        "requests_per_s": round(stats.requests / elapsed_s, 1)
        if elapsed_s > 0 else 0,
        "max_schedule_lag_s": round(stats.max_lag_s, 3),
        "unexpected_responses": stats.unexpected_count,
    }
    failed = stats.unexpected_count > 0
    if verify is not None:
        found, missing, mismatched, duplicates, unreadable = verify
        out["output"] = {"accepted_ids": len(stats.accepted_ids),
                         "found": found, "missing": len(missing),
                         "mismatched": len(mismatched),
                         "duplicates": duplicates,
                         "unreadable_lines": unreadable}
        failed = failed or bool(missing) or bool(mismatched)

    print(f"sent        {out['requests']} requests, {out['readings']} "
          f"readings in {out['duration_s']} s "
          f"({out['requests_per_s']} requests/s)")
    print(f"            {out['requests_valid']} valid, "
          f"{out['requests_invalid_on_purpose']} invalid on purpose, "
          f"{out['requests_unknown_key']} with unknown keys")
    print(f"accepted    {out['accepted_requests']} requests (202), "
          f"{out['accepted_readings']} readings")
    print(f"rejected    by status {out['rejected_by_status']}")
    print(f"            by error  {out['rejected_by_code']}")
    print(f"503         {out['retried_503']} retried, "
          f"{out['gave_up_503']} still 503 after {args.max_retries} retries")
    print(f"latency     p50 {out['latency_ms']['p50']} ms, "
          f"p99 {out['latency_ms']['p99']} ms, "
          f"max {out['latency_ms']['max']} ms")
    print(f"schedule    max lag {out['max_schedule_lag_s']} s")
    if verify is not None:
        o = out["output"]
        print(f"output      {o['found']} of {o['accepted_ids']} accepted ids "
              f"found, {o['missing']} missing, {o['mismatched']} with a "
              f"different device or value, {o['duplicates']} duplicates")
        if o["unreadable_lines"]:
            print(f"            {o['unreadable_lines']} output lines skipped "
                  f"because they are not JSON that Python can parse")
        for message_id in verify[1][:5]:
            print(f"  missing from output: {message_id}")
    print(f"unexpected  {out['unexpected_responses']} responses")
    for line in stats.unexpected:
        print(f"  {line}")
    if args.json_report:
        with open(args.json_report, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print("result      " + ("FAILED" if failed else "ok"))
    return 1 if failed else 0


# ---- command line ---------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Simulate a fleet of devices sending readings to "
        "ingestd and check every response.")
    p.add_argument("-c", "--config", required=True,
                   help="ingestd config file, used by `ingestd device add` "
                   "and for the default --url")
    p.add_argument("--url", help="base URL of the device API (default: "
                   "from http.listen in the config)")
    p.add_argument("--ingestd", default=default_ingestd_bin(),
                   help="ingestd binary (default: $INGESTD_BIN, "
                   "build/ingestd, then PATH)")
    p.add_argument("--devices", type=int, default=1000,
                   help="number of devices (default 1000)")
    p.add_argument("--devices-file",
                   help="JSON file of device ids and keys; reused when it "
                   "exists, written after registration otherwise")
    p.add_argument("--id-prefix", help="prefix of new device ids (default "
                   "sim-<random hex>-)")
    p.add_argument("--device-type", help="ingestd device type passed to "
                   "`device add --type` (default: the config's default)")
    p.add_argument("--register-jobs", type=int, default=4,
                   help="parallel `ingestd device add` processes "
                   "(default 4)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of sending (default 60)")
    p.add_argument("--speed", type=float, default=10.0,
                   help="simulated seconds per wall-clock second "
                   "(default 10)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="sender threads, each with one keep-alive "
                   "connection (default 16)")
    p.add_argument("--invalid-rate", type=float, default=0.03,
                   help="share of readings made invalid on purpose "
                   "(default 0.03)")
    p.add_argument("--invalid-kinds", default=",".join(INVALID_KINDS),
                   help="comma-separated ways to break readings (default: "
                   "all of " + ", ".join(INVALID_KINDS) + ")")
    p.add_argument("--unknown-rate", type=float, default=0.01,
                   help="share of requests sent with a random unknown key "
                   "(default 0.01)")
    p.add_argument("--max-requests", type=int, default=0,
                   help="stop after this many requests (default 0: no "
                   "limit besides --duration)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries of a request that got 503 (default 5)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for one response (default 10)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait until ingestd loads the new keys "
                   "(default 30)")
    p.add_argument("--verify-output", metavar="DIR",
                   help="file sink output folder; check that every "
                   "accepted id is there")
    p.add_argument("--verify-timeout", type=float, default=30.0,
                   help="seconds to wait for the sink (default 30)")
    p.add_argument("--seed", type=int, help="random seed for a repeatable "
                   "run (default: random)")
    p.add_argument("--json-report", metavar="FILE",
                   help="also write the results as JSON to FILE")
    args = p.parse_args(argv)

    checks = [
        (1 <= args.devices <= 100000, "--devices must be 1 to 100000"),
        (1 <= args.register_jobs <= 32, "--register-jobs must be 1 to 32"),
        (0 < args.duration <= 86400, "--duration must be 0 to 86400 s"),
        (0 < args.speed <= 100000, "--speed must be above 0"),
        (1 <= args.concurrency <= 512, "--concurrency must be 1 to 512"),
        (0 <= args.invalid_rate <= 1, "--invalid-rate must be 0 to 1"),
        (0 <= args.unknown_rate <= 1, "--unknown-rate must be 0 to 1"),
        (0 <= args.max_retries <= 100, "--max-retries must be 0 to 100"),
        (args.timeout > 0, "--timeout must be above 0"),
        (args.max_requests >= 0, "--max-requests must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    kinds = tuple(k.strip() for k in args.invalid_kinds.split(",")
                  if k.strip())
    unknown = [k for k in kinds if k not in INVALID_KINDS]
    if not kinds or unknown:
        p.error(f"--invalid-kinds: invalid kind {', '.join(unknown)!r}; use "
                f"some of {', '.join(INVALID_KINDS)}")
    args.invalid_kinds = kinds
    return args


def main(argv):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    if args.url:
        base = args.url.rstrip("/")
    else:
        listen = listen_from_config(args.config)
        if not listen:
            print(f"replay: no http.listen in {args.config}; pass --url",
                  file=sys.stderr)
            return 2
        base = url_from_listen(listen)
    url = base + "/v1/data"

    stats = Stats()
    try:
        devices = load_or_register(args, rng)
        wait_until_known(url, devices, args.ready_timeout)
        print(f"replay: {len(devices)} devices sending to {url} for "
              f"{args.duration:g} s at {args.speed:g}x speed",
              file=sys.stderr)
        elapsed = run_fleet(args, url, devices, rng, stats)
    except ReplayError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("replay: interrupted; results so far:", file=sys.stderr)
        report(stats, 0.0, None, args)
        return 130

    verify = None
    if args.verify_output:
        with stats.lock:
            accepted = dict(stats.accepted_ids)
        verify = verify_output(args.verify_output, accepted,
                               args.verify_timeout)
    return report(stats, elapsed, verify, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
