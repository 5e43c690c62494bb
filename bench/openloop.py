"""An open-loop, fixed-rate HTTP load generator for bench/ingest.py.

wrk is closed-loop: a slow answer delays the next request on its connection, so a stall is
measured once instead of for every request that should have been sent during it (coordinated
omission). This generator schedules request ``i`` at ``start + i / rate`` whatever happens to
earlier ones, and measures each latency from that *scheduled* time to the last byte of the
answer, so a stall in the server (or in this process) counts against every request it delays.

Requests are replayed from a file of ``<message_id> <signature hex> <json body>`` lines, built
into raw HTTP/1.1 requests before the clock starts. Connections are keep-alive and pooled: a
request takes an idle connection or opens a new one (up to ``--max-connections``; beyond that
it waits, and the wait counts). It prints one JSON object and writes the acknowledged message
ids (answer 200 "received") to ``--acked`` so the caller can check each one is stored.
``--ack-2xx`` counts any 2xx answer as an acknowledgement (a receiver that answers
``{"status": "queued"}``), and ``--sent FILE`` also writes "<id> <wall-clock ns>" per
acknowledged request, the ``time.time_ns()`` at which it was sent, so a receiving side on the same
machine (an ERP sink) can time the whole path.

    python bench/openloop.py --port N --requests FILE --rate 1000 --duration 30 --acked FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


@dataclass
class Result:
    """What the run saw; latencies in seconds."""

    latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    sent_ns: list[int] = field(default_factory=list)
    duplicate: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    connections_opened: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request; return (status, body, whether the connection stays open)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, keep = 0, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        body = await self.reader.readexactly(length) if length else b""
        return status, body, keep

    def close(self) -> None:
        self.writer.transport.abort()


def load_requests(path: Path, port: int, url_path: str) -> list[tuple[str, bytes]]:
    """(message_id, raw HTTP request) for each line of the requests file."""
    out = []
    with path.open("rb") as fh:
        for line in fh:
            message_id, signature, body = line.rstrip(b"\n").split(b" ", 2)
            head = (
                f"POST {url_path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                "Content-Type: application/json\r\n"
                f"X-MasonHub-Signature: sha256={signature.decode()}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            out.append((message_id.decode(), head + body))
    return out


class Generator:
    """Sends ``requests`` at a fixed rate over a pool of keep-alive connections."""

    def __init__(
        self, port: int, max_connections: int, timeout: float, *, ack_2xx: bool = False
    ) -> None:
        self.port = port
        self.ack_2xx = ack_2xx
        self.result = Result()
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout = timeout

    async def _open(self) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.result.connections_opened += 1
        return Connection(reader, writer)

    async def prewarm(self, count: int) -> None:
        """Open ``count`` connections before the clock starts."""
        for _ in range(count):
            await self._slots.acquire()
            self._idle.append(await self._open())
            self._slots.release()

    async def one(self, message_id: str, request: bytes, scheduled: float) -> None:
        loop = asyncio.get_running_loop()
        async with self._slots:
            conn: Connection | None = None
            try:
                conn = self._idle.pop() if self._idle else await self._open()
                self.result.send_lags.append(loop.time() - scheduled)
                sent_ns = time.time_ns()
                status, body, keep = await asyncio.wait_for(conn.exchange(request), self._timeout)
            except TimeoutError:
                self.result.error("timeout")
                if conn is not None:
                    conn.close()
                return
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                self.result.error(type(exc).__name__)
                if conn is not None:
                    conn.close()
                return
            self.result.latencies.append(loop.time() - scheduled)
            key = str(status)
            self.result.statuses[key] = self.result.statuses.get(key, 0) + 1
            if (status == 200 and b'"received"' in body) or (self.ack_2xx and status // 100 == 2):
                self.result.acked.append(message_id)
                self.result.sent_ns.append(sent_ns)
            elif status == 200 and b'"duplicate"' in body:
                self.result.duplicate += 1
            if keep:
                self._idle.append(conn)
            else:
                conn.close()

    async def run(self, requests: list[tuple[str, bytes]], rate: float) -> float:
        """Schedule every request; return the seconds from first schedule to last answer."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        for index, (message_id, request) in enumerate(requests):
            scheduled = start + index / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(message_id, request, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=self._timeout + 1)
        for task in tasks:
            task.cancel()
            self.result.error("unfinished")
        return loop.time() - start

    def close(self) -> None:
        for conn in self._idle:
            with contextlib.suppress(Exception):
                conn.close()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: list[float]) -> dict[str, float]:
    """Milliseconds at the usual percentiles."""
    ordered = sorted(values)
    points = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9, "max": 100.0}
    return {name: round(percentile(ordered, p) * 1000, 3) for name, p in points.items()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    requests = load_requests(args.requests, args.port, args.path)
    wanted = round(args.rate * args.duration)
    if len(requests) < wanted:
        raise SystemExit(f"openloop: {args.requests} has {len(requests)} lines, need {wanted}")
    generator = Generator(args.port, args.max_connections, args.timeout, ack_2xx=args.ack_2xx)
    try:
        await generator.prewarm(args.prewarm)
        elapsed = await generator.run(requests[:wanted], args.rate)
    finally:
        generator.close()
    result = generator.result
    args.acked.write_text("".join(f"{m}\n" for m in result.acked))
    if args.sent is not None:
        pairs = zip(result.acked, result.sent_ns, strict=True)
        args.sent.write_text("".join(f"{m} {ns}\n" for m, ns in pairs))
    return {
        "rate": args.rate,
        "duration_s": args.duration,
        "scheduled": wanted,
        "elapsed_s": round(elapsed, 3),
        "answered": len(result.latencies),
        "received": len(result.acked),
        "duplicate": result.duplicate,
        "statuses": result.statuses,
        "errors": result.errors,
        "connections_opened": result.connections_opened,
        "latency_ms": summary(result.latencies),
        "send_lag_ms": summary(result.send_lags),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/webhooks/masonhub")
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--acked", type=Path, required=True, help="write acked ids here")
    parser.add_argument(
        "--ack-2xx", action="store_true", help='any 2xx acknowledges, not only 200 "received"'
    )
    parser.add_argument("--sent", type=Path, help="write '<id> <send time_ns>' of acked here")
    parser.add_argument("--prewarm", type=int, default=32, help="connections opened first")
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    args = parser.parse_args()
    json.dump(asyncio.run(main_async(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
