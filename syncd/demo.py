"""`syncd demo`: the whole system on one machine, with the faults real webhooks have.

Starts the MasonHub simulator, a tiny local ERP that records what it is told, and the real
daemon on SQLite in a temporary state directory, all on loopback. Drives orders through
their lifecycle while the simulator drops, duplicates and reorders callbacks and the ERP
sometimes fails, then runs a reconciliation pass and compares MasonHub's state with the
ERP's: every order's tracking numbers and every SKU's counts. Exit 0 only if all match.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp import web

from syncd.app import METRICS, STORE, create_app
from syncd.config import Settings, settings_from_dict
from syncd.masonhub import MasonHubClient
from syncd.messages import MESSAGE_TYPES
from syncd.metrics import Metrics
from syncd.poller import JOBS, Poller
from syncd.simulator import Simulator
from syncd.testing import ErpCall, LocalErp

log = structlog.get_logger(__name__)


@dataclass
class Comparison:
    """MasonHub's state beside the ERP's."""

    orders: int = 0
    orders_matched: int = 0
    skus: int = 0
    skus_matched: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything matched."""
        return self.orders == self.orders_matched and self.skus == self.skus_matched


def _total(metrics: Metrics, name: str, **labels: str) -> int:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return int(total)


def summary_line(sim: Simulator, erp: LocalErp, metrics: Metrics, elapsed: float) -> str:
    """The live summary: callbacks, duplicates, deliveries, retries, corrections."""
    received = "syncd_webhooks_received_total"
    new = _total(metrics, received, outcome="received")
    return (
        f"{elapsed:5.1f}s  callbacks sent {len(sim.sender.sent):5d} "
        f"(dropped {len(sim.sender.dropped)})  received {new:5d}  "
        f"duplicates {_total(metrics, received, outcome='duplicate'):4d}  "
        f"ERP calls {len(erp.calls):5d}  retries {_total(metrics, 'syncd_erp_retries_total'):4d}  "
        f"corrections {_total(metrics, 'syncd_reconcile_corrections_total'):4d}"
    )


def compare(sim: Simulator, erp: LocalErp) -> Comparison:
    """Every order's tracking numbers and every SKU's counts, MasonHub against the ERP."""
    result = Comparison()
    for order in sim.world.orders:
        result.orders += 1
        expected = sorted(s.tracking_number for s in order.shipments)
        record = erp.records.get(f"/api/orders/{order.customer_identifier}") or {}
        got = sorted(
            s["tracking_number"] for s in record.get("shipments", []) if s.get("tracking_number")
        )
        if expected == got:
            result.orders_matched += 1
        else:
            result.mismatches.append(
                f"order {order.customer_identifier}: MasonHub {expected}, ERP {got}"
            )
    for sku in sim.world.skus:
        result.skus += 1
        record = erp.records.get(f"/api/inventory/{sku.customer_identifier}") or {}
        counts = (sku.total_units, sku.total_available_to_sell)
        told = (record.get("total_units"), record.get("total_available_to_sell"))
        if counts == told:
            result.skus_matched += 1
        else:
            result.mismatches.append(
                f"sku {sku.customer_identifier}: MasonHub {counts}, ERP {told}"
            )
    return result


def demo_settings(state: Path, sim: Simulator, erp_url: str, secret: str) -> Settings:
    """The daemon's settings: SQLite in ``state``, everything on loopback, short polls."""
    poll = {job: {"every": "2s", "lookback": "1m"} for job in JOBS}
    return settings_from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "store": {"url": f"sqlite+aiosqlite:///{state / 'syncd.db'}", "auto_migrate": True},
            "masonhub": {"base_url": sim.base_url, "token": sim.token, "timeout": "10s"},
            "webhooks": {"signing_secrets": [secret]},
            "erp": {
                "base_url": erp_url,
                "token": "demo-erp-token",
                "timeout": "5s",
                "concurrency": 8,
                "backoff_initial": "200ms",
                "backoff_max": "2s",
            },
            "poll": poll,
            "reconcile": {"window": "1d"},
        },
        environ={},
    )


