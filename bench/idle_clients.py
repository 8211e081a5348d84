#!/usr/bin/python3
"""Opens many idle WebSocket or HTTP keep-alive connections to ingestd.

For bench/idle.sh. Each connection uses the API key of one line of the
credentials file ("device_id api_key"), in turn.

- ws: the upgrade request to GET /v1/ws carries the key in an
  Authorization header. After the 101 response the connection sends
  nothing but a pong for each ping from the server.
- http: the connection sends one POST /v1/data with a reading, reads the
  202 response and then stays open without another request.

At most --batch connections are being opened at once, so that the
server's listen backlog does not overflow. Once every connection is open
or has failed, "IDLE kind=K open=N failed=N connect_us=N" goes to stdout.
The connections then stay open for --hold seconds or until SIGTERM or
SIGINT, and "IDLE_END open=N lost=N" follows, where lost counts the
connections that the server closed during the hold.

The opening handshake is written by hand on asyncio streams instead of
with python3-websockets, because that library's handshake costs more CPU
per connection, and these connections never carry a message.
"""

import argparse
import asyncio
import base64
import os
import signal
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("ws", "http"))
    p.add_argument("--host", default="127.0.0.1",
                   help="server IP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="server port")
    p.add_argument("--bind", default=None,
                   help="local address to connect from (default: any)")
    p.add_argument("--credentials", required=True,
                   help="file with one 'device_id api_key' per line")
    p.add_argument("--count", type=int, default=1000,
                   help="connections, 1 to 18000 (default 1000)")
    p.add_argument("--hold", type=int, default=10,
                   help="seconds to keep the connections open (default 10)")
    p.add_argument("--batch", type=int, default=128,
                   help="connections being opened at once (default 128)")
    p.add_argument("--max-seconds", type=int, default=120,
                   help="time limit for opening them all (default 120)")
    args = p.parse_args(argv)

    checks = [("--count", args.count, 1, 18000),
              ("--hold", args.hold, 1, 3600),
              ("--batch", args.batch, 1, 4096),
              ("--max-seconds", args.max_seconds, 1, 3600)]
    for name, value, low, high in checks:
        if not low <= value <= high:
            p.error(f"{name} must be {low} to {high}, got {value}")
    return args


def read_credentials(path):
    creds = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and not parts[0].startswith("#"):
                creds.append(parts)
    if not creds:
        sys.exit(f"idle_clients.py: no credentials in {path}")
    return creds


def reading(device_id):
    return (f'{{"device_id":"{device_id}",'
            f'"timestamp":"2026-12-04T17:00:00.000Z","sensor_value":42.5}}')


def opening_request(args, device_id, key):
    host = f"{args.host}:{args.port}"
    if args.kind == "ws":
        nonce = base64.b64encode(os.urandom(16)).decode()
        return (f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {nonce}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {key}\r\n\r\n").encode()
    body = reading(device_id).encode()
    return (f"POST /v1/data HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_response(reader):
    """Read one HTTP response and return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


def masked_frame(opcode, payload):
    """Build a client frame, which RFC 6455 requires to be masked."""
    mask = os.urandom(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + data


async def answer_pings(reader, writer):
    """Send a pong for each ping from the server until the connection ends."""
    while True:
        head = await reader.readexactly(2)
        opcode = head[0] & 0x0F
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(length)
        if opcode == 0x9:
            writer.write(masked_frame(0xA, payload))
        elif opcode == 0x8:
            return


class Pool:
    def __init__(self, args):
        self.args = args
        self.open = 0
        self.failed = 0
        self.lost = 0
        self.holding = False
        self.writers = []
        self.failures_shown = 0

    def fail(self, message):
        """Count a failed connection and print the first 5 failures."""
        self.failed += 1
        if self.failures_shown < 5:
            self.failures_shown += 1
            print(f"idle_clients.py: {message}", file=sys.stderr)

    async def connect(self, cred, slots):
        device_id, key = cred
        args = self.args
        async with slots:
            try:
                local = (args.bind, 0) if args.bind else None
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port,
                                            local_addr=local), 30)
                writer.write(opening_request(args, device_id, key))
                status = await asyncio.wait_for(read_response(reader), 30)
            except (OSError, asyncio.TimeoutError,
                    asyncio.IncompleteReadError) as e:
                self.fail(f"{args.kind} connection as {device_id} failed: "
                          f"{e!r}")
                return
            expected = 101 if args.kind == "ws" else 202
            if status != expected:
                self.fail(f"{args.kind} connection as {device_id} got "
                          f"{status}, expected {expected}")
                writer.close()
                return
            self.open += 1
            self.writers.append(writer)
        try:
            if args.kind == "ws":
                await answer_pings(reader, writer)
            else:
                await reader.read()
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.open -= 1
        if self.holding:
            self.lost += 1


async def run(args):
    creds = read_credentials(args.credentials)
    pool = Pool(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    slots = asyncio.Semaphore(args.batch)
    start = time.perf_counter()
    tasks = [asyncio.create_task(pool.connect(creds[i % len(creds)], slots))
             for i in range(args.count)]
    deadline = start + args.max_seconds
    timed_out = ""
    while pool.open + pool.failed < args.count and not stop.is_set():
        if time.perf_counter() >= deadline:
            timed_out = " timed_out=1"
            break
        await asyncio.sleep(0.05)
    print(f"IDLE kind={args.kind} open={pool.open} "
          f"failed={args.count - pool.open} "
          f"connect_us={int((time.perf_counter() - start) * 1e6)}"
          f"{timed_out}", flush=True)

    pool.holding = True
    try:
        await asyncio.wait_for(stop.wait(), args.hold)
    except asyncio.TimeoutError:
        pass
    pool.holding = False
    print(f"IDLE_END open={pool.open} lost={pool.lost}", flush=True)
    for t in tasks:
        t.cancel()
    for w in pool.writers:
        w.close()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv):
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
