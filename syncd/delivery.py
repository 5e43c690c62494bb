"""Delivery: workers lease outbox rows, call the ERP adapter, and record what happened.

A dispatcher keeps up to ``erp.concurrency`` deliveries in flight. It claims due rows as
soon as it is told there is work (no polling sleep on the hot path), and otherwise sleeps
until the earliest scheduled retry. A claim that came back short saw every due row, so the
next claim waits until work is announced: new rows, a row its completion put back because
the entity changed in flight, a failure recorded, or the idle poll.

Transient failures are retried with exponential backoff and jitter (``Retry-After`` wins
when the ERP sends one), the next attempt time stored so a restart keeps the schedule;
permanent ones, and the last allowed attempt, are dead-lettered. After a call the ERP may
still be applying (a timeout, say) the next one waits at least ``erp.timeout``, so a late
old state cannot overwrite a newer one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from syncd.batching import Batcher
from syncd.config import ErpSettings
from syncd.erp import Delivery, ErpAdapter
from syncd.errors import DeliveryError, PermanentDeliveryError, StoreUnavailable
from syncd.logs import log_line
from syncd.merge import stop_task
from syncd.metrics import Metrics
from syncd.store import ClaimedDelivery, Completion, SqlStore

log = structlog.get_logger(__name__)

#: How long the dispatcher sleeps at most when idle: work queued by other instances, or
#: left by a process that died, is found within this time.
IDLE_POLL = 1.0
#: A lease outlives the longest call (ERP timeout, plus in-call connection retries) with room
#: to record the outcome; after it, a row held by a dead worker is delivered again.
LEASE_MARGIN = 5.0
#: With more than half of the workers busy, the dispatcher waits up to this long for more of
#: them to finish before it claims: one claim transaction for several free slots, instead of
#: one per finished call (each is a write transaction, and on SQLite it queues with the
#: webhook commits for the one write lock). Once half are free it claims at once, so this
#: only bounds how long a slot can stay empty; bench/deliver: 5 ms gave 1,270 deliveries/s at
#: concurrency 32 on PostgreSQL, 20 ms 1,516/s, 50 ms 1,550/s (claims of 16 either way).
CLAIM_LINGER = 0.02


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1-based): doubling, with up to 50% jitter.

    The jitter spreads retries of many rows that failed together (an ERP outage) so they
    do not all come back at once; the result stays within [initial, maximum].
    """
    base = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return float(min(maximum, base + rng.uniform(0, base / 2)))


@dataclass(frozen=True)
class Verdict:
    """What to do with a failed delivery."""

    retry_at: datetime | None  # None: dead-letter
    permanent: bool


