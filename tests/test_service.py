"""syncd as a service: systemd unit, sd_notify, watchdog, metrics, status, SIGTERM, SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from syncd import app as daemon
from syncd.app import DELIVERER, create_admin_app, create_app, watch
from syncd.notify import Notifier
from syncd.store import SqlStore
from syncd.testing import ErpCall, LocalErp, RecordingErp, dumps, envelope, sign
from tests.conftest import SECRET, make_settings
from tests.test_cli import ROOT, free_port, syncd

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


# --- the unit file ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (pointed at this checkout's venv)."""
    unit = (ROOT / "systemd" / "syncd.service").read_text()
    local = unit.replace("/opt/syncd/.venv/bin/syncd", str(Path(sys.executable).parent / "syncd"))
    path = tmp_path / "syncd.service"
    path.write_text(local)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for directive in (
        "Type=notify",
        "WatchdogSec=30",
        "DynamicUser=yes",
        "StateDirectory=syncd",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "LoadCredential=webhook-secret:",
        "ExecStartPre=/opt/syncd/.venv/bin/syncd migrate",
    ):
        assert directive in unit


# --- sd_notify -------------------------------------------------------------------------------


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def collect(self, seconds: float) -> list[str]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            self.messages.append(data.decode())
        return self.messages

    async def wait_for(self, needle: str, within: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not any(needle in m for m in self.messages):
            if loop.time() > deadline:
                raise AssertionError(f"no {needle!r} in {self.messages}")
            await self.collect(0.05)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    """A bound notify socket, closed after the test."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock  # type: ignore[misc]
    sock.close()


def write_service_config(
    tmp_path: Path, port: int, admin_port: int, *, extra: str = "", subscriptions: str = ""
) -> Path:
    path = tmp_path / "syncd.toml"
    path.write_text(
        f"""
[server]
port = {port}

[admin]
port = {admin_port}

[store]
url = "sqlite+aiosqlite:///{tmp_path / "service.db"}"
auto_migrate = true

[webhooks]
signing_secrets = ["{SECRET}"]
{subscriptions}
{extra}
"""
    )
    return path


async def start(
    config: Path, log: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    with log.open("a") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "syncd",
            "run",
            "--config",
            str(config),
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )


async def wait_ready(admin_port: int, within: float = 20.0) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(within / 0.05)):
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("syncd did not become ready")


async def test_notify_messages_in_order(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """READY=1 comes only once the webhook port accepts, then WATCHDOG=1 pings, STOPPING=1 last."""
    port, admin_port = free_port(), free_port()
    config = write_service_config(tmp_path, port, admin_port)
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    process = await start(config, tmp_path / "syncd.log", env)
    try:
        await notify_socket.wait_for("READY=1")
        # At READY the listener must already accept connections.
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await notify_socket.collect(1.0)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        await notify_socket.collect(0.2)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    messages = notify_socket.messages
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    pings = [i for i, m in enumerate(messages) if m == "WATCHDOG=1"]
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert len(pings) >= 2
    assert ready < pings[0]
    assert pings[-1] < stopping
    assert stopping == max(i for i, m in enumerate(messages) if "STOPPING" in m or "WATCHDOG" in m)
    assert any(m.startswith("STATUS=pending 0, dead 0") for m in messages)


class StalledStore(SqlStore):
    """A store whose delivery claims never return: a wedged worker pool."""

    async def claim_deliveries(self, owner: str, limit: int, lease_seconds: float) -> Any:
        await asyncio.Event().wait()


async def test_watchdog_pings_stop_when_workers_wedge(
    tmp_path: Path,
    notify_socket: NotifySocket,
    aiohttp_client: ClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the delivery loop is stuck, the watchdog pings stop (so systemd restarts us)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'w.db'}"
    # Long enough that a stall of the machine between start-up and the first window does not
    # already count as wedged (0.5 s did once, on a loaded CI machine).
    monkeypatch.setattr(daemon, "WEDGED_AFTER", 2.0)
    settings = make_settings(url, store={"auto_migrate": True})
    client = await aiohttp_client(
        create_app(settings, store=StalledStore(url), adapter=RecordingErp())
    )
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "100000"})
    watcher = asyncio.create_task(watch(client.app, notifier))
    try:
        early = list(await notify_socket.collect(0.3))
        notify_socket.messages.clear()
        await notify_socket.collect(2.0)  # crossing WEDGED_AFTER
        notify_socket.messages.clear()
        late = await notify_socket.collect(0.6)
    finally:
        watcher.cancel()
        notifier.close()
    assert early.count("WATCHDOG=1") >= 1
    assert "WATCHDOG=1" not in late
    assert client.app[DELIVERER].last_tick > 0


def test_notifier_without_systemd_does_nothing() -> None:
    """Without NOTIFY_SOCKET every notification is a no-op."""
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")
    notifier.watchdog()
    notifier.stopping()


# --- metrics and status ------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"no {name} {labels}")


async def test_metrics_after_scenario(
    store_url: str,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: ClientFactory,
) -> None:
    """/metrics counts webhooks by outcome, deliveries, retries, dead letters and the outbox."""
    erp = LocalErp()
    failures = {"/api/orders/M-1": 1, "/api/orders/M-3": 99}

    async def script(call: ErpCall) -> web.Response | None:
        if call.path == "/api/orders/M-3":
            return web.json_response({"error": "no"}, status=400)
        if failures.get(call.path, 0):
            failures[call.path] -= 1
            return web.json_response({}, status=503)
        return None

    erp.respond = script
    server = await aiohttp_server(erp.app())
    settings = make_settings(
        store_url,
        erp={"base_url": str(server.make_url("/api")), "backoff_initial": "50ms"},
    )
    client = await aiohttp_client(create_app(settings))
    admin = await aiohttp_client(create_admin_app(client.app))

    async def post(body: bytes, secret: str = SECRET) -> int:
        headers = {"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, secret)}
        return (await client.post("/webhooks/masonhub", data=body, headers=headers)).status

    for key in ("M-1", "M-2", "M-3"):
        body = dumps(
            envelope("orderEvent", [{"customer_identifier": key, "status": "packed"}], key)
        )
        assert await post(body) == 200
    assert await post(body) == 200  # duplicate
    assert await post(body, secret="wrong") == 401
    assert await post(b"{nope") == 400
    await erp.wait_for(
        lambda: (
            "/api/orders/M-1" in erp.records
            and "/api/orders/M-2" in erp.records
            and len(erp.calls_to("/api/orders/M-3")) == 1
        )
    )
    await asyncio.sleep(0.2)
    text = await (await admin.get("/metrics")).text()
    webhooks = "syncd_webhooks_received_total"
    assert metric(text, webhooks, message_type="orderEvent", outcome="received") == 3
    assert metric(text, webhooks, message_type="orderEvent", outcome="duplicate") == 1
    assert metric(text, webhooks, message_type="other", outcome="unauthenticated") == 1
    assert metric(text, webhooks, message_type="other", outcome="malformed") == 1
    deliveries = "syncd_erp_deliveries_total"
    assert metric(text, deliveries, entity_type="order", outcome="delivered") == 2
    assert metric(text, deliveries, entity_type="order", outcome="retry") == 1
    assert metric(text, deliveries, entity_type="order", outcome="dead") == 1
    assert metric(text, "syncd_erp_retries_total") == 1
    assert metric(text, "syncd_erp_dead_letters_total") == 1
    assert metric(text, "syncd_outbox_depth", state="dead") == 1
    assert metric(text, "syncd_outbox_depth", state="pending") == 0
    assert metric(text, "syncd_webhook_ingest_seconds_count") == 6
    assert metric(text, "syncd_erp_request_seconds_count", entity_type="order") == 2
    report = await (await admin.get("/status?format=json")).json()
    assert report["outbox"] == {"dead": 1}
    assert report["problems"] == ["1 dead-lettered deliveries (syncd events list --state dead)"]
    page = await (await admin.get("/status", headers={"Accept": "text/html"})).text()
    assert "<svg" in page
    assert "needs attention" in page


async def seed_status(db: Path, *, dead: bool = False, poll_ok: bool = False) -> None:
    from syncd.facts import order_fact

    store = SqlStore(f"sqlite+aiosqlite:///{db}")
    await store.migrate()
    await store.apply_facts(
        [order_fact({"customer_identifier": "S-1", "status": "packed"}, "poll")]
    )
    [claim] = await store.claim_deliveries("seed", 1, 60)
    now = datetime.now(UTC)
    if dead:
        await store.fail_delivery(
            claim, "seed", started_at=now, status=400, error="no", retry_at=None, permanent=True
        )
    else:
        await store.complete_delivery(claim, "seed", started_at=now, status=200)
    if poll_ok:
        for job in ("orders", "shipments", "inventory", "inbound_shipments", "rmas"):
            await store.record_run(job, "poll", now, {"records": 0}, None)
    await store.close()


@pytest.mark.parametrize(
    ("dead", "polling", "poll_ok", "code", "needle"),
    [
        pytest.param(False, False, False, 0, "all well", id="healthy"),
        pytest.param(True, False, False, 1, "1 dead-lettered deliveries", id="dead-letter"),
        pytest.param(False, True, False, 1, "poll orders is stale: last success never", id="stale"),
        pytest.param(False, True, True, 0, "all well", id="polls-fresh"),
    ],
)
async def test_status_exit_codes(
    tmp_path: Path, dead: bool, polling: bool, poll_ok: bool, code: int, needle: str
) -> None:
    """syncd status exits 1 for dead letters and stale polls, 0 when all is well."""
    db = tmp_path / "status.db"
    await seed_status(db, dead=dead, poll_ok=poll_ok)
    masonhub = (
        '[masonhub]\nbase_url = "http://127.0.0.1:9/api/v1"\ntoken = "t"\n' if polling else ""
    )
    config = tmp_path / "c.toml"
    config.write_text(
        f'[store]\nurl = "sqlite+aiosqlite:///{db}"\n[webhooks]\nsigning_secrets = ["s"]\n'
        + masonhub
    )
    result = await asyncio.to_thread(syncd, "status", "--config", str(config))
    assert result.returncode == code, result.stdout + result.stderr
    assert needle in result.stdout
    as_json = await asyncio.to_thread(syncd, "status", "--json", "--config", str(config))
    assert json.loads(as_json.stdout)["outbox"] == ({"dead": 1} if dead else {})


# --- SIGTERM under load, SIGHUP ----------------------------------------------------------------


async def test_sigterm_during_burst_loses_nothing(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """SIGTERM during a burst: every 200 is stored, exit 0, and after a restart each stored
    order reaches the ERP exactly once."""
    erp = LocalErp()

    async def slow(_call: ErpCall) -> None:
        await asyncio.sleep(0.05)

    erp.respond = slow
    server = await aiohttp_server(erp.app())
    port, admin_port = free_port(), free_port()
    extra = f'[erp]\nbase_url = "{server.make_url("/api")}"\nconcurrency = 4\n'
    config = write_service_config(tmp_path, port, admin_port, extra=extra)
    log = tmp_path / "syncd.log"
    process = await start(config, log)
    await wait_ready(admin_port)
    url = f"http://127.0.0.1:{port}/webhooks/masonhub"
    answers: dict[str, int] = {}
    some_answered = asyncio.Event()

    async def send(session: aiohttp.ClientSession, n: int) -> None:
        body = dumps(
            envelope(
                "orderEvent", [{"customer_identifier": f"B-{n}", "status": "packed"}], f"b-{n}"
            )
        )
        headers = {"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)}
        try:
            async with session.post(url, data=body, headers=headers) as response:
                answers[f"B-{n}"] = response.status
                if sum(status == 200 for status in answers.values()) >= 10:
                    some_answered.set()
        except aiohttp.ClientError:
            answers[f"B-{n}"] = 0

    async with aiohttp.ClientSession() as session:
        first = [asyncio.create_task(send(session, n)) for n in range(150)]
        # SIGTERM in the middle of the burst: once some answers are back, many still in flight.
        async with asyncio.timeout(30):
            await some_answered.wait()
        process.send_signal(signal.SIGTERM)
        later = [asyncio.create_task(send(session, n)) for n in range(150, 200)]
        await asyncio.gather(*first, *later)
    assert await process.wait() == 0
    acknowledged = {key for key, status in answers.items() if status == 200}
    assert acknowledged, answers
    assert all(status in (200, 503, 0) for status in answers.values())
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")
    try:
        stored = {m.message_id for m in await store.list_messages(limit=1000)}
    finally:
        await store.close()
    assert {f"b-{k.split('-')[1]}" for k in acknowledged} <= stored
    restarted = await start(config, log)
    try:
        await wait_ready(admin_port)
        await erp.wait_for(
            lambda: all(f"/api/orders/B-{m.split('-')[1]}" in erp.records for m in stored),
            within=30,
        )
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await restarted.wait() == 0
    for message_id in stored:
        assert len(erp.calls_to(f"/api/orders/B-{message_id.split('-')[1]}")) == 1


async def test_sighup_reloads_subscriptions(tmp_path: Path) -> None:
    """SIGHUP applies a new subscriptions list and names keys that need a restart."""
    port, admin_port = free_port(), free_port()
    config = write_service_config(tmp_path, port, admin_port)
    log = tmp_path / "syncd.log"
    process = await start(config, log)
    url = f"http://127.0.0.1:{port}/webhooks/masonhub"
    body = dumps(envelope("rmaEvent", [{"customer_identifier": "R-1", "status": "received"}], "r1"))
    headers = {"Content-Type": "application/json", "X-MasonHub-Signature": sign(body, SECRET)}
    try:
        await wait_ready(admin_port)
        write_service_config(
            tmp_path,
            port,
            admin_port,
            subscriptions='subscriptions = ["orderEvent"]',
            extra='[erp]\ntimeout = "3s"\n',
        )
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers) as response,
        ):
            assert await response.json() == {"status": "ignored"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    restart = [e["key"] for e in events if e["event"] == "config.restart_required"]
    assert restart == ["erp.timeout"]
    assert any(e["event"] == "config.reloaded" for e in events)


def test_snapshot_download_only_from_masonhub() -> None:
    """A snapshotReady download_url on another host is refused: the token must not leak."""
    from syncd.app import snapshot_problem

    settings = make_settings(
        masonhub={"base_url": "https://app.masonhub.co/acct/api/v1", "token": "t"}
    )
    ok = "https://app.masonhub.co/acct/api/v1/snapshot_download/1.json"
    assert snapshot_problem(settings, ok) is None
    assert "not on masonhub.base_url's host" in (
        snapshot_problem(settings, "https://evil.example/steal.json") or ""
    )
    assert snapshot_problem(settings, "http://app.masonhub.co/acct/x.json") is not None
    unconfigured = make_settings()
    assert "ACCOUNT placeholder" in (snapshot_problem(unconfigured, ok) or "")
