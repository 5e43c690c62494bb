"""How the merge and the delivery dispatcher pace themselves under load (fewer, larger
write transactions), with stand-in stores so the timing is the loops' own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import syncd.delivery
from syncd.config import ErpSettings
from syncd.delivery import Deliverer
from syncd.erp import Delivery, DeliveryResult
from syncd.merge import Merger
from syncd.store import ClaimedDelivery, ProcessResult


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


class CountingInbox:
    """A store whose inbox is always empty; it records when each merge pass ran."""

    def __init__(self) -> None:
        self.passes: list[float] = []

    async def process_inbox(self, limit: int = 200) -> ProcessResult:
        self.passes.append(asyncio.get_running_loop().time())
        return ProcessResult()


@pytest.mark.parametrize("busy", [False, True])
async def test_merge_yields_to_ingest_only_while_commits_are_busy(busy: bool) -> None:
    """Told of a commit while webhooks are still being committed, the merge waits its linger
    before the next pass; with the committer idle it merges at once."""
    store = CountingInbox()
    merger = Merger(store, busy=lambda: busy, linger=0.3, idle_poll=5.0)
    await merger.start()
    try:
        await until(lambda: bool(store.passes))
        notified = asyncio.get_running_loop().time()
        merger.notify()
        await until(lambda: len(store.passes) >= 2)
    finally:
        await merger.stop()
    waited = store.passes[1] - notified
    assert (waited >= 0.3) if busy else (waited < 0.2)


def claim(n: int) -> ClaimedDelivery:
    return ClaimedDelivery(n, n, "inventory", f"S-{n}", {}, "h", 1, "webhook", 0, 0)


class Outbox:
    """An outbox with plenty of due rows; it records the limit of every claim."""

    def __init__(self) -> None:
        self.limits: list[int] = []
        #: ``due_at`` of every release_leases call.
        self.released: list[datetime | None] = []
        self._next = 0

    async def claim_deliveries(self, owner: str, limit: int, lease: float) -> list[Any]:
        self.limits.append(limit)
        self._next += limit
        return [claim(self._next - i) for i in range(limit)]

    async def complete_deliveries(self, done: Any) -> list[None]:
        return [None] * len(done)

    async def next_due_at(self) -> datetime | None:
        return datetime.now(UTC)

    async def release_leases(self, owner: str, *, due_at: datetime | None = None) -> int:
        self.released.append(due_at)
        return 0


class GatedErp:
    """Each call waits until the test lets that many calls finish."""

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(0)

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        await self.gate.acquire()
        return DeliveryResult(200, 0.0)

    async def close(self) -> None:
        return None


async def test_dispatcher_claims_several_free_slots_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With most workers busy, one finished call does not make a claim of its own: the
    dispatcher waits (CLAIM_LINGER) and claims the slots freed meanwhile together."""
    monkeypatch.setattr(syncd.delivery, "CLAIM_LINGER", 0.3)
    store, erp = Outbox(), GatedErp()
    deliverer = Deliverer(store, erp, ErpSettings(concurrency=8))  # type: ignore[arg-type]
    await deliverer.start()
    try:
        await until(lambda: bool(store.limits))
        assert store.limits == [8]
        erp.gate.release()  # one call finishes ...
        await asyncio.sleep(0.1)
        erp.gate.release()  # ... then two more, within the linger
        erp.gate.release()
        await until(lambda: len(store.limits) >= 2)
        assert store.limits == [8, 3]
        for _ in range(5):  # half or more free: claimed at once
            erp.gate.release()
        await until(lambda: len(store.limits) >= 3, within=0.2)
        assert store.limits[2] >= 4
    finally:
        for _ in range(32):
            erp.gate.release()
        await deliverer.stop(grace=1.0)


@pytest.mark.parametrize("cut_short", [False, True])
async def test_calls_cut_short_at_stop_leave_their_rows_due_after_the_timeout(
    cut_short: bool,
) -> None:
    """Calls still in flight when the stop's grace ends are cancelled, and the ERP may yet
    apply them: their rows are given back due erp.timeout later. A clean drain leaves none."""
    store, erp = Outbox(), GatedErp()
    deliverer = Deliverer(store, erp, ErpSettings(concurrency=2, timeout=7))  # type: ignore[arg-type]
    await deliverer.start()
    await until(lambda: bool(store.limits))
    if not cut_short:
        for _ in range(2):
            erp.gate.release()
        deliverer.notify()
    stopping = datetime.now(UTC)
    await deliverer.stop(grace=0.2)
    [due_at] = store.released
    if cut_short:
        assert due_at is not None
        assert 6.9 < (due_at - stopping).total_seconds() < 7.5
    else:
        assert due_at is None


class SlowCompletions(Outbox):
    """An outbox whose completions commit only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.committed = asyncio.Event()

    async def complete_deliveries(self, done: Any) -> list[None]:
        await self.committed.wait()
        return [None] * len(done)


class CountingErp:
    """Answers at once; counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        self.calls += 1
        return DeliveryResult(200, 0.0)

    async def close(self) -> None:
        return None


async def test_a_slot_is_free_once_the_erp_answers_not_once_the_outcome_commits() -> None:
    """The next call does not wait for the previous one's completion to commit (the row's
    lease keeps it from being claimed again meanwhile); stop() still waits for it."""
    store, erp = SlowCompletions(), CountingErp()
    deliverer = Deliverer(store, erp, ErpSettings(concurrency=1))  # type: ignore[arg-type]
    await deliverer.start()
    try:
        await until(lambda: erp.calls >= 5)  # five calls, no completion committed yet
        assert not store.committed.is_set()
    finally:
        stopping = asyncio.create_task(deliverer.stop(grace=1.0))
        await asyncio.sleep(0.2)
        assert not stopping.done(), "stop() must wait for the outcomes to be recorded"
        store.committed.set()
        await stopping
