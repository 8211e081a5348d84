#!/usr/bin/python3
"""Load generator for ingestd's WebSocket endpoint GET /v1/ws.

K connections each send M readings as text messages, with up to W
messages per connection waiting for their reply. Each connection sends the
API key of one line of the credentials file ("device_id api_key") in an
Authorization header. ingestd replies in message order, so the reply to
the oldest open message gives its ack latency: the time from the send
call to the reply.

Connections can be spread over several processes (--processes), because
one Python process uses at most one core. When all are done, one line
goes to stdout:

  WS_LOAD connections=K connected=K processes=P window=W sent=N acked=N
    rejected=N errors=N duration_us=N rate=X p50_us=N p99_us=N max_us=N
    cpu_pct=X timed_out=0|1

rate is acked / duration, where duration runs from the first send to the
last reply. rejected counts error replies, and errors counts failed
connections and messages still without a reply at the time limit.
cpu_pct is the CPU time of the generator processes, from their start to
their last reply, over the wall time of the run, 100 per busy core.

Needs python3-websockets (Debian 12 ships 10.4).
"""

import argparse
import asyncio
import collections
import json
import multiprocessing
import sys
import time

import websockets


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1",
                   help="server IP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="server port")
    p.add_argument("--credentials", required=True,
                   help="file with one 'device_id api_key' per line")
    p.add_argument("--connections", type=int, default=1,
                   help="connections, 1 to 4096 (default 1)")
    p.add_argument("--messages", type=int, default=1000,
                   help="messages per connection (default 1000)")
    p.add_argument("--window", type=int, default=16,
                   help="messages awaiting a reply per connection "
                   "(default 16)")
    p.add_argument("--processes", type=int, default=1,
                   help="generator processes, 1 to 8 (default 1)")
    p.add_argument("--run", default="run",
                   help="run name, written into each reading (default run)")
    p.add_argument("--max-seconds", type=int, default=120,
                   help="time limit for the whole run (default 120)")
    args = p.parse_args(argv)

    checks = [("--connections", args.connections, 1, 4096),
              ("--messages", args.messages, 1, 10000000),
              ("--window", args.window, 1, 1024),
              ("--processes", args.processes, 1, 8),
              ("--max-seconds", args.max_seconds, 1, 3600)]
    for name, value, low, high in checks:
        if not low <= value <= high:
            p.error(f"{name} must be {low} to {high}, got {value}")
    args.processes = min(args.processes, args.connections)
    return args


def read_credentials(path):
    creds = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                sys.exit(f"ws_load.py: invalid line {number} in {path}: "
                         "expected 'device_id api_key'")
            creds.append(parts)
    if not creds:
        sys.exit(f"ws_load.py: no credentials in {path}")
    return creds


