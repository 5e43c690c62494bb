"""The SQL event store: inbox of received messages, quarantine, schema management.

ORM rows never leave this module: callers get frozen dataclasses built with ``from_row``.
Every driver error is converted to :class:`~syncd.errors.StoreUnavailable` at this boundary,
so the receiver can answer 503 and MasonHub retries instead of believing we stored it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from syncd.errors import SchemaMismatch, StoreUnavailable

T = TypeVar("T")

#: Rows inserted per INSERT statement; keeps bound parameters far below every driver's limit.
INSERT_CHUNK = 500


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and returned as an aware UTC datetime.

    SQLite has no time zones and compares timestamps as text, so storing every value in one
    zone, without an offset, keeps ordering and range filters correct on both backends.
    """

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("dedupe_key", sa.String(255), nullable=False, unique=True),
    sa.Column("message_type", sa.String(64), nullable=False),
    sa.Column("message_id", sa.String(255), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("headers", sa.JSON(), nullable=False),
    sa.Column("remote_addr", sa.String(64), nullable=True),
    sa.Column("received_at", UTCDateTime(), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("processed_at", UTCDateTime(), nullable=True),
    sa.Index("ix_inbox_state_id", "state", "id"),
    sa.Index("ix_inbox_received_at", "received_at"),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("received_at", UTCDateTime(), nullable=False, index=True),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("message_type", sa.String(64), nullable=True),
    sa.Column("body", sa.LargeBinary(), nullable=False),
    sa.Column("headers", sa.JSON(), nullable=False),
    sa.Column("remote_addr", sa.String(64), nullable=True),
)


class InboxState(enum.StrEnum):
    """Processing state of an inbox message."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


#: States whose messages may be pruned once older than the dedupe retention.
PRUNABLE_STATES = (InboxState.DONE,)


@dataclass(frozen=True)
class NewMessage:
    """A message about to be stored in the inbox."""

    dedupe_key: str
    message_type: str
    message_id: str | None
    source: str
    body: bytes
    received_at: datetime
    headers: dict[str, str] = field(default_factory=dict)
    remote_addr: str | None = None


@dataclass(frozen=True)
class InboxMessage:
    """A message stored in the inbox."""

    id: int
    dedupe_key: str
    message_type: str
    message_id: str | None
    source: str
    body: bytes
    headers: dict[str, str]
    remote_addr: str | None
    received_at: datetime
    state: InboxState
    error: str | None
    processed_at: datetime | None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> InboxMessage:
        m = row._mapping
        return cls(
            id=m["id"],
            dedupe_key=m["dedupe_key"],
            message_type=m["message_type"],
            message_id=m["message_id"],
            source=m["source"],
            body=bytes(m["body"]),
            headers=dict(m["headers"]),
            remote_addr=m["remote_addr"],
            received_at=m["received_at"],
            state=InboxState(m["state"]),
            error=m["error"],
            processed_at=m["processed_at"],
        )


@dataclass(frozen=True)
class QuarantinedBody:
    """An authenticated request body that could not be parsed."""

    reason: str
    body: bytes
    received_at: datetime
    message_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    remote_addr: str | None = None
    id: int | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> QuarantinedBody:
        m = row._mapping
        return cls(
            id=m["id"],
            reason=m["reason"],
            body=bytes(m["body"]),
            received_at=m["received_at"],
            message_type=m["message_type"],
            headers=dict(m["headers"]),
            remote_addr=m["remote_addr"],
        )


class SchemaState(enum.StrEnum):
    """How the database schema relates to this version's migrations."""

    CURRENT = "current"
    EMPTY = "empty"
    BEHIND = "behind"
    AHEAD = "ahead"


@dataclass(frozen=True)
class SchemaStatus:
    """The database's migration revision beside the code's."""

    state: SchemaState
    current: tuple[str, ...]
    head: tuple[str, ...]

    def problem(self) -> str | None:
        """A one-line explanation when the schema is not usable, else None."""
        if self.state is SchemaState.EMPTY:
            return "the database has no syncd schema; run `syncd migrate`"
        if self.state is SchemaState.BEHIND:
            return (
                f"the database schema ({', '.join(self.current)}) is older than this syncd "
                f"({', '.join(self.head)}); run `syncd migrate`"
            )
        if self.state is SchemaState.AHEAD:
            return (
                f"the database schema ({', '.join(self.current)}) is newer than this syncd "
                f"({', '.join(self.head)}); upgrade syncd"
            )
        return None


class Store(Protocol):
    """The event store port; :class:`SqlStore` is the implementation."""

    async def add_messages(self, messages: Sequence[NewMessage]) -> list[bool]: ...
    async def add_quarantine(self, item: QuarantinedBody) -> int: ...
    async def ping(self) -> None: ...
    async def schema_status(self) -> SchemaStatus: ...
    async def close(self) -> None: ...


def migrations_dir() -> Path:
    """Where the alembic scripts are: inside the wheel, or beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("syncd's alembic migrations are missing from this installation")


def alembic_config(url: str | None = None) -> Any:
    """An alembic Config for our scripts, independent of the working directory."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; synchronous=FULL makes every commit durable
    # before we acknowledge, which is the whole promise of the inbox.
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        "PRAGMA foreign_keys=ON",
    ):
        cursor.execute(pragma)
    cursor.close()
    # Let SQLAlchemy, not the driver, decide when transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front, so the busy timeout applies instead of a
    # deadlock error when a read-then-write transaction meets another writer. Read-only
    # work (READ_ONLY option) takes a plain BEGIN and never waits for the writer under WAL.
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _sqlite_busy_timeout(url: sa.URL) -> float:
    value = url.query.get("timeout")
    return float(value) if isinstance(value, str) else 5.0


