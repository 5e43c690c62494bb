"""bench/reconcile: a full reconciliation of N orders and 20,000 SKUs where nothing changed.

Everything runs on 127.0.0.1, each part in its own process so that its memory and CPU are
its own:

* the **simulator** (``--serve-simulator N``): a ``Simulator`` with 20,000 SKUs and N orders,
  each moved open → fulfilled (``World.advance_all(4)``: one or two shipments with tracking
  numbers). No callback is registered, so nothing is sent. The same process serves a tiny
  **ERP sink** (``PUT /api/...`` answers 200 and is counted; ``GET /stats``).
* **pass 1** (``--syncd-pass 1``): a fresh store (SQLite in a temporary directory, or a fresh
  ``syncd_bench_*`` PostgreSQL database dropped afterwards), ``SqlStore.migrate()``, then
  ``Poller.reconcile(job)`` for every job of ``syncd.poller.JOBS``. That fills entity state and
  queues one delivery per entity; they are then marked delivered, as a 200-answering ERP
  would have it, by claiming them 2,000 at a time (``claim_deliveries``) and recording them
  (``complete_deliveries``).
* **pass 2** (``--syncd-pass 2``), in a new process, so that its peak RSS is that of the
  no-change pass alone: the same reconciliation, with a real ``Deliverer`` (the ``http``
  adapter, pointed at the sink) running beside it as in the daemon. Measured: wall time, peak
  RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM``; ``VmRSS`` is also sampled every
  0.25 s), the process's CPU time, records read, changes found, outbox rows and ERP calls
  (the sink's count before and after, after giving the Deliverer a second to claim).
* **raw paging** (``--raw-paging``): the same GETs with a bare aiohttp loop (read + ``json``
  parse, nothing else), to show how long the simulator itself takes to serve the pages. The
  simulator's CPU time during each phase is read from ``/proc/<pid>/stat``.

Each pass also reports where its wall time went, measured from outside syncd: time inside SQL
statements by verb (SQLAlchemy cursor events and the dialect's commit), time inside MasonHub
requests (``MasonHubClient._once`` wrapped: the simulator's work, the transfer and
``json.loads``), and the rest, syncd's own Python. A monitor thread splits the machine's CPU
time into this benchmark, PostgreSQL (our databases' backends and the shared server
processes) and others; before each measured phase it waits up to 10 s for others to go quiet,
and each pass-2 cell runs ``--repeat`` times (default 2), the fastest kept.

The code under test is copied (``syncd/`` and ``alembic/`` of the work tree, or of ``HEAD``
with ``--source head``) into a scratch directory first, so edits made to the tree during the
run cannot change what is measured. ``--profile`` runs one more no-change pass of the largest
N on SQLite under ``py-spy record`` (separate from the measured one) and writes the stacks.

Prints a table, writes raw numbers to ``bench/out/reconcile-<time>.json`` (and
``reconcile-latest.json``), and exits 1 if a no-change pass changed anything, left outbox
rows or made an ERP call.

    .venv/bin/python bench/reconcile.py                     # 10k, 50k, 100k; about 20 min
    .venv/bin/python bench/reconcile.py --orders 10000 --backends sqlite    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
PYTHON = Path(sys.executable)
SCRIPT = Path(__file__).resolve()
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_BASE = "postgresql+asyncpg://postgres@127.0.0.1:5432"
TOKEN = "bench-simulator-token"
ERP_TOKEN = "bench-erp-token"
WINDOW = "30d"
#: Deliveries claimed and recorded per transaction when pass 1 marks everything delivered.
MARK_BATCH = 2000
#: How often the syncd process samples its own VmRSS.
RSS_EVERY = 0.25
#: Targets from the issue, for the 100,000-order row.
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 300.0
#: "Flat": peak RSS may rise at most this much from the smallest N to the largest.
FLAT_MB = 15.0
#: The same GETs MasonHubClient makes for each job (sdt is filled in at run time).
ENDPOINTS = (
    ("orders", "/orders", True),
    ("shipments", "/shipments", True),
    ("inventory", "/skus", False),
    ("inbound_shipments", "/inbound_shipments", True),
    ("rmas", "/rmas", True),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The row-value IN that SqlStore._load_entities filters on, as SQLAlchemy renders it.
ROW_VALUE_IN = "(entities.entity_type, entities.entity_key) IN"
#: The client address in a PostgreSQL backend's process title.
_CLIENT = re.compile(r"\S+\(\d+\)|\[local\]")
#: How CpuMonitor splits the machine's CPU time.
GROUPS = ("bench", "postgres", "others")
#: A phase during which other processes used more CPU than this (% of one core) is "noisy".
NOISY_PCT = 25.0


# --- helpers shared by every process --------------------------------------------------------


def _status_mb(field: str) -> float:
    """A VmXXX line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _usage() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "cpu_user_s": round(usage.ru_utime, 3),
        "cpu_system_s": round(usage.ru_stime, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "vm_hwm_mb": round(_status_mb("VmHWM"), 1),
    }