def make_reading(device_id, run, seq):
    """Format a reading of about 160 bytes, like mqtt_load's."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return (
        f'{{"device_id":"{device_id}","timestamp":"{stamp}.'
        f'{int(now * 1000) % 1000:03d}Z",'
        f'"sensor_value":{40 + (seq % 20) * 0.75:.2f},'
        f'"temperature":{21.5 + (seq % 7) * 0.1:.1f},'
        f'"humidity":{48 + (seq % 11) * 0.5:.1f},'
        f'"battery":{87 - seq % 5},"run":"{run}","seq":{seq}}}')


class Stats:
    def __init__(self):
        self.connected = 0
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.errors = 0
        self.first_send = None
        self.last_reply = None
        self.latencies = []
        self.cpu = 0.0


async def drive_connection(args, cred, stats):
    device_id, key = cred
    url = f"ws://{args.host}:{args.port}/v1/ws"
    window = asyncio.Semaphore(args.window)
    sent_at = collections.deque()

    try:
        ws = await websockets.connect(
            url, extra_headers={"Authorization": f"Bearer {key}"},
            max_queue=None, compression=None, open_timeout=30)
    except (OSError, asyncio.TimeoutError,
            websockets.exceptions.WebSocketException) as e:
        print(f"ws_load.py: connecting as {device_id} failed: {e}",
              file=sys.stderr)
        stats.errors += 1
        return
    stats.connected += 1

    async def receive():
        for _ in range(args.messages):
            text = await ws.recv()
            now = time.perf_counter()
            stats.latencies.append(now - sent_at.popleft())
            stats.last_reply = now
            if text.startswith('{"type":"ack"'):
                stats.acked += 1
            else:
                stats.rejected += 1
                if stats.rejected <= 5:
                    print(f"ws_load.py: error reply: {text[:300]}",
                          file=sys.stderr)
            window.release()

    receiver = asyncio.create_task(receive())
    try:
        for seq in range(args.messages):
            await window.acquire()
            if receiver.done():
                break
            text = make_reading(device_id, args.run, seq)
            now = time.perf_counter()
            if stats.first_send is None:
                stats.first_send = now
            sent_at.append(now)
            await ws.send(text)
            stats.sent += 1
        await receiver
    except websockets.exceptions.ConnectionClosed as e:
        print(f"ws_load.py: connection of {device_id} closed: {e}",
              file=sys.stderr)
        stats.errors += 1
    finally:
        receiver.cancel()
        await ws.close()


async def run_share(args, creds, first, count):
    stats = Stats()
    tasks = [asyncio.create_task(
        drive_connection(args, creds[(first + i) % len(creds)], stats))
        for i in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
    timed_out = bool(pending)
    for t in pending:
        t.cancel()
    for t in pending:
        try:
            await t
        except asyncio.CancelledError:
            pass
    # Messages sent without a reply, at the time limit or because their
    # connection closed, are errors.
    stats.errors += stats.sent - stats.acked - stats.rejected
    return stats, timed_out


def child(args, creds, first, count, conn):
    cpu_start = time.process_time()
    stats, timed_out = asyncio.run(run_share(args, creds, first, count))
    stats.cpu = time.process_time() - cpu_start
    conn.send((stats.__dict__, timed_out))
    conn.close()


def percentile(sorted_values, pct):
    if not sorted_values:
        return 0
    index = max(0, (len(sorted_values) * pct + 99) // 100 - 1)
    return sorted_values[index]


def main(argv):
    args = parse_args(argv)
    creds = read_credentials(args.credentials)
    ctx = multiprocessing.get_context("fork")
    start = time.perf_counter()
    children = []
    first = 0
    for p in range(args.processes):
        count = args.connections // args.processes + \
            (1 if p < args.connections % args.processes else 0)
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child,
                           args=(args, creds, first, count, child_end))
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
        first += count

    total = Stats()
    timed_out = False
    for proc, parent_end in children:
        try:
            data, child_timed_out = parent_end.recv()
        except EOFError:
            print(f"ws_load.py: generator process {proc.pid} failed",
                  file=sys.stderr)
            total.errors += 1
            proc.join()
            continue
        proc.join()
        timed_out = timed_out or child_timed_out
        for name in ("connected", "sent", "acked", "rejected", "errors",
                     "cpu"):
            setattr(total, name, getattr(total, name) + data[name])
        total.latencies.extend(data["latencies"])
        if data["first_send"] is not None:
            total.first_send = min(total.first_send or data["first_send"],
                                   data["first_send"])
        if data["last_reply"] is not None:
            total.last_reply = max(total.last_reply or 0, data["last_reply"])

    wall = time.perf_counter() - start
    duration = 0.0
    if total.first_send is not None and total.last_reply is not None:
        duration = max(0.0, total.last_reply - total.first_send)
    lat = sorted(total.latencies)
    us = [int(x * 1e6) for x in
          (percentile(lat, 50), percentile(lat, 99), lat[-1] if lat else 0)]
    print(f"WS_LOAD connections={args.connections} "
          f"connected={total.connected} processes={args.processes} "
          f"window={args.window} sent={total.sent} acked={total.acked} "
          f"rejected={total.rejected} errors={total.errors} "
          f"duration_us={int(duration * 1e6)} "
          f"rate={total.acked / duration if duration else 0:.1f} "
          f"p50_us={us[0]} p99_us={us[1]} max_us={us[2]} "
          f"cpu_pct={100 * total.cpu / wall if wall else 0:.0f} "
          f"timed_out={int(timed_out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
