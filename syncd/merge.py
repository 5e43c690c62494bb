"""Merge: decide what a fact does to an entity, and drain the inbox into the outbox.

Per entity the store keeps the latest known state (with its version and content hash) and
the hash last delivered to the ERP. A fact older than the latest known version, or whose
merged state is identical to it, is recorded and dropped; anything else becomes the
entity's pending delivery. So a webhook and a poll describing one state make one ERP call,
and a late webhook never rolls the ERP back.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from syncd.errors import StoreUnavailable
from syncd.facts import ORDER, Fact, Version, content_hash

log = structlog.get_logger(__name__)

#: While webhooks are being committed, the merge waits this long before its next pass: the
#: write lock and the one core go to acknowledgements first, and the pass that follows takes
#: everything committed meanwhile in one transaction instead of one per commit. While
#: webhooks keep arriving, it is also about how long each may wait for the merge, and so
#: for delivery.
#: bench/RESULTS.md, SQLite, pairs against 50 ms: at 750/s receipt->ERP p50 45-55 -> 9.5-10 ms
#: with ack latency the same; at 1,400/s ack p99 29-40 -> 26-28 ms, p99.9 81-91 -> 36 ms.
#: No wait at all made more transactions and more CPU than it saved (12.5-14.3 ms at 750/s).
MERGE_LINGER = 0.005
#: Most messages one merge transaction takes on SQLite while webhooks are being committed.
#: There the merge runs on the store thread that also commits the inbox: a commit queued
#: behind a 200-message merge waits for all of it (about 20 ms), behind 32 a few ms. Measured
#: at 2,274 webhooks/s (bench/RESULTS.md): ack p99 43 -> 20 ms (medians of six pairs), the
#: same deliveries. PostgreSQL merges on a connection of its own, beside the commits; there
#: smaller passes only make more transactions, and deliveries fell behind.
BUSY_BATCH = 32


class Outcome(enum.StrEnum):
    """What a fact did."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"
    STALE = "stale"


@dataclass(frozen=True)
class Current:
    """What the store knows of an entity when a fact arrives."""

    state: Mapping[str, Any]
    content_hash: str
    version: Version
    delivered_hash: str | None


@dataclass(frozen=True)
class Decision:
    """The effect of one fact on its entity."""

    outcome: Outcome
    version: Version
    state: Mapping[str, Any]
    content_hash: str
    reason: str | None = None

    def needs_delivery(self, delivered_hash: str | None) -> bool:
        """True when the ERP does not have this state yet."""
        return self.outcome is Outcome.APPLIED and self.content_hash != delivered_hash


def _shipment_key(shipment: Mapping[str, Any]) -> str:
    return str(shipment.get("shipment_id") or shipment.get("tracking_number") or sorted(shipment))


def _merge_shipments(old: Any, new: Any) -> list[Any]:
    # A tracking number once seen is never taken from the ERP: shipments are merged by id,
    # the newer record of each winning, so an event that lists fewer shipments loses none.
    merged: dict[str, Any] = {}
    for shipment in [*(old or []), *(new or [])]:
        if isinstance(shipment, Mapping):
            key = _shipment_key(shipment)
            merged[key] = {**merged.get(key, {}), **shipment}
    return list(merged.values())


def merge_state(
    entity_type: str, previous: Mapping[str, Any], new: Mapping[str, Any]
) -> dict[str, Any]:
    """The entity's state after ``new``: its fields win, fields it lacks are kept."""
    merged = {**previous, **new}
    if entity_type == ORDER and ("shipments" in previous or "shipments" in new):
        merged["shipments"] = _merge_shipments(previous.get("shipments"), new.get("shipments"))
    return merged


