"""How the merge and the delivery dispatcher pace themselves under load (fewer, larger
write transactions), with stand-in stores so the timing is the loops' own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import syncd.delivery
from syncd.config import ErpSettings
from syncd.delivery import Deliverer
from syncd.erp import Delivery, DeliveryResult
from syncd.errors import TransientDeliveryError
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


class BacklogInbox:
    """A store with ``pending`` messages waiting; it records the limit of every merge pass."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.limits: list[int] = []

    async def process_inbox(self, limit: int = 200) -> ProcessResult:
        self.limits.append(limit)
        taken = min(limit, self.pending)
        self.pending -= taken
        return ProcessResult(messages=taken)


@pytest.mark.parametrize("busy", [False, True])
async def test_merge_takes_small_batches_while_commits_are_busy(busy: bool) -> None:
    """A backlog is merged 200 at a time when the committer is idle, and at most
    BUSY_BATCH at a time while webhooks are being committed; all of it either way."""
    from syncd.merge import BUSY_BATCH

    store = BacklogInbox(500)
    merger = Merger(store, busy=lambda: busy, batch=200, busy_batch=BUSY_BATCH)
    assert await merger.drain_once() == 500
    assert store.pending == 0
    expected = BUSY_BATCH if busy else 200
    assert set(store.limits) == {expected}
    assert len(store.limits) == 500 // expected + 1


def test_only_the_sqlite_merge_takes_small_batches_while_busy(tmp_path: Path) -> None:
    """On SQLite the merge shares the store thread with the commits and takes BUSY_BATCH
    while busy; on PostgreSQL it has a connection of its own and keeps its full batch."""
    from syncd.app import MERGER, create_app
    from syncd.merge import BUSY_BATCH
    from tests.conftest import make_settings

    sqlite_app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 's.db'}"))
    pg_app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1/unused"))
    assert sqlite_app[MERGER]._busy_batch == BUSY_BATCH
    assert pg_app[MERGER]._busy_batch is None


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

    async def complete_deliveries(self, done: Any) -> list[bool]:
        return [False] * len(done)

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

    async def complete_deliveries(self, done: Any) -> list[bool]:
        await self.committed.wait()
        return [False] * len(done)


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


class ScarceOutbox:
    """An outbox holding only the rows a test puts in; it records every claim's result.

    ``requeue`` names rows whose entity changes while their call is in flight: their
    completion puts them back, due at once. A claim reads the due rows, then waits while
    ``claims_open`` is clear before it answers.
    """

    def __init__(self) -> None:
        self.due: list[int] = []
        self.claims: list[list[int]] = []
        self.requeue: set[int] = set()
        self.completed: list[int] = []
        self.due_reads = 0
        #: Rows due later (a retry, say), by due time: a claim takes them once due.
        self.scheduled: dict[int, datetime] = {}
        self.claims_open = asyncio.Event()
        self.claims_open.set()

    async def claim_deliveries(self, owner: str, limit: int, lease: float) -> list[Any]:
        now = datetime.now(UTC)
        for n, at in sorted(self.scheduled.items()):
            if at <= now:
                self.due.append(n)
                del self.scheduled[n]
        taken, self.due = self.due[:limit], self.due[limit:]
        await self.claims_open.wait()  # what it answers was read before this wait
        self.claims.append(taken)
        return [claim(n) for n in taken]

    async def complete_deliveries(self, done: Any) -> list[bool]:
        ids = [d.claim.outbox_id for d in done]
        self.completed += ids
        again = [n in self.requeue for n in ids]
        self.due += [n for n in ids if n in self.requeue]
        self.requeue -= set(ids)
        return again

    async def next_due_at(self) -> datetime | None:
        self.due_reads += 1
        return min(self.scheduled.values(), default=None)

    async def release_leases(self, owner: str, *, due_at: datetime | None = None) -> int:
        return 0


async def delivering(store: ScarceOutbox, concurrency: int = 4) -> tuple[Deliverer, CountingErp]:
    erp = CountingErp()
    deliverer = Deliverer(store, erp, ErpSettings(concurrency=concurrency))  # type: ignore[arg-type]
    await deliverer.start()
    await until(lambda: len(store.claims) == 1)  # the first claim at start finds nothing
    return deliverer, erp


