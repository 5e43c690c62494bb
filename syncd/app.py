"""The daemon: the aiohttp application, its background services, and the run loop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd.config import Settings
from syncd.delivery import Deliverer
from syncd.erp import ErpAdapter, load_adapter
from syncd.errors import StoreUnavailable, SyncdError
from syncd.inbox import GroupCommitter
from syncd.masonhub import MasonHubClient
from syncd.merge import Merger
from syncd.poller import Poller, PollScheduler
from syncd.receiver import WebhookReceiver, add_routes
from syncd.store import SqlStore

log = structlog.get_logger(__name__)

STORE = web.AppKey("store", SqlStore)
SETTINGS = web.AppKey("settings", Settings)
RECEIVER = web.AppKey("receiver", WebhookReceiver)
SCHEDULER = web.AppKey("scheduler", AsyncIOScheduler)

#: How often processed inbox rows older than the dedupe retention are pruned.
PRUNE_EVERY = timedelta(hours=1)
#: How long a stop waits for in-flight requests before closing their connections.
SHUTDOWN_TIMEOUT = 30.0


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The store is reachable and its schema is this version's."""
    store = request.app[STORE]
    try:
        problem = (await store.schema_status()).problem()
    except StoreUnavailable as exc:
        problem = exc.message
    if problem is not None:
        return web.json_response({"status": "unavailable", "error": problem}, status=503)
    return web.json_response({"status": "ready"})


async def prune_inbox(store: SqlStore, retention: float) -> None:
    """Forget processed messages older than the dedupe retention."""
    cutoff = datetime.now(UTC) - timedelta(seconds=retention)
    try:
        messages, quarantined = await store.prune(cutoff)
    except StoreUnavailable as exc:
        log.warning("inbox.prune_failed", error=exc.message)
        return
    log.info("inbox.pruned", messages=messages, quarantined=quarantined, before=cutoff.isoformat())


class Supervisor:
    """Watches the daemon's background loops: one that dies unexpectedly stops the process.

    A loop that crashed would otherwise leave a process that answers 200 and never delivers.
    """

    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self.reason: str | None = None

    def watch(self, task: asyncio.Task[None] | None) -> None:
        """Treat ``task`` ending with an exception as fatal."""
        if task is not None:
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self.reason = f"{task.get_name()} failed: {exc!r}"
        log.critical("syncd.task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)
        self.failed.set()


SUPERVISOR = web.AppKey("supervisor", Supervisor)
MERGER = web.AppKey("merger", Merger)
DELIVERER = web.AppKey("deliverer", Deliverer)
POLLS = web.AppKey("polls", PollScheduler)


def create_app(
    settings: Settings, store: SqlStore | None = None, adapter: ErpAdapter | None = None
) -> web.Application:
    """The public application: webhook endpoint and health checks, with its services."""
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[SETTINGS] = settings
    app[STORE] = store = store or SqlStore(settings.store.url)
    app[SUPERVISOR] = supervisor = Supervisor()
    erp = adapter or load_adapter(settings.erp)
    app[DELIVERER] = deliverer = Deliverer(store, erp, settings.erp)
    app[MERGER] = merger = Merger(store, on_queued=deliverer.notify)
    committer = GroupCommitter(store, on_commit=merger.notify)
    app[RECEIVER] = WebhookReceiver(settings, store, committer)
    add_routes(app, settings, app[RECEIVER])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def store_ctx(_app: web.Application) -> AsyncIterator[None]:
        try:
            if settings.store.auto_migrate:
                await store.migrate()
            await store.require_current_schema()
            yield
        finally:
            await store.close()

    async def committer_ctx(_app: web.Application) -> AsyncIterator[None]:
        await committer.start()
        supervisor.watch(committer.task)
        yield
        await committer.stop()

    async def pipeline_ctx(_app: web.Application) -> AsyncIterator[None]:
        # Stopped in reverse: the merge finishes its batch before deliveries are drained.
        await deliverer.start()
        supervisor.watch(deliverer.task)
        await merger.start()
        supervisor.watch(merger.task)
        try:
            yield
        finally:
            await merger.stop()
            await deliverer.stop()
            await erp.close()

    # Jobs come from config at every start; their progress lives in our tables, so the
    # scheduler keeps no job store of its own.
    scheduler = app[SCHEDULER] = AsyncIOScheduler(timezone=UTC)
    masonhub = MasonHubClient(settings.masonhub)
    poller = Poller(store, masonhub, settings, on_queued=deliverer.notify)
    app[POLLS] = polls = PollScheduler(poller, store, settings, deliverer.owner)

    async def scheduler_ctx(_app: web.Application) -> AsyncIterator[None]:
        scheduler.add_job(
            prune_inbox,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            args=[store, settings.webhooks.dedupe_retention],
            id="prune_inbox",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(minutes=1),
        )
        polls.add_jobs(scheduler)
        scheduler.start()
        try:
            yield
        finally:
            # Jobs in progress are abandoned between pages: every page commits whole and a
            # cursor moves only after a complete pass, so nothing is half-recorded.
            scheduler.shutdown(wait=False)
            await masonhub.close()

    app.cleanup_ctx.extend([store_ctx, committer_ctx, pipeline_ctx, scheduler_ctx])
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT (or ``stop`` is set), then stop cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        await site.start()
        log.info(
            "syncd.listening",
            addresses=[str(a) for a in runner.addresses],
            webhook_path=settings.webhooks.path,
            store=app[STORE].dialect,
        )
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(app[SUPERVISOR].failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopped, failed):
            waiter.cancel()
        log.info("syncd.stopping")
        # Stop accepting connections, then let requests already reading their bodies finish:
        # aiohttp's own shutdown drops body bytes that arrive after it starts.
        await site.stop()
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await app[RECEIVER].drain()
        except TimeoutError:
            log.warning("syncd.drain_timeout", seconds=SHUTDOWN_TIMEOUT)
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    reason = app[SUPERVISOR].reason
    if reason is not None:
        raise SyncdError(reason)
    log.info("syncd.stopped")
