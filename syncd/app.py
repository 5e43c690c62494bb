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
from syncd.errors import StoreUnavailable
from syncd.inbox import GroupCommitter
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


def create_app(settings: Settings, store: SqlStore | None = None) -> web.Application:
    """The public application: webhook endpoint and health checks, with its services."""
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[SETTINGS] = settings
    app[STORE] = store or SqlStore(settings.store.url)
    committer = GroupCommitter(app[STORE])
    app[RECEIVER] = WebhookReceiver(settings, app[STORE], committer)
    add_routes(app, settings, app[RECEIVER])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = app[STORE]
        try:
            if settings.store.auto_migrate:
                await store.migrate()
            await store.require_current_schema()
            yield
        finally:
            await store.close()

    async def committer_ctx(_app: web.Application) -> AsyncIterator[None]:
        await committer.start()
        yield
        await committer.stop()

    # Jobs come from config at every start; their progress lives in our tables, so the
    # scheduler keeps no job store of its own.
    scheduler = app[SCHEDULER] = AsyncIOScheduler(timezone=UTC)

    async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
        scheduler.add_job(
            prune_inbox,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            args=[app[STORE], settings.webhooks.dedupe_retention],
            id="prune_inbox",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC) + timedelta(minutes=1),
        )
        scheduler.start()
        yield
        scheduler.shutdown(wait=False)

    app.cleanup_ctx.extend([store_ctx, committer_ctx, scheduler_ctx])
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
        await stop.wait()
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
    log.info("syncd.stopped")
