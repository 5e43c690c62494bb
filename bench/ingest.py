"""bench/ingest: accepted webhooks per second, signature checked and durably committed.

Three targets, each its own process on 127.0.0.1, loaded from a separate process:

* ``bare``: ``bench/bare.py``, an aiohttp handler that only reads the body and answers 200,
  the ceiling of this stack;
* ``sqlite``: ``syncd run`` on a fresh SQLite file (WAL; synchronous=FULL for webhook
  commits and delivery claims, NORMAL for merges and completions);
* ``postgresql``: ``syncd run`` on a freshly created PostgreSQL database;
* ``floor`` (with ``--floor``): ``bench/floor.py``, the least an authenticated, durable inbox
  does on this stack (HMAC, JSON, a group-committed SQLite row, a log line), on a fresh
  SQLite file: what any implementation could reach, set beside syncd.

syncd runs as shipped: its merge and delivery loops work in the same process while it
receives, delivering to ``bench/bare.py --erp-sink``, a local ERP that accepts every PUT.
Its log goes to a file, as in production.

Per target: a warm-up and a closed-loop maximum-throughput run with wrk (``bench/ingest.lua``
replaying pre-signed, distinct ~1 KB orderEvent envelopes), then, on a fresh store, an
open-loop fixed-rate run at half of SQLite's maximum (``bench/openloop.py``, latency measured
from each request's scheduled send time). After each syncd run the daemon is killed with
SIGKILL and the store is read back: every request answered 200 "received" must be stored (by
count for wrk, by message id for the fixed-rate run). Every database is removed at the end.

Prints a table, writes raw numbers to ``bench/out/`` and exits 1 if an acknowledged request
is missing or a syncd run was invalid. ``make bench-ingest`` runs it; ``--help`` for knobs.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import random
import re
import resource
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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from syncd.testing import dumps, envelope, sign

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = Path(sys.executable)
SYNCD = PYTHON.with_name("syncd")
SECRET = "bench-secret"
WEBHOOK_PATH = "/webhooks/masonhub"
LUA = BENCH / "ingest.lua"
#: Lines in the bare target's request file; it stores nothing, so wrk may cycle through it.
BARE_LINES = 20_000
#: Request files live in RAM when possible, so writing them never competes with fsync.
SCRATCH_FAST = Path("/dev/shm")
#: Seconds from the start during which a disturbed phase may be run again.
RETRY_BUDGET = 75.0
#: The patches bench/experiments/sitecustomize.py knows (``--patch``).
EXPERIMENTS = (
    "ingest-only",
    "executemany",
    "locktrace",
    "sqllog",
    "no-linger",
    "merge-linger-5ms",
    "merge-linger-10ms",
    "switch-1ms",
    "merge-small",
    "commits-first",
    "uvloop",
    "no-access-log",
    "lean-access-log",
)
#: A phase is "quiet" when processes that are not ours use less than this % of a core.
QUIET_LIMIT = 10.0


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


# --- payloads -------------------------------------------------------------------------------


def _order_template() -> dict[str, Any]:
    """One order of the OpenAPI's callback_order_event example, trimmed to ~1 KB of JSON."""
    return {
        "id": "@@OID@@",
        "warehouse_id": None,
        "customer_identifier": "@@CID@@",
        "order_type": "customer",
        "status": "fulfilled",
        "priority": 100,
        "shipping_provider": "masonhub",
        "shipper_service_level": "ground",
        "shipping_address_name": "Henry Smith",
        "shipping_address_street_line_one": "19 MAIN",
        "shipping_address_city": "Los Angeles",
        "shipping_address_locale": "CA",
        "shipping_address_postal_code": "90001",
        "submitted_at": "2018-08-05T17:32:28Z",
        "line_items": [
            {"sku_customer_id": "shirts872340", "quantity": 2, "product_name": "Blue Shirt"},
            {"sku_customer_id": "pants3422", "quantity": 1, "product_name": "Blue Pants"},
        ],
        "shipments": [
            {
                "shipment_id": "@@SID@@",
                "customer_order_id": "@@CID@@",
                "shipping_provider": "USPS",
                "shipper_service_level": "priority",
                "tracking_number": "@@TRK@@",
                "tracking_url": "http://usps.gov/tracking/@@TRK@@",
                "shipment_date_time": "2018-08-06T17:32:28Z",
                "shipment_weight": 10,
                "warehouse_id": 25727,
            }
        ],
    }


class Payloads:
    """Distinct, signed orderEvent callbacks: a fresh message_id (uuid4) and order each."""

    def __init__(self, seed: int) -> None:
        document = envelope(
            "orderEvent",
            [_order_template()],
            "@@MID@@",
            callback_url="https://erp.example.com/webhooks/masonhub/orderEvent",
        )
        # Literal text and field names alternate: [text, field, text, field, ..., text].
        self._parts = re.split(r"@@(\w+)@@", dumps(document).decode())
        self._rng = random.Random(seed)
        self._serial = 0

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    def one(self) -> tuple[str, str]:
        """(message_id, body) of a new message."""
        self._serial += 1
        values = {
            "MID": self._uuid(),
            "OID": self._uuid(),
            "SID": self._uuid(),
            "CID": str(100_000 + self._serial),
            "TRK": f"9400{self._serial:018d}",
        }
        parts = self._parts
        body = "".join(parts[i] if i % 2 == 0 else values[parts[i]] for i in range(len(parts)))
        return values["MID"], body

    def write(self, path: Path, count: int) -> int:
        """Write ``count`` lines "<message_id> <signature hex> <body>"; return the body size."""
        size = 0
        with path.open("w") as fh:
            for _ in range(count):
                message_id, body = self.one()
                fh.write(f"{message_id} {sign(body.encode(), SECRET, prefix=False)} {body}\n")
                size = len(body)
        return size


