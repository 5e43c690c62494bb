"""The store contract: the same behaviour on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, make_url

from syncd.errors import SchemaMismatch, StoreRejected, StoreUnavailable
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
from tests.conftest import _asyncpg_dsn


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


async def test_group_commit_answers_its_callers_before_the_merge_is_told(
    store: SqlStore,
) -> None:
    """The commit's callers resume (to send their 200s) before a task woken by ``on_commit``
    (the merge) runs: the merge's work in the store thread would otherwise slow the answers."""
    told = asyncio.Event()
    answered: list[str] = []
    seen_by_merge: list[list[str]] = []

    async def merge() -> None:
        await told.wait()
        seen_by_merge.append(list(answered))

    async def request(key: str) -> None:
        await committer.submit([message(key)])
        answered.append(key)

    committer = GroupCommitter(store, on_commit=told.set)
    await committer.start()
    merger = asyncio.create_task(merge())
    try:
        await asyncio.gather(request("a1"), request("a2"), request("a3"))
        await asyncio.wait_for(merger, 5)
    finally:
        await committer.stop()
    assert answered == ["a1", "a2", "a3"]
    assert seen_by_merge == [answered]


async def test_a_value_the_store_refuses_fails_only_its_own_request(store: SqlStore) -> None:
    """A request whose row the database refuses (a NOT NULL broken here) is retried alone:
    the requests committed with it still get their rows, instead of all getting 503."""
    committer = GroupCommitter(store)
    await committer.start()
    try:
        results = await asyncio.gather(
            committer.submit([message("good-1")]),
            committer.submit([dataclasses.replace(message("bad"), message_type=None)]),
            committer.submit([message("good-2")]),
            return_exceptions=True,
        )
    finally:
        await committer.stop()
    assert results[0] == [True]
    assert isinstance(results[1], StoreRejected)
    assert results[2] == [True]
    assert sorted(m.dedupe_key for m in await store.list_messages()) == ["good-1", "good-2"]


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


@pytest.mark.postgres
async def test_postgres_connections_closed_by_the_server_are_not_reused(
    pg_migrated_url: str,
) -> None:
    """After the server ends syncd's connections (a restart, an operator's
    pg_terminate_backend), the next writes and delivery claims connect anew and succeed:
    the pool drops connections closed under it instead of failing one call on each."""
    store = SqlStore(pg_migrated_url)
    database = make_url(pg_migrated_url).database
    try:
        # Several pooled connections, as a busy daemon has.
        await asyncio.gather(*(store.add_messages([message(f"m{i}")]) for i in range(4)))
        await store.claim_deliveries("w", 1, 60.0)
        admin = await asyncpg.connect(_asyncpg_dsn(pg_migrated_url))
        try:
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )
        finally:
            await admin.close()
        assert ended >= 1
        await asyncio.sleep(0.2)  # the server's close reaches the client
        for i in range(4):
            assert await store.add_messages([message(f"after{i}")]) == [True]
            assert await store.claim_deliveries("w", 1, 60.0) == []
    finally:
        await store.close()
        from tests.conftest import _truncate

        await _truncate(pg_migrated_url)


