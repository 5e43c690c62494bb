"""Shared fixtures: a fresh PostgreSQL database per test run, stores on both backends."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aioresponses import aioresponses
from sqlalchemy.engine import make_url
from yarl import URL

from syncd.config import Settings, settings_from_dict
from syncd.store import SqlStore

PG_ADMIN_URL = os.environ.get("SYNCD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SECRET = "test-webhook-secret"
BACKENDS = ["sqlite", "postgresql"]


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _blocking(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class PgDatabases:
    """Creates empty PostgreSQL databases on the local server and drops them at the end."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:10]
        self.created: list[str] = []

    def create(self) -> str:
        name = f"syncd_test_{self.run_id}_{len(self.created)}"
        _blocking(_admin(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return (
            make_url(PG_ADMIN_URL)
            .set(drivername="postgresql+asyncpg", database=name)
            .render_as_string(hide_password=False)
        )

    def drop_all(self) -> None:
        for name in self.created:
            _blocking(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    """Fresh databases for this test run; PostgreSQL must be running (make test starts it)."""
    databases = PgDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def pg_migrated_url(pg_databases: PgDatabases) -> str:
    """One migrated database shared by the run; tests empty its tables after use."""
    url = pg_databases.create()

    async def migrate() -> None:
        store = SqlStore(url)
        await store.migrate()
        await store.close()

    _blocking(migrate())
    return url


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        await conn.execute(
            "TRUNCATE inbox, quarantine, entities, facts, outbox, delivery_attempts,"
            " poll_cursors, poll_runs, leases"
            " RESTART IDENTITY CASCADE"
        )
    finally:
        await conn.close()


@pytest.fixture
def empty_store_url(
    request: pytest.FixtureRequest, tmp_path: Path, pg_databases: PgDatabases
) -> Callable[[str], str]:
    """A factory of URLs of empty, unmigrated databases for a backend."""

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / uuid.uuid4().hex}.db"
        return pg_databases.create()

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: the store contract holds on both."""
    return str(request.param)


@pytest.fixture
async def store_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A migrated, empty store of the parametrised backend."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'syncd.db'}"
        store = SqlStore(url)
        await store.migrate()
        await store.close()
        yield url
        return
    url = request.getfixturevalue("pg_migrated_url")
    yield url
    await _truncate(url)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    """An open SqlStore on a migrated, empty database."""
    store = SqlStore(store_url)
    yield store
    await store.close()


def make_settings(store_url: str = "sqlite+aiosqlite:///:memory:", **sections: Any) -> Settings:
    """Settings for tests: signed webhooks with SECRET, the given store, overrides per section."""
    raw: dict[str, Any] = {
        "store": {"url": store_url},
        "webhooks": {"signing_secrets": [SECRET]},
        "server": {"host": "127.0.0.1", "port": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return settings_from_dict(raw, environ={})


# --- aioresponses ---------------------------------------------------------------------------


class _SentUpload:
    """Stands for a request body already written: all ClientResponse reads of it."""

    output_size = 0


class _CompatResponse(aiohttp.ClientResponse):
    """A ClientResponse aioresponses 0.7.9 can build under aiohttp 3.14.

    aiohttp 3.14 added a required ``stream_writer`` argument that aioresponses does not pass
    (pnuckowski/aioresponses#289); drop this once a fixed release is out.
    """

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _SentUpload())
        super().__init__(method, url, **kwargs)


class _Aioresponses(aioresponses):
    """aioresponses building every mocked response as a `_CompatResponse`."""

    def add(self, url: Any, method: str = "GET", **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _CompatResponse)
        super().add(url, method, **kwargs)


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    """Every aiohttp request answered by aioresponses."""
    with _Aioresponses() as mock:
        yield mock
