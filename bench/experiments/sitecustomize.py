"""Experiments for bench/ingest.py: patches applied to syncd in the daemon, never in syncd/.

``bench/ingest.py --patch NAME[,NAME]`` puts this directory first on the daemon's PYTHONPATH
and names the patches in ``SYNCD_BENCH_PATCHES``; Python imports this module at start-up.
They reach into syncd's internals as of the revision bench/RESULTS.md names; a patch
that no longer fits makes the daemon fail to start, loudly.
Results measured with a patch are marked EXPERIMENT in the report.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


def ingest_only() -> None:
    """The merge loop finds nothing to merge, so deliveries never start: only receiving and
    the group commit use the CPU (both loops still tick, so the daemon stays healthy)."""
    from syncd import store

    async def process_inbox(_self: Any, *_args: Any, **_kwargs: Any) -> Any:
        return store.ProcessResult()

    store.SqlStore.process_inbox = process_inbox


def executemany() -> None:
    """The inbox INSERT as one constant, cached statement with executemany parameters."""
    from syncd import store

    async def add_messages(self: Any, messages: Sequence[Any]) -> list[bool]:
        first: dict[str, int] = {}
        for index, message in enumerate(messages):
            first.setdefault(message.dedupe_key, index)
        rows = [store._message_row(messages[i]) for i in first.values()]
        stmt = self.__dict__.get("_bench_insert")
        if stmt is None:
            stmt = self.__dict__["_bench_insert"] = (
                store._insert(self.dialect, store.inbox)
                .on_conflict_do_nothing(index_elements=["dedupe_key"])
                .returning(store.inbox.c.dedupe_key)
            )
        async with self._begin() as conn:
            inserted = set((await conn.execute(stmt, rows)).scalars())
        return [
            first[m.dedupe_key] == i and m.dedupe_key in inserted for i, m in enumerate(messages)
        ]

    store.SqlStore.add_messages = add_messages


def locktrace() -> None:
    """Every 5 s, log per task how long SQLite writers waited for and held the write lock."""
    import asyncio
    import contextlib
    import json
    import re
    import sys
    import time
    from collections import defaultdict

    from syncd import store

    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])

    def who() -> str:
        task = asyncio.current_task()
        name = task.get_name() if task else "?"
        if name.startswith("Task-") and task is not None:
            name = getattr(task.get_coro(), "__qualname__", name)
        return re.sub(r"\.\d+$", ".*", name)

    async def dump() -> None:
        while True:
            await asyncio.sleep(5)
            rows = {
                k: {
                    "n": int(n),
                    "wait_ms_mean": round(1000 * w / n, 2),
                    "wait_ms_max": round(1000 * wm, 1),
                    "hold_ms_mean": round(1000 * h / n, 2),
                    "hold_ms_max": round(1000 * hm, 1),
                }
                for k, (n, w, wm, h, hm) in stats.items()
            }
            sys.stdout.write(json.dumps({"event": "bench.locktrace", "writers": rows}) + "\n")
            sys.stdout.flush()

    dumper: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def _begin(self: Any) -> Any:
        if not dumper:
            dumper.append(asyncio.get_running_loop().create_task(dump()))
        lock = self._write_lock or contextlib.nullcontext()
        asked = time.perf_counter()
        async with lock:
            got = time.perf_counter()
            try:
                async with self.engine.begin() as conn:
                    yield conn
            except store._UNAVAILABLE as exc:
                raise store.StoreUnavailable(f"event store unavailable: {exc!r}") from exc
            finally:
                row = stats[who()]
                wait, hold = got - asked, time.perf_counter() - got
                row[0] += 1
                row[1] += wait
                row[2] = max(row[2], wait)
                row[3] += hold
                row[4] = max(row[4], hold)

    store.SqlStore._begin = _begin


def sqllog() -> None:
    """SQLAlchemy logs every statement and its cache use ([generated], [cached since], [no key])."""
    import logging

    logging.getLogger("sqlalchemy.engine.Engine").setLevel(logging.INFO)


def no_linger() -> None:
    """The merge never yields to webhook commits and the dispatcher claims as soon as one
    worker is free (MERGE_LINGER = CLAIM_LINGER = 0): the pacing before it was added."""
    from syncd import delivery, merge

    merge.MERGE_LINGER = 0.0
    delivery.CLAIM_LINGER = 0.0


def merge_linger(seconds: float) -> Callable[[], None]:
    """The merge waits ``seconds`` (instead of MERGE_LINGER) after a pass while webhook
    commits are busy: the latency to the ERP against the transactions per second."""

    def patch() -> None:
        from syncd import merge

        merge.MERGE_LINGER = seconds

    return patch


def switch_1ms() -> None:
    """The GIL switch interval at 1 ms instead of 5 ms: the event loop thread waits less for
    the GIL while the SQLite store thread runs a transaction. ``syncd run`` does this itself
    since 2026-12-05 (syncd.cli.SWITCH_INTERVAL); the patch matters only with ``--rev`` older."""
    import sys

    sys.setswitchinterval(0.001)


class _CommitsFirst:
    """An asyncio lock that hands over to a waiting webhook commit before anyone else."""

    def __init__(self) -> None:
        self._held = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._others: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        task = asyncio.current_task()
        urgent = task is not None and task.get_name() == "syncd.inbox.group-commit"
        queue = self._urgent if urgent else self._others
        waiter = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        try:
            await waiter  # handed over with _held still True
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._hand_over()
            elif waiter in queue:
                queue.remove(waiter)
            raise

    async def __aexit__(self, *_exc: object) -> None:
        self._hand_over()

    def _hand_over(self) -> None:
        for queue in (self._urgent, self._others):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self._held = False


def commits_first() -> None:
    """SQLite: webhook commits go ahead of every other writer waiting for the write lock
    (merge, delivery claims and completions wait in arrival order behind them)."""
    from syncd import store

    init = store.SqlStore.__init__

    def patched(self: Any, url: str) -> None:
        init(self, url)
        if self._write_lock is not None:
            self._write_lock = _CommitsFirst()

    store.SqlStore.__init__ = patched  # type: ignore[method-assign]


def merge_small() -> None:
    """While webhook commits are busy the merge takes at most 32 messages per transaction
    (200 otherwise), so a commit never waits behind a long merge. syncd does this itself
    since 2026-12-05 (syncd.merge.BUSY_BATCH); the patch matters only with an older ``--rev``."""
    from syncd import merge

    async def drain_once(self: Any) -> int:
        total = 0
        while True:
            limit = 32 if self._busy is not None and self._busy() else self._batch
            result = await self._store.process_inbox(limit=limit)
            total += int(result.messages)
            if result.queued and self._on_queued is not None:
                self._on_queued()
            if self._on_snapshot is not None:
                for url in result.snapshots:
                    self._on_snapshot(url)
            if result.messages < limit:
                return total

    merge.Merger.drain_once = drain_once  # type: ignore[method-assign]


def no_access_log() -> None:
    """The receiver writes no line per request (what the access log costs)."""
    from syncd import receiver

    receiver._log_answer = lambda *_args, **_kwargs: None


def lean_access_log() -> None:
    """The receiver's line per request written straight with orjson, past structlog's chain:
    the revision's own fields, handed to a logger that renders them itself. syncd does this
    itself since 2026-12-05 (``syncd.logs.log_line``, and the receiver has no ``log``); the
    patch matters only with an older ``--rev``."""
    import sys
    from datetime import UTC, datetime

    import orjson

    from syncd import receiver

    def write(level: str) -> Callable[..., None]:
        def line(event: str, **fields: Any) -> None:
            fields.update(event=event, level=level)
            fields["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            sys.stdout.write(orjson.dumps(fields).decode() + "\n")
            sys.stdout.flush()

        return line

    class Lean:
        info = staticmethod(write("info"))
        warning = staticmethod(write("warning"))

    receiver.log = Lean()  # type: ignore[attr-defined]


def use_uvloop() -> None:
    """uvloop's event loop instead of asyncio's default (needs ``pip install uvloop``)."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


PATCHES: dict[str, Callable[[], None]] = {
    "uvloop": use_uvloop,
    "no-access-log": no_access_log,
    "lean-access-log": lean_access_log,
    "merge-small": merge_small,
    "commits-first": commits_first,
    "ingest-only": ingest_only,
    "no-linger": no_linger,
    "merge-linger-5ms": merge_linger(0.005),
    "merge-linger-10ms": merge_linger(0.01),
    "executemany": executemany,
    "locktrace": locktrace,
    "sqllog": sqllog,
    "switch-1ms": switch_1ms,
}

for _name in filter(None, os.environ.get("SYNCD_BENCH_PATCHES", "").split(",")):
    PATCHES[_name]()
