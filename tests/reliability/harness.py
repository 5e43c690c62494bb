"""The reliability rig: the simulator, a recording ERP and `syncd run` as a real child process.

A scenario builds a :class:`Rig`, drives the simulated warehouse while it does something nasty
(kills the daemon, takes the ERP or the store away), lets everything settle, and ends with
:meth:`Rig.audit`: the evidence that nothing acknowledged was lost and nothing took effect
twice. The daemon is a separate process, so ``kill -9`` is real; the simulator and the ERP
live in the test process, where their records are the audit's ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from syncd.facts import INBOUND_SYNONYMS, normalise_status
from syncd.messages import MESSAGE_TYPES
from syncd.simulator import Message, MessageState, Simulator
from syncd.store import InboxState, SqlStore
from syncd.testing import ErpCall, LocalErp, TcpProxy, sign
from tests.reliability.conftest import (
    CALLBACK_TOKEN,
    ERP_TOKEN,
    MASONHUB_TOKEN,
    WEBHOOK_SECRET,
    LogScan,
)
from tests.test_cli import ROOT, free_port
from tests.test_service import start

#: The simulator's callback retry schedule here: seconds, long enough in all to ride out a
#: daemon restart or a 20 s store outage (MasonHub's own is 1 min, 5 min, 15 min, 1 h).
RETRIES = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 10.0, 10.0, 10.0, 15.0)


# --- the ERP ------------------------------------------------------------------------------------


class ErpTakesEffect(LocalErp):
    """The local ERP, keeping in ``applied`` every call it took effect on, in order.

    A call takes effect when ``respond`` lets it through (returns None): the body is stored
    and the default 200 goes back, even if the caller has given up waiting by then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[ErpCall] = []
        self.outage: Callable[[ErpCall], Any] | None = None
        self.respond = self._maybe_fail

    async def _maybe_fail(self, call: ErpCall) -> web.StreamResponse | None:
        response = await self.outage(call) if self.outage is not None else None
        if response is None:
            self.applied.append(call)
        return response


# --- the daemon ---------------------------------------------------------------------------------


class Daemon:
    """`syncd run --config PATH` as a child process: started, killed with SIGKILL, restarted."""

    def __init__(self, config: Path, log: Path, admin_port: int) -> None:
        self.config = config
        self.log = log
        self.admin_port = admin_port
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self, within: float = 60.0) -> None:
        """Start it and wait until its admin listener says ready."""
        assert self.process is None or self.process.returncode is not None
        self.process = await start(self.config, self.log)
        self.starts += 1
        await self.wait_ready(within)

    async def wait_ready(self, within: float = 60.0) -> None:
        """Wait until ``/readyz`` answers 200 (store reachable, schema current)."""
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.returncode is not None:
                    raise AssertionError(f"syncd exited with {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    url = f"http://127.0.0.1:{self.admin_port}/readyz"
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"syncd not ready within {within} s")

    async def kill(self) -> None:
        """kill -9: no handler runs, nothing is flushed, leases stay held."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self.kills += 1

    async def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit status."""
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process is not None else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                return await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError("syncd did not stop within 30 s of SIGTERM") from None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def config_text(
    *,
    port: int,
    admin_port: int,
    store_url: str,
    masonhub_url: str,
    erp_url: str,
    polls: float | None = None,
    erp_timeout: float = 2.0,
) -> str:
    """The daemon's config: the suite's secrets, fast retries, polls only if ``polls`` (s)."""
    jobs = "\n".join(
        f"[poll.{job}]\n"
        + (f'every = "{polls}s"\nlookback = "1m"\n' if polls else "enabled = false\n")
        for job in ("orders", "shipments", "inventory", "inbound_shipments", "rmas")
    )
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[admin]
host = "127.0.0.1"
port = {admin_port}

[store]
url = "{store_url}"
auto_migrate = true

[masonhub]
base_url = "{masonhub_url}"
token = "{MASONHUB_TOKEN}"
timeout = "10s"

[webhooks]
signing_secrets = ["{WEBHOOK_SECRET}"]
callback_token = "{CALLBACK_TOKEN}"

[erp]
base_url = "{erp_url}"
token = "{ERP_TOKEN}"
timeout = "{erp_timeout}s"
concurrency = 8
max_attempts = 1000
backoff_initial = "100ms"
backoff_max = "1s"