def test_a_sqlite_daemon_does_not_load_the_postgresql_driver(tmp_path: Path) -> None:
    """Importing the daemon and using a SQLite store leaves asyncpg unloaded: it costs about
    150 ms of startup, which a daemon restarted by systemd should not pay for nothing."""
    code = (
        "import asyncio, sys\n"
        "import syncd.app, syncd.cli\n"
        "from syncd.store import SqlStore\n"
        "async def main():\n"
        f"    store = SqlStore('sqlite+aiosqlite:///{tmp_path / 's.db'}')\n"
        "    await store.migrate()\n"
        "    await store.claim_deliveries('w', 1, 60.0)\n"
        "    await store.close()\n"
        "asyncio.run(main())\n"
        "print('asyncpg' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


async def test_prune_job_uses_dedupe_retention(store: SqlStore) -> None:
    """The periodic prune forgets processed messages older than webhooks.dedupe_retention."""
    from syncd.app import prune_inbox

    await store.add_messages([message("old", at=datetime.now(UTC) - timedelta(days=3))])
    await store.add_messages([message("young", at=datetime.now(UTC) - timedelta(hours=1))])
    for stored in await store.list_messages():
        await store.set_message_state(stored.id, InboxState.DONE)
    await prune_inbox(store, retention=timedelta(days=1).total_seconds())
    assert [m.dedupe_key for m in await store.list_messages()] == ["young"]


async def test_sqlite_file_writes_run_whole_in_the_store_thread(tmp_path: Path) -> None:
    """On a SQLite file a write transaction runs whole in the store's own thread (one
    hand-off per transaction); on an in-memory database it runs on the async engine."""
    import threading

    def where(conn: Connection) -> str:
        conn.execute(sa.text("SELECT 1"))
        return threading.current_thread().name

    on_file = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    in_memory = SqlStore("sqlite+aiosqlite:///:memory:")
    try:
        await on_file.migrate()
        assert (await on_file._transact(where)).startswith("syncd-store")
        assert await in_memory._transact(where) == threading.current_thread().name
        # The thread's transactions and the async engine's reads see the same database.
        assert await on_file.add_messages([message("m1"), message("m1")]) == [True, False]
        assert (await on_file.process_inbox()).messages == 1
        # (An empty body cannot be normalised: failed, but no longer pending.)
        assert [m.state for m in await on_file.list_messages()] == [InboxState.FAILED]
    finally:
        await on_file.close()
        await in_memory.close()


@pytest.mark.parametrize("where", ["file", "memory"])
async def test_sqlite_driver_writes_read_back_through_sqlalchemy(
    tmp_path: Path, where: str
) -> None:
    """The group commit, merge, claim and completion run as plain SQL on SQLite (on the store
    thread's own connection for a file, on the async engine in memory). What they write reads
    back through SQLAlchemy as it went in: timestamps from any zone and at whole seconds,
    headers, entities with their outbox rows, the attempt record."""
    from syncd.facts import order_fact
    from syncd.store import Completion, _sqlite_time

    to_text = sa.DateTime().dialect_impl(sa.create_engine("sqlite://").dialect)
    process = to_text.bind_processor(sa.create_engine("sqlite://").dialect)
    assert process is not None
    for instant in (datetime(2026, 12, 4, 23, 5, 0), datetime(2026, 12, 4, 23, 5, 0, 7)):
        assert _sqlite_time(instant.replace(tzinfo=UTC)) == process(instant)
    with pytest.raises(ValueError, match="naive"):
        _sqlite_time(datetime(2026, 12, 4))

    url = f"sqlite+aiosqlite:///{tmp_path / 'd.db'}" if where == "file" else None
    store = SqlStore(url or "sqlite+aiosqlite:///:memory:")
    try:
        await store.migrate()
        east = timezone(timedelta(hours=5))
        received = datetime(2026, 12, 5, 4, 5, 6, tzinfo=east)
        await store.add_messages([dataclasses.replace(message("t"), received_at=received)])
        stored = await store.get_message_by_key("t")
        assert stored is not None
        assert (stored.received_at, stored.received_at.tzinfo) == (received, UTC)
        assert stored.headers == {"content-type": "application/json"}
        if where == "file":
            # The thread's own connection commits as durably as the engine's connections.
            assert store._driver is not None
            driver = store._driver.dbapi_connection
            assert driver is not None
            pragmas = [
                driver.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            ]
            assert pragmas == ["wal", 2, 1, 5000]

        fact = order_fact({"customer_identifier": "O-9", "status": "fulfilled"}, "webhook")
        await store.apply_facts([fact])
        # The merge reads entities with its own SQL; they match the SQLAlchemy read, with
        # the outbox row pending and then leased.
        merge_read = await store._merge(lambda db: db.entities("order", ["O-9", "O-none"]))
        assert merge_read == [await store.get_entity("order", "O-9")]
        [claim] = await store.claim_deliveries("w1", 5, 30)
        leased = await store.get_entity("order", "O-9")
        assert leased is not None
        assert leased.lease_until is not None
        assert await store._merge(lambda db: db.entities("order", ["O-9"])) == [leased]
        assert (claim.entity_key, claim.state["status"]) == ("O-9", "fulfilled")
        assert await store.claim_deliveries("w2", 5, 30) == []  # leased to w1
        started = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        await store.complete_deliveries([Completion(claim, "w1", started, 204)])
        [attempt] = await store.attempts_of(claim.entity_id)
        assert (attempt.started_at, attempt.status_code, attempt.outcome, attempt.replay) == (
            started,
            204,
            "delivered",
            False,
        )
        entity = await store.get_entity("order", "O-9")
        assert entity is not None
        assert (entity.delivered_revision, entity.outbox_id) == (1, None)
        assert entity.delivered_at is not None
        assert started < entity.delivered_at <= datetime.now(UTC)
    finally:
        await store.close()


async def test_sqlite_syncs_every_commit_that_something_outside_relies_on(
    tmp_path: Path,
) -> None:
    """On a SQLite file the inbox commit (a webhook's 200 follows it) and the claim (an ERP
    call follows it) commit with synchronous=FULL; the merge and the completion, which can be
    derived again, with NORMAL. The store thread's connection keeps the setting of the last
    transaction it ran, so reading it after each step tells how that step committed; a new
    connection after a failure starts over from FULL and is switched again."""
    from syncd.facts import order_fact
    from syncd.store import Completion

    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    loop = asyncio.get_running_loop()

    def synchronous() -> int:
        assert store._driver is not None
        driver = store._driver.dbapi_connection
        assert driver is not None
        return int(driver.execute("PRAGMA synchronous").fetchone()[0])

    async def committed_with() -> int:
        assert store._thread is not None
        return await loop.run_in_executor(store._thread, synchronous)

    full, normal = 2, 1
    try:
        await store.migrate()
        await store.add_messages([message("m1")])
        assert await committed_with() == full
        await store.apply_facts([order_fact({"customer_identifier": "O-1"}, "webhook")])
        assert await committed_with() == normal
        await store.process_inbox()
        assert await committed_with() == normal
        [claim] = await store.claim_deliveries("w1", 5, 30)
        assert await committed_with() == full
        started = datetime.now(UTC)
        await store.complete_deliveries([Completion(claim, "w1", started, 204)])
        assert await committed_with() == normal
        await store.add_messages([message("m2")])
        assert await committed_with() == full

        await store.process_inbox()
        assert store._thread is not None
        await loop.run_in_executor(store._thread, store._close_driver)
        await store.process_inbox()
        assert await committed_with() == normal
        await store.claim_deliveries("w1", 5, 30)
        assert await committed_with() == full
    finally:
        await store.close()


def test_sqlite_older_than_3_35_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's SQL needs RETURNING (SQLite 3.35) and json_each: an older library is
    named when the store is opened, not found out by every transaction."""
    from syncd import store as store_module

    assert store_module.sqlite_library_problem() is None  # the library these tests run on
    problem = store_module.sqlite_library_problem((3, 34, 1))
    assert problem == "SQLite 3.34.1 is too old for the event store: syncd needs 3.35 or later"
    monkeypatch.setattr(store_module, "sqlite_library_problem", lambda: problem)
    with pytest.raises(StoreUnavailable, match=r"^SQLite 3\.34\.1 is too old"):
        SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")


async def test_sqlite_driver_transaction_rolls_back_and_carries_on(tmp_path: Path) -> None:
    """A plain-SQL transaction that fails part-way leaves nothing behind, and the next one
    on the same connection works."""
    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    try:
        await store.migrate()
        await store.add_messages([message("kept")])

        def half_then_fail(sql: Any) -> None:
            sql.run("DELETE FROM inbox", ())
            raise sqlite3.IntegrityError("refused part-way")

        with pytest.raises(StoreRejected, match="refused part-way"):
            await store._transact_sql(half_then_fail)
        assert [m.dedupe_key for m in await store.list_messages()] == ["kept"]
        assert await store.add_messages([message("next"), message("kept")]) == [True, False]
    finally:
        await store.close()


async def test_cancelled_write_keeps_the_lock_until_its_transaction_ended(
    tmp_path: Path,
) -> None:
    """A caller cancelled while the store's thread runs its transaction does not release the
    write lock early: the next writer starts only after that transaction has ended."""
    import threading
    import time

    store = SqlStore(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await store.migrate()
    started, finished = threading.Event(), threading.Event()

    def slow(conn: Connection) -> None:
        started.set()
        conn.execute(sa.text("SELECT 1"))
        time.sleep(0.3)
        finished.set()

    try:
        task = asyncio.create_task(store._transact(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5.0)
        task.cancel()
        assert await store.add_messages([message("after")]) == [True]
        assert finished.is_set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await store.close()


async def test_group_commit_is_busy_while_committing(store: SqlStore) -> None:
    """GroupCommitter.busy (what the merge yields to) is true only while a commit is queued
    or in progress."""
    committer = GroupCommitter(store)
    await committer.start()
    try:
        assert not committer.busy
        pending = asyncio.ensure_future(committer.submit([message("b1")]))
        await asyncio.sleep(0)
        assert committer.busy
        assert await pending == [True]
        await asyncio.sleep(0)
        assert not committer.busy
    finally:
        await committer.stop()