def create_engine(url: str) -> AsyncEngine:
    """An async engine with syncd's settings for the URL's backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            parsed.difference_update_query(["timeout"]),
            connect_args={"timeout": _sqlite_busy_timeout(parsed)},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        parsed,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        pool_timeout=10,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "syncd"},
        },
    )


def _insert(dialect_name: str, table: sa.Table) -> Any:
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


_UNAVAILABLE = (SQLAlchemyError, OSError, asyncio.TimeoutError)

#: Execution option marking a connection that only reads.
READ_ONLY = "syncd_read_only"


class SqlStore:
    """The event store on SQLite (embedded default) or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.begin() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"event store unavailable: {_describe(exc)}") from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self.engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                yield conn
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"event store unavailable: {_describe(exc)}") from exc

    async def add_messages(self, messages: Sequence[NewMessage]) -> list[bool]:
        """Store messages in one transaction; True for each one not seen before.

        A dedupe key repeated inside the batch is new only at its first place.
        """
        first: dict[str, int] = {}
        for index, message in enumerate(messages):
            first.setdefault(message.dedupe_key, index)
        rows = [_message_row(messages[i]) for i in first.values()]
        inserted: set[str] = set()
        async with self._begin() as conn:
            for start in range(0, len(rows), INSERT_CHUNK):
                stmt = (
                    _insert(self.dialect, inbox)
                    .values(rows[start : start + INSERT_CHUNK])
                    .on_conflict_do_nothing(index_elements=["dedupe_key"])
                    .returning(inbox.c.dedupe_key)
                )
                inserted.update((await conn.execute(stmt)).scalars())
        return [
            first[m.dedupe_key] == i and m.dedupe_key in inserted for i, m in enumerate(messages)
        ]

    async def add_quarantine(self, item: QuarantinedBody) -> int:
        """Keep an unparseable authenticated body for inspection; returns its id."""
        async with self._begin() as conn:
            result = await conn.execute(
                quarantine.insert()
                .values(
                    received_at=item.received_at,
                    reason=item.reason,
                    message_type=item.message_type,
                    body=item.body,
                    headers=item.headers,
                    remote_addr=item.remote_addr,
                )
                .returning(quarantine.c.id)
            )
            return int(result.scalar_one())

    async def get_message(self, message_id: int) -> InboxMessage | None:
        """The inbox message with this row id."""
        async with self._read() as conn:
            row = (await conn.execute(inbox.select().where(inbox.c.id == message_id))).first()
        return None if row is None else InboxMessage.from_row(row)

    async def get_message_by_key(self, dedupe_key: str) -> InboxMessage | None:
        """The inbox message with this dedupe key."""
        async with self._read() as conn:
            stmt = inbox.select().where(inbox.c.dedupe_key == dedupe_key)
            row = (await conn.execute(stmt)).first()
        return None if row is None else InboxMessage.from_row(row)

    async def list_messages(
        self,
        *,
        state: InboxState | None = None,
        message_type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[InboxMessage]:
        """Inbox messages, oldest first, filtered."""
        stmt = inbox.select().order_by(inbox.c.id).limit(limit)
        if state is not None:
            stmt = stmt.where(inbox.c.state == state.value)
        if message_type is not None:
            stmt = stmt.where(inbox.c.message_type == message_type)
        if since is not None:
            stmt = stmt.where(inbox.c.received_at >= since)
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [InboxMessage.from_row(row) for row in rows]

    async def count_messages(self) -> int:
        """How many messages the inbox holds."""
        async with self._read() as conn:
            return int(
                (await conn.execute(sa.select(sa.func.count()).select_from(inbox))).scalar_one()
            )

    async def list_quarantine(self, limit: int = 100) -> list[QuarantinedBody]:
        """Quarantined bodies, oldest first."""
        async with self._read() as conn:
            stmt = quarantine.select().order_by(quarantine.c.id).limit(limit)
            rows = (await conn.execute(stmt)).all()
        return [QuarantinedBody.from_row(row) for row in rows]

    async def set_message_state(
        self, message_id: int, state: InboxState, *, error: str | None = None
    ) -> None:
        """Record the outcome of processing one inbox message."""
        async with self._begin() as conn:
            await conn.execute(
                inbox.update()
                .where(inbox.c.id == message_id)
                .values(state=state.value, error=error, processed_at=datetime.now(UTC))
            )

    async def prune(self, older_than: datetime) -> tuple[int, int]:
        """Forget processed messages and quarantined bodies received before ``older_than``.

        Pending and failed messages are kept whatever their age: nothing unprocessed is lost.
        Returns (inbox rows, quarantine rows) deleted.
        """
        async with self._begin() as conn:
            done = await conn.execute(
                inbox.delete().where(
                    inbox.c.received_at < older_than,
                    inbox.c.state.in_([s.value for s in PRUNABLE_STATES]),
                )
            )
            quarantined = await conn.execute(
                quarantine.delete().where(quarantine.c.received_at < older_than)
            )
        return done.rowcount, quarantined.rowcount

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        async with self._read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def _run_sync(self, fn: Callable[[Connection], T], *, read_only: bool = False) -> T:
        context = self._read() if read_only else self._begin()
        async with context as conn:
            return await conn.run_sync(fn)

    async def schema_status(self) -> SchemaStatus:
        """Compare the database's alembic revision with this code's head."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(alembic_config())
        head = tuple(sorted(script.get_heads()))

        def current(conn: Connection) -> tuple[str, ...]:
            return tuple(sorted(MigrationContext.configure(conn).get_current_heads()))

        revisions = await self._run_sync(current, read_only=True)
        known = {rev.revision for rev in script.walk_revisions()}
        if not revisions:
            state = SchemaState.EMPTY
        elif revisions == head:
            state = SchemaState.CURRENT
        elif all(rev in known for rev in revisions):
            state = SchemaState.BEHIND
        else:
            state = SchemaState.AHEAD
        return SchemaStatus(state=state, current=revisions, head=head)

    async def migrate(self) -> SchemaStatus:
        """Upgrade the schema to this code's head revision."""
        status = await self.schema_status()
        if status.state is SchemaState.AHEAD:
            raise SchemaMismatch(status.problem())
        if status.state is not SchemaState.CURRENT:
            from alembic import command

            def upgrade(conn: Connection) -> None:
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")

            await self._run_sync(upgrade)
        return await self.schema_status()

    async def require_current_schema(self) -> None:
        """Raise SchemaMismatch unless the schema is exactly this code's head."""
        problem = (await self.schema_status()).problem()
        if problem is not None:
            raise SchemaMismatch(problem)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


def _message_row(message: NewMessage) -> dict[str, Any]:
    return {
        "dedupe_key": message.dedupe_key,
        "message_type": message.message_type,
        "message_id": message.message_id,
        "source": message.source,
        "body": message.body,
        "headers": message.headers,
        "remote_addr": message.remote_addr,
        "received_at": message.received_at,
        "state": InboxState.PENDING.value,
    }


def _describe(exc: BaseException) -> str:
    """A one-line reason for a driver error, without its SQL or parameters."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {text}" if text else type(original).__name__