[reconcile]
enabled = false
window = "1d"

{jobs}
"""


# --- a private PostgreSQL server, to stop for real ----------------------------------------------


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise AssertionError("pg_ctl not found: the store outage needs PostgreSQL's server")
    return Path(pg_ctl).parent


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on its own port, so a test may stop it under load."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="syncd-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        log = str(self.dir / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash: no checkpoint, connections cut at once."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.destroy()


# --- the audit ----------------------------------------------------------------------------------


@dataclass
class Audit:
    """What the scenario proved. ``lost`` and ``duplicated`` must be empty."""

    acknowledged: int = 0
    #: Messages MasonHub got a 2xx for that are not in syncd's store.
    acknowledged_missing: list[str] = field(default_factory=list)
    entities: int = 0
    #: Entity states MasonHub reached that the ERP does not have.
    lost: list[str] = field(default_factory=list)
    #: Calls that made the ERP apply a state it already had, under a new Idempotency-Key.
    duplicated: list[str] = field(default_factory=list)
    #: Calls repeating an Idempotency-Key the ERP had already taken effect on: harmless.
    harmless_retries: int = 0
    #: Order calls that moved an order's status backwards after it had moved on.
    regressions: list[str] = field(default_factory=list)
    #: Inbox messages syncd marked failed, and deliveries it dead-lettered (none expected:
    #: every scenario sends only good messages to an ERP that recovers).
    failed: list[str] = field(default_factory=list)
    erp_calls: int = 0
    erp_applied: int = 0
    callbacks: Counter[str] = field(default_factory=Counter)

    @property
    def clean(self) -> bool:
        return not (
            self.acknowledged_missing
            or self.lost
            or self.duplicated
            or self.regressions
            or self.failed
        )

    def line(self) -> str:
        return (
            f"acknowledged {self.acknowledged}, missing {len(self.acknowledged_missing)}; "
            f"entities {self.entities}, lost {len(self.lost)}; duplicated effects "
            f"{len(self.duplicated)}, harmless retries {self.harmless_retries}, regressions "
            f"{len(self.regressions)}, failed {len(self.failed)}; ERP calls {self.erp_calls} "
            f"({self.erp_applied} took effect); callbacks {dict(self.callbacks)}"
        )

    def check(self) -> None:
        """Fail with the first few problems of each kind."""
        problems = {
            "acknowledged but not stored": self.acknowledged_missing,
            "lost (MasonHub has it, the ERP does not)": self.lost,
            "duplicated effect": self.duplicated,
            "order status went backwards": self.regressions,
            "failed or dead-lettered": self.failed,
        }
        found = {what: items[:10] for what, items in problems.items() if items}
        assert not found, f"{self.line()}\n{found}"


_ORDER_RANK = {
    "open": 0,
    "at_warehouse": 1,
    "in_process": 2,
    "packed": 3,
    "fulfilled": 4,
}


def _shipping_rank(status: str | None) -> int:
    # Carrier stages come after fulfilled; a canceled order is final. An order first known
    # from a polled shipment has no status yet: anything may follow it.
    if status is None:
        return -1
    return _ORDER_RANK.get(status, 5)


def _tracking(body: dict[str, Any]) -> list[str]:
    shipments = body.get("shipments", [])
    return sorted(s["tracking_number"] for s in shipments if s.get("tracking_number"))


def _status_told(message: Message) -> str | None:
    """The status a callback stated (a carrier stage, say), as syncd names it."""
    envelope = message.envelope
    items = envelope.get("data") if isinstance(envelope, dict) else None
    first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
    status = normalise_status(first.get("status") or first.get("event_type"))
    return INBOUND_SYNONYMS.get(status, status) if status else None


def last_told(sim: Simulator) -> dict[str, str]:
    """Per entity key, the status of the newest callback that reached syncd.

    When the callback of an order's or a return's last stage is dropped, the newest stage
    syncd was told is all it can know until a poll reads the record, so the audit before
    the reconciliation pass accepts it too.
    """
    told: dict[str, str] = {}
    for message in sim.sender.messages:  # in publish order: the newest last
        if message.state is MessageState.DELIVERED and (status := _status_told(message)):
            told[message.entity_key] = status
    return told


def expected_state(
    sim: Simulator, *, reconciled: bool = False
) -> dict[str, Callable[[dict[str, Any]], str | None]]:
    """Per ERP path, a check of the ERP's body: None if it holds MasonHub's state, else why.

    After a reconciliation pass an order must show its packages' carrier stage exactly: GET
    /orders shows each shipment's stage, so the pass repairs a stage whose callback was lost.
    """
    checks: dict[str, Callable[[dict[str, Any]], str | None]] = {}
    world = sim.world
    told = last_told(sim)
    for order in world.orders:
        tracking = sorted(s.tracking_number for s in order.shipments)
        statuses = {normalise_status(order.event_status())}
        if not reconciled:
            statuses |= {normalise_status(order.status), told.get(order.customer_identifier)}

        def check_order(
            body: dict[str, Any], tracking: list[str] = tracking, statuses: set[Any] = statuses
        ) -> str | None:
            if _tracking(body) != tracking:
                return f"tracking {_tracking(body)}, MasonHub {tracking}"
            if body.get("status") not in statuses:
                return f"status {body.get('status')}, MasonHub {sorted(statuses)}"
            return None

        checks[f"/api/orders/{order.customer_identifier}"] = check_order
    for sku in world.skus:
        counts = (sku.total_units, sku.total_available_to_sell)

        def check_sku(body: dict[str, Any], counts: tuple[int, int] = counts) -> str | None:
            told = (body.get("total_units"), body.get("total_available_to_sell"))
            return None if told == counts else f"counts {told}, MasonHub {counts}"

        checks[f"/api/inventory/{sku.customer_identifier}"] = check_sku
    for inbound in world.inbound_shipments:
        raw = normalise_status(inbound.status) or ""
        statuses = {INBOUND_SYNONYMS.get(raw, raw)}
        statuses.add(told.get(inbound.customer_identifier, ""))

        def check_inbound(body: dict[str, Any], statuses: set[str] = statuses) -> str | None:
            told = body.get("status")
            return None if told in statuses else f"status {told}, MasonHub {sorted(statuses)}"

        checks[f"/api/inbound-shipments/{inbound.customer_identifier}"] = check_inbound
    for rma in world.rmas:
        statuses = {normalise_status(rma.status), normalise_status(rma.carrier_status)}
        statuses.add(told.get(rma.customer_identifier))

        def check_rma(body: dict[str, Any], statuses: set[Any] = statuses) -> str | None:
            told = body.get("status")
            return None if told in statuses else f"status {told}, MasonHub {sorted(statuses)}"

        checks[f"/api/returns/{rma.customer_identifier}"] = check_rma
    return checks


async def stored_keys(store_url: str, keys: list[str]) -> set[str]:
    """Which of these dedupe keys syncd's inbox holds (read from the test process)."""
    store = SqlStore(store_url)
    try:
        found = set()
        for key in keys:
            if await store.get_message_by_key(key) is not None:
                found.add(key)
        return found
    finally:
        await store.close()