def decide(current: Current | None, fact: Fact) -> Decision:
    """What ``fact`` does to an entity whose latest known state is ``current``."""
    if current is None:
        state = dict(fact.state)
        return Decision(Outcome.APPLIED, fact.version, state, content_hash(state))
    reason = fact.version.older_than(current.version)
    if reason is not None:
        return _stale(current, fact, reason)
    state = merge_state(fact.entity_type, current.state, fact.state)
    version = Version(
        fact.version.rank if fact.version.rank is not None else current.version.rank,
        fact.version.timestamp or current.version.timestamp,
    )
    digest = content_hash(state)
    if digest == current.content_hash:
        return Decision(Outcome.UNCHANGED, version, state, digest, "identical to current state")
    return Decision(Outcome.APPLIED, version, state, digest)


async def stop_task(task: asyncio.Task[None], grace: float) -> None:
    """Wait for a loop that was asked to stop; cancel it if it takes longer than ``grace``.

    Cancelling a task inside a database call can leave the driver's thread holding a lock,
    so loops are asked to finish their iteration first and cancelled only as a last resort.
    """
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _stale(current: Current, fact: Fact, reason: str) -> Decision:
    """An older fact changes nothing, except that an order's shipments it lists are kept.

    Shipments only ever accumulate, so taking them from an older record cannot roll the ERP
    back, and a tracking number that reached syncd only through a late or polled record
    (its newer callbacks lost) still makes it to the ERP.
    """
    if fact.entity_type == ORDER and fact.state.get("shipments"):
        state = merge_state(ORDER, current.state, {"shipments": fact.state["shipments"]})
        digest = content_hash(state)
        if digest != current.content_hash:
            return Decision(
                Outcome.APPLIED, current.version, state, digest, f"{reason}; shipments merged"
            )
    return Decision(Outcome.STALE, current.version, current.state, current.content_hash, reason)


class Merger:
    """Drains pending inbox messages into entity state and the outbox, as they arrive."""

    def __init__(
        self,
        store: Any,
        *,
        on_queued: Any = None,
        on_snapshot: Any = None,
        batch: int = 200,
        idle_poll: float = 1.0,
        busy: Callable[[], bool] | None = None,
        linger: float | None = None,
        busy_batch: int | None = None,
    ) -> None:
        self._store = store
        #: True while webhook commits are queued or in progress (the receiver is busy).
        self._busy = busy
        self._linger = MERGE_LINGER if linger is None else linger
        #: Most messages per transaction while busy (None: ``batch`` always).
        self._busy_batch = busy_batch
        self._on_queued = on_queued
        self._on_snapshot = on_snapshot
        self._batch = batch
        self._idle_poll = idle_poll
        self._wake = asyncio.Event()
        self._stopping = False
        self.task: asyncio.Task[None] | None = None
        #: Monotonic time of the loop's last round: the watchdog's sign of life.
        self.last_tick = 0.0

    def notify(self) -> None:
        """New messages were committed: merge them now."""
        self._wake.set()

    async def start(self) -> None:
        """Start draining in the background."""
        self.task = asyncio.create_task(self._run(), name="syncd.merge")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop after the batch in progress has committed (cancelled only after ``grace`` s)."""
        if self.task is None:
            return
        self._stopping = True
        self._wake.set()
        await stop_task(self.task, grace)
        self.task = None

    async def drain_once(self) -> int:
        """Merge pending messages until none are left; returns how many were processed.

        While webhooks are being committed each transaction takes at most ``busy_batch``.
        """
        total = 0
        while True:
            limit = self._batch
            if self._busy_batch is not None and self._busy is not None and self._busy():
                limit = min(limit, self._busy_batch)
            result = await self._store.process_inbox(limit=limit)
            total += int(result.messages)
            if result.queued and self._on_queued is not None:
                self._on_queued()
            if self._on_snapshot is not None:
                for url in result.snapshots:
                    self._on_snapshot(url)
            if result.messages < limit:
                return total

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self.last_tick = loop.time()
            self._wake.clear()
            try:
                await self.drain_once()
            except StoreUnavailable as exc:
                log.warning("merge.store_unavailable", error=exc.message)
            # Other instances' receivers, and restarts, leave work no event announces here.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle_poll):
                    await self._wake.wait()
            if self._busy is not None and self._busy() and not self._stopping:
                # Yield to ingest; under light load nothing is queued and this never waits.
                await asyncio.sleep(self._linger)
