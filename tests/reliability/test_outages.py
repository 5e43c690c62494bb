"""The ERP and the store go away under load, then come back: nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from aiohttp import web

from syncd.testing import ErpCall
from tests.reliability.conftest import FULL, LogScan
from tests.reliability.harness import Rig, private_postgres

#: Seconds each outage phase lasts (SYNCD_RELIABILITY_OUTAGE overrides).
OUTAGE = float(os.environ.get("SYNCD_RELIABILITY_OUTAGE", 30 if FULL else 4))
#: The store outage the issue names: PostgreSQL stopped for 20 s.
STORE_OUTAGE = float(os.environ.get("SYNCD_RELIABILITY_STORE_OUTAGE", 20))
ORDERS = 1000 if FULL else 80
ERP_TIMEOUT = 1.0


async def test_erp_refuses_then_fails_then_hangs_then_recovers(
    tmp_path: Path, log_scan: LogScan
) -> None:
    """Connection refused, then 503s, then answers slower than erp.timeout (which still take
    effect, late), each for OUTAGE s: afterwards every state is delivered, none twice."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}"
    async with Rig(tmp_path, url, log_scan, erp_timeout=ERP_TIMEOUT) as rig:
        assert rig.erp_proxy is not None
        seen = {"503": 0, "slow": 0}

        async def unavailable(_call: ErpCall) -> web.Response:
            seen["503"] += 1
            return web.json_response({"error": "maintenance"}, status=503)

        async def slow(_call: ErpCall) -> None:
            seen["slow"] += 1
            await asyncio.sleep(ERP_TIMEOUT + 0.5)  # then takes effect: syncd gave up waiting

        phase = 0

        async def outages(elapsed: float) -> None:
            nonlocal phase
            assert rig.erp_proxy is not None
            if phase == 0 and elapsed >= 1:
                await rig.erp_proxy.cut()
            elif phase == 1 and elapsed >= 1 + OUTAGE:
                await rig.erp_proxy.restore()
                rig.erp.outage = unavailable
            elif phase == 2 and elapsed >= 1 + 2 * OUTAGE:
                rig.erp.outage = slow
            elif phase == 3 and elapsed >= 1 + 3 * OUTAGE:
                rig.erp.outage = None
            else:
                return
            phase += 1

        await rig.drive(3 + 3 * OUTAGE, orders=ORDERS, during=outages)
        await rig.prove(f"ERP outage {OUTAGE} s x3 {seen}")
        assert phase == 4
        assert seen["503"] > 0, "no call met the 503 phase"
        assert seen["slow"] > 0, "no call met the slow phase"


async def test_postgresql_stopped_under_load_answers_503_and_recovers_without_restart(
    tmp_path: Path, log_scan: LogScan
) -> None:
    """PostgreSQL crashes (immediate stop) for STORE_OUTAGE s while webhooks keep coming:
    they are answered 503 meanwhile, none acknowledged is lost, and the same daemon process
    carries on once the server is back."""
    with private_postgres() as postgres:
        async with Rig(tmp_path, postgres.url, log_scan) as rig:
            loop = asyncio.get_running_loop()
            window: dict[str, float] = {}
            pid = rig.daemon.pid

            async def outage(elapsed: float) -> None:
                if "down" not in window and elapsed >= 2:
                    await asyncio.to_thread(postgres.stop, "immediate")
                    window["down"] = loop.time()
                elif "up" not in window and "down" in window and elapsed >= 2 + STORE_OUTAGE:
                    await asyncio.to_thread(postgres.start)
                    window["up"] = loop.time()

            await rig.drive(6 + STORE_OUTAGE, orders=ORDERS, during=outage)
            await rig.daemon.wait_ready()
            await rig.prove(f"store outage {STORE_OUTAGE} s", within=180)
            sent = rig.sim.sender.sent
            # Answers that came back well inside the outage (a second of margin each side
            # for requests that committed just before the stop).
            inside = [a for a in sent if window["down"] + 1 <= a.at <= window["up"] - 1]
            statuses = {a.status for a in inside}
            errors = Counter(a.error for a in inside if a.status is None)
            print(f"answers while the store was down: {statuses}, errors {dict(errors)}")
            assert rig.daemon.pid == pid, "the daemon was restarted"
            assert rig.daemon.alive
            assert rig.daemon.starts == 1
            assert inside, "no webhook arrived during the outage"
            # Every answer was 503. At full scale some requests also time out in the
            # simulator's own connection queue (thousands of retries through 100
            # connections): not answers, and not acknowledgements either.
            assert 503 in statuses, f"no 503 while the store was down: {statuses}"
            answered = statuses - {None}
            assert answered == {503}, f"answers other than 503 while the store was down: {statuses}"
            assert set(errors) <= {"TimeoutError"}, errors
