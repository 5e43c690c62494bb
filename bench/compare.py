"""bench/compare: syncd beside the integration guide's Flask + gunicorn + Redis design.

Five targets on 127.0.0.1, one at a time, loaded by the same generators from a separate process:

* ``bare``: ``bench/bare.py``, an aiohttp handler that reads the body and answers 200;
* ``sqlite``: ``syncd run`` on a fresh SQLite file (WAL; synchronous=FULL for webhook
  commits and delivery claims, NORMAL for merges and completions);
* ``postgresql``: ``syncd run`` on a fresh PostgreSQL database (created, then dropped);
* ``guide``: the guide's receiver (``bench/peers/guide_receiver.py``, Flask under gunicorn,
  sync workers) pushing to the local Redis, and its worker (``bench/peers/guide_worker.py``)
  popping and calling the ERP;
* ``floor``: ``bench/floor.py --erp``, the least a durable pipeline does on this stack: a
  group-committed SQLite inbox (``--floor-synchronous``, FULL by default) whose rows go to the
  ERP as soon as they committed (``--floor-client``: by aiohttp from the event loop, or by
  ``http.client`` threads fed by the store thread), with no merge, outbox, lease or retry.
  It sets syncd's latency against what any implementation that stores a webhook before
  delivering it can reach; it takes no part in the kill -9 phase and does not set the fixed
  rate.

syncd and the guide's worker deliver to the same ERP, ``bench/erp_sink.py``, which answers every
PUT at once and records when each call arrived and its order id (the last path segment). Every
webhook is a signed ~1 KB orderEvent (``ingest.Payloads``) with its own message id and
``customer_identifier``, so the sink can tell which webhooks reached the ERP.

Phases, each on a fresh deployment of the target (fresh database, fresh Redis list):

1. **max**: wrk with ``bench/ingest.lua`` (pre-signed distinct requests, closed loop) after a
   warm-up: accepted webhooks/s, CPU by process, and the ERP calls made meanwhile.
2. **fixed**: ``bench/openloop.py`` at one rate for every target (``--fraction`` of the slowest
   durable target's maximum): acknowledgement latency from each request's scheduled send
   time; receipt-to-ERP, the sink's arrival time minus the send time (``time.time_ns()`` on the
   same machine); CPU per webhook over the run and until every acknowledged webhook reached
   the ERP. Then **light**: receipt-to-ERP again at ``--light-rate``.
3. **kill -9** (durable targets): openloop at ``--kill-rate`` for ``--kill-duration`` s, while
   every ``--kill-interval`` s (±25%, the same seeded schedule for every target) each process
   of the target gets SIGKILL and is started again at once: syncd's one process; the guide's
   gunicorn master and workers (the process group) and its worker process. Redis keeps running:
   it is a separate server, and it is left as configured here (no RDB, no AOF), which cannot
   matter while it is not restarted. Three modes (``--kill-modes``), each on a fresh
   deployment: ``any`` kills at the scheduled moment; ``in-flight`` then waits (up to 1 s) until
   the target holds an event it has taken up for the ERP and the ERP has not confirmed (syncd: a
   leased outbox row; the guide: a worker thread out of ``BRPOP``, seen in Redis's CLIENT LIST),
   which is where the guide's design keeps an event only in memory; ``erp-outage`` kills the
   ERP sink first and the target ``--outage`` s later, while deliveries are being retried, then
   starts both again. Afterwards the sink is watched until every acknowledged webhook arrived,
   or nothing is pending and no call came for 5 s, or ``--settle`` seconds passed. Counted:
   acknowledged (any 2xx) but never delivered.

Before each measured run the script waits (``--quiet-wait``) for other processes to go quiet,
and reports their CPU either way. Prints Markdown tables, writes raw numbers to
``bench/out/compare-<UTC stamp>.{json,md}`` (and ``compare-latest.*``), removes every database,
Redis key and process it made, and exits 1 if syncd lost an acknowledged webhook or a run was
invalid. ``make bench`` runs it; ``--help`` for the knobs, ``--quick`` for a short smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import deliver
import ingest
import redis
from ingest import (
    BENCH,
    OUT,
    PYTHON,
    SECRET,
    SYNCD,
    WEBHOOK_PATH,
    BenchError,
    Load,
    Payloads,
    Target,
    free_port,
)

from syncd.testing import sign

TARGETS = ("bare", "sqlite", "postgresql", "guide", "floor")
DURABLE = ("sqlite", "postgresql", "guide")
PEERS = BENCH / "peers"
GUNICORN = PYTHON.with_name("gunicorn")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ERP_TOKEN = "bench-erp-token"
#: Lines in the bare target's request file (it stores nothing, so wrk may cycle through it).
BARE_LINES = 20_000
#: Durable targets cannot outrun this on this stack; it bounds the warm-up's request file.
WARMUP_RATE_CAP = 10_000
#: Settling ends early once nothing is pending and the sink saw no call for this many seconds.
SETTLE_QUIET = 5.0
QUICK = {
    "duration": 4.0,
    "warmup": 2.0,
    "fixed_duration": 6.0,
    "fixed_warmup": 1.0,
    "light_duration": 4.0,
    "kill_duration": 16.0,
    "kill_interval": 4.0,
    "quiet_wait": 3.0,
}


# --- processes ------------------------------------------------------------------------------


def kill_group(*holders: Any) -> None:
    """SIGKILL the process group of each ``holder.proc`` (each started in its own session), all
    before reaping any, so that no process outlives the first kill by more than a moment."""
    procs = []
    for holder in holders:
        proc, holder.proc = holder.proc, None
        if proc is not None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            procs.append(proc)
    for proc in procs:
        proc.wait()


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (gunicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def redis_server_pid() -> int | None:
    """The local redis-server's pid, if it runs here (its CPU is the guide's)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "comm").read_text().strip() == "redis-server":
                    return int(entry.name)
    return None


