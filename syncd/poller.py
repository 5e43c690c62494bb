"""Polling and reconciliation: the half of the hybrid that catches what callbacks missed.

Each pass reads one kind of MasonHub record page by page and feeds every record, as a fact
with source ``poll`` or ``reconcile``, through the same merge as callbacks, so state the
ERP already has makes no call. Facts that change something are *corrections*: state the
callbacks had not delivered. An incremental pass reads from its cursor minus the lookback;
the cursor moves only after the whole pass has committed, and never past the time the pass
started, so records updated during a pass are read again by the next one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from syncd.config import PollJobSettings, Settings
from syncd.errors import SyncdError
from syncd.facts import (
    ORDER,
    Fact,
    NormalisationError,
    inbound_shipment_fact,
    inventory_fact,
    order_fact,
    return_fact,
    shipment_fact,
)
from syncd.masonhub import MasonHubClient
from syncd.merge import Outcome
from syncd.metrics import Metrics
from syncd.store import SqlStore

log = structlog.get_logger(__name__)

JOBS = ("orders", "shipments", "inventory", "inbound_shipments", "rmas")
LEADER_LEASE = "scheduler"

Reader = Callable[[MasonHubClient, datetime | None], AsyncIterator[dict[str, Any]]]
Normaliser = Callable[[Mapping[str, Any], str], Fact]

READERS: dict[str, tuple[Reader, Normaliser]] = {
    "orders": (lambda c, since: c.orders(since), order_fact),
    "shipments": (lambda c, since: c.shipments(since), shipment_fact),
    # /skus has no update-time filter: inventory passes always read every SKU.
    "inventory": (lambda c, _since: c.skus(), inventory_fact),
    "inbound_shipments": (lambda c, since: c.inbound_shipments(since), inbound_shipment_fact),
    "rmas": (lambda c, since: c.rmas(since), return_fact),
}


@dataclass
class PassReport:
    """What one poll or reconciliation pass read and did."""

    job: str
    kind: str
    since: str | None = None
    records: int = 0
    new: int = 0
    unchanged: int = 0
    stale: int = 0
    invalid: int = 0
    corrections: dict[str, int] = field(default_factory=dict)
    redelivered: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The report as stored and printed."""
        return asdict(self)

    def line(self) -> str:
        """One line for logs and the terminal."""
        fixes = sum(self.corrections.values())
        return (
            f"{self.kind} {self.job}: {self.records} records, {self.new} changed "
            f"({fixes} corrections), {self.unchanged} unchanged, {self.stale} stale, "
            f"{self.invalid} invalid, {len(self.redelivered)} re-delivered, {self.seconds:.1f}s"
        )


class PassFailed(SyncdError):
    """A poll pass failed; its cursor did not move."""


ProgressCallback = Callable[[PassReport], None]


