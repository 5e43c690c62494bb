"""kill -9 of syncd, again and again, during a sustained webhook burst and pending deliveries."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from syncd.testing import ErpCall
from tests.conftest import PgDatabases
from tests.reliability.conftest import FULL, LogScan
from tests.reliability.harness import Rig

#: Seconds of activity, seconds of uptime between kills, orders at the start.
DURATION, INTERVAL, ORDERS = (120.0, 3.0, 1000) if FULL else (16.0, 3.0, 100)


def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}"
    databases: PgDatabases = request.getfixturevalue("pg_databases")
    return databases.create()


async def slow_erp(_call: ErpCall) -> None:
    # A little ERP latency keeps deliveries in flight when the kill comes.
    await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_kill_9_during_a_burst_loses_nothing_and_repeats_nothing(
    backend: str, tmp_path: Path, log_scan: LogScan, request: pytest.FixtureRequest
) -> None:
    """Every acknowledged callback is in the store, every state MasonHub reached is in the
    ERP, and nothing took effect twice (a repeated Idempotency-Key is a harmless retry)."""
    async with Rig(tmp_path, store_url(backend, tmp_path, request), log_scan) as rig:
        rig.erp.outage = slow_erp
        restarts: list[asyncio.Task[None]] = []
        next_kill: float | None = INTERVAL

        async def restart() -> None:
            await rig.daemon.kill()
            await rig.daemon.start()

        async def kill_now_and_then(elapsed: float) -> None:
            # The clock to the next kill starts once the daemon is ready again: counted from
            # the kill, a slow start would leave it up for only a moment per cycle, and
            # MasonHub's retries would run out against a daemon that is almost never there.
            nonlocal next_kill
            if any(not t.done() for t in restarts):
                return
            if next_kill is None:
                next_kill = elapsed + INTERVAL
            elif elapsed >= next_kill:
                restarts.append(asyncio.create_task(restart()))
                next_kill = None

        await rig.drive(DURATION, orders=ORDERS, during=kill_now_and_then)
        await asyncio.gather(*restarts)
        live, _nightly = await rig.prove(f"kill -9 x{rig.daemon.kills} on {backend}")
        assert rig.daemon.kills >= 2, "fewer kills than the scenario is about"
        assert live.acknowledged > ORDERS
        assert live.callbacks["failed"] == 0, "MasonHub gave up on a callback"