class Deliverer:
    """Runs ``erp.concurrency`` concurrent deliveries from the outbox to the ERP."""

    def __init__(
        self,
        store: SqlStore,
        adapter: ErpAdapter,
        settings: ErpSettings,
        *,
        owner: str | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._adapter = adapter
        self._settings = settings
        self.owner = owner or f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not security)
        self._lease = 2 * settings.timeout + LEASE_MARGIN
        #: Each completion's result: True if its row is due again (the entity changed).
        self._completions: Batcher[Completion, bool] = Batcher(
            store.complete_deliveries, name="syncd.delivery.completions"
        )
        self._wake = asyncio.Event()
        #: Counts announcements that rows may be due now (see _announce).
        self._announced = 0
        #: ``_announced`` as it was when the last claim that came back short began; None
        #: when the next round must claim (at start, after a full or failed claim).
        self._looked: int | None = None
        #: Loop time by which to claim even if nothing is announced: the next row due, or
        #: the idle poll for rows that other processes queued or left behind.
        self._claim_by = 0.0
        #: Loop time at which the next known scheduled row (a retry, a lease running out)
        #: is due, until a claim has run since then; None when none is known.
        self._due_by: float | None = None
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        #: Outcomes of answered calls waiting for their shared transaction (see _deliver).
        self._recording: set[asyncio.Future[bool]] = set()
        self.task: asyncio.Task[None] | None = None
        #: Monotonic time of the dispatcher's last loop: the watchdog's sign of life.
        self.last_tick = 0.0

    def notify(self) -> None:
        """New work was queued: claim it now."""
        self._announce()

    def _announce(self) -> None:
        """Rows may be due now that the last claim did not see: claim on the next round."""
        self._announced += 1
        self._wake.set()

    async def start(self) -> None:
        """Start the dispatcher and the writer that records completed deliveries."""
        await self._completions.start()
        self.task = asyncio.create_task(self._run(), name="syncd.delivery")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let calls in flight finish for ``grace`` s, then release the rest."""
        if self.task is not None:
            self._stopping = True
            self._wake.set()
            await stop_task(self.task, grace)
            self.task = None
        cut_short = False
        if self._in_flight:
            _done, pending = await asyncio.wait(self._in_flight, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            cut_short = bool(pending)
        # Answered calls are recorded before the leases of the rest are given back.
        await asyncio.gather(*self._recording, return_exceptions=True)
        await self._completions.stop()
        # A cancelled call may still be applied by the ERP: its row waits erp.timeout, as
        # after a timeout (see verdict), before anyone sends that entity again.
        due_at = None
        if cut_short:
            due_at = datetime.now(UTC) + timedelta(seconds=self._settings.timeout)
        with contextlib.suppress(StoreUnavailable):
            released = await self._store.release_leases(self.owner, due_at=due_at)
            if released:
                log.info("delivery.leases_released", rows=released)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        linger_until: float | None = None
        while not self._stopping:
            self.last_tick = loop.time()
            self._wake.clear()
            free = self._settings.concurrency - len(self._in_flight)
            if free <= 0:
                await self._sleep(IDLE_POLL)  # every worker busy: a finished one wakes us
                continue
            if self._looked == self._announced and loop.time() < self._claim_by:
                # The last claim came back short and nothing was announced since, so a claim
                # now would find nothing: at light load that was two empty write
                # transactions per delivery (after its call, and after its completion).
                linger_until = None
                await self._sleep(self._claim_by - loop.time())
                continue
            if free < self._settings.concurrency / 2:
                # Most workers are busy: let a few more finish first (CLAIM_LINGER).
                if linger_until is None:
                    linger_until = loop.time() + CLAIM_LINGER
                if loop.time() < linger_until:
                    await self._sleep(linger_until - loop.time())
                    continue
            linger_until = None
            seen, started = self._announced, loop.time()
            try:
                claimed = await self._store.claim_deliveries(self.owner, free, self._lease)
            except StoreUnavailable as exc:
                log.warning("delivery.store_unavailable", error=exc.message)
                self._looked = None
                await self._sleep(IDLE_POLL)
                continue
            for claim in claimed:
                task = asyncio.create_task(
                    self._deliver(claim), name=f"syncd.deliver.{claim.outbox_id}"
                )
                self._in_flight.add(task)
                task.add_done_callback(self._finished)
            if len(claimed) == free:
                self._looked = None  # there may be more
                continue
            await self._plan_next_claim(seen, started, bool(claimed))
            await self._sleep(self._claim_by - loop.time())

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free

    async def _plan_next_claim(self, seen: int, started: float, claimed_some: bool) -> None:
        """After a claim (begun at loop time ``started``) that came back short: claim again
        when work is announced after ``seen``, when the next known row is due, or at the
        idle poll, whichever comes first."""
        self._looked = seen
        if self._due_by is not None and started >= self._due_by:
            self._due_by = None  # that claim saw the row it was waiting for
        if not claimed_some:
            try:
                due = await self._store.next_due_at()
            except StoreUnavailable:
                due = None
            if due is not None:
                self._due_at(due)
        self._claim_by = asyncio.get_running_loop().time() + IDLE_POLL
        if self._due_by is not None:
            self._claim_by = min(self._claim_by, self._due_by)

    def _due_at(self, due: datetime) -> None:
        """A row is due at ``due``: claim by then."""
        at = asyncio.get_running_loop().time() + (due - datetime.now(UTC)).total_seconds()
        self._due_by = at if self._due_by is None else min(self._due_by, at)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _deliver(self, claim: ClaimedDelivery) -> None:
        delivery = Delivery(
            entity_type=claim.entity_type,
            entity_key=claim.entity_key,
            payload=claim.state,
            idempotency_key=claim.idempotency_key,
            source=claim.source,
            replay=bool(claim.replay),
        )
        started = datetime.now(UTC)
        try:
            result = await self._adapter.deliver(delivery)
        except DeliveryError as exc:
            await self._record_failure(claim, started, exc)
            return
        self._metrics.deliveries.labels(claim.entity_type, "delivered").inc()
        self._metrics.erp_seconds.labels(claim.entity_type).observe(result.elapsed)
        log_line(
            "delivery.delivered",
            "info",
            {
                "entity_type": claim.entity_type,
                "entity_key": claim.entity_key,
                "idempotency_key": claim.idempotency_key,
                "status": result.status,
                "attempt": claim.attempts + 1,
                "latency_ms": round(result.elapsed * 1000, 3),
                "source": claim.source,
            },
        )
        # Completions from concurrent workers share one transaction, and the worker's slot is
        # free as soon as the ERP has answered: the row keeps its lease until the completion
        # commits, so nobody claims it meanwhile, and the next claim need not wait for it.
        completion = Completion(claim, self.owner, started, result.status)
        try:
            recorded = self._completions.submit_nowait(completion)
        except StoreUnavailable as exc:
            self._record_failed(claim, exc)
            return
        self._recording.add(recorded)
        recorded.add_done_callback(functools.partial(self._recorded, claim))

    def _recorded(self, claim: ClaimedDelivery, recorded: asyncio.Future[bool]) -> None:
        self._recording.discard(recorded)
        if recorded.cancelled():
            return
        error = recorded.exception()
        if isinstance(error, StoreUnavailable):
            self._record_failed(claim, error)
        elif error is None and recorded.result():
            self._announce()  # the entity changed while in flight: its row is due again

    def verdict(self, claim: ClaimedDelivery, exc: DeliveryError) -> Verdict:
        """Retry time for a failure, or dead-letter (retry_at None)."""
        if isinstance(exc, PermanentDeliveryError):
            return Verdict(None, True)
        attempt = claim.attempts + 1
        if attempt >= self._settings.max_attempts:
            return Verdict(None, False)
        retry_after = getattr(exc, "retry_after", None)
        delay = (
            retry_after
            if retry_after is not None
            else backoff_delay(
                attempt, self._settings.backoff_initial, self._settings.backoff_max, self._rng
            )
        )
        if getattr(exc, "uncertain", False):
            # The ERP may still be applying that call. The next one may carry a newer state, and
            # must land after it: give the old call as long again as it was given to answer.
            delay = max(delay, self._settings.timeout)
        return Verdict(datetime.now(UTC) + timedelta(seconds=delay), False)

    async def _record_failure(
        self, claim: ClaimedDelivery, started: datetime, exc: DeliveryError
    ) -> None:
        verdict = self.verdict(claim, exc)
        error = exc.message if not exc.body else f"{exc.message}: {exc.body}"
        fields = {
            "entity_type": claim.entity_type,
            "entity_key": claim.entity_key,
            "idempotency_key": claim.idempotency_key,
            "status": exc.status,
            "attempt": claim.attempts + 1,
            "error": exc.message,
        }
        if verdict.retry_at is None:
            self._metrics.deliveries.labels(claim.entity_type, "dead").inc()
            self._metrics.dead_letters.inc()
            log.error("delivery.dead_lettered", permanent=verdict.permanent, **fields)
        else:
            self._metrics.deliveries.labels(claim.entity_type, "retry").inc()
            self._metrics.retries.inc()
            log.warning("delivery.retry_scheduled", retry_at=verdict.retry_at.isoformat(), **fields)
        await self._record(
            self._store.fail_delivery(
                claim,
                self.owner,
                started_at=started,
                status=exc.status,
                error=error,
                retry_at=verdict.retry_at,
                permanent=verdict.permanent,
            ),
            claim,
        )
        # The row has a retry time now (or is due at once, if its entity moved on).
        if verdict.retry_at is not None:
            self._due_at(verdict.retry_at)
        self._announce()

    async def _record(self, write: Awaitable[None], claim: ClaimedDelivery) -> None:
        try:
            await write
        except StoreUnavailable as exc:
            self._record_failed(claim, exc)

    @staticmethod
    def _record_failed(claim: ClaimedDelivery, exc: StoreUnavailable) -> None:
        # If the store is down the outcome is not recorded; the lease expires and the row is
        # delivered again with the same Idempotency-Key: an extra call, never a lost one.
        log.warning(
            "delivery.record_failed",
            entity_type=claim.entity_type,
            entity_key=claim.entity_key,
            error=exc.message,
        )