class Instance:
    """One deployment of a target on a free port: start, kill -9 (restartable), clean up."""

    durable = True

    def __init__(self, run: Run, name: str, label: str) -> None:
        self.run = run
        self.name = name
        self.label = label
        self.port = free_port()

    def start(self) -> None:
        """Start every process and wait until the target answers."""
        raise NotImplementedError

    def kill9(self) -> None:
        """SIGKILL every process of the target (nothing graceful)."""
        raise NotImplementedError

    def restart(self) -> None:
        """kill -9, then start again on the same port with the same data."""
        self.kill9()
        self.start()

    def pids(self) -> dict[str, int]:
        """The target's processes (and the ERP sink), by the name their CPU is reported under."""
        raise NotImplementedError

    def pending(self) -> int:
        """Work the target holds that may still reach the ERP (0 when idle)."""
        return 0

    def in_flight(self) -> int:
        """Events the target has taken up for delivery and the ERP has not yet confirmed."""
        return 0

    def close(self) -> None:
        """Remove what the target stored (databases, Redis keys)."""


class Bare(Instance):
    """bench/bare.py: the ceiling of the aiohttp stack."""

    durable = False

    def __init__(self, run: Run, name: str, label: str) -> None:
        super().__init__(run, name, label)
        argv = [str(PYTHON), str(BENCH / "bare.py"), f"--port={self.port}"]
        self.target = Target(label, [*argv, f"--path={WEBHOOK_PATH}"], run.log(label))

    def start(self) -> None:
        self.target.start(self.port)

    def kill9(self) -> None:
        kill_group(self.target)

    def pids(self) -> dict[str, int]:
        return {"server": self.target.pid}


class Floor(Instance):
    """bench/floor.py with ``--erp``: a durable inbox whose rows go to the ERP once committed.

    It measures latency only: it has no recovery after a kill, so it takes no part in the
    kill -9 phase, and its maximum does not set the fixed rate.
    """

    def __init__(self, run: Run, name: str, label: str) -> None:
        super().__init__(run, name, label)
        self.backend = ingest.FloorBackend(run.scratch / f"{label}.db")
        argv = [str(PYTHON), str(BENCH / "floor.py"), f"--port={self.port}"]
        argv.append(f"--db={self.backend.path}")
        argv += [f"--path={WEBHOOK_PATH}", f"--erp={run.sink.base}/api", f"--token={ERP_TOKEN}"]
        argv.append(f"--synchronous={run.args.floor_synchronous}")
        argv.append(f"--erp-client={run.args.floor_client}")
        self.target = Target(label, argv, run.log(label))

    def start(self) -> None:
        self.target.start(self.port)

    def kill9(self) -> None:
        kill_group(self.target)

    def pids(self) -> dict[str, int]:
        return {"server": self.target.pid, "erp": self.run.sink.process.pid}

    def close(self) -> None:
        self.backend.drop()


class Syncd(Instance):
    """``syncd run`` on a fresh SQLite file or PostgreSQL database, delivering to the sink."""

    def __init__(self, run: Run, name: str, label: str) -> None:
        super().__init__(run, name, label)
        self.backend: ingest.Backend
        if name == "sqlite":
            self.backend = ingest.SqliteBackend(run.scratch / f"{label}.db")
        else:
            self.backend = ingest.PostgresBackend(run.args.pg_dsn, label)
        run.stack.callback(self.backend.drop)
        self.backend.create()
        self.admin = free_port()
        config = run.scratch / f"{label}.toml"
        ingest.syncd_config(config, self.port, self.admin, self.backend, run.sink.port)
        argv = [str(SYNCD), "run", "--config", str(config)]
        self.target = Target(label, argv, run.log(label), run.env)
        #: Lease owners of killed daemons: their leases are stale, not deliveries in flight.
        self.dead_owners: set[str] = set()

    def start(self) -> None:
        self.target.start(self.port, self.admin)

    def restart(self) -> None:
        self.kill9()
        sql = "SELECT DISTINCT lease_owner FROM outbox WHERE lease_owner IS NOT NULL"
        self.dead_owners |= {str(row[0]) for row in self.backend.rows(sql)}
        self.start()

    def kill9(self) -> None:
        kill_group(self.target)

    def pids(self) -> dict[str, int]:
        return {"server": self.target.pid, "erp": self.run.sink.process.pid}

    def pending(self) -> int:
        sql = (
            "SELECT (SELECT count(*) FROM outbox)"
            " + (SELECT count(*) FROM inbox WHERE state = 'pending')"
        )
        return int(self.backend.rows(sql)[0][0])

    def in_flight(self) -> int:
        """Outbox rows the running daemon has leased (claimed, not yet completed)."""
        sql = "SELECT lease_owner, count(*) FROM outbox WHERE lease_owner IS NOT NULL GROUP BY 1"
        rows = self.backend.rows(sql)
        return sum(int(n) for owner, n in rows if owner not in self.dead_owners)

    def close(self) -> None:
        self.backend.drop()