def flaky(rng: random.Random, rate: float) -> Any:
    """An ERP responder that answers 503 to a share of calls."""

    async def respond(_call: ErpCall) -> web.Response | None:
        if rng.random() < rate:
            return web.json_response({"error": "demo outage"}, status=503)
        return None

    return respond


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> Any:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The daemon's JSON lines would drown the summary: keep warnings and worse only."""
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        yield
    finally:
        structlog.reset_defaults()


async def drive(sim: Simulator, orders: int, duration: float, out: TextIO, status: Any) -> None:
    """Create orders, then move them along until all are delivered or time is up."""
    world = sim.world
    world.create_orders(orders)
    started = time.monotonic()
    last_print = 0.0
    while time.monotonic() - started < duration and world.active_orders:
        world.advance_all(1)
        if world.rng.random() < 0.3:
            world.step(3)
        await asyncio.sleep(0.25)
        if time.monotonic() - last_print >= 1.0:
            last_print = time.monotonic()
            out.write(status(time.monotonic() - started) + "\n")
            out.flush()


async def run_demo(
    *, orders: int = 200, duration: float = 60.0, seed: int = 1, out: TextIO = sys.stdout
) -> bool:
    """Run the demo; True if the ERP ends up matching MasonHub exactly."""
    secret = secrets.token_hex(16)
    rng = random.Random(seed)  # noqa: S311 (fault injection, not security)
    sim = Simulator(
        seed=seed,
        signing_secret=secret,
        drop_rate=0.05,
        duplicate_rate=0.05,
        reorder_window=0.3,
        time_factor=0.002,
    )
    erp = LocalErp()
    erp.respond = flaky(rng, 0.03)
    with tempfile.TemporaryDirectory(prefix="syncd-demo-") as state, quiet_logs():
        await sim.start()
        async with serving(erp.app()) as erp_port:
            settings = demo_settings(Path(state), sim, f"http://127.0.0.1:{erp_port}/api", secret)
            app = create_app(settings)
            async with serving(app) as port:
                for message_type in MESSAGE_TYPES:
                    url = f"http://127.0.0.1:{port}/webhooks/masonhub/{message_type}"
                    sim.register_callback(url, message_type)
                out.write(
                    f"simulator {sim.base_url}, syncd http://127.0.0.1:{port}, ERP port "
                    f"{erp_port}, state {state}\nfaults: 5% of callbacks dropped, 5% duplicated, "
                    "reordered within 0.3 s; 3% of ERP calls answered 503\n"
                )
                started = time.monotonic()

                def status(elapsed: float) -> str:
                    return summary_line(sim, erp, app[METRICS], elapsed)

                await drive(sim, orders, duration, out, status)
                await sim.sender.wait_idle(within=30)
                out.write("reconciling with MasonHub...\n")
                await reconcile(app, settings, out)
                await settle(app, erp, within=60)
                out.write(status(time.monotonic() - started) + "\n")
        await sim.close()
    result = compare(sim, erp)
    out.write(
        f"orders: {result.orders_matched}/{result.orders} tracking numbers match; "
        f"SKUs: {result.skus_matched}/{result.skus} counts match\n"
    )
    for line in result.mismatches[:20]:
        out.write(f"  MISMATCH {line}\n")
    out.write("ERP matches MasonHub\n" if result.ok else "ERP does NOT match MasonHub\n")
    return result.ok


async def reconcile(app: web.Application, settings: Settings, out: TextIO) -> None:
    """The nightly pass, now: every job, through the daemon's own store and metrics."""
    client = MasonHubClient(settings.masonhub)
    try:
        poller = Poller(app[STORE], client, settings, metrics=app[METRICS])
        for job in JOBS:
            out.write("  " + (await poller.reconcile(job)).line() + "\n")
    finally:
        await client.close()
    from syncd.app import DELIVERER

    app[DELIVERER].notify()


async def settle(app: web.Application, erp: LocalErp, within: float) -> None:
    """Wait until everything is merged and delivered."""
    store = app[STORE]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        inbox = await store.inbox_counts()
        outbox = await store.outbox_counts()
        if not inbox.get("pending") and not outbox.get("pending"):
            return
        await asyncio.sleep(0.2)
    log.error("demo.not_settled", erp_calls=len(erp.calls))