class Poller:
    """Runs poll and reconciliation passes against MasonHub into the store."""

    def __init__(
        self,
        store: SqlStore,
        client: MasonHubClient,
        settings: Settings,
        *,
        on_queued: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._client = client
        self.client = client
        self.settings = settings
        self._on_queued = on_queued

    def job_settings(self, job: str) -> PollJobSettings:
        """The [poll.JOB] settings."""
        settings: PollJobSettings = getattr(self.settings.poll, job)
        return settings

    async def incremental(self, job: str) -> PassReport:
        """Read records changed since the job's cursor minus its lookback; move the cursor."""
        started = datetime.now(UTC)
        lookback = timedelta(seconds=self.job_settings(job).lookback)
        cursor = await self._store.get_cursor(job)
        since = (cursor or started) - lookback
        report = await self._run(job, "poll", since, started)
        await self._store.set_cursor(job, started)
        return report

    async def reconcile(self, job: str, progress: ProgressCallback | None = None) -> PassReport:
        """Read everything updated within ``reconcile.window`` and merge it."""
        started = datetime.now(UTC)
        since = started - timedelta(seconds=self.settings.reconcile.window)
        return await self._run(job, "reconcile", since, started, progress)

    async def _run(
        self,
        job: str,
        kind: str,
        since: datetime,
        started: datetime,
        progress: ProgressCallback | None = None,
    ) -> PassReport:
        report = PassReport(job=job, kind=kind, since=since.isoformat())
        clock = time.monotonic()
        reader, normalise = READERS[job]
        try:
            await self._merge_stream(report, reader(self._client, since), normalise, kind, progress)
        except SyncdError as exc:
            report.seconds = time.monotonic() - clock
            self._observe(report, ok=False)
            await self._store.record_run(job, kind, started, report.as_dict(), exc.message)
            log.warning("poll.failed", job=job, kind=kind, error=exc.message)
            raise PassFailed(f"{kind} {job} failed: {exc.message}") from exc
        report.seconds = time.monotonic() - clock
        self._observe(report, ok=True)
        await self._store.record_run(job, kind, started, report.as_dict(), None)
        log.info("poll.finished", **report.as_dict())
        return report

    async def import_snapshot(self, url: str) -> PassReport:
        """Merge a full inventory snapshot (announced by snapshotReady) SKU by SKU."""
        started = datetime.now(UTC)
        report = PassReport(job="inventory", kind="snapshot")
        clock = time.monotonic()
        try:
            await self._merge_stream(report, self._client.download(url), inventory_fact, "poll")
        except SyncdError as exc:
            report.seconds = time.monotonic() - clock
            self._observe(report, ok=False)
            await self._store.record_run(
                "inventory", "snapshot", started, report.as_dict(), exc.message
            )
            raise PassFailed(f"snapshot import failed: {exc.message}") from exc
        report.seconds = time.monotonic() - clock
        self._observe(report, ok=True)
        await self._store.record_run("inventory", "snapshot", started, report.as_dict(), None)
        log.info("snapshot.imported", **report.as_dict())
        return report

    async def _merge_stream(
        self,
        report: PassReport,
        records: AsyncIterator[dict[str, Any]],
        normalise: Normaliser,
        kind: str,
        progress: ProgressCallback | None = None,
    ) -> None:
        async for page in _pages(records, self._client.page_size):
            await self._merge_page(report, page, normalise, kind)
            if progress is not None:
                progress(report)

    def _observe(self, report: PassReport, *, ok: bool) -> None:
        metrics = self._metrics
        metrics.poll_runs.labels(report.job, report.kind, "ok" if ok else "failed").inc()
        metrics.poll_records.labels(report.job).inc(report.records)
        for entity_type, count in report.corrections.items():
            metrics.corrections.labels(entity_type).inc(count)
        if ok:
            metrics.poll_last_success.labels(report.job).set(time.time())

    async def _merge_page(
        self, report: PassReport, page: list[dict[str, Any]], normalise: Normaliser, kind: str
    ) -> None:
        facts = []
        for record in page:
            try:
                facts.append(normalise(record, kind))
            except (NormalisationError, TypeError, ValueError) as exc:
                report.invalid += 1
                log.warning("poll.invalid_record", job=report.job, error=str(exc))
        report.records += len(page)
        result = await self._store.apply_facts(facts, record_unchanged=False)
        for fact, decision in zip(facts, result.decisions, strict=True):
            if decision.outcome is Outcome.APPLIED:
                report.new += 1
                report.corrections[fact.entity_type] = (
                    report.corrections.get(fact.entity_type, 0) + 1
                )
            elif decision.outcome is Outcome.UNCHANGED:
                report.unchanged += 1
            else:
                report.stale += 1
        if kind == "reconcile" and report.job in ("orders", "shipments"):
            await self._round_trip(report, facts)
        if (result.queued or report.redelivered) and self._on_queued is not None:
            self._on_queued()

    async def _round_trip(self, report: PassReport, facts: list[Fact]) -> None:
        """Re-deliver orders whose tracking numbers the ERP may not have.

        After the merge, an order's state holds every tracking number MasonHub showed; if that
        state was not what was last delivered and nothing is queued to deliver it (a dead
        letter, say), it is queued again and named in the report.
        """
        wanted = {
            f.entity_key
            for f in facts
            if f.entity_type == ORDER and any(s.get("tracking_number") for s in _shipments(f))
        }
        if not wanted:
            return
        known = await self._store.entities_by_keys(ORDER, sorted(wanted))
        stuck = [
            e.id
            for e in known.values()
            if e.delivered_hash != e.content_hash
            and e.outbox_state is not None
            and e.outbox_state.value == "dead"
        ]
        if stuck and await self._store.requeue(stuck):
            report.redelivered.extend(e.entity_key for e in known.values() if e.id in set(stuck))


def _shipments(fact: Fact) -> list[Mapping[str, Any]]:
    shipments = fact.state.get("shipments")
    return [s for s in shipments if isinstance(s, Mapping)] if isinstance(shipments, list) else []


async def _pages(
    records: AsyncIterator[dict[str, Any]], size: int
) -> AsyncIterator[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    async for record in records:
        page.append(record)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def polling_problem(settings: Settings) -> str | None:
    """Why scheduled polls cannot run with these settings, or None."""
    if "/ACCOUNT/" in settings.masonhub.base_url:
        return "masonhub.base_url still holds the ACCOUNT placeholder"
    if not settings.masonhub.token.get_secret_value():
        return "masonhub.token is not set"
    return None


class PollScheduler:
    """The scheduled polls of one instance; only the holder of the leader lease runs them.

    APScheduler keeps no job store here (its FAQ forbids sharing one between processes):
    jobs are built from the config at every start, and their progress lives in our tables.
    """

    #: How long the leader lease lasts without renewal; renewed at a third of it.
    LEASE_TTL = 60.0

    def __init__(self, poller: Poller, store: SqlStore, settings: Settings, owner: str) -> None:
        self._poller = poller
        self._store = store
        self._settings = settings
        self.owner = owner
        self.leader = False
        #: Monotonic time each job last finished a pass, failed or not (for health).
        self.last_run: dict[str, float] = {}

    def add_jobs(self, scheduler: Any) -> None:
        """Add the [poll.*] and [reconcile] jobs, and the lease renewal, to ``scheduler``."""
        from apscheduler.triggers.cron import CronTrigger

        problem = polling_problem(self._settings)
        if problem is not None:
            log.warning("poll.disabled", reason=problem)
            return
        now = datetime.now(UTC)
        scheduler.add_job(
            self.renew_lease,
            "interval",
            seconds=self.LEASE_TTL / 3,
            id="leader_lease",
            max_instances=1,
            coalesce=True,
            next_run_time=now,
        )
        for job in JOBS:
            every = self._poller.job_settings(job).every
            if not self._poller.job_settings(job).enabled:
                continue
            scheduler.add_job(
                self.poll,
                "interval",
                seconds=every,
                args=[job],
                id=f"poll_{job}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(every / 2)),
                next_run_time=now + timedelta(seconds=min(every, 10.0)),
            )
        if self._settings.reconcile.enabled:
            scheduler.add_job(
                self.reconcile_all,
                CronTrigger.from_crontab(self._settings.reconcile.cron, timezone=UTC),
                id="reconcile",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=3600,
            )

    def reschedule(self, scheduler: Any, settings: Settings) -> None:
        """Replace the poll and reconcile jobs with ones built from new settings (SIGHUP)."""
        for job in scheduler.get_jobs():
            if job.id.startswith("poll_") or job.id in ("reconcile", "leader_lease"):
                job.remove()
        self._settings = settings
        self._poller.settings = settings
        self.add_jobs(scheduler)

    async def renew_lease(self) -> bool:
        """Take or keep the leader lease; polls run only while it is held."""
        try:
            leader = await self._store.acquire_lease(LEADER_LEASE, self.owner, self.LEASE_TTL)
        except SyncdError as exc:
            log.warning("poll.lease_failed", error=exc.message)
            leader = False
        if leader != self.leader:
            log.info("poll.leadership", leader=leader, owner=self.owner)
        self.leader = leader
        return leader

    async def poll(self, job: str) -> None:
        """One incremental pass of ``job``, if this instance leads."""
        if not await self.renew_lease():
            return
        try:
            await self._poller.incremental(job)
        except SyncdError as exc:
            log.warning("poll.pass_failed", job=job, error=exc.message)
        finally:
            self.last_run[job] = time.monotonic()

    async def reconcile_all(self) -> None:
        """The nightly full pass over every job, if this instance leads.

        With snapshotReady subscribed it also asks MasonHub for a full inventory snapshot,
        which arrives later by callback and is merged like any poll.
        """
        for job in JOBS:
            if not await self.renew_lease():
                return
            try:
                await self._poller.reconcile(job)
            except SyncdError as exc:
                log.warning("reconcile.pass_failed", job=job, error=exc.message)
        if "snapshotReady" in self._settings.webhooks.subscriptions:
            try:
                await self._poller.client.request_snapshot()
            except SyncdError as exc:
                log.warning("snapshot.request_failed", error=exc.message)