class Guide(Instance):
    """The integration guide's design: gunicorn + Flask receiver, Redis list, BRPOP worker."""

    def __init__(self, run: Run, name: str, label: str) -> None:
        super().__init__(run, name, label)
        self.queue = f"syncd-bench:{os.getpid()}:{label}"
        self.redis = run.redis
        run.stack.callback(self.close)
        env = {
            **os.environ,
            "GUIDE_WEBHOOK_SECRET": SECRET,
            "GUIDE_QUEUE": self.queue,
            "GUIDE_PATH": WEBHOOK_PATH,
            "GUIDE_REDIS_HOST": REDIS_HOST,
            "GUIDE_REDIS_PORT": str(REDIS_PORT),
        }
        argv = [str(GUNICORN), "--workers", str(run.args.guide_workers), "--worker-class", "sync"]
        argv += ["--bind", f"127.0.0.1:{self.port}", "--pythonpath", str(PEERS)]
        argv += ["--log-level", "warning", "guide_receiver:app"]
        self.receiver = Target(f"{label}-gunicorn", argv, run.log(f"{label}-gunicorn"), env)
        worker = [str(PYTHON), str(PEERS / "guide_worker.py"), f"--erp={run.sink.base}/api"]
        worker += [f"--token={ERP_TOKEN}", f"--queue={self.queue}"]
        worker += [f"--threads={run.args.guide_threads}"]
        worker += [f"--redis-host={REDIS_HOST}", f"--redis-port={REDIS_PORT}"]
        self.worker = deliver.Process(f"{label}-worker", worker, run.log(f"{label}-worker"))

    def start(self) -> None:
        seen = self.worker.log.stat().st_size if self.worker.log.exists() else 0
        self.worker.start()
        self.receiver.start(self.port)
        deadline = time.monotonic() + 30
        while b"guide_worker ready" not in self.worker.log.read_bytes()[seen:]:
            if not self.worker.alive() or time.monotonic() > deadline:
                raise BenchError(f"guide worker did not start: {self.worker.tail()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        # The worker first: it is the one that may hold an event in memory.
        kill_group(self.worker, self.receiver)

    def pids(self) -> dict[str, int]:
        pids = {"server": self.receiver.pid, "worker": self.worker.pid}
        pids.update({f"gunicorn_{i}": p for i, p in enumerate(children(self.receiver.pid))})
        if (server := redis_server_pid()) is not None:
            pids["redis"] = server
        return {**pids, "erp": self.run.sink.process.pid}

    def pending(self) -> int:
        return int(self.redis.llen(self.queue))

    def in_flight(self) -> int:
        """Worker threads not blocked in BRPOP: each holds an event only in its memory.

        Counted from Redis's CLIENT LIST: the worker names its connections ``guide_worker``,
        and a connection waiting in BRPOP has the flag ``b``.
        """
        clients = self.redis.client_list()
        mine = [c for c in clients if c.get("name") == f"guide_worker:{self.queue}"]
        if not mine:
            return 0
        return max(0, self.run.args.guide_threads - sum("b" in c["flags"] for c in mine))

    def close(self) -> None:
        self.redis.delete(self.queue, f"{self.queue}:processed")


# --- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """Options, scratch space, the shared ERP sink and Redis client, results."""

    args: argparse.Namespace
    scratch: Path
    fast: Path
    stack: ExitStack
    sink: deliver.Sink
    redis: redis.Redis
    env: dict[str, str]
    payloads: Payloads
    results: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    def log(self, label: str) -> Path:
        return self.scratch / f"{label}.log"

    def instance(self, name: str, phase: str) -> Instance:
        """A fresh deployment of target ``name``, killed (and its data removed) at the end."""
        kinds = {"bare": Bare, "sqlite": Syncd, "postgresql": Syncd, "guide": Guide, "floor": Floor}
        instance = kinds[name](self, name, f"{name}_{phase}")
        self.stack.callback(instance.kill9)
        instance.start()
        return instance

    def requests(self, label: str, count: int) -> Path:
        """``count`` new signed webhooks, one a line: "<customer_identifier> <hex sig> <body>".

        openloop reports acknowledged requests by the first field, and the sink records the
        customer_identifier of each call, so the two can be compared directly.
        """
        path = self.fast / f"{label}.txt"
        with path.open("w") as fh:
            for _ in range(count):
                _message_id, body = self.payloads.one()
                cid = json.loads(body)["data"][0]["customer_identifier"]
                fh.write(f"{cid} {sign(body.encode(), SECRET, prefix=False)} {body}\n")
        return path

    def quiet(self, instance: Instance) -> None:
        ingest.wait_quiet(instance.pids(), self.args.quiet_wait)


def target_cpu(name: str, usage: dict[str, float]) -> dict[str, float]:
    """Split a ``cpu_usage`` dict: the target's own processes (with its database or Redis), the
    ERP sink, the load generator, and everything else."""
    names = {k.removesuffix("_cpu_pct"): v for k, v in usage.items()}
    own = {"server", "worker", "redis"} | {k for k in names if k.startswith("gunicorn_")}
    target = sum(v for k, v in names.items() if k in own)
    pg = usage.get("postgres_cpu_pct", 0.0)
    other = usage.get("other_cpu_pct", 0.0)
    if name == "postgresql":
        target += pg
    else:
        other += pg
    return {
        "target": round(target, 1),
        "erp": usage.get("erp_cpu_pct", 0.0),
        "loadgen": usage.get("loadgen_cpu_pct", 0.0),
        "other": round(other, 1),
    }


def acked_count(result: dict[str, Any]) -> int:
    """Answers that acknowledge: syncd's and bare's 200 "received", the guide's 200 "queued"."""
    return int(result["received"] + result["other_200"])


def settle(
    run: Run,
    instance: Instance,
    acked: set[str],
    timeout: float,
) -> dict[str, Any]:
    """Wait until every acknowledged id reached the sink, or the target went idle, or timeout."""
    started = time.monotonic()
    last_count, last_change, complete = -1, started, False
    while True:
        count = run.sink.stats()["count"]
        now = time.monotonic()
        if count != last_count:
            last_count, last_change = count, now
        if count >= len(acked) and acked <= set(run.sink.calls()["key"]):
            complete = True
            break
        if now - last_change >= SETTLE_QUIET and instance.pending() == 0:
            break
        if now - started >= timeout:
            break
        time.sleep(0.5)
    return {
        "settle_s": round(time.monotonic() - started, 1),
        "all_acked_delivered": complete,
        "pending_at_end": instance.pending(),
    }


def ms_summary(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds."""
    return {
        f"{name}_ms": round(deliver.percentile(values, pct), 2)
        for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }


def receipt_to_erp(run: Run, sent_file: Path) -> dict[str, Any]:
    """Per acknowledged webhook: the sink's first call for its order minus its send time."""
    calls = run.sink.calls()
    first: dict[str, int] = {}
    for key, at in zip(calls["key"], calls["at_ns"], strict=True):
        first.setdefault(key, at)
    sent = [line.split() for line in sent_file.read_text().splitlines()]
    latencies = [(first[k] - int(ns)) / 1e6 for k, ns in sent if k in first]
    return {"acked": len(sent), "reached_erp": len(latencies), **ms_summary(latencies)}


# --- phases ---------------------------------------------------------------------------------


def load_of(args: argparse.Namespace) -> Load:
    return Load(args.threads, args.connections, args.duration, args.warmup)


def phase_max(run: Run, name: str, bare_rate: float) -> dict[str, Any]:
    """Warm-up, then the measured closed-loop run with wrk."""
    load = load_of(run.args)
    if name == "bare":
        warm = measured = run.requests("bare", BARE_LINES)
    else:
        warm = run.requests(
            f"{name}-warm", math.ceil(min(bare_rate, WARMUP_RATE_CAP) * load.warmup)
        )
    instance = run.instance(name, "max")
    print(f"{name}: max, warm-up {load.warmup:g}s, then {load.duration:g}s", flush=True)
    warmup = ingest.run_wrk(instance, warm, load.warmup, load)
    if name != "bare":
        # Sized from the warm-up's rate with margin, as bench/ingest does; a wrap is reported.
        rate = max(acked_count(warmup) / (warmup["duration_us"] / 1e6) * 2, 500)
        measured = run.requests(f"{name}-max", math.ceil(min(rate, bare_rate) * load.duration))
    run.sink.reset()
    run.quiet(instance)
    result = ingest.run_wrk(instance, measured, load.duration, load)
    erp_calls = run.sink.stats()["count"]
    instance.kill9()
    instance.close()
    seconds = result["duration_us"] / 1e6
    result["acked_per_s"] = round(acked_count(result) / seconds, 1)
    result["erp_calls_per_s"] = round(erp_calls / seconds, 1)
    result["cpu"] = target_cpu(name, result)
    if instance.durable and (result["wraps"] or warmup["wraps"]):
        run.problems.append(f"{name} max: request file exhausted; some requests were repeats")
    if bad := ingest.failures(result):
        run.problems.append(f"{name} max: answers other than 200: {bad}")
    print(
        f"  {result['acked_per_s']:.0f} acknowledged/s, target CPU {result['cpu']['target']:.0f}%,"
        f" other {result['cpu']['other']:.0f}%",
        flush=True,
    )
    return {"warmup": warmup, "max": result}


def openloop_options(instance: Instance, label: str) -> tuple[Path, Path, list[str]]:
    """(acked file, sent file, options) for bench/openloop.py against ``instance``.

    Any 2xx acknowledges (the guide answers "queued"). The guide's sync workers close every
    connection after one answer, so connections opened before the clock starts would only sit
    in its accept queue, behind workers blocked reading idle ones: none are opened for it.
    """
    acked, sent = instance.run.scratch / f"{label}.acked", instance.run.scratch / f"{label}.sent"
    options = ["--ack-2xx", f"--sent={sent}"]
    if isinstance(instance, Guide):
        options.append("--prewarm=0")
    return acked, sent, options


def openloop(
    instance: Instance, label: str, requests: Path, rate: float, seconds: float
) -> tuple[dict[str, Any], set[str], Path]:
    """A fixed-rate run; its result, the acknowledged ids and the file of their send times."""
    acked, sent, options = openloop_options(instance, label)
    result = ingest.run_openloop(instance, requests, rate, seconds, acked, *options)
    return result, set(acked.read_text().split()), sent


def phase_fixed(run: Run, name: str, rate: float) -> dict[str, Any]:
    """Acknowledgement and receipt-to-ERP latency at ``rate``, then receipt-to-ERP when light."""
    args = run.args
    warm = run.requests(f"{name}-fixed-warm", math.ceil(rate * args.fixed_warmup))
    measured = run.requests(f"{name}-fixed", math.ceil(rate * args.fixed_duration))
    light_file = run.requests(f"{name}-light", math.ceil(args.light_rate * args.light_duration))
    instance = run.instance(name, "fixed")
    print(f"{name}: fixed {rate:g}/s, {args.fixed_warmup:g}s warm-up, {args.fixed_duration:g}s")
    _, warm_acked, _ = openloop(instance, f"{name}-fixed-warm", warm, rate, args.fixed_warmup)
    if instance.durable:
        settle(run, instance, warm_acked, args.settle)
    run.sink.reset()
    run.quiet(instance)
    started = time.monotonic()
    with ingest.cpu_usage(instance.pids()) as usage:
        result, acked, sent = openloop(
            instance, f"{name}-fixed", measured, rate, args.fixed_duration
        )
        if instance.durable:
            result["settle"] = settle(run, instance, acked, args.settle)
    window = time.monotonic() - started
    result["cpu"] = target_cpu(name, result)
    result["cpu_until_delivered"] = target_cpu(name, usage)
    result["cpu_window_s"] = round(window, 2)
    result["cpu_ms_per_webhook"] = round(
        result["cpu_until_delivered"]["target"] * 10 * window / max(1, len(acked)), 3
    )
    found: dict[str, Any] = {"fixed": result}
    if ingest.failures(result):
        run.problems.append(f"{name} fixed: failures {ingest.failures(result)}")
    if instance.durable:
        result["receipt_to_erp"] = receipt_to_erp(run, sent)
        run.sink.reset()
        run.quiet(instance)
        print(f"{name}: light {args.light_rate:g}/s for {args.light_duration:g}s", flush=True)
        light, light_acked, light_sent = openloop(
            instance, f"{name}-light", light_file, args.light_rate, args.light_duration
        )
        light["settle"] = settle(run, instance, light_acked, args.settle)
        light["receipt_to_erp"] = receipt_to_erp(run, light_sent)
        found["light"] = light
    instance.kill9()
    instance.close()
    lat = result["latency_ms"]
    print(f"  ack p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms", flush=True)
    return found


def kill_schedule(args: argparse.Namespace) -> list[float]:
    """Seconds after the stream starts at which to kill: the same for every target."""
    rng = random.Random(args.seed)
    times, k = [], 1
    while (at := args.kill_interval * (k + rng.uniform(-0.25, 0.25))) < args.kill_duration - 1:
        times.append(at)
        k += 1
    return times


def wait_in_flight(instance: Instance, limit: float = 1.0) -> int:
    """Wait (up to ``limit`` s) until the target holds an event on its way to the ERP."""
    deadline = time.monotonic() + limit
    while (held := instance.in_flight()) == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    return held


def kill_once(run: Run, instance: Instance, mode: str, began: float) -> dict[str, Any]:
    """One kill -9 and restart of ``instance`` (see phase_kill for the modes)."""
    erp_down = 0.0
    read_before_kill: tuple[int, int] | None = None
    if mode == "erp-outage":
        # The sink keeps its calls in a file (Sink(record=True)), so killing it forgets none.
        # This script once read its calls just before the kill instead, and missed those the
        # sink answered in between: counted afterwards as "answered as the sink was killed".
        seen = len(run.sink.calls()["key"])
        erp_down = time.monotonic()
        kill_group(run.sink.process)
        read_before_kill = (seen, time.time_ns())
        time.sleep(run.args.outage)
    held = wait_in_flight(instance) if mode == "in-flight" else instance.in_flight()
    killed = time.monotonic()
    instance.restart()
    restarted = time.monotonic()
    if mode == "erp-outage":
        run.sink.start()
    return {
        "at_s": round(killed - began, 2),
        "down_s": round(restarted - killed, 2),
        "in_flight_seen": held,
        "erp_down_s": round(time.monotonic() - erp_down, 2) if erp_down else 0.0,
        "read_before_kill": read_before_kill,
    }


def phase_kill(run: Run, name: str, mode: str) -> dict[str, Any]:
    """A sustained stream with kill -9 and restart of the target on a schedule; then count.

    ``mode`` "any": kill at the scheduled moment. "in-flight": from the scheduled moment, wait
    (up to 1 s) until the target holds an event it has taken up for the ERP and not yet
    completed (syncd: a leased outbox row; the guide: a worker thread out of BRPOP), then kill.
    "erp-outage": at the scheduled moment the ERP sink is killed, ``--outage`` s later the
    target is killed and restarted, then the sink is started again (an ERP outage during which
    the receiving side keeps acknowledging and the delivering side keeps retrying).
    """
    args = run.args
    label = f"{name}-kill-{mode}"
    requests = run.requests(label, math.ceil(args.kill_rate * args.kill_duration))
    instance = run.instance(name, f"kill_{mode.replace('-', '_')}")
    acked_file, _sent, options = openloop_options(instance, label)
    argv = [str(PYTHON), str(BENCH / "openloop.py"), f"--port={instance.port}"]
    argv += [f"--requests={requests}", f"--rate={args.kill_rate:g}"]
    argv += [f"--duration={args.kill_duration:g}", f"--acked={acked_file}", *options]
    argv += ["--timeout=5"]
    run.sink.reset()
    run.quiet(instance)
    print(
        f"{name}: kill -9 ({mode}) every ~{args.kill_interval:g}s under {args.kill_rate:g}/s "
        f"for {args.kill_duration:g}s",
        flush=True,
    )
    kills: list[dict[str, Any]] = []
    loadgen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        began = time.monotonic()
        for at in kill_schedule(args):
            time.sleep(max(0.0, began + at - time.monotonic()))
            kills.append(kill_once(run, instance, mode, began))
        out, _ = loadgen.communicate(timeout=args.kill_duration + 60)
    finally:
        if loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
    if loadgen.returncode != 0:
        raise BenchError(f"openloop failed in {label} ({loadgen.returncode})")
    stream = json.loads(out)
    acked = set(acked_file.read_text().split())
    settled = settle(run, instance, acked, args.settle)
    calls = run.sink.calls()
    delivered = set(calls["key"])
    last_moment = sum(
        sum(1 for at in calls["at_ns"][seen:] if at <= killed_ns)
        for seen, killed_ns in (k["read_before_kill"] for k in kills if k["read_before_kill"])
    )
    instance.kill9()
    instance.close()
    lost = sorted(acked - delivered)
    result = {
        "mode": mode,
        "rate": args.kill_rate,
        "duration_s": args.kill_duration,
        "kills": kills,
        "sent": stream["scheduled"],
        "acked": len(acked),
        "not_acked": stream["scheduled"] - len(acked),
        "statuses": stream["statuses"],
        "errors": stream["errors"],
        "erp_calls": len(calls["key"]),
        "delivered": len(acked & delivered),
        "lost": len(lost),
        "lost_ids": lost[:50],
        "delivered_not_acked": len(delivered - acked),
        "duplicate_calls": len(calls["key"]) - len(delivered),
        "answered_as_the_sink_was_killed": last_moment,
        **settled,
    }
    if name != "guide" and lost:
        run.problems.append(
            f"{name} kill -9 ({mode}): {len(lost)} acknowledged webhooks never delivered"
        )
    print(
        f"  {len(kills)} kills, {len(acked)} acknowledged, {len(lost)} never delivered, "
        f"{result['duplicate_calls']} duplicate calls, settled in {settled['settle_s']:g}s"
        + (f", {last_moment} answered as the sink was killed" if mode == "erp-outage" else ""),
        flush=True,
    )
    return result


def execute(run: Run) -> None:
    """Every phase, in order, over the chosen targets; results accumulate in run.results."""
    names = run.args.targets
    targets: dict[str, dict[str, Any]] = run.results["targets"]
    bare_rate = 25_000.0
    for name in names:
        targets[name] = phase_max(run, name, bare_rate)
        if name == "bare":
            bare_rate = targets[name]["max"]["acked_per_s"]
    durable = [n for n in names if n in DURABLE]
    slowest = min((targets[n]["max"]["acked_per_s"] for n in durable), default=bare_rate)
    rate = run.args.rate or round(run.args.fraction * slowest)
    run.results["fixed_rate"] = rate
    for name in names:
        targets[name].update(phase_fixed(run, name, rate))
    for mode in run.args.kill_modes:
        for name in durable:
            targets[name].setdefault("kill", {})[mode] = phase_kill(run, name, mode)


# --- report ---------------------------------------------------------------------------------


def _ratio(value: float, base: float) -> str:
    return f"{100 * value / base:.0f}%" if base else "n/a"


def _pair(r: dict[str, Any] | None) -> str:
    if not r:
        return "n/a"
    return f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"


def _per_cpu(target: dict[str, Any]) -> float:
    """Accepted webhooks per CPU-second of the target's own processes at max load."""
    m = target["max"]
    return float(m["acked_per_s"] / max(m["cpu"]["target"], 1.0) * 100)


def main_table(results: dict[str, Any]) -> list[str]:
    """Throughput, latency and CPU per target, with ratios to bare."""
    targets = results["targets"]
    bare = targets.get("bare")
    rows = [
        "| target | accepted/s | vs bare | target CPU % at max | accepted per target CPU-s "
        "| vs bare | ERP calls/s during max | ack p50 ms | ack p99 ms | p99 vs bare "
        f"| receipt→ERP p50 / p99 ms at {results['fixed_rate']:g}/s "
        f"| receipt→ERP p50 / p99 ms at {results['light_rate']:g}/s "
        "| CPU ms per webhook, received to delivered | other CPU % max / fixed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, t in targets.items():
        m, f = t["max"], t["fixed"]
        lat = f["latency_ms"]
        vs_rate = vs_eff = vs_p99 = "n/a"
        if bare:
            vs_rate = _ratio(m["acked_per_s"], bare["max"]["acked_per_s"])
            vs_eff = _ratio(_per_cpu(t), _per_cpu(bare))
            vs_p99 = f"{lat['p99'] / bare['fixed']['latency_ms']['p99']:.1f}x"
        cpu_ms = "n/a" if name == "bare" else f"{f['cpu_ms_per_webhook']:.2f}"
        erp = "n/a" if name == "bare" else f"{m['erp_calls_per_s']:.0f}"
        light = t.get("light", {}).get("receipt_to_erp")
        rows.append(
            f"| {name} | {m['acked_per_s']:.0f} | {vs_rate} | {m['cpu']['target']:.0f} "
            f"| {_per_cpu(t):.0f} | {vs_eff} | {erp} | {lat['p50']:.2f} | {lat['p99']:.2f} "
            f"| {vs_p99} | {_pair(f.get('receipt_to_erp'))} | {_pair(light)} | {cpu_ms} "
            f"| {m['cpu']['other']:.0f} / {f['cpu']['other']:.0f} |"
        )
    return rows


def kill_table(results: dict[str, Any]) -> list[str]:
    """What each durable target lost under kill -9."""
    rows = [
        "| target | kill at | rate/s | kills | kills with an event in flight | sent | acknowledged "
        "| not acknowledged | delivered "
        "| **acknowledged, never delivered** | delivered, not acknowledged | duplicate ERP calls "
        "| restart s (mean) | settle s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kills = [(n, k) for n, t in results["targets"].items() for k in t.get("kill", {}).values()]
    for name, k in sorted(kills, key=lambda x: x[1]["mode"]):
        down = sum(x["down_s"] for x in k["kills"]) / max(1, len(k["kills"]))
        held = sum(x["in_flight_seen"] > 0 for x in k["kills"])
        rows.append(
            f"| {name} | {k['mode']} | {k['rate']:g} | {len(k['kills'])} | {held} | {k['sent']} "
            f"| {k['acked']} "
            f"| {k['not_acked']} | {k['delivered']} | **{k['lost']}** "
            f"| {k['delivered_not_acked']} | {k['duplicate_calls']} | {down:.2f} "
            f"| {k['settle_s']:g} |"
        )
    return rows


def _latency_ratios(results: dict[str, Any], mine: dict[str, Any], guide: dict[str, Any]) -> str:
    """Ack p50 / p99 and receipt-to-ERP p50 (fixed and light rate) as multiples of the guide's."""
    ours, theirs = mine["fixed"]["latency_ms"], guide["fixed"]["latency_ms"]
    text = f"ack p50 {ours['p50'] / theirs['p50']:.2f}x, p99 {ours['p99'] / theirs['p99']:.2f}x"
    for phase, rate in (("fixed", results["fixed_rate"]), ("light", results["light_rate"])):
        a = mine.get(phase, {}).get("receipt_to_erp")
        b = guide.get(phase, {}).get("receipt_to_erp")
        if a and b and b["p50_ms"]:
            text += f", receipt→ERP p50 at {rate:g}/s {a['p50_ms'] / b['p50_ms']:.2f}x"
    return text


def verdict(results: dict[str, Any]) -> list[str]:
    """The target of issue 7: syncd ahead of the guide's design, and 0 lost where it loses."""
    t = results["targets"]
    if "guide" not in t:
        return []
    guide = t["guide"]
    lines = []
    for name in ("sqlite", "postgresql"):
        if name not in t:
            continue
        s = t[name]
        rate = s["max"]["acked_per_s"] / guide["max"]["acked_per_s"]
        line = f"- syncd {name} vs guide: throughput {rate:.2f}x, "
        line += _latency_ratios(results, s, guide) + " (below 1 is faster)"
        for mode in s.get("kill", {}).keys() & guide.get("kill", {}).keys():
            mine, theirs = s["kill"][mode]["lost"], guide["kill"][mode]["lost"]
            line += f"; lost under kill -9 ({mode}): {mine} vs {theirs}"
        lines.append(line)
    if "floor" in t:
        lines.append(
            f"- floor vs guide: {_latency_ratios(results, t['floor'], guide)} (the least a "
            "design that stores a webhook before delivering it does)"
        )
    return lines


def busy_summary(results: dict[str, Any]) -> str:
    """How much CPU other processes used during the measured runs (in % of one core)."""
    values = []
    for t in results["targets"].values():
        values += [t[p]["cpu"]["other"] for p in ("max", "fixed") if p in t]
    if not values:
        return ""
    values.sort()
    return (
        f"other processes during measured runs: min {values[0]:.0f}%, median "
        f"{values[len(values) // 2]:.0f}%, max {values[-1]:.0f}% of one core (of 200%)"
    )


def report(results: dict[str, Any]) -> str:
    env, load = results["environment"], results["load"]
    lines = [
        f"compare, {env['date_utc']}, {env['cpus']} CPUs shared by every process, "
        f"syncd {results['syncd']['source']} at {results['syncd']['git_head'][:12]}"
        + (f", EXPERIMENT: patched with {p}" if (p := results["syncd"].get("patch")) else "")
        + (
            f"; floor: inbox synchronous={results['args']['floor_synchronous']}, "
            f"ERP client {results['args'].get('floor_client', 'aiohttp')}"
            if "floor" in results["targets"]
            else ""
        ),
        f"max: wrk -t{load['threads']} -c{load['connections']} -d{load['duration']:g}s after "
        f"{load['warmup']:g}s; fixed: {results['fixed_rate']:g}/s for "
        f"{results['args']['fixed_duration']:g}s; guide: gunicorn {results['guide']['workers']} "
        f"sync workers, worker {results['guide']['threads']} threads",
        "",
        *main_table(results),
        "",
    ]
    if any("kill" in t for t in results["targets"].values()):
        lines += [
            f"kill -9 every ~{results['args']['kill_interval']:g}s, restarted at once; "
            f"Redis kept running (persistence: {results['guide']['redis_persistence']})",
            "",
            *kill_table(results),
            "",
        ]
    lines += verdict(results)
    if busy := busy_summary(results):
        lines += ["", busy]
    if results["problems"]:
        lines += ["", "PROBLEMS:", *(f"- {p}" for p in results["problems"])]
    return "\n".join(lines) + "\n"


def save(results: dict[str, Any]) -> str:
    """Write the raw numbers and the report to bench/out/; return the report."""
    text = report(results)
    stamp = results["stamp"]
    for name in (f"compare-{stamp}", "compare-latest"):
        (OUT / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (OUT / f"{name}.md").write_text(text)
    return text + f"raw numbers: {OUT / f'compare-{stamp}.json'}\n"


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated ({','.join(TARGETS)})"
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run of every phase")
    p.add_argument("--duration", type=float, default=20, help="wrk seconds (20)")
    p.add_argument("--warmup", type=float, default=5, help="wrk warm-up seconds (5)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--fixed-duration", type=float, default=30, help="seconds (30)")
    p.add_argument("--fixed-warmup", type=float, default=3, help="seconds (3)")
    p.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        help="fixed rate as a share of the slowest durable target's max (0.5)",
    )
    p.add_argument("--rate", type=float, help="fixed rate per second (overrides --fraction)")
    p.add_argument("--light-rate", type=float, default=20, help="receipt-to-ERP when light (20)")
    p.add_argument("--light-duration", type=float, default=15, help="seconds (15)")
    p.add_argument("--kill-rate", type=float, default=300, help="webhooks/s during kill -9 (300)")
    p.add_argument("--kill-duration", type=float, default=45, help="seconds of stream (45)")
    p.add_argument("--kill-interval", type=float, default=5, help="seconds between kills (5)")
    p.add_argument(
        "--kill-modes",
        default="any,in-flight,erp-outage",
        help="comma-separated: 'any' kills on schedule, 'in-flight' waits (up to 1 s) for an "
        "event taken up for the ERP but not confirmed, 'erp-outage' kills while the ERP is "
        "down; empty: no kill -9 scenario (any,in-flight,erp-outage)",
    )
    p.add_argument(
        "--outage", type=float, default=1.5, help="erp-outage: ERP down this long before a kill"
    )
    p.add_argument(
        "--settle",
        type=float,
        default=150,
        help="max seconds to wait for acknowledged webhooks to reach the ERP (150; syncd's "
        "lease of a killed delivery expires after 2 x erp.timeout + 5 s = 35 s)",
    )
    p.add_argument("--guide-workers", type=int, default=4, help="gunicorn sync workers (4)")
    p.add_argument("--guide-threads", type=int, default=8, help="guide worker threads (8)")
    p.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "SYNCD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="admin DSN; a fresh database is created beside it per phase and dropped",
    )
    p.add_argument(
        "--source",
        choices=("worktree", "head"),
        default="worktree",
        help="syncd under test: a copy of the working tree taken at start, or HEAD",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10,
        help="before each measured run, wait up to this many seconds for other processes to "
        f"use less than {ingest.QUIET_LIMIT:g}%% of a core (10)",
    )
    p.add_argument(
        "--floor-synchronous",
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="the floor target's inbox commit: FULL waits for the disk, NORMAL does not (FULL)",
    )
    p.add_argument(
        "--floor-client",
        choices=("aiohttp", "threads"),
        default="aiohttp",
        help="the floor target's ERP calls: aiohttp from the event loop, or http.client "
        "threads fed by the store thread (aiohttp)",
    )
    p.add_argument("--seed", type=int, default=7, help="payloads and kill schedule (7)")
    p.add_argument(
        "--patch",
        default="",
        help="experiment: patch syncd with bench/experiments "
        f"({', '.join(ingest.EXPERIMENTS)}); reported with the results",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch dirs (logs, dbs)")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    args.targets = [t for t in args.targets.split(",") if t]
    args.kill_modes = [m for m in args.kill_modes.split(",") if m]
    if unknown := set(args.kill_modes) - {"any", "in-flight", "erp-outage"}:
        p.error(f"unknown kill modes: {', '.join(sorted(unknown))}")
    if unknown := set(args.targets) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if unknown := set(filter(None, args.patch.split(","))) - set(ingest.EXPERIMENTS):
        p.error(f"unknown --patch {', '.join(sorted(unknown))}")
    return args


def environment(client: redis.Redis) -> dict[str, Any]:
    """bench/ingest's description of the machine, plus the peer's versions and Redis."""
    info = client.info("server")
    return {
        **ingest.environment(),
        **{name: metadata.version(name) for name in ("flask", "gunicorn", "redis")},
        "redis_server": info.get("redis_version", "?"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def redis_persistence(client: redis.Redis) -> str:
    """Redis's RDB and AOF settings, in words."""
    save_rule = client.config_get("save").get("save", "")
    aof = client.config_get("appendonly").get("appendonly", "no")
    rdb = f"RDB save '{save_rule}'" if save_rule else "no RDB snapshots"
    return f"{rdb}, appendonly {aof}"


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool, hint in (("wrk", "apt-get install wrk"), (str(GUNICORN), "make bench")):
        if shutil.which(tool) is None:
            print(f"bench/compare: {tool} is not installed ({hint})", file=sys.stderr)
            return 2
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"bench/compare: no Redis on {REDIS_HOST}:{REDIS_PORT}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_exit)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "stamp": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "argv": sys.argv,
        "args": {k: v for k, v in vars(args).items()},
        "environment": environment(client),
        "load": load_of(args).__dict__,
        "light_rate": args.light_rate,
        "guide": {
            "workers": args.guide_workers,
            "threads": args.guide_threads,
            "redis_persistence": redis_persistence(client),
        },
        "targets": {},
    }
    began = time.monotonic()
    with ExitStack() as stack:
        stack.callback(client.close)
        scratch, fast = ingest.scratch_dirs(stack, args.keep)
        (scratch / "src").mkdir()
        results["syncd"] = deliver.snapshot(args.source, scratch / "src")
        env = {**os.environ, "PYTHONPATH": str(scratch / "src")}
        if args.patch:
            # Applied by bench/experiments/sitecustomize.py in syncd's process only.
            paths = [str(ingest.BENCH / "experiments"), env["PYTHONPATH"]]
            env["PYTHONPATH"] = os.pathsep.join(paths)
            env["SYNCD_BENCH_PATCHES"] = args.patch
            results["syncd"]["patch"] = args.patch
        sink = deliver.Sink(scratch, record=True)
        stack.callback(sink.process.stop)
        sink.start()
        run = Run(args, scratch, fast, stack, sink, client, env, Payloads(args.seed), results)
        results["problems"] = run.problems
        try:
            execute(run)
        except BenchError as exc:
            print(f"bench/compare: {exc}", file=sys.stderr)
            return 1
    results["wall_seconds"] = round(time.monotonic() - began, 1)
    results["environment"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    print()
    print(save(results), end="")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
