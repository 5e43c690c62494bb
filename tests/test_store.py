"""The store contract: the same behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, make_url

from syncd.errors import SchemaMismatch, StoreUnavailable
from syncd.inbox import GroupCommitter
from syncd.store import (
    InboxState,
    NewMessage,
    QuarantinedBody,
    SchemaState,
    SqlStore,
    metadata,
)
from syncd.testing import TcpProxy


def message(key: str, *, at: datetime | None = None, body: bytes = b"{}") -> NewMessage:
    return NewMessage(
        dedupe_key=key,
        message_type="orderEvent",
        message_id=key,
        source="webhook",
        body=body,
        received_at=at or datetime.now(UTC),
        headers={"content-type": "application/json"},
        remote_addr="127.0.0.1",
    )


async def test_new_and_duplicate_messages(store: SqlStore) -> None:
    """A message is new once; the same dedupe key again is a duplicate and stores nothing."""
    assert await store.add_messages([message("a"), message("b")]) == [True, True]
    assert await store.add_messages([message("b"), message("c")]) == [False, True]
    assert await store.count_messages() == 3


async def test_duplicate_inside_one_batch(store: SqlStore) -> None:
    """A key repeated inside one batch is new only at its first place."""
    assert await store.add_messages([message("x"), message("x"), message("y")]) == [
        True,
        False,
        True,
    ]
    assert await store.count_messages() == 2


async def test_large_batch_spans_insert_chunks(store: SqlStore) -> None:
    """A batch larger than one INSERT statement is stored whole, in one transaction."""
    keys = [f"k{i}" for i in range(1234)]
    assert all(await store.add_messages([message(k) for k in keys]))
    assert await store.count_messages() == 1234


async def test_message_round_trip(store: SqlStore) -> None:
    """What is stored comes back byte for byte, with an aware UTC timestamp."""
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    body = b'{"message_type":"orderEvent","data":[{"x":"\xc3\xa9"}]}'
    await store.add_messages([message("rt", at=at, body=body)])
    stored = await store.get_message_by_key("rt")
    assert stored is not None
    assert stored.body == body
    assert stored.received_at == at
    assert stored.received_at.tzinfo is not None
    assert stored.state is InboxState.PENDING
    assert stored.headers == {"content-type": "application/json"}
    assert await store.get_message(stored.id) == stored


async def test_list_messages_filters(store: SqlStore) -> None:
    """Messages are listed oldest first and filter by state, type and time."""
    old = datetime.now(UTC) - timedelta(days=2)
    await store.add_messages([message("old", at=old), message("new")])
    listed = await store.list_messages()
    assert [m.dedupe_key for m in listed] == ["old", "new"]
    await store.set_message_state(listed[0].id, InboxState.FAILED, error="no customer id")
    failed = await store.list_messages(state=InboxState.FAILED)
    assert [(m.dedupe_key, m.error) for m in failed] == [("old", "no customer id")]
    recent = await store.list_messages(since=datetime.now(UTC) - timedelta(hours=1))
    assert [m.dedupe_key for m in recent] == ["new"]
    assert await store.list_messages(message_type="rmaEvent") == []


async def test_quarantine_round_trip(store: SqlStore) -> None:
    """An unparseable body is kept with its reason."""
    item = QuarantinedBody(reason="invalid JSON", body=b"{not json", received_at=datetime.now(UTC))
    item_id = await store.add_quarantine(item)
    [kept] = await store.list_quarantine()
    assert kept.id == item_id
    assert (kept.reason, kept.body) == ("invalid JSON", b"{not json")


async def test_prune_keeps_unprocessed_messages(store: SqlStore) -> None:
    """Pruning forgets old processed messages only; pending and failed ones stay."""
    old = datetime.now(UTC) - timedelta(days=40)
    await store.add_messages([message(k, at=old) for k in ("done", "pending", "failed")])
    await store.add_messages([message("recent-done")])
    by_key = {m.dedupe_key: m for m in await store.list_messages()}
    await store.set_message_state(by_key["done"].id, InboxState.DONE)
    await store.set_message_state(by_key["failed"].id, InboxState.FAILED, error="x")
    await store.set_message_state(by_key["recent-done"].id, InboxState.DONE)
    await store.add_quarantine(QuarantinedBody(reason="r", body=b"x", received_at=old))
    pruned = await store.prune(datetime.now(UTC) - timedelta(days=30))
    assert pruned == (1, 1)
    assert sorted(m.dedupe_key for m in await store.list_messages()) == [
        "failed",
        "pending",
        "recent-done",
    ]
    # Once pruned, the dedupe key is forgotten: the message would be new again.
    assert await store.add_messages([message("done")]) == [True]


async def test_group_commit_concurrent_duplicates(store: SqlStore) -> None:
    """50 concurrent submissions of one message store one row; exactly one is new."""
    committer = GroupCommitter(store)
    await committer.start()
    try:
        results = await asyncio.gather(*(committer.submit([message("same")]) for _ in range(50)))
    finally:
        await committer.stop()
    assert sorted(r[0] for r in results).count(True) == 1
    assert await store.count_messages() == 1
    assert committer.commits < 50


async def test_group_commit_answers_each_request_its_own_rows(store: SqlStore) -> None:
    """Requests batched together each get the outcome of their own messages."""
    await store.add_messages([message("seen")])
    committer = GroupCommitter(store)
    await committer.start()
    try:
        first, second = await asyncio.gather(
            committer.submit([message("n1"), message("seen")]),
            committer.submit([message("n2")]),
        )
    finally:
        await committer.stop()
    assert (first, second) == ([True, False], [True])


async def test_schema_status(backend: str, empty_store_url: Callable[[str], str]) -> None:
    """An empty database is reported empty, a migrated one current, an unknown revision ahead."""
    store = SqlStore(empty_store_url(backend))
    try:
        assert (await store.schema_status()).state is SchemaState.EMPTY
        with pytest.raises(SchemaMismatch, match="syncd migrate"):
            await store.require_current_schema()
        assert (await store.migrate()).state is SchemaState.CURRENT
        await store.require_current_schema()
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff9999'"))
        status = await store.schema_status()
        assert status.state is SchemaState.AHEAD
        assert "newer than this syncd" in (status.problem() or "")
        with pytest.raises(SchemaMismatch, match="newer"):
            await store.migrate()
    finally:
        await store.close()


async def test_migrations_match_models(backend: str, empty_store_url: Callable[[str], str]) -> None:
    """alembic upgrade head on an empty database gives exactly the models' schema."""
    store = SqlStore(empty_store_url(backend))
    try:
        await store.migrate()

        def diff(conn: Connection) -> list[object]:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))

        async with store.engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await store.close()


