"""The daemon: the aiohttp application, its background services, and the run loop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from yarl import URL

from syncd.config import Settings
from syncd.delivery import Deliverer
from syncd.erp import ErpAdapter, load_adapter
from syncd.errors import StoreUnavailable, SyncdError
from syncd.inbox import GroupCommitter
from syncd.masonhub import MasonHubClient
from syncd.merge import BUSY_BATCH, Merger
from syncd.metrics import Metrics
from syncd.notify import Notifier
from syncd.poller import Poller, PollScheduler, polling_problem
from syncd.receiver import WebhookReceiver, add_routes
from syncd.store import SqlStore

log = structlog.get_logger(__name__)

STORE = web.AppKey("store", SqlStore)
SETTINGS = web.AppKey("settings", Settings)
RECEIVER = web.AppKey("receiver", WebhookReceiver)
SCHEDULER = web.AppKey("scheduler", AsyncIOScheduler)
METRICS = web.AppKey("metrics", Metrics)
MAIN = web.AppKey("main", web.Application)

#: How often processed inbox rows older than the dedupe retention are pruned.
PRUNE_EVERY = timedelta(hours=1)
#: How long a stop waits for in-flight requests before closing their connections.
SHUTDOWN_TIMEOUT = 30.0
#: Seconds an idle keep-alive connection, or one that never finishes its request headers
#: (slowloris), is kept open; aiohttp's own default is an hour.
KEEPALIVE_TIMEOUT = 75.0
#: A background loop that has not come round for this long is wedged: watchdog pings stop.
WEDGED_AFTER = 30.0
#: How often the systemd status line is refreshed.
STATUS_EVERY = 10.0


async def healthz(_request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The store is reachable and its schema is this version's."""
    store = request.app[MAIN][STORE]
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
    settings: Settings,
    store: SqlStore | None = None,
    adapter: ErpAdapter | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The public application (the webhook endpoint and /healthz) with every service."""
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics = metrics or Metrics()
    app[STORE] = store = store or SqlStore(settings.store.url)
    app[SUPERVISOR] = supervisor = Supervisor()
    erp = adapter or load_adapter(settings.erp)
    app[DELIVERER] = deliverer = Deliverer(store, erp, settings.erp, metrics=metrics)
    masonhub = MasonHubClient(settings.masonhub)
    poller = Poller(store, masonhub, settings, on_queued=deliverer.notify, metrics=metrics)
    snapshots: set[asyncio.Task[None]] = set()

    def on_snapshot(url: str) -> None:
        problem = snapshot_problem(settings, url)
        if problem is not None:
            log.warning("snapshot.ignored", reason=problem)
            return
        # Imported in the background: the merge loop must not wait for a large download.
        task = asyncio.create_task(_import_snapshot(poller, url), name="syncd.snapshot")
        snapshots.add(task)
        task.add_done_callback(snapshots.discard)

    app[MERGER] = merger = Merger(
        store,
        on_queued=deliverer.notify,
        on_snapshot=on_snapshot,
        # While webhooks are being committed the merge waits a little (MERGE_LINGER) and, on
        # SQLite, where it shares the store thread with the commits, takes less at a time.
        busy=lambda: committer.busy,
        busy_batch=BUSY_BATCH if store.dialect == "sqlite" else None,
    )
    committer = GroupCommitter(store, on_commit=merger.notify)
    app[RECEIVER] = WebhookReceiver(settings, store, committer, metrics)
    add_routes(app, settings, app[RECEIVER])
    app.router.add_get("/healthz", healthz)

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
            for task in list(snapshots):
                task.cancel()
            await asyncio.gather(*snapshots, return_exceptions=True)
            await masonhub.close()

    app.cleanup_ctx.extend([store_ctx, committer_ctx, pipeline_ctx, scheduler_ctx])
    return app


def snapshot_problem(settings: Settings, url: str) -> str | None:
    """Why a snapshotReady download_url must not be fetched, or None.

    The download carries our MasonHub token, so it goes only to MasonHub's own origin: a
    callback naming any other host would otherwise hand the token to it.
    """
    problem = polling_problem(settings)
    if problem is not None:
        return problem
    base, target = URL(settings.masonhub.base_url), URL(url)
    if (target.scheme, target.host, target.port) != (base.scheme, base.host, base.port):
        return f"download_url is not on masonhub.base_url's host ({target.host})"
    return None


async def _import_snapshot(poller: Poller, url: str) -> None:
    try:
        await poller.import_snapshot(url)
    except SyncdError as exc:
        log.warning("snapshot.import_failed", error=exc.message)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus exposition; store gauges are read at scrape time."""
    main = request.app[MAIN]
    metrics, store = main[METRICS], main[STORE]
    try:
        counts = await store.outbox_counts()
        oldest = await store.oldest_pending()
    except StoreUnavailable:
        counts, oldest = {}, None
    for state in ("pending", "dead"):
        metrics.outbox_depth.labels(state).set(counts.get(state, 0))
    age = 0.0 if oldest is None else (datetime.now(UTC) - oldest).total_seconds()
    metrics.oldest_pending.set(max(0.0, age))
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