async def test_no_claim_after_a_call_or_its_completion_when_nothing_was_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim that came back short saw every due row: the finished call and its recorded
    completion do not make the dispatcher claim again. Only new work does."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 30.0)
    store = ScarceOutbox()
    deliverer, erp = await delivering(store)
    try:
        for n in (1, 2, 3):
            store.due.append(n)
            deliverer.notify()
            await until(lambda n=n: store.completed == list(range(1, n + 1)))
            await asyncio.sleep(0.05)  # time for any claim the call or completion would cause
        assert erp.calls == 3
        assert store.claims == [[], [1], [2], [3]]
        assert store.due_reads == 1  # after the empty claim at start
    finally:
        await deliverer.stop(grace=1.0)


async def test_a_row_requeued_by_its_completion_is_claimed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The entity changed while its call was in flight: the completion puts the row back and
    says so, and the dispatcher claims it at once, without waiting for the idle poll."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 30.0)
    store = ScarceOutbox()
    deliverer, erp = await delivering(store)
    try:
        store.due.append(7)
        store.requeue.add(7)
        deliverer.notify()
        await until(lambda: store.completed == [7, 7], within=2.0)
        assert erp.calls == 2
        assert store.claims == [[], [7], [7]]
    finally:
        await deliverer.stop(grace=1.0)


async def test_work_announced_during_a_claim_is_claimed_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Work queued while a claim is running may be committed after that claim's snapshot: the
    dispatcher claims again rather than trusting the short answer."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 30.0)
    store = ScarceOutbox()
    deliverer, erp = await delivering(store)
    try:
        store.claims_open.clear()
        deliverer.notify()  # a claim starts: it finds nothing, and has not answered yet
        await asyncio.sleep(0.05)
        store.due.append(5)  # committed after that claim read
        deliverer.notify()
        store.claims_open.set()
        await until(lambda: erp.calls == 1, within=2.0)
        assert store.claims == [[], [], [5]]
    finally:
        await deliverer.stop(grace=1.0)


async def test_a_row_scheduled_for_later_is_claimed_when_due_though_other_work_came_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The time of the next scheduled row, read after an empty claim, is kept when other work
    is claimed before it: the row is claimed when due, not at the next idle poll."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 5.0)
    store = ScarceOutbox()
    store.scheduled[1] = datetime.now(UTC) + timedelta(seconds=0.4)
    deliverer, _erp = await delivering(store)  # its first claim is empty, then it reads
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        store.due.append(2)
        deliverer.notify()
        await until(lambda: store.completed == [2])
        await until(lambda: 1 in store.completed, within=3.0)
        assert loop.time() - began < 1.5
        assert store.claims[:3] == [[], [2], [1]]
    finally:
        await deliverer.stop(grace=1.0)


class FailingErp(CountingErp):
    """Refuses the first call with a retryable 503, then accepts."""

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        self.calls += 1
        if self.calls == 1:
            raise TransientDeliveryError("ERP answered 503", status=503)
        return DeliveryResult(200, 0.0)


class RetryingOutbox(ScarceOutbox):
    """A failed row is due again at once; the read of the next due time is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: list[int] = []

    async def fail_delivery(self, claim: ClaimedDelivery, owner: str, **_: Any) -> None:
        self.failed.append(claim.outbox_id)
        self.due.append(claim.outbox_id)


async def test_a_failed_call_is_claimed_again_when_its_retry_is_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After recording a failure the dispatcher claims again (the row may be due, or the
    next_due_at read after an empty claim times its retry), not only at the idle poll."""
    monkeypatch.setattr(syncd.delivery, "IDLE_POLL", 30.0)
    store, erp = RetryingOutbox(), FailingErp()
    deliverer = Deliverer(  # type: ignore[arg-type]
        store, erp, ErpSettings(concurrency=2, timeout=0.01, backoff_initial=0.01)
    )
    await deliverer.start()
    try:
        store.due.append(9)
        deliverer.notify()
        await until(lambda: store.completed == [9], within=2.0)
        assert store.failed == [9]
        assert erp.calls == 2
    finally:
        await deliverer.stop(grace=1.0)