async def test_sqlite_is_durable_wal(tmp_path: Path) -> None:
    """The SQLite store runs in WAL mode with synchronous=FULL, so a commit survives power loss."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    try:
        async with store.engine.connect() as conn:
            mode = (await conn.execute(sa.text("PRAGMA journal_mode"))).scalar_one()
            sync = (await conn.execute(sa.text("PRAGMA synchronous"))).scalar_one()
    finally:
        await store.close()
    assert (mode, sync) == ("wal", 2)


async def test_sqlite_locked_database_is_unavailable(tmp_path: Path) -> None:
    """A SQLite file another process holds locked raises StoreUnavailable, not a driver error."""
    path = tmp_path / "locked.db"
    store = SqlStore(f"sqlite+aiosqlite:///{path}?timeout=0.2")
    await store.migrate()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.add_messages([message("m")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await store.add_messages([message("m")]) == [True]
    await store.close()


@pytest.mark.postgres
async def test_postgres_outage_is_unavailable_then_recovers(pg_migrated_url: str) -> None:
    """PostgreSQL going away raises StoreUnavailable; the same store works again once it is back."""
    url = make_url(pg_migrated_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    store = SqlStore(url.set(port=proxy.port).render_as_string(hide_password=False))
    try:
        assert await store.add_messages([message("before")]) == [True]
        await proxy.cut()
        with pytest.raises(StoreUnavailable):
            await store.add_messages([message("during")])
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await proxy.restore()
        assert await store.add_messages([message("after")]) == [True]
        keys = [m.dedupe_key for m in await store.list_messages()]
        assert keys == ["before", "after"]
    finally:
        await store.close()
        await proxy.cut()
        from tests.conftest import _truncate

        await _truncate(pg_migrated_url)


async def test_prune_job_uses_dedupe_retention(store: SqlStore) -> None:
    """The periodic prune forgets processed messages older than webhooks.dedupe_retention."""
    from syncd.app import prune_inbox

    await store.add_messages([message("old", at=datetime.now(UTC) - timedelta(days=3))])
    await store.add_messages([message("young", at=datetime.now(UTC) - timedelta(hours=1))])
    for stored in await store.list_messages():
        await store.set_message_state(stored.id, InboxState.DONE)
    await prune_inbox(store, retention=timedelta(days=1).total_seconds())
    assert [m.dedupe_key for m in await store.list_messages()] == ["young"]
