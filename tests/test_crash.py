"""Crash safety: syncd killed with SIGKILL mid-delivery loses nothing and repeats at most once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from syncd.testing import ErpCall, LocalErp, dumps, envelope, sign
from tests.test_cli import free_port
from tests.test_service import start, wait_ready

SECRET = "crash-test-secret"


def write_config(path: Path, db: Path, port: int, erp_url: str) -> Path:
    path.write_text(
        f"""
[server]
port = {port}

[admin]
port = {port + 1}

[store]
url = "sqlite+aiosqlite:///{db}"
auto_migrate = true

[webhooks]
signing_secrets = ["{SECRET}"]

[erp]
base_url = "{erp_url}"
timeout = "3s"
backoff_initial = "100ms"
backoff_max = "1s"
"""
    )
    return path


async def start_syncd(config: Path, port: int, log: Path) -> asyncio.subprocess.Process:
    """`syncd run` as a child process, once its admin listener (port + 1) says ready."""
    process = await start(config, log)
    try:
        await wait_ready(port + 1)
    except AssertionError:
        process.kill()
        raise
    return process


async def test_kill_during_delivery_then_restart(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path
) -> None:
    """SIGKILL while the ERP call is in flight: after restart the lease expires and the
    delivery completes, with one extra call at most, carrying the same Idempotency-Key."""
    erp = LocalErp()
    first_call = asyncio.Event()
    hold = asyncio.Event()

    async def hang_first(_call: ErpCall) -> web.Response | None:
        if not first_call.is_set():
            first_call.set()
            await hold.wait()  # never answered: the caller dies first
        return None

    erp.respond = hang_first
    server = await aiohttp_server(erp.app())
    port = free_port()
    config = write_config(
        tmp_path / "c.toml", tmp_path / "s.db", port, str(server.make_url("/api"))
    )
    log = tmp_path / "syncd.log"
    process = await start_syncd(config, port, log)
    body = dumps(
        envelope(
            "orderEvent",
            [
                {
                    "customer_identifier": "K-1",
                    "status": "fulfilled",
                    "shipments": [{"shipment_id": "s1", "tracking_number": "1ZKILL"}],
                }
            ],
            "kill-1",
        )
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/webhooks/masonhub",
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-MasonHub-Signature": sign(body, SECRET),
            },
        ) as response,
    ):
        assert response.status == 200
    async with asyncio.timeout(10):
        await first_call.wait()
    process.send_signal(signal.SIGKILL)
    await process.wait()
    restarted = await start_syncd(config, port, log)
    try:
        await erp.wait_for(lambda: "/api/orders/K-1" in erp.records, within=30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await restarted.wait() == 0
        hold.set()
    calls = erp.calls_to("/api/orders/K-1")
    assert len(calls) == 2
    assert calls[0].headers["Idempotency-Key"] == calls[1].headers["Idempotency-Key"]
    assert erp.records["/api/orders/K-1"]["shipments"][0]["tracking_number"] == "1ZKILL"