def _sdt() -> str:
    since = datetime.now(UTC) - timedelta(days=30)
    return since.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _write(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, default=str))


# --- the simulator process ------------------------------------------------------------------


async def serve_simulator(args: argparse.Namespace) -> int:
    """Build the world, serve it and the ERP sink, print one JSON line; run until stdin ends."""
    from aiohttp import web

    from syncd.simulator import Simulator

    began = time.monotonic()
    sim = Simulator(seed=args.seed, token=TOKEN, skus=args.skus, snapshot_delay=None)
    skus_s = time.monotonic() - began
    sim.world.create_orders(args.serve_simulator)
    orders_s = time.monotonic() - began - skus_s
    sim.world.advance_all(4)
    statuses = Counter(order.status for order in sim.world.orders)
    build_s = time.monotonic() - began
    base_url = await sim.start("127.0.0.1", 0)

    calls = {"count": 0}

    async def put(request: web.Request) -> web.Response:
        await request.read()
        calls["count"] += 1
        return web.json_response({})

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(calls)

    erp = web.Application()
    erp.router.add_put("/api/{tail:.*}", put)
    erp.router.add_get("/stats", stats)
    runner = web.AppRunner(erp, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    erp_port = runner.addresses[0][1]
    world = sim.world
    ready = {
        "pid": os.getpid(),
        "base_url": base_url,
        "erp_url": f"http://127.0.0.1:{erp_port}/api",
        "erp_stats": f"http://127.0.0.1:{erp_port}/stats",
        "build_seconds": {
            "skus": round(skus_s, 2),
            "orders": round(orders_s, 2),
            "total": round(build_s, 2),
        },
        "records": {
            "orders": len(world.orders),
            "shipments": len(world.shipments),
            "skus": len(world.skus),
            "inbound_shipments": len(world.inbound_shipments),
            "rmas": len(world.rmas),
        },
        "order_statuses": dict(statuses),
        "rss_mb": round(_status_mb("VmRSS"), 1),
    }
    print(json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stdin_closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    await runner.cleanup()
    await sim.close()
    os._exit(0)  # the stdin reader thread may still be blocked


# --- the raw paging process -----------------------------------------------------------------


async def raw_paging(args: argparse.Namespace) -> int:
    """Every page syncd reads, with aiohttp and json.loads and nothing else."""
    import aiohttp

    sdt = _sdt()
    jobs: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    headers = {"Accept": "application/json", "Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for job, path, windowed in ENDPOINTS:
            params = {"sdt": sdt} if windowed else {"include_counts": "true"}
            jobs[job] = await _raw_job(session, args.base_url + path, params, args.page_size)
    wall = time.monotonic() - began
    result = {
        "wall_s": round(wall, 3),
        "records": sum(j["records"] for j in jobs.values()),
        "bytes": sum(j["bytes"] for j in jobs.values()),
        "requests": sum(j["requests"] for j in jobs.values()),
        "jobs": jobs,
        **_usage(),
    }
    _write(Path(args.result), result)
    return 0


async def _raw_job(session: Any, url: str, params: dict[str, str], size: int) -> dict[str, Any]:
    began = time.monotonic()
    offset = records = requests = size_bytes = 0
    while True:
        query = {**params, "offset": str(offset), "limit": str(size)}
        async with session.get(url, params=query) as response:
            raw = await response.read()
            response.raise_for_status()
        requests += 1
        size_bytes += len(raw)
        page = json.loads(raw)
        count = len(page["data"] if isinstance(page, dict) else page)
        records += count
        if count < size:
            break
        offset += count
    seconds = round(time.monotonic() - began, 3)
    return {"records": records, "requests": requests, "bytes": size_bytes, "seconds": seconds}


# --- the syncd processes --------------------------------------------------------------------


class RssSampler:
    """VmRSS every RSS_EVERY seconds, as (seconds since start, MiB)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._began = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._began = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(RSS_EVERY)

    def take(self) -> None:
        at = round(time.monotonic() - self._began, 2)
        self.samples.append((at, round(_status_mb("VmRSS"), 1)))

    async def stop(self) -> None:
        self.take()
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    def quartiles(self) -> list[float]:
        """VmRSS at 0, 25, 50, 75 and 100% of the samples."""
        if not self.samples:
            return []
        last = len(self.samples) - 1
        return [self.samples[round(last * q / 4)][1] for q in range(5)]


def bench_settings(args: argparse.Namespace) -> Any:
    from syncd.config import settings_from_dict

    raw = {
        "masonhub": {"base_url": args.base_url, "token": TOKEN, "page_size": args.page_size},
        "webhooks": {"signing_secrets": ["x"]},
        "store": {"url": args.store},
        "reconcile": {"window": WINDOW},
        "erp": {"base_url": args.erp_url, "token": ERP_TOKEN, "timeout": "5s"},
    }
    return settings_from_dict(raw, environ={})


async def _erp_calls(url: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return int((await response.json())["count"])


async def mark_delivered(store: Any) -> dict[str, Any]:
    """Record every pending delivery as accepted by the ERP, MARK_BATCH per transaction."""
    from syncd.store import Completion

    began = time.monotonic()
    owner = f"bench-{uuid.uuid4().hex[:8]}"
    marked = 0
    while True:
        claims = await store.claim_deliveries(owner, MARK_BATCH, 3600.0)
        if not claims:
            break
        now = datetime.now(UTC)
        await store.complete_deliveries([Completion(c, owner, now, 200) for c in claims])
        marked += len(claims)
    return {"marked": marked, "seconds": round(time.monotonic() - began, 3)}


class Timings:
    """Where a pass's wall time goes: SQL statements (by verb) and MasonHub requests.

    Measured from outside syncd: SQLAlchemy's cursor events and the dialect's commit time every
    statement (a statement's time includes the hop to the driver's thread or the server and the
    fetch), and ``MasonHubClient._once`` is wrapped to time every request (the simulator's work,
    the transfer and ``json.loads``). The rest of the wall time is syncd's own Python work.
    """

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.count: Counter[str] = Counter()

    def add(self, kind: str, began: float) -> None:
        self.seconds[kind] += time.perf_counter() - began
        self.count[kind] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.count.clear()

    def install(self, store: Any, client_class: Any) -> None:
        from sqlalchemy import event

        engine = store.engine.sync_engine
        starts: list[float] = []

        def before(*_args: Any) -> None:
            starts.append(time.perf_counter())

        def after(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
            if verb == "SELECT" and ROW_VALUE_IN in statement:
                verb = "SELECT by (entity_type, entity_key) IN"  # SqlStore._load_entities
            self.add(f"sql {verb}", starts.pop())

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        dialect = engine.dialect
        commit = dialect.do_commit

        def timed_commit(dbapi_connection: Any) -> None:
            began = time.perf_counter()
            commit(dbapi_connection)
            self.add("sql COMMIT", began)

        dialect.do_commit = timed_commit
        once = getattr(client_class, "_once", None)
        if once is None:
            return

        async def timed_once(client: Any, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await once(client, *args, **kwargs)
            finally:
                self.add("masonhub request", began)

        client_class._once = timed_once

    def report(self, wall: float) -> dict[str, Any]:
        sql = sum(s for k, s in self.seconds.items() if k.startswith("sql "))
        http = self.seconds["masonhub request"]
        return {
            "seconds": {k: round(s, 3) for k, s in self.seconds.most_common()},
            "count": dict(self.count.most_common()),
            "sql_s": round(sql, 3),
            "masonhub_s": round(http, 3),
            "python_s": round(wall - sql - http, 3),
        }


async def syncd_pass(args: argparse.Namespace) -> int:
    """One reconciliation of every job (pass 1 on a fresh store; pass 2 expecting no change)."""
    from syncd.delivery import Deliverer
    from syncd.erp import load_adapter
    from syncd.logs import configure_logging
    from syncd.masonhub import MasonHubClient
    from syncd.poller import JOBS, Poller
    from syncd.store import SqlStore

    log_file = open(args.log, "a")  # noqa: SIM115, ASYNC230 (before any work; whole process)
    configure_logging(stream=log_file)
    settings = bench_settings(args)
    result: dict[str, Any] = {"pass": args.syncd_pass, "rss_at_start_mb": _status_mb("VmRSS")}
    store = SqlStore(args.store)
    if args.syncd_pass == 1:
        await store.migrate()
    client = MasonHubClient(settings.masonhub)
    deliverer = None
    if args.syncd_pass != 1:
        deliverer = Deliverer(store, load_adapter(settings.erp), settings.erp, owner="bench")
        await deliverer.start()
    poller = Poller(store, client, settings, on_queued=deliverer.notify if deliverer else None)
    timings = Timings()
    timings.install(store, MasonHubClient)
    result["outbox_before"] = await store.outbox_counts()
    erp_before = await _erp_calls(args.erp_stats)
    sampler = RssSampler()
    sampler.start()
    cpu_before = _usage()["cpu_s"]
    timings.reset()
    began = time.monotonic()
    reports = [(await poller.reconcile(job)).as_dict() for job in JOBS]
    wall = time.monotonic() - began
    result["wall_s"] = round(wall, 3)
    result["cpu_during_pass_s"] = round(_usage()["cpu_s"] - cpu_before, 3)
    result["timings"] = timings.report(wall)
    await sampler.stop()
    if deliverer is not None:
        deliverer.notify()
        await asyncio.sleep(1.0)  # a claim round: anything queued would now be on its way
        await deliverer.stop()
    else:
        result["marked"] = await mark_delivered(store)
    result["outbox_after"] = await store.outbox_counts()
    result["erp_calls"] = await _erp_calls(args.erp_stats) - erp_before
    await client.close()
    await store.close()
    result.update(
        records=sum(r["records"] for r in reports),
        changed=sum(r["new"] for r in reports),
        unchanged=sum(r["unchanged"] for r in reports),
        stale=sum(r["stale"] for r in reports),
        invalid=sum(r["invalid"] for r in reports),
        reports=reports,
        rss_quartiles_mb=sampler.quartiles(),
        rss_samples=sampler.samples,
        **_usage(),
    )
    log_file.close()
    _write(Path(args.result), result)
    return 0


# --- the orchestrator -----------------------------------------------------------------------


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip()


def snapshot(source: str, dest: Path) -> dict[str, Any]:
    """Copy the syncd under test (package and migrations) into ``dest``."""
    if source == "head":
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "HEAD", "syncd", "alembic"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    elif source == "worktree":
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("syncd", "alembic"):
            shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    dirty = _git("status", "--short", "--", "syncd", "alembic")
    return {
        "source": source,
        "git_head": _git("rev-parse", "HEAD"),
        "uncommitted_in_syncd": dirty.splitlines() if source != "head" else [],
    }


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMonitor:
    """CPU seconds used on the machine, split into this benchmark, PostgreSQL and others.

    A thread reads every ``/proc/PID/stat`` twice a second; a process that exits between two
    readings loses at most that half second. Other engineers' tests and benchmarks share the
    two cores, so each phase reports how much CPU they took while it ran.
    """

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        #: PostgreSQL databases of this run: their backends count as "postgres", not "others".
        self.databases: set[str] = set()
        self._kinds: dict[tuple[int, str], str] = {}
        self._last: dict[tuple[int, str], float] = {}
        self._first = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def snapshot(self) -> Counter[str]:
        self._sample()
        with self._lock:
            return Counter(self.totals)

    @staticmethod
    def _read() -> dict[int, tuple[str, int, float, str]]:
        procs = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            head, _, tail = text.rpartition(")")
            fields = tail.split()
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
            procs[int(entry.name)] = (head.partition("(")[2], int(fields[1]), cpu, fields[19])
        return procs

    def _postgres(self, pid: int, key: tuple[int, str]) -> str:
        """A backend of one of our databases, or a server process all sessions share, is
        "postgres"; a backend of someone else's database is "others"."""
        kind = self._kinds.get(key)
        if kind is None:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                title = ""
            words = title.split()
            # "postgres: 15/main: USER DATABASE HOST(PORT) STATE" for a client's backend
            backend = (
                bool(words)
                and words[0] == "postgres:"
                and any(_CLIENT.fullmatch(word) for word in words)
            )
            mine = any(name in words for name in self.databases)
            kind = "others" if backend and not mine else "postgres"
            if backend:  # a shared process keeps its title; a backend's database never changes
                self._kinds[key] = kind
        return kind

    def wait_quiet(self, limit_pct: float = 10.0, within: float = 10.0) -> float:
        """Wait up to ``within`` s for a second in which others use under ``limit_pct``."""
        deadline = time.monotonic() + within
        while True:
            before = self.snapshot()["others"]
            time.sleep(1.0)
            pct = 100 * (self.snapshot()["others"] - before)
            if pct < limit_pct or time.monotonic() >= deadline:
                return round(pct, 1)

    def _sample(self) -> None:
        procs = self._read()
        me = os.getpid()

        def ours(pid: int) -> bool:
            for _ in range(32):
                if pid == me:
                    return True
                if pid not in procs or pid <= 1:
                    return False
                pid = procs[pid][1]
            return False

        with self._lock:
            seen = {}
            for pid, (comm, _ppid, cpu, start) in procs.items():
                key = (pid, start)
                seen[key] = cpu
                before = self._last.get(key, cpu if self._first else 0.0)
                group = (
                    "bench"
                    if ours(pid)
                    else self._postgres(pid, key)
                    if comm == "postgres"
                    else "others"
                )
                self.totals[group] += max(0.0, cpu - before)
            self._last = seen
            self._first = False


def machine() -> dict[str, Any]:
    cpu = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "mem_total_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@dataclass
class Simulated:
    """A running simulator process and what it said when it was ready."""

    process: subprocess.Popen[str]
    ready: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.ready["pid"])

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Run:
    """One run of the matrix: scratch directory, child processes, stores to drop."""

    def __init__(self, args: argparse.Namespace, scratch: Path, stack: ExitStack) -> None:
        self.args = args
        self.scratch = scratch
        self.stack = stack
        self.env = {**os.environ, "PYTHONPATH": str(scratch / "src"), "PYTHONHASHSEED": "0"}
        self.env.pop("SYNCD_CONFIG", None)
        self.log = scratch / "syncd.log"
        self.monitor = CpuMonitor()
        self.monitor.start()
        stack.callback(self.monitor.stop)

    def child(self, *extra: str) -> list[str]:
        return [str(PYTHON), str(SCRIPT), *extra]

    def start_simulator(self, orders: int) -> Simulated:
        cmd = self.child(
            "--serve-simulator", str(orders), "--skus", str(self.args.skus), "--seed", "1"
        )
        process = subprocess.Popen(
            cmd, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        simulated = Simulated(process, {})
        self.stack.callback(simulated.stop)
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until built; a crash gives ""
        if not line:
            raise SystemExit(f"the simulator for {orders} orders exited ({process.wait()})")
        simulated.ready = json.loads(line)
        return simulated

    def run_child(self, sim: Simulated, name: str, *extra: str, wrap: list[str] | None = None):
        """Run a measuring child to completion; its result, with the simulator's CPU time."""
        result = self.scratch / f"{name}.json"
        cmd = [*(wrap or []), *self.child(*extra, "--result", str(result))]
        quiet = self.monitor.wait_quiet()
        sim_cpu = _proc_cpu(sim.pid)
        machine_before = self.monitor.snapshot()
        began = time.monotonic()
        process = subprocess.Popen(cmd, env=self.env, start_new_session=True)
        self.stack.callback(_kill_group, process)
        try:
            code = process.wait(self.args.child_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise SystemExit(f"{name} took longer than {self.args.child_timeout} s") from None
        if code != 0 or not result.exists():
            raise SystemExit(f"{name} failed (exit {code}); log: {self.log}")
        document: dict[str, Any] = json.loads(result.read_text())
        document["child_wall_s"] = round(time.monotonic() - began, 3)
        document["simulator_cpu_s"] = round(_proc_cpu(sim.pid) - sim_cpu, 3)
        used = self.monitor.snapshot()
        used.subtract(machine_before)
        document["machine_cpu_s"] = {group: round(used[group], 2) for group in GROUPS}
        document["others_cpu_pct_before"] = quiet
        document["others_cpu_pct"] = round(100 * used["others"] / document["child_wall_s"], 1)
        return document

    def syncd_args(self, sim: Simulated, url: str, which: int) -> list[str]:
        ready = sim.ready
        return [
            "--syncd-pass",
            str(which),
            "--base-url",
            ready["base_url"],
            "--erp-url",
            ready["erp_url"],
            "--erp-stats",
            ready["erp_stats"],
            "--store",
            url,
            "--page-size",
            str(self.args.page_size),
            "--log",
            str(self.log),
        ]

    def new_store(self, backend: str, orders: int) -> str:
        if backend == "sqlite":
            path = self.scratch / f"syncd-{orders}.db"
            self.stack.callback(_remove_sqlite, path)
            return f"sqlite+aiosqlite:///{path}"
        name = f"syncd_bench_reconcile_{uuid.uuid4().hex[:10]}"
        _psql(f"CREATE DATABASE {name}")
        self.monitor.databases.add(name)
        self.stack.callback(_drop_database, name)
        return f"{PG_BASE}/{name}"

    def cell(self, sim: Simulated, backend: str, orders: int) -> dict[str, Any]:
        url = self.new_store(backend, orders)
        tag = f"{backend}-{orders}"
        print(f"  {tag}: pass 1 (fills the store) ...", flush=True)
        first = self.run_child(sim, f"pass1-{tag}", *self.syncd_args(sim, url, 1))
        print(
            f"  {tag}: pass 1 {first['wall_s']:.1f} s, {first['records']} records, "
            f"{first['marked']['marked']} marked delivered; pass 2 (no change) ...",
            flush=True,
        )
        runs = []
        for attempt in range(self.args.repeat):
            runs.append(
                self.run_child(sim, f"pass2-{tag}-{attempt}", *self.syncd_args(sim, url, 2))
            )
            print(
                f"  {tag}: pass 2 {runs[-1]['wall_s']:.1f} s, peak RSS "
                f"{runs[-1]['ru_maxrss_mb']} MB, {runs[-1]['changed']} changed, "
                f"{runs[-1]['erp_calls']} ERP calls, others used {runs[-1]['others_cpu_pct']}% CPU",
                flush=True,
            )
        cell: dict[str, Any] = {"backend": backend, "orders": orders, "pass1": first}
        cell["pass2"] = min(runs, key=lambda run: run["wall_s"])
        cell["pass2_runs"] = [_brief(run) for run in runs]
        if self.args.profile and backend == "sqlite" and orders == max(self.args.orders):
            cell["profile"] = self.profile(sim, url, tag)
        if backend == "sqlite":
            _remove_sqlite(self.scratch / f"syncd-{orders}.db")
        else:
            _drop_database(url.rsplit("/", 1)[1])
        return cell

    def profile(self, sim: Simulated, url: str, tag: str) -> dict[str, Any]:
        """One more no-change pass under py-spy; the stacks and a summary go to bench/out."""
        py_spy = shutil.which("py-spy", path=str(PYTHON.parent)) or shutil.which("py-spy")
        if py_spy is None:
            print("  (py-spy not found: no profile)")
            return {}
        raw = OUT / f"reconcile-profile-{tag}.txt"
        wrap = [py_spy, "record", "--format", "raw", "--rate", "100", "-o", str(raw), "--"]
        print(f"  {tag}: pass 2 again under py-spy ...", flush=True)
        third = self.run_child(sim, f"profile-{tag}", *self.syncd_args(sim, url, 2), wrap=wrap)
        summary = summarise_profile(raw)
        top = OUT / f"reconcile-profile-{tag}-top.txt"
        top.write_text(summary["text"])
        return {"raw": str(raw), "top": str(top), "wall_s": third["wall_s"], **summary["shares"]}

    def matrix(self, cells: list[dict[str, Any]]) -> None:
        """Every cell, appended to ``cells`` as it finishes (so a failure keeps the rest)."""
        for orders in self.args.orders:
            print(f"N = {orders}: building the simulator ...", flush=True)
            sim = self.start_simulator(orders)
            print(
                f"  simulator ready in {sim.ready['build_seconds']['total']} s: "
                f"{sim.ready['records']}, RSS {sim.ready['rss_mb']} MB; raw paging ...",
                flush=True,
            )
            raw = self.run_child(sim, f"raw-{orders}", "--raw-paging", *self._raw_args(sim))
            print(f"  raw paging {raw['wall_s']:.1f} s for {raw['records']} records", flush=True)
            for backend in self.args.backends:
                cell = self.cell(sim, backend, orders)
                cell.update(simulator=sim.ready, raw=raw)
                cells.append(cell)
            sim.stop()

    def _raw_args(self, sim: Simulated) -> list[str]:
        return ["--base-url", sim.ready["base_url"], "--page-size", str(self.args.page_size)]


def _kill_group(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", PG_ADMIN, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
        check=True,
        capture_output=True,
    )


def _drop_database(name: str) -> None:
    with suppress(subprocess.CalledProcessError):
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --- profile summary ------------------------------------------------------------------------

#: Where a sample's time goes: the first of these frames found, innermost first.
PROFILE_BUCKETS = (
    (
        "sqlite3 running a statement (aiosqlite thread)",
        ("_connection_worker_thread (aiosqlite/core.py:63)",),
    ),
    ("aiosqlite thread waiting for work", ("_connection_worker_thread (aiosqlite/core.py:59)",)),
    ("event loop waiting (epoll)", ("EpollSelector.select",)),
    ("content_hash (merge)", ("content_hash (syncd/facts.py",)),
    ("normalise records (facts.py)", ("_fact (syncd/facts.py",)),
    ("MasonHub request + json.loads", ("_once (syncd/masonhub.py",)),
    ("_load_entities (SQLAlchemy side)", ("_load_entities (syncd/store.py",)),
    ("merge.decide", ("decide (syncd/merge.py",)),
    ("store writes and commit", ("_write_entities (syncd/store.py", "_begin (syncd/store.py")),
)


def _bucket(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in PROFILE_BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarise_profile(raw: Path) -> dict[str, Any]:
    """Samples per bucket and the top frames by self and total time, from py-spy raw output."""
    buckets: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    if raw.exists():
        for line in raw.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            samples += count
            frames = stack.split(";")
            buckets[_bucket(stack)] += count
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    shares = {name: round(100 * n / samples, 1) for name, n in buckets.most_common()}
    lines = [f"{samples} samples (py-spy, 100 Hz, all threads, idle excluded)", "", "buckets:"]
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in shares.items()]
    lines += ["", "top frames by own time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(25)]
    lines += ["", "top frames by total time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(40)]
    return {"shares": {"samples": samples, "buckets_pct": shares}, "text": "\n".join(lines) + "\n"}


# --- report ---------------------------------------------------------------------------------


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("wall_s", "ru_maxrss_mb", "changed", "erp_calls", "others_cpu_pct")
    return {key: run[key] for key in keys}


def _pct(seconds: float, wall: float) -> str:
    return f"{100 * seconds / wall:.0f}%"


def _row(cell: dict[str, Any]) -> str:
    one, two, raw = cell["pass1"], cell["pass2"], cell["raw"]
    wall = two["wall_s"]
    outbox = sum(two["outbox_after"].values())
    noisy = " (noisy)" if two.get("others_cpu_pct", 0.0) > NOISY_PCT else ""
    return (
        f"| {cell['orders']:,} | {cell['backend']} | {two['records']:,} | {wall:.1f} "
        f"| {two['ru_maxrss_mb']:.0f} | {two['rss_at_start_mb']:.0f} | {two['changed']} "
        f"| {outbox} | {two['erp_calls']} | {raw['wall_s']:.1f} "
        f"| {_pct(two['cpu_during_pass_s'], wall)} | {_pct(two['simulator_cpu_s'], wall)} "
        f"| {_pct(two.get('machine_cpu_s', {}).get('postgres', 0.0), two['child_wall_s'])} "
        f"| {two.get('others_cpu_pct', 0.0):.0f}%{noisy} | {one['wall_s']:.1f} |"
    )


def table(results: dict[str, Any]) -> list[str]:
    """The Markdown table of a run, and the verdicts."""
    lines = [
        "| orders | store | records read | pass 2 s | peak RSS MB | RSS before pass MB "
        "| changed | outbox rows | ERP calls | raw paging s | syncd CPU | simulator CPU "
        "| PostgreSQL CPU | others' CPU | pass 1 s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(cell) for cell in results["cells"]]
    lines.append("")
    lines += verdicts(results["cells"])
    return lines


def verdicts(cells: list[dict[str, Any]]) -> list[str]:
    """Targets met or not, and whether memory is flat, per backend."""
    lines = []
    for backend in sorted({c["backend"] for c in cells}):
        mine = sorted((c for c in cells if c["backend"] == backend), key=lambda c: c["orders"])
        big = mine[-1]["pass2"]
        seconds, rss = big["wall_s"], big["ru_maxrss_mb"]
        rise = rss - mine[0]["pass2"]["ru_maxrss_mb"]
        lines.append(
            f"{backend}, {mine[-1]['orders']:,} orders: {seconds:.1f} s "
            f"({'met' if seconds < TARGET_SECONDS else 'MISSED'}, target < {TARGET_SECONDS:.0f}"
            f" s); peak RSS {rss:.0f} MB ({'met' if rss < TARGET_RSS_MB else 'MISSED'}, target "
            f"< {TARGET_RSS_MB:.0f} MB); RSS {rise:+.1f} MB from {mine[0]['orders']:,} to "
            f"{mine[-1]['orders']:,} orders ({'flat' if rise <= FLAT_MB else 'NOT flat'})"
        )
    return lines


def failures(cells: list[dict[str, Any]]) -> list[str]:
    """No-change passes that changed something, left outbox rows or called the ERP."""
    bad = []
    for cell in cells:
        two = cell["pass2"]
        if two["changed"] or sum(two["outbox_after"].values()) or two["erp_calls"]:
            bad.append(
                f"{cell['backend']} {cell['orders']}: {two['changed']} changed, "
                f"outbox {two['outbox_after']}, {two['erp_calls']} ERP calls"
            )
    return bad


def orchestrate(args: argparse.Namespace) -> int:
    """Snapshot the code, run the matrix, print the table, write the JSON."""
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    with ExitStack() as stack:
        scratch = Path(tempfile.mkdtemp(prefix="syncd-reconcile-"))
        if not args.keep:
            stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        (scratch / "src").mkdir()
        code = snapshot(args.source, scratch / "src")
        if args.source == "live":
            (scratch / "src").rmdir()
        run = Run(args, scratch, stack)
        results: dict[str, Any] = {
            "benchmark": "reconcile",
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "code": code,
            "params": {
                "orders": args.orders,
                "skus": args.skus,
                "page_size": args.page_size,
                "window": WINDOW,
                "backends": args.backends,
            },
        }
        results["cells"] = []
        try:
            run.matrix(results["cells"])
        finally:
            results["seconds"] = round(time.monotonic() - began, 1)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            for path in (OUT / f"reconcile-{stamp}.json", OUT / "reconcile-latest.json"):
                _write(path, results)
            if run.log.exists():
                shutil.copy(run.log, OUT / "reconcile-latest-syncd.log")
    print()
    print("\n".join(table(results)))
    print(f"\nwhole run {results['seconds']:.0f} s; raw numbers: bench/out/reconcile-{stamp}.json")
    bad = failures(results["cells"])
    for line in bad:
        print(f"FAILED: {line}")
    return 1 if bad else 0


def _terminate(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)


def _orders(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def _backends(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    if not set(names) <= {"sqlite", "postgresql"}:
        raise argparse.ArgumentTypeError(f"unknown backend in {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=_orders, default=_orders("10000,50000,100000"))
    parser.add_argument("--skus", type=int, default=20000)
    parser.add_argument("--backends", type=_backends, default=["sqlite", "postgresql"])
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--source", choices=("worktree", "head", "live"), default="worktree")
    parser.add_argument("--profile", action="store_true", help="py-spy on a largest-N pass 2")
    parser.add_argument("--repeat", type=int, default=2, help="pass 2 runs per cell (best kept)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--child-timeout", type=float, default=1800.0)
    parser.add_argument("--report", type=Path, help="print the table of a saved JSON file")
    internal = parser.add_argument_group("internal (the child processes)")
    internal.add_argument("--serve-simulator", type=int, metavar="N")
    internal.add_argument("--seed", type=int, default=1)
    internal.add_argument("--raw-paging", action="store_true")
    internal.add_argument("--syncd-pass", type=int, choices=(1, 2))
    for name in ("--base-url", "--erp-url", "--erp-stats", "--store", "--log", "--result"):
        internal.add_argument(name)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print("\n".join(table(json.loads(args.report.read_text()))))
        return 0
    if args.serve_simulator is not None:
        return asyncio.run(serve_simulator(args))
    if args.raw_paging:
        return asyncio.run(raw_paging(args))
    if args.syncd_pass is not None:
        return asyncio.run(syncd_pass(args))
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
