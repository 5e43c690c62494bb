"""Multi-instance safety: scheduled polls run on the one instance holding the leader lease."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from syncd.masonhub import MasonHubClient
from syncd.poller import LEADER_LEASE, Poller, PollScheduler
from syncd.store import SqlStore
from tests.conftest import make_settings


@pytest.mark.postgres
async def test_two_instances_run_each_pass_once(
    pg_migrated_url: str, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Two instances sharing PostgreSQL both fire the orders job: MasonHub is read once."""
    reads = 0

    async def orders(_request: web.Request) -> web.Response:
        nonlocal reads
        reads += 1
        return web.json_response([])

    api = web.Application()
    api.router.add_get("/api/v1/orders", orders)
    server = await aiohttp_server(api)
    settings = make_settings(
        pg_migrated_url,
        masonhub={"base_url": str(server.make_url("/api/v1")), "token": "t"},
    )
    stores = [SqlStore(pg_migrated_url), SqlStore(pg_migrated_url)]
    clients = [MasonHubClient(settings.masonhub) for _ in stores]
    instances = [
        PollScheduler(Poller(store, client, settings), store, settings, owner=f"host-{i}")
        for i, (store, client) in enumerate(zip(stores, clients, strict=True))
    ]
    try:
        await asyncio.gather(*(instance.poll("orders") for instance in instances))
        assert reads == 1
        assert sorted(i.leader for i in instances) == [False, True]
        holder = await stores[0].lease_holder(LEADER_LEASE)
        assert holder is not None
        leader = next(i for i in instances if i.leader)
        assert holder[0] == leader.owner
        # The follower takes over once the leader stops renewing and the lease runs out.
        follower = next(i for i in instances if not i.leader)
        assert not await stores[0].acquire_lease(LEADER_LEASE, follower.owner, 60)
        assert await stores[0].acquire_lease(LEADER_LEASE, leader.owner, 0.1)
        await asyncio.sleep(0.2)
        await follower.poll("orders")
        assert follower.leader
        assert reads == 2
    finally:
        for client in clients:
            await client.close()
        for store in stores:
            await store.close()
        from tests.conftest import _truncate

        await _truncate(pg_migrated_url)


async def test_lease_contract(store: SqlStore) -> None:
    """A lease is held by one owner, renewed by it, and taken over only after it expires."""
    assert await store.acquire_lease("job", "a", 60)
    assert await store.acquire_lease("job", "a", 60)
    assert not await store.acquire_lease("job", "b", 60)
    assert await store.acquire_lease("job", "a", 0.05)
    await asyncio.sleep(0.1)
    assert await store.acquire_lease("job", "b", 60)
    assert not await store.acquire_lease("job", "a", 60)