async def failures(store_url: str) -> list[str]:
    """Inbox messages in state failed and dead-lettered deliveries, with their reasons."""
    store = SqlStore(store_url)
    try:
        failed = [
            f"message {m.id} ({m.message_type}): {m.error}"
            for m in await store.list_messages(state=InboxState.FAILED, limit=50)
        ]
        dead = await store.dead_entity_ids()
        return failed + [f"entity {entity_id} dead-lettered" for entity_id in dead]
    finally:
        await store.close()


def audit_erp(erp: ErpTakesEffect, audit: Audit) -> None:
    """Duplicated effects, harmless retries and regressions, from the calls that took effect."""
    audit.erp_calls = len(erp.calls)
    audit.erp_applied = len(erp.applied)
    seen_keys: dict[str, set[str]] = {}
    last_body: dict[str, Any] = {}
    best_rank: dict[str, int] = {}
    best_status: dict[str, str] = {}
    for call in erp.applied:
        key = call.headers.get("Idempotency-Key", "")
        keys = seen_keys.setdefault(call.path, set())
        if key in keys:
            audit.harmless_retries += 1
        elif call.path in last_body and last_body[call.path] == call.body:
            audit.duplicated.append(f"{call.path} {key}")
        keys.add(key)
        last_body[call.path] = call.body
        if call.path.startswith("/api/orders/") and isinstance(call.body, dict):
            status = call.body.get("status")
            rank = _shipping_rank(status)
            if rank < best_rank.get(call.path, -1) and status != "canceled":
                audit.regressions.append(
                    f"{call.path}: {status} after {best_status[call.path]} "
                    f"({key}, from {call.headers.get('X-Syncd-Source')})"
                )
            if rank >= best_rank.get(call.path, -1):
                best_rank[call.path], best_status[call.path] = rank, str(status)