# --- processes and CPU ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_200(url: str) -> bool:
    with (
        suppress(OSError, urllib.error.URLError),
        urllib.request.urlopen(url, timeout=1) as answer,  # noqa: S310 (http://127.0.0.1 only)
    ):
        return bool(answer.status == 200)
    return False


class Target:
    """A server process under test (or helping), with its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: Processes of ours that work for this target (the ERP sink): not "other" CPU.
        self.helpers: dict[str, int] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> dict[str, int]:
        """This target and its helpers, by the name their CPU use is reported under."""
        return {"server": self.pid, **self.helpers} if self.proc else dict(self.helpers)

    def start(self, port: int, ready_port: int = 0, timeout: float = 60.0) -> None:
        """Start the process and wait until GET /readyz answers 200.

        syncd serves /readyz on its admin listener (``ready_port``); revisions before that
        served it on the public port, so both are asked.
        """
        self.port = port
        urls = [f"http://127.0.0.1:{p}/readyz" for p in (ready_port, port) if p]
        with self.log.open("ab") as log:
            # Its own session: a Ctrl-C reaches only this script, which then stops it.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if any(_answers_200(url) for url in urls):
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} not ready after {timeout:.0f}s: {self.tail()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send ``sig`` to this process only and wait for it (SIGKILL if it lingers)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by every thread of ``pid`` (0 once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process (its backends serve syncd during a PostgreSQL run)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def machine_seconds() -> tuple[float, float]:
    """(user+system, irq+softirq+steal) CPU seconds of the whole machine, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (v[0] + v[1] + v[2]) / _TICK, (v[5] + v[6] + v[7]) / _TICK


