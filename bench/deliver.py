"""bench/deliver: outbox deliveries per second to an ERP that answers at once, and latency.

Everything runs on 127.0.0.1, each server in its own process:

* the ERP is ``bench/erp_sink.py`` (``PUT /api/...`` answers 200 at once and records, per call,
  its arrival time, the order id from the path and the Idempotency-Key);
* syncd is the real daemon, ``syncd run --config <tmp toml>``, its log going to a file.

**Throughput.** Per backend (SQLite in WAL mode in a temporary directory; PostgreSQL in a fresh
``syncd_bench_*`` database, dropped at the end) one store is pre-filled, without the daemon,
through the real merge path (``SqlStore.apply_facts`` of ``order_fact`` facts, 1,000 per
transaction): one pending delivery per distinct order. Each cell (``erp.concurrency`` 1, 8, 32)
gets its own copy of that store (a file copy, or ``CREATE DATABASE ... TEMPLATE``), starts the
daemon and times from the daemon's start until the sink has the last call. The steady rate is
taken from the sink's arrival times between 10% and 90% of the calls. Afterwards: every order
got exactly one call (duplicates counted, and those with the same Idempotency-Key, a harmless
retry, separately), the outbox is empty and one attempt per order is recorded.

**Latency.** The daemon at concurrency 8 on a fresh empty store; signed single-order
``orderEvent`` callbacks at a fixed rate (open loop). Receipt-to-ERP is the sink's arrival time
minus the client's send time, both ``time.time_ns()`` on the same machine.

The PostgreSQL concurrency-32 cell is profiled with py-spy for a few seconds when py-spy is
installed. Prints a table, writes raw numbers to ``bench/out/``, and exits 1 if a cell lost or
duplicated a delivery (a same-key retry is reported, not failed) or left the outbox non-empty.

    .venv/bin/python bench/deliver.py            # the whole matrix: 20-25 min on 2 idle cores
    .venv/bin/python bench/deliver.py --help     # knobs (order counts, rates, backends)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import syncd
from syncd.facts import order_fact
from syncd.store import SqlStore
from syncd.testing import dumps, envelope, sign

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = Path(sys.executable)
SYNCD = PYTHON.with_name("syncd")
SECRET = "bench"
ERP_TOKEN = "bench-erp-token"
WEBHOOK_PATH = "/webhooks/masonhub"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Set in the child run: the scratch directory whose ``src/`` holds the syncd under test.
SNAPSHOT_ENV = "SYNCD_DELIVER_SCRATCH"
#: Facts per apply_facts transaction while pre-filling.
PREFILL_CHUNK = 1000
#: A run during which other processes used more CPU than this (% of one core) is "noisy".
NOISY_PCT = 25.0
#: The steady part of a run, as fractions of its calls.
STEADY = (0.10, 0.90)
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


# --- small helpers --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_json(url: str, method: str = "GET", timeout: float = 30.0) -> Any:
    """GET or POST (empty body) a local URL and decode its JSON answer."""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"refusing a non-local URL: {url}")
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 (checked)
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 (checked)
        return json.loads(answer.read())


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def order_item(serial: int, prefix: str) -> dict[str, Any]:
    """One MasonHub order record (GET /orders shape): fulfilled, one shipment with tracking."""
    key = f"{prefix}{serial:06d}"
    return {
        "id": str(uuid.uuid4()),
        "customer_identifier": key,
        "status": "fulfilled",
        "updated_at": "2024-05-01T12:00:00Z",
        "shipments": [
            {
                "shipment_id": f"S-{key}",
                "tracking_number": f"9400{serial:018d}",
                "tracking_url": f"http://usps.gov/tracking/9400{serial:018d}",
                "shipping_provider": "USPS",
                "shipper_service_level": "priority",
                "shipment_date_time": "2024-05-01T11:00:00Z",
                "shipment_line_items": [
                    {"sku_customer_id": "shirts872340", "quantity": 2},
                    {"sku_customer_id": "pants3422", "quantity": 1},
                ],
            }
        ],
    }


# --- CPU accounting -------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User+system CPU seconds of ``pid`` (and of its reaped children if asked); 0 if gone."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def postgres_backends(database_prefix: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving a database named ``prefix*``.

    A backend's process title names its database ("postgres: 15/main: USER DB HOST ...").
    """
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if database_prefix in title:
                found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (everything but idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _TICK


class CpuMeter:
    """CPU used during a phase, in % of one core (2 cores = 200%), by who used it.

    ``postgres`` is only the backends serving this benchmark's databases (found by process
    title, sampled by `sample` so that short-lived ones are seen too); the server's shared
    processes and every other database's backends count as ``other``.
    """

    def __init__(self, pids: dict[str, int], pg_prefix: str | None) -> None:
        self.pids = pids
        self.pg_prefix = pg_prefix
        self.usage: dict[str, float] = {}
        self._pg_first: dict[int, float] = {}
        self._pg_last: dict[int, float] = {}
        self._before: dict[str, float] = {}
        self._started = self._busy = self._own = 0.0

    def start(self) -> CpuMeter:
        self._started = time.monotonic()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._busy, self._own = machine_busy(), time.process_time()
        if self.pg_prefix:
            self._pg_first = postgres_backends(self.pg_prefix)
            self._pg_last = dict(self._pg_first)
        return self

    def sample(self) -> None:
        """Look for backends started since the last sample (new ones count from zero)."""
        if self.pg_prefix:
            for pid, seconds in postgres_backends(self.pg_prefix).items():
                self._pg_first.setdefault(pid, 0.0)
                self._pg_last[pid] = seconds

    def stop(self) -> dict[str, float]:
        self.sample()
        wall = time.monotonic() - self._started
        used = {name: cpu_seconds(pid) - self._before[name] for name, pid in self.pids.items()}
        used["postgres"] = sum(self._pg_last[p] - self._pg_first[p] for p in self._pg_last)
        used["bench"] = time.process_time() - self._own
        busy = machine_busy() - self._busy
        used["other"] = max(0.0, busy - sum(used.values()))
        for name, seconds in used.items():
            self.usage[f"{name}_cpu_pct"] = round(100 * seconds / wall, 1)
        self.usage["machine_busy_pct"] = round(100 * busy / wall, 1)
        self.usage["cpu_window_s"] = round(wall, 3)
        return self.usage


def wait_quiet(max_wait: float, limit: float = 15.0) -> float:
    """Wait up to ``max_wait`` s for a second in which the machine is < ``limit`` % busy.

    Other work on the machine (a test suite, another benchmark) takes CPU from the run.
    """
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        busy = machine_busy()
        time.sleep(1.0)
        pct = 100 * (machine_busy() - busy)
        if pct < limit or time.monotonic() >= deadline:
            return round(pct, 1)
        if not told:
            print(f"  waiting for the machine to be quiet (busy: {pct:.0f}%)", flush=True)
            told = True


# --- processes ------------------------------------------------------------------------------


class Process:
    """A server process with its output in a file, in its own session."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, *urls: str, timeout: float = 60.0) -> None:
        """Wait until one of ``urls`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited: {self.tail()}")
            for url in urls:
                with suppress(OSError, urllib.error.URLError, ValueError):
                    http_json(url, timeout=1)
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} not answering after {timeout:.0f}s: {self.tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM this process only and wait (SIGKILL if it lingers); its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def tail(self, lines: int = 5) -> str:
        text = (
            self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        )
        return " | ".join(text[-lines:]) or "(no output)"


class Sink:
    """bench/erp_sink.py on a free port."""

    def __init__(self, scratch: Path, *, record: bool = False) -> None:
        self.port = free_port()
        argv = [str(PYTHON), str(BENCH / "erp_sink.py"), f"--port={self.port}"]
        if record:  # calls survive a SIGKILL of the sink (see erp_sink.py)
            argv.append(f"--record={scratch / 'erp_sink.calls'}")
        self.process = Process("erp_sink", argv, scratch / "erp_sink.log")
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process.start()
        self.process.wait_http(f"{self.base}/stats")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = http_json(f"{self.base}/stats", timeout=5)
        return result

    def calls(self) -> dict[str, list[Any]]:
        result: dict[str, list[Any]] = http_json(f"{self.base}/calls", timeout=60)
        return result

    def reset(self) -> None:
        http_json(f"{self.base}/reset", method="POST", timeout=5)


# --- stores ---------------------------------------------------------------------------------


class Backend:
    """Where the daemon's store lives: a pre-filled template, and copies of it per run."""

    name = ""
    #: Part of the name of every database this backend creates (None: not PostgreSQL).
    pg_prefix: str | None = None

    def url_of(self, copy: str) -> str:
        raise NotImplementedError

    def template(self, label: str) -> str:
        """The URL of a new empty template store named ``label``."""
        raise NotImplementedError

    def freeze(self, label: str) -> None:
        """Make template ``label`` copyable (nothing may hold it open)."""

    def clone(self, label: str, copy: str) -> str:
        """A copy of template ``label`` named ``copy``; its URL."""
        raise NotImplementedError

    def query(self, copy: str, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def settings(self) -> dict[str, str]:
        return {}

    def drop_all(self) -> None:
        """Remove every database this backend created."""


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.db"

    def url_of(self, copy: str) -> str:
        return f"sqlite+aiosqlite:///{self._path(copy)}"

    def template(self, label: str) -> str:
        return self.url_of(label)

    def freeze(self, label: str) -> None:
        # Fold the WAL into the main file so that copying the file copies the whole store.
        with sqlite3.connect(self._path(label)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def clone(self, label: str, copy: str) -> str:
        shutil.copyfile(self._path(label), self._path(copy))
        return self.url_of(copy)

    def query(self, copy: str, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self._path(copy)) as conn:
            return conn.execute(sql).fetchall()

    def settings(self) -> dict[str, str]:
        fs = subprocess.run(
            ["df", "--output=fstype,source", str(self.dir)], capture_output=True, text=True
        ).stdout.split()
        return {
            "journal_mode": "WAL (set by syncd on every connection)",
            "synchronous": "FULL for webhook commits and claims, NORMAL for merges and completions",
            "sqlite_version": sqlite3.sqlite_version,
            "directory": str(self.dir),
            "filesystem": " ".join(fs[2:]) if len(fs) > 2 else "?",
        }


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self) -> None:
        self.prefix = f"syncd_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.pg_prefix = self.prefix
        self.created: list[str] = []

    def _db(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def url_of(self, copy: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self._db(copy)}"

    @staticmethod
    def _fetch(database: str, sql: str) -> list[tuple[Any, ...]]:
        import asyncpg

        async def fetch() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + f"/{database}", timeout=10)
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def _create(self, name: str, template: str | None = None) -> None:
        sql = f'CREATE DATABASE "{self._db(name)}"'
        if template is not None:
            sql += f' TEMPLATE "{self._db(template)}"'
        self._fetch("postgres", sql)
        self.created.append(self._db(name))

    def template(self, label: str) -> str:
        self._create(label)
        return self.url_of(label)

    def clone(self, label: str, copy: str) -> str:
        self._create(copy, template=label)
        return self.url_of(copy)

    def query(self, copy: str, sql: str) -> list[tuple[Any, ...]]:
        return self._fetch(self._db(copy), sql)

    def settings(self) -> dict[str, str]:
        names = ("server_version", "synchronous_commit", "fsync", "shared_buffers")
        return {n: str(self._fetch("postgres", f"SHOW {n}")[0][0]) for n in names}

    def drop_all(self) -> None:
        while self.created:
            name = self.created.pop()
            try:
                self._fetch("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # keep dropping the others
                print(f"  could not drop database {name}: {exc}", file=sys.stderr)


async def _prefill(url: str, start: int, stop: int, *, migrate: bool) -> float:
    store = SqlStore(url)
    try:
        if migrate:
            await store.migrate()
        began = time.perf_counter()
        for first in range(start, stop, PREFILL_CHUNK):
            facts = [
                order_fact(order_item(i, "D"), "poll")
                for i in range(first, min(stop, first + PREFILL_CHUNK))
            ]
            result = await store.apply_facts(facts, record=False)
            if result.queued != len(facts):
                raise BenchError(f"pre-fill queued {result.queued} of {len(facts)} facts")
        return time.perf_counter() - began
    finally:
        await store.close()


def prefill(backend: Backend, sizes: list[int]) -> dict[int, float]:
    """Templates ``t<n>`` holding ``n`` pending order deliveries, for each of ``sizes``.

    One store grows through the sizes; each size is copied off as it is reached.
    """
    seconds: dict[int, float] = {}
    growing = "grow"
    url = backend.template(growing)
    done = 0
    for size in sorted(set(sizes)):
        seconds[size] = asyncio.run(_prefill(url, done, size, migrate=done == 0))
        done = size
        backend.freeze(growing)
        backend.clone(growing, f"t{size}")
    return seconds


# --- the daemon -----------------------------------------------------------------------------


POLL_JOBS = ("orders", "shipments", "inventory", "inbound_shipments", "rmas")


def daemon_config(
    path: Path, url: str, sink: Sink, concurrency: int, *, migrate: bool
) -> tuple[int, int]:
    """Write a ``syncd run`` config; returns the webhook and the admin port.

    Polls and the reconciliation are off, and MasonHub points at a closed local port, so the
    daemon only delivers and nothing leaves 127.0.0.1.
    """
    port, admin = free_port(), free_port()
    polls = "".join(f"[poll.{job}]\nenabled = false\n\n" for job in POLL_JOBS)
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n\n'
        f"[store]\nurl = {json.dumps(url)}\nauto_migrate = {str(migrate).lower()}\n\n"
        f'[masonhub]\nbase_url = "http://127.0.0.1:{free_port()}/api/v1"\ntoken = "unused"\n\n'
        f'[webhooks]\npath = "{WEBHOOK_PATH}"\nsigning_secrets = ["{SECRET}"]\n\n'
        f'[erp]\nbase_url = "{sink.base}/api"\ntoken = "{ERP_TOKEN}"\n'
        f'timeout = "15s"\nconcurrency = {concurrency}\n\n'
        f"{polls}[reconcile]\nenabled = false\n"
    )
    return port, admin


@dataclass
class Run:
    """Options, scratch space, and what every phase needs."""

    args: argparse.Namespace
    scratch: Path
    stack: ExitStack
    sink: Sink
    results: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    serial: int = 0

    def daemon(self, backend: Backend, url: str, concurrency: int, *, migrate: bool) -> Any:
        self.serial += 1
        label = f"{backend.name}-c{concurrency}-{self.serial}"
        config = self.scratch / f"{label}.toml"
        port, admin = daemon_config(config, url, self.sink, concurrency, migrate=migrate)
        argv = [str(SYNCD), "run", "--config", str(config)]
        process = Process(f"syncd ({label})", argv, self.scratch / f"{label}.log")
        self.stack.callback(process.stop)
        return process, (port, admin)


# --- profiling ------------------------------------------------------------------------------


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(PYTHON.parent)) or shutil.which("py-spy")


def start_profile(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording collapsed stacks of ``pid`` (idle frames dropped)."""
    tool = py_spy()
    if tool is None:
        print("  (py-spy not found: `.venv/bin/pip install py-spy` to profile)")
        return None
    argv = [tool, "record", "--pid", str(pid), "--duration", str(round(seconds))]
    argv += ["--rate", "200", "--format", "raw", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: What a sample was doing: the first rule (in order) with a needle in any of its frames.
PROFILE_PHASES = (
    ("record completions: SqlStore.complete_deliveries", ("complete_deliver",)),
    ("claim: SqlStore.claim_deliveries", ("claim_deliveries",)),
    ("dispatcher idle check: SqlStore.next_due_at", ("next_due_at",)),
    ("ERP call: HttpErpAdapter.deliver", ("HttpErpAdapter",)),
    ("other store writes (fail_delivery, release_leases)", ("fail_delivery", "release_leases")),
    ("logging: structlog JSON line per delivery", ("structlog/",)),
    ("dispatcher and worker glue (Deliverer)", ("Deliverer.",)),
    ("event loop waiting in epoll (not busy)", ("EpollSelector.select",)),
)
#: Which code the time was spent in: the frame nearest the leaf that matches a rule.
PROFILE_COSTS = (
    ("kernel: socket send (asyncio transport write)", ("_SelectorSocketTransport.write",)),
    ("event loop waiting in epoll (not busy)", ("EpollSelector.select",)),
    ("opening a DB connection", ("connect_utils.py",)),
    ("pool pre-ping on checkout", ("_async_ping", "do_ping")),
    (
        "SQLAlchemy: building and compiling statements",
        ("sqlalchemy/sql/", "_compile_w_cache", "_generate_cache_key"),
    ),
    ("SQLAlchemy: engine, pool, results, greenlets", ("sqlalchemy/",)),
    ("DB driver (asyncpg, aiosqlite)", ("asyncpg/", "aiosqlite/")),
    ("tenacity (AsyncRetrying per ERP call)", ("tenacity/",)),
    ("aiohttp client, yarl, multidict", ("aiohttp/", "yarl/", "multidict/")),
    ("structlog and json", ("structlog/", "json/")),
    ("syncd's own code", ("syncd/",)),
    ("asyncio machinery", ("asyncio/",)),
)
OTHER = "other (callbacks with no syncd frame on the stack: socket reads, greenlet-run SQL)"


def _phase(frames: list[str]) -> str:
    for name, needles in PROFILE_PHASES:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    return OTHER


def _cost(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in PROFILE_COSTS:
            if any(needle in frame for needle in needles):
                return name
    return OTHER


def summarize_profile(raw: Path, top: int = 30) -> list[str]:
    """Shares of active samples by phase, by cross-cutting cost, and by function."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    costs: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        phases[_phase(frames)] += count
        costs[_cost(frames)] += count
        bare = [re.sub(r":\d+\)$", ")", f) for f in frames]
        own[bare[-1]] += count
        for frame in set(bare):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples of the daemon's busy threads (idle waits dropped); by phase:"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in phases.most_common()]
    lines.append("by code the time was spent in (the frame nearest the leaf that says):")
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in costs.most_common()]
    lines.append("by function, inclusive% self%:")
    for frame, count in inclusive.most_common(top):
        lines.append(f"{100 * count / total:6.1f} {100 * own[frame] / total:6.1f}  {frame}")
    lines.append("top self time:")
    lines += [f"{100 * n / total:6.1f}  {frame}" for frame, n in own.most_common(top)]
    return lines


# --- throughput -----------------------------------------------------------------------------


def wait_for_calls(
    run: Run,
    daemon: Process,
    expected: int,
    deadline: float,
    profile_at: int | None,
    meter: CpuMeter,
) -> tuple[dict[str, Any], subprocess.Popen[bytes] | None]:
    """Poll the sink until ``expected`` calls arrived (or the deadline, or the daemon died)."""
    profiler = None
    stats = run.sink.stats()
    while stats["count"] < expected and time.monotonic() < deadline and daemon.alive():
        if profile_at is not None and stats["count"] >= profile_at:
            output = OUT / "deliver-profile-raw.txt"
            profiler = start_profile(daemon.pid, run.args.profile_seconds, output)
            profile_at = None  # once, whether or not py-spy is there
        time.sleep(0.2)
        meter.sample()
        stats = run.sink.stats()
    return stats, profiler


def check_calls(calls: dict[str, list[Any]], expected: set[str]) -> dict[str, Any]:
    """Exactly one call per expected order? Duplicates, same-key retries, missing, unexpected."""
    per_order: dict[str, set[str]] = {}
    counts: Counter[str] = Counter(calls["key"])
    for key, idem in zip(calls["key"], calls["idempotency_key"], strict=True):
        per_order.setdefault(key, set()).add(idem)
    duplicated = [k for k, n in counts.items() if n > 1]
    same_key = sum(counts[k] - 1 for k in duplicated if len(per_order[k]) == 1)
    return {
        "calls": len(calls["key"]),
        "distinct_orders": len(counts),
        "missing": len(expected - counts.keys()),
        "unexpected": len(counts.keys() - expected),
        "duplicate_calls": sum(counts[k] - 1 for k in duplicated),
        "duplicate_calls_same_idempotency_key": same_key,
    }


def rates(calls: dict[str, list[Any]], started_ns: int, expected: int) -> dict[str, Any]:
    """Overall and steady-state deliveries per second from the sink's arrival times."""
    at = sorted(calls["at_ns"])
    if not at:
        return {"deliveries_per_s": 0.0, "steady_per_s": 0.0}
    lo, hi = (min(len(at) - 1, int(f * expected)) for f in STEADY)
    span = (at[hi] - at[lo]) / 1e9
    total = (at[-1] - started_ns) / 1e9
    first = (at[0] - started_ns) / 1e9
    return {
        "seconds_start_to_last_call": round(total, 3),
        "seconds_start_to_first_call": round(first, 3),
        "deliveries_per_s": round(len(at) / total, 1),
        "steady_per_s": round((hi - lo) / span, 1) if span > 0 else 0.0,
        "steady_window_calls": [lo, hi],
        "deliveries_per_s_after_first_call": round((len(at) - 1) / ((at[-1] - at[0]) / 1e9), 1)
        if len(at) > 1
        else 0.0,
    }


def store_state(backend: Backend, copy: str) -> dict[str, Any]:
    """What the store says after the daemon stopped."""
    outbox = dict(backend.query(copy, "SELECT state, count(*) FROM outbox GROUP BY state"))
    attempts = dict(
        backend.query(copy, "SELECT outcome, count(*) FROM delivery_attempts GROUP BY outcome")
    )
    state: dict[str, Any] = {
        "outbox_rows": {str(k): int(v) for k, v in outbox.items()},
        "attempts": attempts,
    }
    if backend.name == "postgresql":
        # Counted by the server for this database since it was created (one session is this
        # query's own): sessions opened, transactions, and rows scanned or fetched.
        names = ("sessions", "xact_commit", "xact_rollback", "tup_returned", "tup_fetched")
        row = backend.query(
            copy,
            f"SELECT {', '.join(names)} FROM pg_stat_database "  # noqa: S608 (constants)
            "WHERE datname = current_database()",
        )[0]
        state["pg_stats"] = dict(zip(names, (int(v) for v in row), strict=True))
        # Scans of the outbox: a sequential scan reads the whole table.
        table = ("seq_scan", "seq_tup_read", "idx_scan", "idx_tup_fetch", "n_tup_del")
        row = backend.query(
            copy,
            f"SELECT {', '.join(table)} FROM pg_stat_user_tables "  # noqa: S608 (constants)
            "WHERE relname = 'outbox'",
        )[0]
        state["pg_outbox_stats"] = dict(zip(table, (int(v or 0) for v in row), strict=True))
    return state


def throughput_cell(run: Run, backend: Backend, concurrency: int, orders: int) -> dict[str, Any]:
    """One cell: a copy of the pre-filled store, the daemon, until every order was delivered."""
    copy = f"c{concurrency}_{run.serial}"
    url = backend.clone(f"t{orders}", copy)
    run.sink.reset()
    quiet = wait_quiet(run.args.quiet_wait)
    daemon, _ports = run.daemon(backend, url, concurrency, migrate=False)
    profile_at = (
        orders // 10
        if backend.name == "postgresql" and concurrency == max(run.args.concurrency)
        else None
    )
    deadline = time.monotonic() + run.args.cell_timeout
    started_ns = time.time_ns()
    daemon.start()
    meter = CpuMeter({"syncd": daemon.pid, "erp_sink": run.sink.process.pid}, backend.pg_prefix)
    meter.start()
    stats, profiler = wait_for_calls(run, daemon, orders, deadline, profile_at, meter)
    usage = meter.stop()
    crashed = not daemon.alive()
    time.sleep(1.0)  # a late duplicate would arrive now
    if profiler is not None:
        profiler.wait(timeout=run.args.profile_seconds + 30)
    status = daemon.stop()
    calls = run.sink.calls()
    expected = {f"D{i:06d}" for i in range(orders)}
    result: dict[str, Any] = {
        "backend": backend.name,
        "concurrency": concurrency,
        "orders": orders,
        "quiet_before_pct": quiet,
        "daemon_exit_status": status,
        **rates(calls, started_ns, orders),
        **check_calls(calls, expected),
        **store_state(backend, copy),
        **usage,
    }
    if crashed:
        run.problems.append(f"{backend.name} c={concurrency}: daemon died: {daemon.tail()}")
    elif stats["count"] < orders:
        run.problems.append(
            f"{backend.name} c={concurrency}: only {stats['count']} of {orders} calls within "
            f"{run.args.cell_timeout:g}s"
        )
    if (
        result["missing"]
        or result["duplicate_calls"] > result["duplicate_calls_same_idempotency_key"]
    ):
        run.problems.append(f"{backend.name} c={concurrency}: missing or duplicated deliveries")
    if result["outbox_rows"]:
        run.problems.append(f"{backend.name} c={concurrency}: outbox not empty")
    return result


# --- latency --------------------------------------------------------------------------------


async def _send_webhooks(port: int, rate: float, seconds: float, prefix: str) -> dict[str, Any]:
    """Open loop: callback ``i`` is sent at ``start + i / rate``; send time per order id."""
    import aiohttp

    url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    count = round(rate * seconds)
    bodies = []
    for i in range(count):
        body = dumps(envelope("orderEvent", [order_item(i, prefix)], str(uuid.uuid4())))
        bodies.append((f"{prefix}{i:06d}", body, sign(body, SECRET)))
    sent: dict[str, int] = {}
    acks: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()

    async def one(session: aiohttp.ClientSession, key: str, body: bytes, signature: str) -> None:
        headers = {"Content-Type": "application/json", "X-MasonHub-Signature": signature}
        sent[key] = time.time_ns()
        began = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                statuses[str(answer.status)] += 1
        except aiohttp.ClientError as exc:
            statuses[type(exc).__name__] += 1
        acks.append(time.perf_counter() - began)

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks = []
        start = loop.time() + 0.1
        for i, (key, body, signature) in enumerate(bodies):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            lags.append(loop.time() - (start + i / rate))
            tasks.append(asyncio.create_task(one(session, key, body, signature)))
        await asyncio.gather(*tasks)
    return {"sent": sent, "acks": acks, "lags": lags, "statuses": dict(statuses)}


def _ms_summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 2),
        "p90_ms": round(percentile(values, 90), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(max(values, default=0.0), 2),
    }


def latency_run(run: Run, backend: Backend) -> dict[str, Any]:
    """Receipt-to-ERP at a low fixed rate, daemon at the latency concurrency, empty store."""
    args = run.args
    url = backend.template("latency")
    daemon, (port, admin) = run.daemon(backend, url, args.latency_concurrency, migrate=True)
    quiet = wait_quiet(args.quiet_wait)
    daemon.start()
    # /readyz is on the admin listener (on the public one in older revisions).
    daemon.wait_http(f"http://127.0.0.1:{admin}/readyz", f"http://127.0.0.1:{port}/readyz")
    # Warm-up at the same rate (connections, prepared statements), not measured.
    asyncio.run(_send_webhooks(port, args.latency_rate, args.latency_warmup, "W"))
    time.sleep(1.0)
    run.sink.reset()
    meter = CpuMeter({"syncd": daemon.pid, "erp_sink": run.sink.process.pid}, backend.pg_prefix)
    meter.start()
    load = asyncio.run(_send_webhooks(port, args.latency_rate, args.latency_seconds, "L"))
    deadline = time.monotonic() + 15
    while run.sink.stats()["count"] < len(load["sent"]) and time.monotonic() < deadline:
        meter.sample()
        time.sleep(0.1)
    usage = meter.stop()
    daemon.stop()
    calls = run.sink.calls()
    arrived: dict[str, int] = {}
    for key, at in zip(calls["key"], calls["at_ns"], strict=True):
        arrived.setdefault(key, at)
    latencies = [(arrived[k] - t) / 1e6 for k, t in load["sent"].items() if k in arrived]
    missing = len(load["sent"]) - len(latencies)
    if missing:
        run.problems.append(f"latency {backend.name}: {missing} webhooks never reached the ERP")
    return {
        "backend": backend.name,
        "concurrency": args.latency_concurrency,
        "rate_per_s": args.latency_rate,
        "seconds": args.latency_seconds,
        "webhooks": len(load["sent"]),
        "reached_erp": len(latencies),
        "statuses": load["statuses"],
        "quiet_before_pct": quiet,
        "receipt_to_erp": _ms_summary(latencies),
        "webhook_ack": _ms_summary([a * 1000 for a in load["acks"]]),
        "sender_lag_p99_ms": round(percentile(load["lags"], 99) * 1000, 2),
        **check_calls(calls, set(load["sent"])),
        **usage,
    }


# --- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "note": "one machine: the daemon, PostgreSQL, the ERP sink and this load generator "
        "share its CPUs",
    }


def cpu_ms_per_delivery(cell: dict[str, Any], who: str) -> float:
    """CPU milliseconds ``who`` spent per delivery during a throughput cell."""
    window = cell.get("cpu_window_s", cell["seconds_start_to_last_call"])
    return float(cell[f"{who}_cpu_pct"]) * 10 * window / max(1, cell["calls"])


def table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| backend | concurrency | orders | deliveries/s (start to last call) | steady/s "
        "(10-90%) | dup calls (same key) | missing | outbox after | syncd CPU | PG CPU "
        "| syncd CPU ms/delivery | PG CPU ms/delivery | other processes' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for cell in results.get("throughput", []):
        outbox = ", ".join(f"{k} {v}" for k, v in cell["outbox_rows"].items()) or "empty"
        lines.append(
            f"| {cell['backend']} | {cell['concurrency']} | {cell['orders']:,} "
            f"| {cell['deliveries_per_s']:,.0f} | {cell['steady_per_s']:,.0f} "
            f"| {cell['duplicate_calls']} ({cell['duplicate_calls_same_idempotency_key']}) "
            f"| {cell['missing']} | {outbox} | {cell['syncd_cpu_pct']:.0f}% "
            f"| {cell['postgres_cpu_pct']:.0f}% | {cpu_ms_per_delivery(cell, 'syncd'):.2f} "
            f"| {cpu_ms_per_delivery(cell, 'postgres'):.2f} | {cell['other_cpu_pct']:.0f}% |"
        )
    lines += [
        "",
        "| backend | concurrency | webhooks | rate/s | receipt-to-ERP p50 | p90 | p99 | max "
        "| webhook ack p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in results.get("latency", []):
        r, a = cell["receipt_to_erp"], cell["webhook_ack"]
        lines.append(
            f"| {cell['backend']} | {cell['concurrency']} | {cell['reached_erp']}/"
            f"{cell['webhooks']} | {cell['rate_per_s']:g} | {r['p50_ms']:.1f} ms "
            f"| {r['p90_ms']:.1f} ms | {r['p99_ms']:.1f} ms | {r['max_ms']:.1f} ms "
            f"| {a['p50_ms']:.1f} ms | {a['p99_ms']:.1f} ms |"
        )
    return lines


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--orders", type=int, default=50_000, help="queued deliveries per cell")
    p.add_argument(
        "--orders-c1",
        type=int,
        default=10_000,
        help="queued deliveries at concurrency 1 (50,000 would take over 3 minutes there)",
    )
    p.add_argument("--cell-timeout", type=float, default=420.0, help="seconds per cell at most")
    p.add_argument("--latency-rate", type=float, default=20.0, help="webhooks per second")
    p.add_argument("--latency-seconds", type=float, default=30.0)
    p.add_argument("--latency-warmup", type=float, default=3.0)
    p.add_argument("--latency-concurrency", type=int, default=8)
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument(
        "--retry-noisy",
        type=int,
        default=1,
        help=f"run a cell again (at most this often) if other processes used > {NOISY_PCT:g}%% "
        "CPU during it; the quietest try is reported",
    )
    p.add_argument("--quiet-wait", type=float, default=60.0, help="max s to wait for quiet")
    p.add_argument(
        "--source",
        choices=("worktree", "head", "live"),
        default="worktree",
        help="syncd under test: a copy of the working tree taken at start (default), the "
        "committed HEAD, or the live tree (edits during the run take effect)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--report", type=Path, help="only print the tables of a raw JSON file")
    return p.parse_args(argv)


def orders_for(args: argparse.Namespace, concurrency: int) -> int:
    return args.orders_c1 if concurrency == 1 else args.orders


def measure_cell(run: Run, backend: Backend, concurrency: int) -> None:
    """A throughput cell, run again while noisy (up to --retry-noisy); the quietest counts."""
    orders = orders_for(run.args, concurrency)
    tries: list[dict[str, Any]] = []
    while len(tries) <= run.args.retry_noisy:
        print(f"{backend.name}: concurrency {concurrency}, {orders:,} deliveries", flush=True)
        tries.append(throughput_cell(run, backend, concurrency, orders))
        if tries[-1]["other_cpu_pct"] <= NOISY_PCT:
            break
        print(f"  other processes used {tries[-1]['other_cpu_pct']:.0f}% CPU: noisy")
    cell = min(tries, key=lambda t: t["other_cpu_pct"])
    cell["tries"] = len(tries)
    if len(tries) > 1:
        cell["other_tries"] = [t for t in tries if t is not cell]
    run.results.setdefault("throughput", []).append(cell)
    print(
        f"  {cell['deliveries_per_s']:,.0f}/s overall, {cell['steady_per_s']:,.0f}/s steady,"
        f" {cell['calls']:,} calls, {cell['duplicate_calls']} duplicate, "
        f"{cell['missing']} missing, outbox {cell['outbox_rows'] or 'empty'}",
        flush=True,
    )


def measure_latency(run: Run, backend: Backend) -> None:
    print(f"{backend.name}: latency at {run.args.latency_rate:g}/s", flush=True)
    cell = latency_run(run, backend)
    run.results.setdefault("latency", []).append(cell)
    r = cell["receipt_to_erp"]
    print(f"  receipt-to-ERP p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms", flush=True)


def run_backend(run: Run, backend: Backend) -> None:
    """Pre-fill, every throughput cell, then latency; a failed phase is reported, not fatal."""
    args = run.args
    sizes = sorted({orders_for(args, c) for c in args.concurrency})
    print(
        f"{backend.name}: pre-filling {', '.join(f'{n:,}' for n in sizes)} deliveries", flush=True
    )
    seconds = prefill(backend, sizes)
    run.results.setdefault("prefill_seconds", {})[backend.name] = seconds
    run.results.setdefault("stores", {})[backend.name] = backend.settings()
    phases: list[tuple[str, Any]] = [
        (f"c={c}", lambda c=c: measure_cell(run, backend, c)) for c in args.concurrency
    ]
    phases.append(("latency", lambda: measure_latency(run, backend)))
    for label, phase in phases:
        try:
            phase()
        except (BenchError, OSError, urllib.error.URLError, subprocess.SubprocessError) as exc:
            run.problems.append(f"{backend.name} {label}: {exc}")
            print(f"  FAILED: {exc}", flush=True)
        write_results(run, final=False)


def write_results(run: Run, *, final: bool = True) -> None:
    """Raw JSON to bench/out/ (also after every phase); at the end the tables and profile."""
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = run.results["stamp"]
    text = json.dumps(run.results, indent=2, sort_keys=True)
    for name in (f"deliver-{stamp}.json", "deliver-latest.json"):
        (OUT / name).write_text(text + "\n")
    if not final:
        return
    raw = OUT / "deliver-profile-raw.txt"
    if raw.exists() and raw.stat().st_mtime >= run.results["started_epoch"]:
        summary = summarize_profile(raw)
        (OUT / "deliver-profile-top.txt").write_text("\n".join(summary) + "\n")
        print("\nprofile (PostgreSQL, top concurrency):\n  " + "\n  ".join(summary[:20]))
    print("\n" + "\n".join(table(run.results)))
    print(f"\nraw: {OUT / f'deliver-{stamp}.json'}")


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip()


def snapshot(source: str, dest: Path) -> dict[str, Any]:
    """Copy the syncd under test (package and migrations) into ``dest``.

    Other work on the tree during the run then cannot change the code being measured.
    """
    if source == "head":
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "HEAD", "syncd", "alembic"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    else:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("syncd", "alembic"):
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    dirty = _git("status", "--short", "--", "syncd", "alembic")
    return {
        "source": source,
        "git_head": _git("rev-parse", "HEAD"),
        "uncommitted_in_syncd": dirty.splitlines() if source == "worktree" else [],
    }


def main(argv: list[str] | None = None) -> int:
    """Snapshot the code under test, then run the benchmark on it in a child process."""
    args = parse_args(argv)
    if args.report is not None:
        print("\n".join(table(json.loads(args.report.read_text()))))
        return 0
    if args.source == "live" or os.environ.get(SNAPSHOT_ENV):
        return bench(args)
    scratch = Path(tempfile.mkdtemp(prefix="syncd-deliver-", dir="/tmp"))
    child: subprocess.Popen[bytes] | None = None
    signal.signal(signal.SIGTERM, _terminate)
    try:
        (scratch / "src").mkdir()
        info = snapshot(args.source, scratch / "src")
        (scratch / "source.json").write_text(json.dumps(info))
        env = {**os.environ, SNAPSHOT_ENV: str(scratch), "PYTHONPATH": str(scratch / "src")}
        child = subprocess.Popen(
            [str(PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]], env=env
        )
        return child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


def bench(args: argparse.Namespace) -> int:
    """The whole matrix; 1 if any cell lost, duplicated or left deliveries."""
    names = args.backends.split(",")
    if not set(names) <= {"sqlite", "postgresql"}:
        raise SystemExit(f"unknown backend in --backends {args.backends!r}")
    signal.signal(signal.SIGTERM, _terminate)
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with ExitStack() as stack:
        given = os.environ.get(SNAPSHOT_ENV)
        scratch = Path(given) if given else Path(tempfile.mkdtemp(prefix="syncd-deliver-"))
        if not given and not args.keep:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        source_file = scratch / "source.json"
        source = json.loads(source_file.read_text()) if source_file.exists() else {"source": "live"}
        source["syncd_imported_from"] = str(Path(syncd.__file__).parent)
        sink = Sink(scratch)
        stack.callback(sink.process.stop)
        sink.start()
        run = Run(args, scratch, stack, sink)
        run.results.update(
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            stamp=datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            started_epoch=time.time(),
            machine=machine(),
            code=source,
            argv=sys.argv,
        )
        for name in names:
            backend: Backend = SqliteBackend(scratch) if name == "sqlite" else PostgresBackend()
            stack.callback(backend.drop_all)
            run_backend(run, backend)
        run.results["problems"] = run.problems
        run.results["wall_seconds"] = round(time.monotonic() - began, 1)
        write_results(run)
    for problem in run.problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if run.problems else 0


if __name__ == "__main__":
    sys.exit(main())