# --- the rig ------------------------------------------------------------------------------------


class Rig:
    """The simulator, the ERP (behind a proxy that can cut it off) and the daemon, on loopback."""

    def __init__(
        self,
        tmp: Path,
        store_url: str,
        scan: LogScan,
        *,
        seed: int = 1,
        polls: float | None = None,
        erp_timeout: float = 2.0,
        **faults: Any,
    ) -> None:
        self.tmp = tmp
        self.store_url = store_url
        self.scan = scan
        self.sim = Simulator(
            seed=seed,
            token=MASONHUB_TOKEN,
            signing_secret=WEBHOOK_SECRET,
            retry_delays=RETRIES,
            **faults,
        )
        self.erp = ErpTakesEffect()
        self.port = free_port()
        self.admin_port = free_port()
        self.polls = polls
        self.erp_timeout = erp_timeout
        self._erp_runner: web.AppRunner | None = None
        self.erp_proxy: TcpProxy | None = None
        self.config = tmp / "syncd.toml"
        self.daemon = Daemon(self.config, scan.watch(tmp / "syncd.log"), self.admin_port)

    async def __aenter__(self) -> Rig:
        await self.sim.start()
        self._erp_runner = web.AppRunner(self.erp.app(), access_log=None)
        await self._erp_runner.setup()
        site = web.TCPSite(self._erp_runner, "127.0.0.1", 0)
        await site.start()
        erp_port = self._erp_runner.addresses[0][1]
        self.erp_proxy = TcpProxy("127.0.0.1", erp_port)
        await self.erp_proxy.start()
        self.config.write_text(
            config_text(
                port=self.port,
                admin_port=self.admin_port,
                store_url=self.store_url,
                masonhub_url=self.sim.base_url,
                erp_url=f"http://127.0.0.1:{self.erp_proxy.port}/api",
                polls=self.polls,
                erp_timeout=self.erp_timeout,
            )
        )
        for message_type in MESSAGE_TYPES:
            url = f"http://127.0.0.1:{self.port}/webhooks/masonhub/{message_type}"
            self.sim.register_callback(url, message_type, token=CALLBACK_TOKEN)
        await self.daemon.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        # Every signature MasonHub sent is a secret's fingerprint: it must not be in a log.
        for message in self.sim.sender.messages:
            self.scan.forbid("a callback's signature", sign(message.body, WEBHOOK_SECRET))
        with contextlib.suppress(Exception):
            await self.daemon.stop()
        await self.sim.close()
        if self.erp_proxy is not None:
            await self.erp_proxy.cut()
        if self._erp_runner is not None:
            await self._erp_runner.cleanup()

    async def drive(
        self,
        seconds: float,
        *,
        orders: int,
        changes_per_tick: int = 3,
        tick: float = 0.2,
        during: Callable[[float], Any] | None = None,
    ) -> None:
        """Create ``orders`` orders, then move the warehouse along for ``seconds``.

        ``during(elapsed)`` is awaited every tick: the scenario's mischief.
        """
        world = self.sim.world
        world.create_orders(orders)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            world.advance_all(1) if world.rng.random() < 0.3 else world.step(changes_per_tick)
            if during is not None:
                await during(elapsed)
            await asyncio.sleep(tick)

    async def settle(self, within: float = 120.0) -> None:
        """Wait until MasonHub has nothing left to send and syncd nothing left to deliver."""
        deadline = time.monotonic() + within
        await self.sim.wait_idle(within)
        store = SqlStore(self.store_url)
        try:
            while time.monotonic() < deadline:
                inbox = await store.inbox_counts()
                outbox = await store.outbox_counts()
                if not inbox.get("pending") and not outbox.get("pending"):
                    return
                await asyncio.sleep(0.2)
        finally:
            await store.close()
        raise AssertionError(f"not settled within {within} s: inbox {inbox}, outbox {outbox}")

    async def reconcile(self) -> str:
        """`syncd reconcile` (the nightly pass, now) in its own process; its report."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "syncd",
            "reconcile",
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
        )
        out, _ = await process.communicate()
        text = out.decode(errors="replace")
        (self.tmp / "reconcile.log").write_text(text)
        self.scan.watch(self.tmp / "reconcile.log")
        assert process.returncode == 0, text
        return text

    async def audit(self, *, reconciled: bool = False) -> Audit:
        """Store against MasonHub's sent log; ERP against MasonHub's world.

        Before a reconciliation pass only the entities MasonHub sent a callback about are
        expected in the ERP (a new return, say, announces nothing); after one, all of them.
        """
        audit = Audit()
        sender = self.sim.sender
        audit.callbacks = Counter(sender.states())
        acked = sorted({a.message_id for a in sender.sent if a.status and 200 <= a.status < 300})
        audit.acknowledged = len(acked)
        stored = await stored_keys(self.store_url, acked)
        audit.acknowledged_missing = [key for key in acked if key not in stored]
        audit.failed = await failures(self.store_url)
        announced = {m.entity_key for m in sender.messages}
        for path, check in expected_state(self.sim, reconciled=reconciled).items():
            if not reconciled and path.rsplit("/", 1)[-1] not in announced:
                continue
            audit.entities += 1
            body = self.erp.records.get(path)
            problem = "never delivered" if body is None else check(body)
            if problem:
                audit.lost.append(f"{path}: {problem}")
        audit_erp(self.erp, audit)
        for lost in audit.lost[:3]:
            print(await self.explain(lost.split(":", 1)[0].rsplit("/", 1)[-1]))
        return audit

    async def explain(self, key: str) -> str:
        """The story of one entity: what MasonHub sent, what syncd decided, what the ERP got."""
        lines = [f"--- {key}"]
        store = SqlStore(self.store_url)
        try:
            for m in self.sim.sender.messages:
                if m.entity_key != key:
                    continue
                items = m.envelope.get("data") if isinstance(m.envelope, dict) else None
                first = items[0] if isinstance(items, list) and items else {}
                stored = await store.get_message_by_key(m.message_id)
                facts = await store.facts_of(stored.id) if stored is not None else []
                decided = [f"{f.outcome}({f.reason or ''})" for f in facts]
                lines.append(
                    f"callback {m.message_id} {m.message_type} status={first.get('status')} "
                    f"at={first.get('updated_at') or first.get('as_of')} answers={m.responses} "
                    f"stored={stored.state if stored else None} facts={decided}"
                )
        finally:
            await store.close()
        # In arrival order, each with its place in the order the ERP took effect (None: never).
        for call in self.erp.calls:
            if call.path.endswith(f"/{key}"):
                body = call.body if isinstance(call.body, dict) else {}
                applied = next((i for i, c in enumerate(self.erp.applied) if c is call), None)
                lines.append(
                    f"ERP {call.headers.get('Idempotency-Key')} status={body.get('status')} "
                    f"applied={applied}"
                )
        return "\n".join(lines)

    async def prove(
        self, label: str, *, within: float = 120.0, callbacks_complete: bool = True
    ) -> tuple[Audit, Audit]:
        """Settle and audit; then the nightly pass, settle, and audit everything MasonHub has.

        The first audit shows nothing acknowledged was lost: when MasonHub's callbacks all
        arrived (``callbacks_complete``), the ERP must already have every announced state.
        The second, after the reconciliation pass, that the ERP equals MasonHub.
        """
        await self.settle(within)
        live = await self.audit()
        print(f"{label}: {live.line()}")
        if callbacks_complete:
            live.check()
        else:
            assert not live.acknowledged_missing, live.acknowledged_missing[:10]
            assert not live.duplicated, live.duplicated[:10]
        report = await self.reconcile()
        await self.settle(within)
        nightly = await self.audit(reconciled=True)
        print(f"{label}, after the nightly pass: {nightly.line()}")
        print(report.strip())
        nightly.check()
        return live, nightly