@contextmanager
def cpu_usage(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """Fill a dict with CPU use during the block, in % of one core, by who used it.

    One entry per named pid (``server``, ``erp``), then ``postgres`` (every PostgreSQL
    process), ``loadgen`` (the children this script waited for: wrk, openloop) and ``other``:
    user+system time of the machine not accounted to those, which should be near 0. A busy
    neighbour takes CPU from the run and makes its numbers low.
    """
    usage: dict[str, float] = {}
    started = time.monotonic()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    pg_before = {p: cpu_seconds(p) for p in postgres_pids()}
    busy, irq = machine_seconds()
    yield usage
    wall = time.monotonic() - started
    busy2, irq2 = machine_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    used["postgres"] = sum(cpu_seconds(p) - pg_before.get(p, 0.0) for p in postgres_pids())
    used["loadgen"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    used["other"] = max(0.0, (busy2 - busy) - sum(used.values()))
    used["irq_steal"] = irq2 - irq
    for name, seconds in used.items():
        usage[f"{name}_cpu_pct"] = round(100 * seconds / wall, 1)


def wait_quiet(pids: dict[str, int], max_wait: float) -> None:
    """Wait (up to ``max_wait`` s) for a second in which processes not ours are quiet.

    The machine may be shared (a test suite, an editor); starting a phase while it is busy
    would measure the neighbour. The phase's own "other" CPU is reported either way.
    """
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        with cpu_usage(pids) as usage:
            time.sleep(1.0)
        other = usage["other_cpu_pct"]
        if other < QUIET_LIMIT or time.monotonic() >= deadline:
            return
        if not told:
            print(f"  waiting for the machine to be quiet (other processes: {other:.0f}%)")
            told = True


# --- load -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """The wrk parameters, the same for every target."""

    threads: int
    connections: int
    duration: float
    warmup: float


def run_wrk(target: Target, requests: Path, seconds: float, load: Load) -> dict[str, Any]:
    """One wrk run against ``target``; wrk's own numbers plus CPU use."""
    argv = [
        "wrk",
        f"-t{load.threads}",
        f"-c{load.connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{target.port}{WEBHOOK_PATH}",
        "--",
        str(requests),
        str(load.threads),
    ]
    with cpu_usage(target.pids()) as usage:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no WRKJSON line: {done.stdout} {done.stderr}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    seconds_run = result["duration_us"] / 1e6
    result["responses_per_s"] = round(result["responses"] / seconds_run, 1)
    result["accepted_per_s"] = round(result["received"] / seconds_run, 1)
    result["argv"] = " ".join([*argv[:-3], "--", "REQUESTS", argv[-1]])
    result.update(usage)
    return result


def run_openloop(
    target: Target, requests: Path, rate: float, seconds: float, acked: Path, *extra: str
) -> dict[str, Any]:
    """One fixed-rate run of bench/openloop.py against ``target`` (``extra``: more options)."""
    argv = [
        str(PYTHON),
        str(BENCH / "openloop.py"),
        f"--port={target.port}",
        f"--requests={requests}",
        f"--rate={rate:g}",
        f"--duration={seconds:g}",
        f"--acked={acked}",
        *extra,
    ]
    with cpu_usage(target.pids()) as usage:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise BenchError(f"openloop failed ({done.returncode}): {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    result.update(usage)
    return result


# --- profiling ------------------------------------------------------------------------------


def start_profiler(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` for ``seconds`` into collapsed stacks, if py-spy is installed."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(PYTHON.parent))
    if py_spy is None:
        print("  (py-spy not found: `.venv/bin/pip install py-spy` to profile)")
        return None
    argv = [py_spy, "record", "--pid", str(pid), "--duration", f"{math.ceil(seconds)}"]
    # --gil: only the thread holding the GIL is sampled, i.e. where the one core syncd can use
    # for Python goes; the store's driver thread shows up only while it runs Python code.
    argv += ["--rate", "250", "--gil", "--format", "raw", "--nonblocking", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


#: Where a sampled stack's time is charged. Subtrees first: a stack with one of these frames
#: anywhere belongs to the first that matches. SQLAlchemy runs statements in greenlets, whose
#: stacks py-spy shows without their async callers, hence the statement-level needles.
PROFILE_SUBTREES = (
    ("logging: structlog JSON lines", ("structlog/", "_log_answer")),
    ("merge loop: inbox -> entities, outbox", ("syncd/merge.py", "process_inbox", "facts.py")),
    ("delivery loop: outbox -> ERP", ("syncd/delivery.py", "syncd/erp/", "_delivery")),
    (
        "inbox INSERT: build and compile its multi-VALUES statement",
        ("ValuesBase.values", "_extend_values_for_multiparams"),
    ),
    ("SQL compile, other statements", ("_compile_w_cache", "CompilerElement._compiler")),
    ("receiver: HMAC signature check", ("signature_valid",)),
    ("receiver: JSON parse of the body", ("parse_body",)),
)
#: Otherwise the frame nearest the leaf that names one of these decides.
PROFILE_OWNERS = (
    (
        "store: SQLAlchemy execute, pool, driver",
        ("sqlalchemy/", "aiosqlite/", "asyncpg/", "syncd/store.py"),
    ),
    ("group commit: syncd/inbox.py", ("syncd/inbox.py",)),
    ("receiver: other syncd code", ("syncd/receiver.py", "syncd/messages.py")),
    ("aiohttp: HTTP parsing, routing, responses", ("aiohttp/",)),
)
PROFILE_OTHER = "asyncio event loop, sockets, other"


def _category(frames: list[str]) -> str:
    for name, needles in PROFILE_SUBTREES:
        if any(needle in frame for frame in frames for needle in needles):
            return name
    for frame in reversed(frames):
        for name, needles in PROFILE_OWNERS:
            if any(needle in frame for needle in needles):
                return name
    return PROFILE_OTHER


def summarize_profile(raw: Path, top: int = 25) -> list[str]:
    """Shares of samples by category, then by function (inclusive and self), from py-spy."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f.replace(str(PYTHON.parent.parent), "<venv>") for f in frames]
        total += count
        own[frames[-1]] += count
        categories[_category(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples of the thread holding the GIL; by category:"]
    lines += [f"{100 * n / total:6.1f}  {name}" for name, n in categories.most_common()]
    lines.append("by function, inclusive% self%:")
    for frame, count in inclusive.most_common(top):
        lines.append(f"{100 * count / total:6.1f} {100 * own[frame] / total:6.1f}  {frame}")
    lines.append("top self time:")
    for frame, count in own.most_common(top):
        lines.append(f"{100 * count / total:6.1f}  {frame}")
    return lines


@contextmanager
def profiled(enabled: bool, pid: int, seconds: float, name: str) -> Iterator[None]:
    """With ``--profile``, py-spy records ``pid`` during the block (bench/out/ingest-profile-*)."""
    raw = OUT / f"ingest-profile-{name}.txt"
    profiler = start_profiler(pid, seconds, raw) if enabled else None
    yield
    if profiler is not None:
        profiler.wait(timeout=60)
        report_profile(raw)


def report_profile(raw: Path) -> None:
    """Write the summary of a py-spy recording beside it and print its categories."""
    summary = summarize_profile(raw)
    raw.with_name(raw.stem + "-top.txt").write_text("\n".join(summary) + "\n")
    shown = summary[: summary.index("by function, inclusive% self%:")]
    print("  profile: " + "\n    ".join(shown))


# --- stores ---------------------------------------------------------------------------------

#: Progress of syncd's pipeline, read back after a run; tables a revision lacks are skipped.
PIPELINE_QUERIES = {
    "inbox": "SELECT state, count(*) FROM inbox GROUP BY state",
    "outbox": "SELECT state, count(*) FROM outbox GROUP BY state",
    "entities": "SELECT 'all', count(*) FROM entities",
    "delivered": "SELECT 'entities', count(*) FROM entities WHERE delivered_at IS NOT NULL",
}


class Backend:
    """A fresh database for one syncd run, and how to read it back."""

    name = ""
    url = ""

    def create(self) -> None:
        """Make the empty database."""

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of a query."""
        raise NotImplementedError

    def settings(self) -> dict[str, str]:
        """The durability settings the database reports."""
        raise NotImplementedError

    def drop(self) -> None:
        """Remove the database."""

    def keys(self) -> set[str]:
        """Every dedupe key in the inbox."""
        return {str(row[0]) for row in self.rows("SELECT dedupe_key FROM inbox")}

    def pipeline(self) -> dict[str, dict[str, int]]:
        """Rows by state in syncd's pipeline tables."""
        counts = {}
        for name, sql in PIPELINE_QUERIES.items():
            with suppress(Exception):
                counts[name] = {str(state): int(n) for state, n in self.rows(sql)}
        return counts


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite+aiosqlite:///{path}"

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as conn:
            return conn.execute(sql).fetchall()

    def settings(self) -> dict[str, str]:
        # synchronous is per connection (syncd sets it); the WAL mode is persistent.
        return {
            "journal_mode": str(self.rows("PRAGMA journal_mode")[0][0]),
            "synchronous": "FULL for webhook commits and claims, NORMAL for merges and completions",
            "sqlite_version": sqlite3.sqlite_version,
        }

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


class FloorBackend(SqliteBackend):
    """bench/floor.py's SQLite file: an inbox table only, every commit FULL."""

    name = "floor"

    def settings(self) -> dict[str, str]:
        return {**super().settings(), "synchronous": "FULL"}


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, admin_dsn: str, label: str) -> None:
        from sqlalchemy.engine import make_url

        self.database = f"syncd_bench_{os.getpid()}_{label}"
        admin = make_url(admin_dsn)
        self._admin = admin.set(drivername="postgresql").render_as_string(hide_password=False)
        own = admin.set(drivername="postgresql", database=self.database)
        self._own = own.render_as_string(hide_password=False)
        self.url = own.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        self._created = False

    @staticmethod
    def _fetch(dsn: str, sql: str) -> list[tuple[Any, ...]]:
        import asyncpg

        async def fetch() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(fetch())

    def create(self) -> None:
        try:
            self._fetch(self._admin, f'CREATE DATABASE "{self.database}"')
        except Exception as exc:
            raise BenchError(
                f"cannot create a PostgreSQL database ({type(exc).__name__}: {exc}); "
                "start it (`make services`), set --pg-dsn, or pass --no-postgres"
            ) from exc
        self._created = True

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self._fetch(self._own, sql)

    def settings(self) -> dict[str, str]:
        names = ("synchronous_commit", "fsync", "wal_sync_method", "server_version")
        return {n: str(self.rows(f"SHOW {n}")[0][0]) for n in names}

    def drop(self) -> None:
        if self._created:
            self._fetch(self._admin, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self._created = False


def syncd_config(path: Path, port: int, admin: int, backend: Backend, erp_port: int) -> None:
    """A config for ``syncd run``: the store, the bench secret, the ERP sink, else defaults."""
    path.write_text(
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\n\n'
        "[admin]\n"
        f'host = "127.0.0.1"\nport = {admin}\n\n'
        "[store]\n"
        f"url = {json.dumps(backend.url)}\nauto_migrate = true\n\n"
        "[webhooks]\n"
        f'path = "{WEBHOOK_PATH}"\nsigning_secrets = ["{SECRET}"]\n\n'
        "[erp]\n"
        f'base_url = "http://127.0.0.1:{erp_port}/api"\ntoken = "bench-erp-token"\n\n'
        # No token: scheduled polls stay off, and nothing is ever sent off this machine.
        "[masonhub]\n"
        f'base_url = "http://127.0.0.1:{erp_port}/masonhub"\n'
    )


# --- the benchmark --------------------------------------------------------------------------


@dataclass
class Run:
    """What the benchmark needs everywhere: options, scratch space, payloads, results."""

    args: argparse.Namespace
    load: Load
    scratch: Path
    fast: Path
    payloads: Payloads
    stack: ExitStack
    results: dict[str, Any]
    env: dict[str, str] | None = None
    erp: Target | None = None
    problems: list[str] = field(default_factory=list)
    retry_until: float = field(default_factory=lambda: time.monotonic() + RETRY_BUDGET)

    def quiet(self, target: Target) -> None:
        """Let a busy neighbour finish before a measured phase starts."""
        wait_quiet(target.pids(), self.args.quiet_wait)

    def requests_file(self, label: str, count: int) -> Path:
        path = self.fast / f"{label}.txt"
        self.results["body_bytes"] = self.payloads.write(path, count)
        return path

    def backend(self, kind: str, label: str) -> Backend:
        """A fresh, empty database of ``kind``, removed at the end whatever happens."""
        backend: Backend
        if kind == "sqlite":
            backend = SqliteBackend(self.scratch / f"{label}.db")
        elif kind == "floor":
            backend = FloorBackend(self.scratch / f"{label}.db")
        else:
            backend = PostgresBackend(self.args.pg_dsn, label)
        self.stack.callback(backend.drop)
        backend.create()
        return backend

    def bare(self, *extra: str) -> Target:
        """bench/bare.py (with ``extra`` arguments) started on a free port, stopped at the end."""
        port = free_port()
        argv = [str(PYTHON), str(BENCH / "bare.py"), f"--port={port}", f"--path={WEBHOOK_PATH}"]
        name = "erp-sink" if extra else "bare"
        target = Target(name, [*argv, *extra], self.scratch / f"{name}.log")
        self.stack.callback(target.stop)
        target.start(port)
        return target

    def syncd(self, backend: Backend, label: str) -> Target:
        """``syncd run`` on ``backend``, delivering to the ERP sink; stopped at the end.

        For the floor backend, bench/floor.py on its file instead.
        """
        if isinstance(backend, FloorBackend):
            port = free_port()
            argv = [str(PYTHON), str(BENCH / "floor.py"), f"--port={port}"]
            argv += [f"--db={backend.path}", f"--path={WEBHOOK_PATH}"]
            target = Target(label, argv, self.scratch / f"{label}.log")
            self.stack.callback(target.stop)
            target.start(port)
            return target
        assert self.erp is not None
        port, admin = free_port(), free_port()
        config = self.scratch / f"{label}.toml"
        syncd_config(config, port, admin, backend, self.erp.port)
        argv = [str(SYNCD), "run", "--config", str(config)]
        target = Target(label, argv, self.scratch / f"{label}.log", self.env)
        target.helpers = {"erp": self.erp.pid}
        self.stack.callback(target.stop)
        target.start(port, admin)
        return target


def _other(result: dict[str, Any]) -> float:
    """CPU % of processes not ours during a phase's measured run."""
    measured = result.get("max", result)
    return float(measured.get("other_cpu_pct", 0.0))


def attempts(run: Run, name: str, phase: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Run ``phase`` again from a fresh start while a neighbour disturbed it (``--retries``).

    Only within the first RETRY_BUDGET seconds of the benchmark, so it stays bounded in time.
    Every attempt's durability is checked; the least disturbed one is reported.
    """
    tries: list[dict[str, Any]] = []
    for attempt in range(1 + run.args.retries):
        tries.append(phase(attempt))
        if _other(tries[-1]) <= QUIET_LIMIT or time.monotonic() > run.retry_until:
            break
        if attempt < run.args.retries:
            print(f"  {name}: other processes used {_other(tries[-1]):.0f}% of a core; again")
    best = min(tries, key=_other)
    best["attempts"] = len(tries)
    return best


def bench_bare(run: Run, _attempt: int) -> dict[str, Any]:
    """The ceiling: warm-up, then the measured wrk run, against bench/bare.py."""
    requests = run.requests_file("bare", BARE_LINES)
    target = run.bare()
    print(f"bare: warm-up {run.load.warmup:g}s, then {run.load.duration:g}s")
    run_wrk(target, requests, run.load.warmup, run.load)
    run.quiet(target)
    result = run_wrk(target, requests, run.load.duration, run.load)
    target.stop()
    return {"max": result}


def bench_bare_fixed(run: Run, rate: float, _attempt: int) -> dict[str, Any]:
    """The bare handler at the fixed rate: the latency floor of stack plus generator."""
    seconds = run.args.fixed_duration
    requests = run.requests_file("bare-fixed", math.ceil(rate * seconds))
    target = run.bare()
    print(f"bare: fixed rate {rate:g}/s for {seconds:g}s")
    run.quiet(target)
    result = run_openloop(target, requests, rate, seconds, run.scratch / "bare-acked.txt")
    target.stop()
    return result


def failures(result: dict[str, Any]) -> dict[str, int]:
    """Answers other than 200, and requests that got no answer, by kind."""
    bad = {code: n for code, n in result["statuses"].items() if code != "200"}
    errors = result.get("errors", {})
    # wrk's "status" error counts the non-2xx answers already in "statuses".
    bad.update({kind: n for kind, n in errors.items() if n and kind != "status"})
    return bad


def check_valid(run: Run, name: str, result: dict[str, Any]) -> None:
    """A syncd run must send only new messages and get only 200 "received"."""
    if result.get("wraps"):
        run.problems.append(f"{name}: request file exhausted ({result['wraps']} wraps)")
    if result.get("duplicate"):
        run.problems.append(f"{name}: {result['duplicate']} duplicate answers")
    if bad := failures(result):
        run.problems.append(f"{name}: answers other than 200: {bad}")


def verify_count(run: Run, backend: Backend, runs: list[dict[str, Any]]) -> dict[str, int]:
    """The inbox must hold a row for every 200 "received" wrk counted (and no more than sent)."""
    stored = len(backend.keys())
    acked = sum(r["received"] for r in runs)
    sent = sum(r["sent"] for r in runs)
    ok = acked <= stored <= sent
    verdict = "ok" if ok else "MISSING ROWS"
    print(f"  after SIGKILL: {stored} rows stored, {acked} acknowledged, {sent} sent: {verdict}")
    if not ok:
        run.problems.append(f"{backend.name}: {stored} rows stored for {acked} acknowledgements")
    return {"acked": acked, "stored": stored, "sent": sent}


def verify_ids(run: Run, backend: Backend, acked_files: list[Path]) -> dict[str, int]:
    """Every message id acknowledged in the fixed-rate run must be in the inbox."""
    acked = {m for path in acked_files for m in path.read_text().split()}
    missing = len(acked - backend.keys())
    print(f"  after SIGKILL: {len(acked)} acknowledged ids, {missing} missing")
    if missing:
        run.problems.append(f"{backend.name}: {missing} acknowledged ids not stored")
    return {"acked": len(acked), "missing": missing}


def bench_syncd_max(run: Run, kind: str, bare_rps: float, attempt: int) -> dict[str, Any]:
    """Fresh store; warm-up and max run with wrk; SIGKILL; read back."""
    load = run.load
    backend = run.backend(kind, f"{kind}_max{attempt}")
    # syncd does more than the bare handler on the same stack, so bare's rate bounds it.
    warm = run.requests_file(f"{kind}-warm", math.ceil(bare_rps * load.warmup * 1.1))
    target = run.syncd(backend, f"{kind}-max{attempt}")
    print(f"{kind}: warm-up {load.warmup:g}s")
    warmup = run_wrk(target, warm, load.warmup, load)
    # Sized from the warm-up's rate, with margin; a wrap would be reported, not hidden.
    count = math.ceil(max(warmup["responses_per_s"] * 2, 500) * load.duration)
    requests = run.requests_file(f"{kind}-max", min(count, math.ceil(bare_rps * load.duration)))
    print(f"{kind}: {load.duration:g}s at {load.connections} connections")
    run.quiet(target)
    with profiled(run.args.profile, target.pid, load.duration - 1, kind):
        result = run_wrk(target, requests, load.duration, load)
    target.stop(signal.SIGKILL)
    check_valid(run, f"{kind} warm-up", warmup)
    check_valid(run, f"{kind} max", result)
    found = {
        "warmup": warmup,
        "max": result,
        "durability": verify_count(run, backend, [warmup, result]),
        "pipeline": backend.pipeline(),
        "settings": backend.settings(),
        "log": log_stats(target.log),
    }
    backend.drop()
    return found


def bench_syncd_fixed(run: Run, kind: str, rate: float, attempt: int) -> dict[str, Any]:
    """Fresh store; warm-up, then the fixed-rate run; SIGKILL; check every acked id."""
    seconds, warm_seconds = run.args.fixed_duration, run.args.fixed_warmup
    backend = run.backend(kind, f"{kind}_fixed{attempt}")
    warm = run.requests_file(f"{kind}-fixed-warm", math.ceil(rate * warm_seconds))
    requests = run.requests_file(f"{kind}-fixed", math.ceil(rate * seconds))
    target = run.syncd(backend, f"{kind}-fixed{attempt}")
    print(f"{kind}: fixed rate {rate:g}/s, {warm_seconds:g}s warm-up, then {seconds:g}s")
    acked = [run.scratch / f"{kind}-fixed-warm.acked", run.scratch / f"{kind}-fixed.acked"]
    warmup = run_openloop(target, warm, rate, warm_seconds, acked[0])
    run.quiet(target)
    with profiled(run.args.profile, target.pid, seconds - 1, f"{kind}-fixed"):
        result = run_openloop(target, requests, rate, seconds, acked[1])
    target.stop(signal.SIGKILL)
    check_valid(run, f"{kind} fixed warm-up", warmup)
    check_valid(run, f"{kind} fixed", result)
    result["durability"] = verify_ids(run, backend, acked)
    result["pipeline"] = backend.pipeline()
    backend.drop()
    return result


def log_stats(log: Path) -> dict[str, int]:
    """How much syncd logged: lines, bytes, and lines that are not an accepted webhook."""
    lines = bytes_ = other = 0
    with log.open("rb") as fh:
        for line in fh:
            lines += 1
            bytes_ += len(line)
            if b'"webhook.accepted"' not in line:
                other += 1
    return {"lines": lines, "bytes": bytes_, "lines_not_webhook_accepted": other}


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True)


def syncd_source(run: Run) -> dict[str, str]:
    """Which syncd is measured: the installed working tree, or ``--rev`` exported to scratch.

    The daemon imports the exported copy through PYTHONPATH, which comes before the editable
    install, so edits made to the working tree during the run cannot change what is measured.
    ``--patch`` puts bench/experiments first on that path: its sitecustomize.py applies the
    named experiments to the daemon (never to syncd/).
    """
    paths: list[str] = []
    if run.args.rev:
        rev = _git("rev-parse", "--verify", f"{run.args.rev}^{{commit}}")
        if rev.returncode != 0:
            raise BenchError(f"unknown revision {run.args.rev!r}")
        head = rev.stdout.decode().strip()
        archive = _git("archive", "--format=tar", head, "syncd", "alembic")
        tree = run.scratch / "src"
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
        paths.append(str(tree))
        source = {"source": f"git archive {run.args.rev}", "head": head, "state": "clean"}
    else:
        status = _git("status", "--porcelain", "--", "syncd", "alembic").stdout.strip()
        head = _git("rev-parse", "HEAD").stdout.decode().strip()
        state = "with uncommitted changes" if status else "clean"
        source = {"source": "working tree", "head": head, "state": state}
    env = {}
    if run.args.patch:
        unknown = set(run.args.patch.split(",")) - set(EXPERIMENTS)
        if unknown:
            raise BenchError(f"unknown --patch {', '.join(sorted(unknown))}; know {EXPERIMENTS}")
        paths.insert(0, str(BENCH / "experiments"))
        env["SYNCD_BENCH_PATCHES"] = run.args.patch
        source["state"] += f", EXPERIMENT: patched with {run.args.patch}"
    if paths:
        run.env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(paths)}
    return source


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        "?",
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    versions = {}
    for package in ("aiohttp", "sqlalchemy", "aiosqlite", "asyncpg", "structlog"):
        module = __import__(package)
        versions[package] = getattr(module, "__version__", "?")
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0].strip(),
        **versions,
    }


def execute(run: Run) -> None:
    """Every phase, in order; results accumulate in ``run.results``."""
    targets = run.results["targets"]
    run.results["syncd"] = syncd_source(run)
    targets["bare"] = attempts(run, "bare", partial(bench_bare, run))
    bare_rps = targets["bare"]["max"]["responses_per_s"]
    run.erp = run.bare("--erp-sink")
    kinds = ["sqlite"] if run.args.no_postgres else ["sqlite", "postgresql"]
    if run.args.floor:
        kinds.append("floor")
    for kind in kinds:
        targets[kind] = attempts(run, kind, partial(bench_syncd_max, run, kind, bare_rps))
    rate = run.args.rate or round(run.args.fraction * targets["sqlite"]["max"]["accepted_per_s"])
    run.results["fixed_rate"] = rate
    for kind in kinds:
        fixed = partial(bench_syncd_fixed, run, kind, rate)
        targets[kind]["fixed"] = attempts(run, f"{kind} fixed", fixed)
    run.erp.stop()
    targets["bare"]["fixed"] = attempts(run, "bare fixed", partial(bench_bare_fixed, run, rate))


# --- report ---------------------------------------------------------------------------------

_CPU_NAMES = ("server", "postgres", "erp", "loadgen", "other")
_CPU_HEADER = "CPU % " + " / ".join(n.replace("postgres", "pg") for n in _CPU_NAMES)


def _cpu(r: dict[str, Any]) -> str:
    """CPU use by who used it, in % of one core."""
    return " / ".join(f"{r.get(f'{n}_cpu_pct', 0.0):.0f}" for n in _CPU_NAMES)


def _pipeline(target: dict[str, Any]) -> str:
    """Inbox rows merged and entities delivered when the daemon was killed."""
    counts = target.get("pipeline", {})
    inbox = counts.get("inbox", {})
    if "entities" not in counts:
        return "n/a"
    merged = sum(n for state, n in inbox.items() if state != "pending")
    delivered = counts.get("delivered", {}).get("entities", 0)
    return f"{merged} / {delivered}"


def _per_cpu(r: dict[str, Any]) -> float:
    """Accepted requests per CPU-second of the server process: what a neighbour's load on
    the machine changes least, so runs on a busy machine can still be compared."""
    return float(r["accepted_per_s"] / max(r["server_cpu_pct"], 1.0) * 100)


def max_table(results: dict[str, Any]) -> list[str]:
    """The closed-loop maximum-throughput table, in Markdown."""
    bare = results["targets"]["bare"]["max"]["accepted_per_s"]
    rows = [
        "| target | accepted/s | vs bare | per server CPU-s | vs bare | wrk p50 ms | wrk p99 ms "
        f"| non-200 | acked → stored | merged / delivered | {_CPU_HEADER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    bare_eff = _per_cpu(results["targets"]["bare"]["max"])
    for name, target in results["targets"].items():
        r = target["max"]
        stored = "(stores nothing)"
        if "durability" in target:
            stored = f"{target['durability']['acked']} → {target['durability']['stored']}"
        lat = r["latency_us"]
        eff = _per_cpu(r)
        rows.append(
            f"| {name} | {r['accepted_per_s']:.0f} | {100 * r['accepted_per_s'] / bare:.1f}% "
            f"| {eff:.0f} | {100 * eff / bare_eff:.1f}% "
            f"| {lat['p50'] / 1000:.2f} | {lat['p99'] / 1000:.2f} | {sum(failures(r).values())} "
            f"| {stored} | {_pipeline(target)} | {_cpu(r)} |"
        )
    return rows


def fixed_table(results: dict[str, Any]) -> list[str]:
    """The open-loop fixed-rate latency table, in Markdown."""
    rows = [
        "| target | rate/s | sent | 200 received | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        f"| generator lag p99 ms | acked ids missing | merged / delivered | {_CPU_HEADER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, target in results["targets"].items():
        r = target.get("fixed")
        if r is None:
            continue
        lat = r["latency_ms"]
        missing = r.get("durability", {}).get("missing", "n/a")
        rows.append(
            f"| {name} | {r['rate']:g} | {r['scheduled']} | {r['received']} | {lat['p50']:.2f} "
            f"| {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p99.9']:.2f} | {lat['max']:.2f} "
            f"| {r['send_lag_ms']['p99']:.2f} | {missing} | {_pipeline(r)} | {_cpu(r)} |"
        )
    return rows


def verdicts(results: dict[str, Any]) -> list[str]:
    """The issue's two targets, met or not."""
    targets = results["targets"]
    sqlite, bare = targets["sqlite"], targets["bare"]
    ratio = sqlite["max"]["accepted_per_s"] / bare["max"]["accepted_per_s"]
    per_cpu = _per_cpu(sqlite["max"]) / _per_cpu(bare["max"])
    p99 = sqlite["fixed"]["latency_ms"]["p99"]
    lines = [
        f"- SQLite >= 40% of bare's throughput: {100 * ratio:.1f}% "
        f"({100 * per_cpu:.1f}% per server CPU-second), " + ("met" if ratio >= 0.40 else "NOT met"),
        f"- SQLite p99 < 25 ms at half its maximum: {p99:.2f} ms, "
        + ("met" if p99 < 25 else "NOT met"),
    ]
    if "floor" in targets:
        floor = targets["floor"]["max"]
        lines.append(
            f"- (the floor, bench/floor.py: "
            f"{100 * floor['accepted_per_s'] / bare['max']['accepted_per_s']:.1f}% of bare, "
            f"{100 * _per_cpu(floor) / _per_cpu(bare['max']):.1f}% per server CPU-second)"
        )
    return lines


def noisy_runs(results: dict[str, Any]) -> list[str]:
    """Measured runs during which processes not ours used more than QUIET_LIMIT % of a core."""
    lines = []
    for name, target in results["targets"].items():
        for phase in ("max", "fixed"):
            other = target.get(phase, {}).get("other_cpu_pct", 0.0)
            if other > QUIET_LIMIT:
                lines.append(f"- {name} {phase}: other processes used {other:.0f}% of a core")
    return lines


def report(results: dict[str, Any]) -> str:
    """The whole result as Markdown: header, both tables, the verdicts, any problem."""
    load, src, env = results["load"], results["syncd"], results["environment"]
    lines = [
        f"ingest, {env['date_utc']}, {env['cpus']} CPUs shared by servers and load generator, "
        f"body {results['body_bytes']} bytes",
        f"syncd: {src['source']} at {src['head'][:12]} ({src['state']})",
        "",
        f"closed loop: wrk -t{load['threads']} -c{load['connections']} -d{load['duration']:g}s "
        f"after a {load['warmup']:g}s warm-up",
        "",
        *max_table(results),
        "",
        f"open loop: {results['fixed_rate']:g} requests/s (half of SQLite's maximum) for "
        f"{results['fixed_duration']:g}s on a fresh store, latency from the scheduled send time",
        "",
        *fixed_table(results),
        "",
        *verdicts(results),
    ]
    if noisy := noisy_runs(results):
        lines += ["", "WARNING: the machine was not quiet; these numbers are low:", *noisy]
    if results["problems"]:
        lines += ["", "PROBLEMS:", *(f"- {p}" for p in results["problems"])]
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20, help="wrk seconds (20)")
    parser.add_argument("--warmup", type=float, default=5, help="wrk warm-up seconds (5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--fixed-duration", type=float, default=30, help="seconds (30)")
    parser.add_argument("--fixed-warmup", type=float, default=3, help="seconds (3)")
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="fixed rate as a share of SQLite's max (0.5)"
    )
    parser.add_argument(
        "--rate",
        type=int,
        help="fixed rate in requests/s instead of --fraction (two revisions at one rate)",
    )
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "SYNCD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin DSN; fresh databases are created beside it and dropped",
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument(
        "--floor", action="store_true", help="also measure bench/floor.py, the stack's floor"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy on syncd during its measured runs"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rev", help="measure this git revision of syncd/ (default: working tree)")
    parser.add_argument(
        "--patch",
        metavar="NAME[,NAME]",
        help=f"experiment: patch the daemon with bench/experiments ({', '.join(EXPERIMENTS)})",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10,
        help="before each measured phase, wait up to this many seconds for other processes "
        f"to use less than {QUIET_LIMIT:g}%% of a core (10)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help=f"run a phase again (fresh) when other processes used > {QUIET_LIMIT:g}%% (1)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dirs (logs, dbs)")
    return parser.parse_args(argv)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def scratch_dirs(stack: ExitStack, keep: bool) -> tuple[Path, Path]:
    """(scratch on disk for databases and logs, scratch in RAM for request files)."""
    scratch = Path(tempfile.mkdtemp(prefix="syncd-bench-"))
    fast = scratch
    if SCRATCH_FAST.is_dir() and os.access(SCRATCH_FAST, os.W_OK):
        fast = Path(tempfile.mkdtemp(prefix="syncd-bench-", dir=SCRATCH_FAST))
        stack.callback(shutil.rmtree, fast, ignore_errors=True)
    if keep:
        print(f"scratch kept: {scratch}")
    else:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
    return scratch, fast


def save(results: dict[str, Any]) -> str:
    """Write the raw numbers and the report to bench/out/; return the report."""
    text = report(results)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for name in (f"ingest-{stamp}", "ingest-latest"):
        (OUT / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (OUT / f"{name}.md").write_text(text)
    return text + f"raw numbers: {OUT / f'ingest-{stamp}.json'}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench/ingest: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_exit)
    OUT.mkdir(parents=True, exist_ok=True)
    load = Load(args.threads, args.connections, args.duration, args.warmup)
    results: dict[str, Any] = {
        "environment": environment(),
        "load": load.__dict__,
        "fixed_duration": args.fixed_duration,
        "targets": {},
    }
    with ExitStack() as stack:
        scratch, fast = scratch_dirs(stack, args.keep)
        run = Run(args, load, scratch, fast, Payloads(args.seed), stack, results)
        results["problems"] = run.problems
        try:
            execute(run)
        except BenchError as exc:
            print(f"bench/ingest: {exc}", file=sys.stderr)
            return 1
    print()
    print(save(results), end="")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