async def status_endpoint(request: web.Request) -> web.Response:
    """The status report: JSON for machines, a small HTML page for a person."""
    from syncd import status

    main = request.app[MAIN]
    store = main[STORE]
    try:
        report = await status.collect(store, main[SETTINGS])
    except StoreUnavailable as exc:
        return web.json_response({"status": "unavailable", "error": exc.message}, status=503)
    wants_json = request.query.get("format") == "json" or (
        "application/json" in request.headers.get("Accept", "")
        and "text/html" not in request.headers.get("Accept", "")
    )
    if wants_json:
        return web.json_response(report, status=200)
    history = await store.attempts_since(datetime.now(UTC) - timedelta(hours=24))
    return web.Response(text=status.render_html(report, history), content_type="text/html")


def create_admin_app(main: web.Application) -> web.Application:
    """The private listener: /metrics, /status, /healthz and /readyz of the main app."""
    admin = web.Application()
    admin[MAIN] = main
    admin.router.add_get("/metrics", metrics_endpoint)
    admin.router.add_get("/status", status_endpoint)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    return admin


def health_problem(app: web.Application, now: float) -> str | None:
    """Why the daemon is not healthy (watchdog pings stop), or None."""
    for name, tick in (
        ("delivery loop", app[DELIVERER].last_tick),
        ("merge loop", app[MERGER].last_tick),
    ):
        if now - tick > WEDGED_AFTER:
            return f"{name} has not run for {now - tick:.0f}s"
    if app[SUPERVISOR].failed.is_set():
        return app[SUPERVISOR].reason
    return None


async def watch(app: web.Application, notifier: Notifier) -> None:
    """Ping the systemd watchdog while healthy, and keep the status line current."""
    from syncd import status

    loop = asyncio.get_running_loop()
    interval = notifier.watchdog_interval or STATUS_EVERY
    next_status = 0.0
    while True:
        problem = health_problem(app, loop.time())
        if problem is None:
            notifier.watchdog()
        else:
            log.error("syncd.unhealthy", problem=problem)
        if loop.time() >= next_status:
            next_status = loop.time() + STATUS_EVERY
            try:
                notifier.status(status.summary(await status.collect(app[STORE], app[SETTINGS])))
            except StoreUnavailable as exc:
                notifier.status(f"store unavailable: {exc.message}")
        await asyncio.sleep(min(interval, STATUS_EVERY))


def reload_settings(app: web.Application, new: Settings) -> list[str]:
    """Apply what can change without a restart; returns the keys that need one."""
    old = app[SETTINGS]
    changed = _changed_keys(old.model_dump(), new.model_dump())
    live = ("poll.", "reconcile.", "webhooks.subscriptions")
    app[RECEIVER].set_subscriptions(new.webhooks.subscriptions)
    app[POLLS].reschedule(app[SCHEDULER], new)
    return [key for key in changed if not key.startswith(live)]


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [
            k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [] if old == new else [prefix.rstrip(".")]


async def serve(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    reload: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Run the daemon until SIGTERM or SIGINT (or ``stop`` is set), then stop cleanly.

    READY=1 goes to systemd only once the store is checked, both listeners are bound and the
    scheduler runs. SIGHUP re-reads the config through ``reload``.
    """
    stop = stop or asyncio.Event()
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    app = create_app(settings)
    admin = create_admin_app(app)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _on_hup(app, reload))
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
    )
    admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=5)
    await runner.setup()
    watcher: asyncio.Task[None] | None = None
    try:
        await admin_runner.setup()
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        await site.start()
        await web.TCPSite(admin_runner, settings.admin.host, settings.admin.port).start()
        log.info(
            "syncd.listening",
            addresses=[str(a) for a in runner.addresses],
            admin=[str(a) for a in admin_runner.addresses],
            webhook_path=settings.webhooks.path,
            store=app[STORE].dialect,
        )
        notifier.ready("listening")
        watcher = asyncio.create_task(watch(app, notifier), name="syncd.watchdog")
        await _until_stop(stop, app[SUPERVISOR])
        log.info("syncd.stopping")
        notifier.stopping()
        # Stop accepting connections, then let requests already reading their bodies finish:
        # aiohttp's own shutdown drops body bytes that arrive after it starts.
        await site.stop()
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await app[RECEIVER].drain()
        except TimeoutError:
            log.warning("syncd.drain_timeout", seconds=SHUTDOWN_TIMEOUT)
    finally:
        if watcher is not None:
            watcher.cancel()
        await admin_runner.cleanup()
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        notifier.close()
    reason = app[SUPERVISOR].reason
    if reason is not None:
        raise SyncdError(reason)
    log.info("syncd.stopped")


async def _until_stop(stop: asyncio.Event, supervisor: Supervisor) -> None:
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(supervisor.failed.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    for waiter in (stopped, failed):
        waiter.cancel()


def _on_hup(app: web.Application, reload: Callable[[], Settings]) -> None:
    try:
        new = reload()
    except SyncdError as exc:
        log.error("config.reload_failed", error=exc.message)
        return
    restart = reload_settings(app, new)
    log.info("config.reloaded", applied=["poll", "reconcile", "webhooks.subscriptions"])
    for key in restart:
        log.warning("config.restart_required", key=key)
