"""The SQL event store: inbox of received messages, quarantine, schema management.

ORM rows never leave this module: callers get frozen dataclasses built with ``from_row``.
The schema, migrations and most statements are SQLAlchemy's; the hottest ones (group commit,
delivery claim and completion) run as plain SQL on the driver (the pooled asyncpg connection
on PostgreSQL, the store thread's own sqlite3 connection on a SQLite file), where
SQLAlchemy's execution layer cost more than the statements themselves.
Every driver error is converted to :class:`~syncd.errors.StoreUnavailable` at this boundary,
so the receiver can answer 503 and MasonHub retries instead of believing we stored it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import DataError, DisconnectionError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolProxiedConnection

from syncd import jsoncodec
from syncd.errors import SchemaMismatch, StoreRejected, StoreUnavailable
from syncd.facts import Fact, NormalisationError, Version, message_facts, snapshot_url
from syncd.merge import Current, Decision, Outcome, decide

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")

#: Rows inserted per INSERT statement; keeps bound parameters far below every driver's limit.
INSERT_CHUNK = 500


D = TypeVar("D")


def _build(cls: type[D], mapping: Mapping[str, Any], **converted: Any) -> D:
    """A dataclass from a row mapping: same-named columns, plus the converted values."""
    names = [f.name for f in fields(cls) if f.name not in converted]  # type: ignore[arg-type]
    return cls(**{name: mapping[name] for name in names}, **converted)


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
        return _naive(value)

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


entities = sa.Table(
    "entities",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("entity_type", sa.String(32), nullable=False),
    sa.Column("entity_key", sa.String(255), nullable=False),
    sa.Column("state", sa.JSON(), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("version_rank", sa.Integer(), nullable=True),
    sa.Column("version_ts", UTCDateTime(), nullable=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    # Bumped on every applied change: with the replay count it makes the Idempotency-Key, so
    # the key is stable across retries of one version yet new when state goes A -> B -> A.
    sa.Column("revision", sa.Integer(), nullable=False),
    sa.Column("replays", sa.Integer(), nullable=False),
    sa.Column("delivered_hash", sa.String(64), nullable=True),
    sa.Column("delivered_revision", sa.Integer(), nullable=True),
    sa.Column("delivered_at", UTCDateTime(), nullable=True),
    sa.UniqueConstraint("entity_type", "entity_key"),
)

facts = sa.Table(
    "facts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "inbox_id", sa.BigInteger(), sa.ForeignKey("inbox.id", ondelete="CASCADE"), nullable=True
    ),
    sa.Column("entity_id", sa.BigInteger(), sa.ForeignKey("entities.id"), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text(), nullable=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("version_rank", sa.Integer(), nullable=True),
    sa.Column("version_ts", UTCDateTime(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index("ix_facts_inbox_id", "inbox_id"),
    sa.Index("ix_facts_entity_id", "entity_id"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column(
        "entity_id", sa.BigInteger(), sa.ForeignKey("entities.id"), nullable=False, unique=True
    ),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", UTCDateTime(), nullable=True),
    sa.Column("replay", sa.Integer(), nullable=False),
    sa.Column("last_status", sa.Integer(), nullable=True),
    sa.Column("last_error", sa.Text(), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Index("ix_outbox_state_next_attempt_at", "state", "next_attempt_at"),
)

delivery_attempts = sa.Table(
    "delivery_attempts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("entity_id", sa.BigInteger(), sa.ForeignKey("entities.id"), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Column("idempotency_key", sa.String(400), nullable=False),
    sa.Column("revision", sa.Integer(), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("replay", sa.Boolean(), nullable=False),
    sa.Column("worker", sa.String(64), nullable=False),
    sa.Index("ix_delivery_attempts_entity_id", "entity_id"),
    sa.Index("ix_delivery_attempts_finished_at", "finished_at"),
)


poll_cursors = sa.Table(
    "poll_cursors",
    metadata,
    sa.Column("job", sa.String(32), primary_key=True),
    sa.Column("cursor_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

poll_runs = sa.Table(
    "poll_runs",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=False),
    sa.Column("finished_at", UTCDateTime(), nullable=False),
    sa.Column("ok", sa.Boolean(), nullable=False),
    sa.Column("report", sa.JSON(), nullable=False),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Index("ix_poll_runs_job_id", "job", "id"),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
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
    def from_row(cls, row: Any) -> InboxMessage:
        m = row._mapping
        return _build(
            cls, m, body=bytes(m["body"]), headers=dict(m["headers"]), state=InboxState(m["state"])
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
    def from_row(cls, row: Any) -> QuarantinedBody:
        m = row._mapping
        return _build(cls, m, body=bytes(m["body"]), headers=dict(m["headers"]))


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


class OutboxState(enum.StrEnum):
    """State of an entity's pending delivery."""

    PENDING = "pending"
    DEAD = "dead"


@dataclass(frozen=True)
class ProcessResult:
    """What one pass over the inbox did."""

    messages: int = 0
    facts: int = 0
    failed: int = 0
    queued: int = 0
    decisions: tuple[Decision, ...] = ()
    #: download_url of each snapshotReady message processed.
    snapshots: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimedDelivery:
    """An outbox row leased to one worker, with the entity state to send."""

    outbox_id: int
    entity_id: int
    entity_type: str
    entity_key: str
    state: dict[str, Any]
    content_hash: str
    revision: int
    source: str
    attempts: int
    replay: int

    @property
    def idempotency_key(self) -> str:
        """Stable for every attempt at this version; new for each replay."""
        key = f"{self.entity_type}:{self.entity_key}:r{self.revision}"
        return f"{key}:replay{self.replay}" if self.replay else key


@dataclass(frozen=True)
class Completion:
    """A delivery the ERP accepted, to be recorded."""

    claim: ClaimedDelivery
    owner: str
    started_at: datetime
    status: int


@dataclass(frozen=True)
class EntityRecord:
    """An entity's latest known and last delivered state, with its outbox row if any."""

    id: int
    entity_type: str
    entity_key: str
    state: dict[str, Any]
    content_hash: str
    version: Version
    source: str
    revision: int
    replays: int
    updated_at: datetime
    delivered_hash: str | None
    delivered_revision: int | None
    delivered_at: datetime | None
    outbox_id: int | None
    outbox_state: OutboxState | None
    attempts: int
    next_attempt_at: datetime | None
    lease_until: datetime | None
    last_status: int | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> EntityRecord:
        return cls.from_mapping(row._mapping)

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> EntityRecord:
        """From columns named as in _ENTITY_SELECT, timestamps and state already decoded."""
        return _build(
            cls,
            m,
            state=dict(m["state"]),
            version=Version(m["version_rank"], m["version_ts"]),
            outbox_state=None if m["outbox_state"] is None else OutboxState(m["outbox_state"]),
            attempts=m["attempts"] or 0,
        )

    def current(self) -> Current:
        """What the merge compares a new fact with."""
        return Current(self.state, self.content_hash, self.version, self.delivered_hash)


@dataclass(frozen=True)
class FactRecord:
    """A recorded fact and what it did."""

    id: int
    inbox_id: int | None
    entity_type: str
    entity_key: str
    source: str
    outcome: str
    reason: str | None
    content_hash: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> FactRecord:
        return _build(cls, row._mapping)


@dataclass(frozen=True)
class AttemptRecord:
    """One call to the ERP and how it ended."""

    id: int
    entity_id: int
    started_at: datetime
    finished_at: datetime
    outcome: str
    status_code: int | None
    error: str | None
    idempotency_key: str
    revision: int
    source: str
    replay: bool

    @classmethod
    def from_row(cls, row: Any) -> AttemptRecord:
        m = row._mapping
        return _build(cls, m, replay=bool(m["replay"]))


@dataclass(frozen=True)
class EventSummary:
    """An inbox message as `syncd events list` shows it."""

    id: int
    received_at: datetime
    message_type: str
    message_id: str | None
    source: str
    state: str
    error: str | None
    facts: int


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
    # before we acknowledge, which is the whole promise of the inbox. (The store thread's
    # connection commits work it can derive again with NORMAL: see SqlStore._transact_sql.)
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


#: JSON columns (entity state, headers) through orjson: every merge writes state and every
#: delivery reads it.
_JSON_CODEC: dict[str, Any] = {
    "json_serializer": jsoncodec.dumps,
    "json_deserializer": jsoncodec.loads,
}


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
            **_JSON_CODEC,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    engine = create_async_engine(
        parsed,
        pool_size=10,
        max_overflow=10,
        pool_timeout=10,
        **_JSON_CODEC,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "syncd"},
        },
    )
    event.listen(engine.sync_engine.pool, "checkout", _drop_closed_connection)
    return engine


def _drop_closed_connection(_dbapi: Any, _record: Any, proxy: PoolProxiedConnection) -> None:
    """Never hand out a pooled PostgreSQL connection that the server has closed.

    A restarted or stopped server closes its connections, and asyncpg notices at once, so
    this check needs no round trip: SQLAlchemy's pool_pre_ping spent three (BEGIN, ping,
    ROLLBACK) on every checkout, as many as the statements of a whole delivery claim.
    Raising DisconnectionError makes the pool discard it and connect anew.
    """
    if proxy.driver_connection is None or proxy.driver_connection.is_closed():
        raise DisconnectionError("connection closed by the server")


def _sqlite_thread_engine(url: str) -> sa.Engine | None:
    """A synchronous engine on the same SQLite file, for the store's own thread (see
    :meth:`SqlStore._transact`); None for an in-memory database, which one engine must own.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    engine = sa.create_engine(
        parsed.difference_update_query(["timeout"]).set(drivername="sqlite"),
        # Only the store's thread uses it; disposing may happen on another.
        connect_args={"timeout": _sqlite_busy_timeout(parsed), "check_same_thread": False},
        **_JSON_CODEC,
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _insert(dialect_name: str, table: sa.Table) -> Any:
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    sqlite3.Error,
    OSError,
    asyncio.TimeoutError,
)
#: Errors about the statement's values, not about reaching the database.
_REJECTED: tuple[type[BaseException], ...] = (
    DataError,
    IntegrityError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
)


@functools.cache
def _asyncpg_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """_REJECTED and _UNAVAILABLE with asyncpg's own errors added, for statements run on the
    driver. Imported on first use: a SQLite daemon starts without loading asyncpg."""
    import asyncpg

    return (
        (*_REJECTED, asyncpg.DataError, asyncpg.IntegrityConstraintViolationError),
        (*_UNAVAILABLE, asyncpg.PostgresError, asyncpg.InterfaceError),
    )


@contextlib.contextmanager
def _store_errors(
    rejected: tuple[type[BaseException], ...] = _REJECTED,
    unavailable: tuple[type[BaseException], ...] = _UNAVAILABLE,
) -> Iterator[None]:
    """Driver and connection errors as the store's own: StoreRejected, else StoreUnavailable."""
    try:
        yield
    except rejected as exc:
        raise StoreRejected(f"event store refused a value: {_describe(exc)}") from exc
    except unavailable as exc:
        raise StoreUnavailable(f"event store unavailable: {_describe(exc)}") from exc


#: The oldest SQLite whose SQL the store uses throughout: RETURNING came in 3.35.
SQLITE_MINIMUM = (3, 35, 0)


def sqlite_library_problem(
    version: tuple[int, int, int] = sqlite3.sqlite_version_info,
) -> str | None:
    """Why the SQLite library Python links cannot hold syncd's store, or None.

    Said once at start-up, instead of every transaction failing with a syntax error.
    """
    if version < SQLITE_MINIMUM:
        shown = ".".join(map(str, version))
        return f"SQLite {shown} is too old for the event store: syncd needs 3.35 or later"
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as probe:
            probe.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:
        return f"SQLite {sqlite3.sqlite_version} lacks the JSON functions the event store uses"
    return None


#: Execution option marking a connection that only reads.
READ_ONLY = "syncd_read_only"


class SqlStore:
    """The event store on SQLite (embedded default) or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.dialect = self.engine.dialect.name
        problem = sqlite_library_problem() if self.dialect == "sqlite" else None
        if problem is not None:
            raise StoreUnavailable(problem)
        self._write_lock = asyncio.Lock() if self.dialect == "sqlite" else None
        #: SQLite file: the hot write transactions run whole in one thread of their own.
        self._thread_engine = _sqlite_thread_engine(url)
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="syncd-store")
            if self._thread_engine is not None
            else None
        )
        #: The store thread's own sqlite3 connection, for the hot paths (see _transact_sql).
        self._driver: PoolProxiedConnection | None = None
        #: Whether that connection commits with synchronous=FULL now (see _transact_sql).
        self._driver_syncs = True

    @functools.cached_property
    def _merge_sql(self) -> _MergeStatements:
        """The merge's SQLAlchemy statements, built on first use: a SQLite store merges in
        plain SQL (_SqliteMerge) and never needs them."""
        return _MergeStatements.build(self.dialect)

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        # SQLite has one writer at a time. Queueing our own writers here, in the event loop,
        # is fairer and faster than letting them spin in SQLite's busy handler.
        async with self._write_lock or contextlib.nullcontext():
            with _store_errors():
                async with self.engine.begin() as conn:
                    yield conn

    async def _transact(self, body: Callable[[Connection], T]) -> T:
        """Run ``body`` in one write transaction and return what it returns.

        On a SQLite file the whole transaction (BEGIN IMMEDIATE, every statement, COMMIT)
        runs in the store's own thread with the stdlib driver: one hand-off between the
        event loop and a thread per transaction, where aiosqlite makes three or four per
        statement. Elsewhere (PostgreSQL, in-memory SQLite) it runs on the async engine.
        Either way it has committed when this returns.
        """
        if self._thread is None:
            async with self._write_lock or contextlib.nullcontext():
                with _store_errors():
                    async with self.engine.begin() as conn:
                        return await conn.run_sync(body)
        return await self._on_thread(self._in_thread, body)

    async def _transact_sql(self, body: Callable[[_Sql], T], *, sync: bool = True) -> T:
        """SQLite: run ``body`` over plain SQL in one write transaction (see _transact).

        On a file it runs on the store thread's own sqlite3 connection, with BEGIN IMMEDIATE
        and COMMIT issued here: SQLAlchemy's connection, transaction and execution layers
        cost several times what the driver does (bench/pipeline_cpu.py). On an in-memory
        database the same SQL runs on the async engine, which owns that database.

        ``sync=False`` commits without waiting for the disk (synchronous=NORMAL), for work
        that can be derived again from what is on disk: a merge (from the inbox) and a
        completion (the call is repeated with the same Idempotency-Key). In WAL mode a power
        cut can then lose only commits after the last synced one, and every later
        synchronous=FULL commit, on any connection, syncs the WAL and with it all of them.
        So whatever is told outside must follow a synced commit: a webhook's 200 its inbox
        commit, an ERP call its claim, which also makes the merge that set the revision of
        its Idempotency-Key durable before the key is ever sent.
        """
        if self._thread is None:
            return await self._transact(lambda conn: body(_EngineSql(conn)))
        return await self._on_thread(functools.partial(self._in_driver_thread, sync=sync), body)

    async def _on_thread(self, run: Callable[[Callable[[Any], T]], T], body: Any) -> T:
        async with self._write_lock or contextlib.nullcontext():
            with _store_errors():
                assert self._thread is not None
                loop = asyncio.get_running_loop()
                done = loop.run_in_executor(self._thread, run, body)
                try:
                    return await asyncio.shield(done)
                except asyncio.CancelledError:
                    # The thread carries on: hold the write lock until its transaction ended.
                    with contextlib.suppress(BaseException):
                        await done
                    raise

    def _in_thread(self, body: Callable[[Connection], T]) -> T:
        assert self._thread_engine is not None
        with self._thread_engine.begin() as conn:
            return body(conn)

    def _in_driver_thread(self, body: Callable[[_Sql], T], *, sync: bool = True) -> T:
        if self._driver is None:
            assert self._thread_engine is not None
            # A connection of the thread engine (so with its pragmas and busy timeout),
            # taken out of the pool for good: only this thread uses it.
            driver = self._thread_engine.raw_connection()
            driver.detach()
            self._driver = driver
            self._driver_syncs = True
        conn = self._driver.dbapi_connection
        assert isinstance(conn, sqlite3.Connection)
        if sync != self._driver_syncs:
            conn.execute("PRAGMA synchronous=FULL" if sync else "PRAGMA synchronous=NORMAL")
            self._driver_syncs = sync
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(_DriverSql(conn))
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                # Neither committed nor rolled back: start afresh on a new connection.
                self._close_driver()
            raise
        return result

    def _close_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            with contextlib.suppress(sqlite3.Error):
                driver.close()

    @asynccontextmanager
    async def _asyncpg(self) -> AsyncIterator[asyncpg.Connection]:
        """PostgreSQL: a pooled connection's own asyncpg connection, for the hot paths.

        Its statements bypass SQLAlchemy's execution layer, which costs several times the
        driver's own work per statement (bench/pipeline_cpu.py). A statement run on its own
        is its own transaction; callers open one with ``transaction()`` where they need it.
        A connection left broken, or still inside a transaction (a cancelled rollback), is
        invalidated rather than handed to the next user of the pool.
        """
        with _store_errors(*_asyncpg_errors()):
            async with self.engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver: asyncpg.Connection = raw.driver_connection
                try:
                    yield driver
                finally:
                    if driver.is_closed() or driver.is_in_transaction():
                        raw.invalidate()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with _store_errors():
            async with self.engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                yield conn

    async def add_messages(self, messages: Sequence[NewMessage]) -> list[bool]:
        """Store messages in one transaction; True for each one not seen before.

        A dedupe key repeated inside the batch is new only at its first place.
        """
        first: dict[str, int] = {}
        for index, message in enumerate(messages):
            first.setdefault(message.dedupe_key, index)
        unique = [messages[i] for i in first.values()]
        if self.dialect == "postgresql":
            # One statement, so its own transaction, durable when it returns.
            async with self._asyncpg() as pg:
                records = await pg.fetch(
                    _PG_ADD_MESSAGES,
                    [m.dedupe_key for m in unique],
                    [m.message_type for m in unique],
                    [m.message_id for m in unique],
                    [m.source for m in unique],
                    [m.body for m in unique],
                    [jsoncodec.dumps(m.headers) for m in unique],
                    [m.remote_addr for m in unique],
                    [_naive(m.received_at) for m in unique],
                    InboxState.PENDING.value,
                )
            inserted = {r["dedupe_key"] for r in records}
        else:
            rows = [
                (
                    m.dedupe_key,
                    m.message_type,
                    m.message_id,
                    m.source,
                    m.body,
                    jsoncodec.dumps(m.headers),
                    m.remote_addr,
                    _sqlite_time(m.received_at),
                    InboxState.PENDING.value,
                )
                for m in unique
            ]

            def insert(sql: _Sql) -> set[str]:
                # A row is new where the insert changed one (ON CONFLICT DO NOTHING).
                return {row[0] for row in rows if sql.run(_SQLITE_ADD_MESSAGE, row)}

            inserted = await self._transact_sql(insert)
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

    # --- merge -------------------------------------------------------------------------

    async def process_inbox(self, limit: int = 200) -> ProcessResult:
        """Merge up to ``limit`` pending inbox messages, in arrival order, in one transaction.

        The messages' state change commits with the entity and outbox changes, so a crash
        loses nothing and repeats nothing. A message that cannot be normalised is marked
        failed with the reason. On PostgreSQL, SKIP LOCKED lets several instances drain at once.
        """
        return await self._merge(lambda db: self._process_inbox(db, limit))

    async def _merge(self, body: Callable[[_MergeDb], T]) -> T:
        """Run a merge transaction: plain SQL on SQLite (see _transact_sql), else SQLAlchemy."""
        if self.dialect == "sqlite":
            return await self._transact_sql(lambda sql: body(_SqliteMerge(sql)), sync=False)
        return await self._transact(lambda conn: body(_AlchemyMerge(conn, self._merge_sql)))

    def _process_inbox(self, db: _MergeDb, limit: int) -> ProcessResult:
        rows = db.pending_messages(limit)
        if not rows:
            return ProcessResult()
        items: list[tuple[int | None, Fact]] = []
        failed: dict[int, str] = {}
        snapshots = [
            url
            for row in rows
            if row.message_type == "snapshotReady"
            and (url := snapshot_url(bytes(row.body))) is not None
        ]
        for row in rows:
            try:
                items.extend(
                    (row.id, f)
                    for f in message_facts(row.message_type, bytes(row.body), row.source)
                )
            except NormalisationError as exc:
                failed[row.id] = exc.message
            except Exception as exc:
                # A record our normaliser did not foresee must not block the inbox
                # forever: it is failed, visible in `syncd events`, and can be replayed.
                failed[row.id] = f"cannot normalise: {type(exc).__name__}: {exc}"
        decisions, queued = self._apply(db, items, record=True)
        now = datetime.now(UTC)
        done = [row.id for row in rows if row.id not in failed]
        if done:
            db.messages_done(done, now)
        if failed:
            db.messages_failed(failed, now)
        return ProcessResult(
            len(rows), len(items), len(failed), queued, tuple(decisions), tuple(snapshots)
        )

    async def apply_facts(
        self, items: Sequence[Fact], *, record: bool = True, record_unchanged: bool = True
    ) -> ProcessResult:
        """Merge facts that come with no inbox message (polls), in one transaction.

        Polls re-read mostly unchanged state: ``record_unchanged=False`` keeps only the facts
        that changed something (the corrections), so the facts table does not grow with
        every nightly pass.
        """
        decisions, queued = await self._merge(
            lambda db: self._apply(
                db, [(None, f) for f in items], record=record, record_unchanged=record_unchanged
            )
        )
        return ProcessResult(0, len(items), 0, queued, tuple(decisions))

    @staticmethod
    def _load_entities(
        db: _MergeDb, keys: set[tuple[str, str]]
    ) -> dict[tuple[str, str], EntityRecord]:
        found: dict[tuple[str, str], EntityRecord] = {}
        by_type: dict[str, list[str]] = {}
        for entity_type, entity_key in sorted(keys):
            by_type.setdefault(entity_type, []).append(entity_key)
        # `entity_type = ? AND entity_key IN (...)` walks the unique index; SQLite does not
        # use it for a row-value `(type, key) IN (...)`, which scanned the table per page.
        for entity_type, names in by_type.items():
            for start in range(0, len(names), INSERT_CHUNK):
                for record in db.entities(entity_type, names[start : start + INSERT_CHUNK]):
                    found[(record.entity_type, record.entity_key)] = record
        return found

    def _apply(
        self,
        db: _MergeDb,
        items: Sequence[tuple[int | None, Fact]],
        *,
        record: bool,
        record_unchanged: bool = True,
    ) -> tuple[list[Decision], int]:
        """Decide every fact in memory, in order, then write the batch in a few statements.

        Per entity the facts are folded one after another exactly as if merged one by one;
        only the end state is written: new entities in one INSERT, changed ones in one
        executemany UPDATE, outbox rows and facts likewise. A batch touching thousands of
        entities costs a handful of round trips instead of several per fact.
        """
        known = self._load_entities(db, {(f.entity_type, f.entity_key) for _, f in items})
        now = datetime.now(UTC)
        work: dict[tuple[str, str], _Pending] = {}
        decisions: list[Decision] = []
        recorded: list[tuple[int | None, Fact, Decision]] = []
        for inbox_id, fact in items:
            key = (fact.entity_type, fact.entity_key)
            pending = work.get(key) or _Pending(known.get(key))
            decision = decide(pending.current(), fact)
            decisions.append(decision)
            if _changes_row(pending, decision):
                pending.fold(fact, decision)
                work[key] = pending
            if record and (record_unchanged or decision.outcome is Outcome.APPLIED):
                work.setdefault(key, pending)
                recorded.append((inbox_id, fact, decision))
        ids = self._write_entities(db, work, now)
        queued = self._queue_all(db, work, ids, now)
        if recorded:
            db.insert_facts(
                [
                    _fact_row(inbox_id, ids[(f.entity_type, f.entity_key)], f, d, now)
                    for inbox_id, f, d in recorded
                ]
            )
        return decisions, queued

    @staticmethod
    def _write_entities(
        db: _MergeDb, work: Mapping[tuple[str, str], _Pending], now: datetime
    ) -> dict[tuple[str, str], int]:
        """Insert new and update changed entities; the id of every entity in ``work``."""
        ids = {key: p.entity.id for key, p in work.items() if p.entity is not None}
        fresh = [p.row(key, now) for key, p in work.items() if p.entity is None and p.folded]
        if fresh:
            ids.update(db.insert_entities(fresh))
        changed = [
            {"id": p.entity.id, **p.row(key, now)}
            for key, p in work.items()
            if p.entity is not None and p.folded
        ]
        if changed:
            db.update_entities(changed)
        return ids

    @staticmethod
    def _queue_all(
        db: _MergeDb,
        work: Mapping[tuple[str, str], _Pending],
        ids: Mapping[tuple[str, str], int],
        now: datetime,
    ) -> int:
        """Make sure each changed entity's latest state is on its way to the ERP.

        An entity already pending keeps its row: the worker sends whatever the entity holds
        when it claims the row, so changes while it waits coalesce into one call. A dead one
        gets a fresh set of attempts: the newer state may be what the ERP wanted.
        """
        wanted: list[dict[str, Any]] = []
        revive: list[int] = []
        for key, p in work.items():
            if not p.applied or p.content_hash == p.delivered_hash:
                continue
            if p.outbox_state is OutboxState.DEAD and p.outbox_id is not None:
                revive.append(p.outbox_id)
                continue
            wanted.append(
                {
                    "entity_id": ids[key],
                    "state": OutboxState.PENDING.value,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "replay": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        inserted = 0
        if wanted:
            # A pending row seen at load time may be gone: on PostgreSQL the outbox columns
            # are not re-read after waiting for the entity lock, and the completion that held
            # it deletes the row of the version it delivered. So insert unless a row is there.
            inserted = db.queue_outbox(wanted)
        if revive:
            db.revive_outbox(revive, now)
        return inserted + len(revive)

    async def get_entity(self, entity_type: str, entity_key: str) -> EntityRecord | None:
        """An entity with its outbox row."""
        async with self._read() as conn:
            stmt = _ENTITY_SELECT.where(
                entities.c.entity_type == entity_type, entities.c.entity_key == entity_key
            )
            row = (await conn.execute(stmt)).first()
        return None if row is None else EntityRecord.from_row(row)

    async def list_entities(
        self, *, entity_type: str | None = None, outbox_state: OutboxState | None = None
    ) -> list[EntityRecord]:
        """Entities, filtered by type and by the state of their outbox row."""
        stmt = _ENTITY_SELECT.order_by(entities.c.id)
        if entity_type is not None:
            stmt = stmt.where(entities.c.entity_type == entity_type)
        if outbox_state is not None:
            stmt = stmt.where(outbox.c.state == outbox_state.value)
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [EntityRecord.from_row(row) for row in rows]

    # --- delivery ----------------------------------------------------------------------

    async def claim_deliveries(
        self, owner: str, limit: int, lease_seconds: float
    ) -> list[ClaimedDelivery]:
        """Lease up to ``limit`` due outbox rows to ``owner``, oldest due first.

        One row per entity and a lease per row: an entity never has two deliveries in
        flight. A lease left by a crashed worker expires and the row becomes due again.
        """
        now = datetime.now(UTC)
        until = now + timedelta(seconds=lease_seconds)
        if self.dialect == "postgresql":
            # One statement, so its own transaction: lock, lease and read in one snapshot; a
            # change committed since is caught by the completion.
            async with self._asyncpg() as pg:
                records = await pg.fetch(
                    _PG_CLAIM, _naive(now), limit, owner, _naive(until), OutboxState.PENDING.value
                )
            # The engine's JSON codec is set on its asyncpg connections: state arrives decoded.
            return [_claimed(r, dict(r["state"])) for r in records]
        lease = (owner, _sqlite_time(until), OutboxState.PENDING.value, _sqlite_time(now), limit)

        def claim(sql: _Sql) -> list[dict[str, Any]]:
            ids = [row[0] for row in sql.rows(_SQLITE_CLAIM, lease)]
            if not ids:
                return []
            return sql.mappings(_SQLITE_CLAIMED, (_id_list(ids),))

        return [_claimed(m, jsoncodec.loads(m["state"])) for m in await self._transact_sql(claim)]

    async def complete_delivery(
        self, claim: ClaimedDelivery, owner: str, *, started_at: datetime, status: int
    ) -> None:
        """Record a delivered version; the row is done unless the entity changed meanwhile."""
        await self.complete_deliveries([Completion(claim, owner, started_at, status)])

    async def complete_deliveries(self, done: Sequence[Completion]) -> list[bool]:
        """Record many delivered versions in one transaction (see complete_delivery).

        True for each row queued again because its entity changed while the call was in
        flight: that row is due now. A row whose lease another worker holds now (ours
        expired) is left to that worker.
        """
        now = datetime.now(UTC)
        if self.dialect == "postgresql":
            requeued = await self._complete_postgresql(done, now)
        else:
            requeued = await self._complete_sqlite(done, now)
        return [d.claim.outbox_id in requeued for d in done]

    async def _complete_sqlite(self, done: Sequence[Completion], now: datetime) -> set[int]:
        """complete_deliveries on SQLite, in one write transaction."""
        at = _sqlite_time(now)
        attempts = [
            (
                d.claim.entity_id,
                _sqlite_time(d.started_at),
                at,
                "delivered",
                d.status,
                d.claim.idempotency_key,
                d.claim.revision,
                d.claim.content_hash,
                d.claim.source,
                bool(d.claim.replay),
                d.owner,
            )
            for d in done
        ]
        delivered = [(d.claim.content_hash, d.claim.revision, at, d.claim.entity_id) for d in done]
        outbox_ids = _id_list([d.claim.outbox_id for d in done])

        def complete(sql: _Sql) -> set[int]:
            sql.run_many(_SQLITE_INSERT_ATTEMPT, attempts)
            sql.run_many(_SQLITE_MARK_DELIVERED, delivered)
            current = {row["id"]: row for row in sql.mappings(_SQLITE_OUTBOX_NOW, (outbox_ids,))}
            finished: list[int] = []
            changed: list[int] = []
            for d in done:
                row = current.get(d.claim.outbox_id)
                if row is None or row["lease_owner"] != d.owner:
                    continue
                unchanged = row["revision"] == d.claim.revision and row["replay"] == d.claim.replay
                (finished if unchanged else changed).append(d.claim.outbox_id)
            if finished:
                sql.run(_SQLITE_DELETE_OUTBOX, (_id_list(finished),))
            if changed:
                # The entity moved on while its call was in flight: send the new state now.
                sql.run(_SQLITE_REQUEUE_CHANGED, (at, at, _id_list(changed)))
            return set(changed)

        return await self._transact_sql(complete, sync=False)

    async def _complete_postgresql(self, done: Sequence[Completion], now: datetime) -> set[int]:
        """complete_deliveries on PostgreSQL: two statements over arrays, in one transaction.

        The first records the attempts and marks the entities delivered, which locks them: a
        merge changing one of them now waits for this transaction. The second then reads each
        entity's current revision (a new snapshot, after those locks) and deletes the rows
        delivered as they are, or requeues those whose entity moved on while in flight, and
        returns the requeued rows' ids.
        """
        claims = [d.claim for d in done]
        at = _naive(now)
        async with self._asyncpg() as pg, pg.transaction():
            await pg.execute(
                _PG_RECORD_DELIVERED,
                [c.entity_id for c in claims],
                [_naive(d.started_at) for d in done],
                [d.status for d in done],
                [c.idempotency_key for c in claims],
                [c.revision for c in claims],
                [c.content_hash for c in claims],
                [c.source for c in claims],
                [bool(c.replay) for c in claims],
                [d.owner for d in done],
                at,
                "delivered",
            )
            requeued = await pg.fetch(
                _PG_SETTLE_DELIVERED,
                [c.outbox_id for c in claims],
                [d.owner for d in done],
                [c.revision for c in claims],
                [c.replay for c in claims],
                at,
            )
        return {r["id"] for r in requeued}

    async def fail_delivery(
        self,
        claim: ClaimedDelivery,
        owner: str,
        *,
        started_at: datetime,
        status: int | None,
        error: str,
        retry_at: datetime | None,
        permanent: bool,
    ) -> None:
        """Record a failed attempt; retry at ``retry_at``, or dead-letter when it is None."""
        now = datetime.now(UTC)
        outcome = "permanent" if permanent else "transient"

        def fail(conn: Connection) -> None:
            conn.execute(
                delivery_attempts.insert().values(
                    **_attempt_row(claim, owner, started_at, now, outcome, status, error)
                )
            )
            values: dict[str, Any] = {
                "attempts": outbox.c.attempts + 1,
                "lease_owner": None,
                "lease_until": None,
                "last_status": status,
                "last_error": error,
                "updated_at": now,
            }
            revision = conn.execute(
                sa.select(entities.c.revision)
                .where(entities.c.id == claim.entity_id)
                .with_for_update()
            ).scalar()
            if retry_at is not None:
                values["next_attempt_at"] = retry_at
            elif revision == claim.revision:
                values["state"] = OutboxState.DEAD.value
            else:
                # The entity moved on while this version was in flight: the refusal was of
                # an old state, so the new one gets its own attempts instead of a dead letter.
                values.update(attempts=0, next_attempt_at=now)
            conn.execute(
                outbox.update()
                .where(outbox.c.id == claim.outbox_id, outbox.c.lease_owner == owner)
                .values(**values)
            )

        await self._transact(fail)

    async def release_leases(self, owner: str, *, due_at: datetime | None = None) -> int:
        """Give back every lease ``owner`` holds, so another worker can take the rows: now, or
        from ``due_at`` (for rows whose calls were cut short, which the ERP may still apply)."""
        values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if due_at is not None:
            values["next_attempt_at"] = due_at
        async with self._begin() as conn:
            result = await conn.execute(
                outbox.update().where(outbox.c.lease_owner == owner).values(**values)
            )
        return result.rowcount

    async def next_due_at(self) -> datetime | None:
        """When the next pending delivery becomes claimable, if any is pending."""
        async with self._read() as conn:
            free = sa.select(sa.func.min(outbox.c.next_attempt_at)).where(
                outbox.c.state == OutboxState.PENDING.value, outbox.c.lease_until.is_(None)
            )
            leased = sa.select(sa.func.min(outbox.c.lease_until)).where(
                outbox.c.state == OutboxState.PENDING.value, outbox.c.lease_until.is_not(None)
            )
            times = [(await conn.execute(q)).scalar_one() for q in (free, leased)]
        present = [t for t in times if t is not None]
        return min(present) if present else None

    async def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by state."""
        async with self._read() as conn:
            stmt = sa.select(outbox.c.state, sa.func.count()).group_by(outbox.c.state)
            return {state: int(n) for state, n in (await conn.execute(stmt)).all()}

    async def requeue(self, entity_ids: Sequence[int]) -> int:
        """Queue these entities' current state again, as a replay; returns how many."""
        now = datetime.now(UTC)
        count = 0
        async with self._begin() as conn:
            for entity_id in sorted(set(entity_ids)):
                count += await self._requeue_one(conn, entity_id, now)
        return count

    async def _requeue_one(self, conn: AsyncConnection, entity_id: int, now: datetime) -> int:
        locked = (
            await conn.execute(
                sa.select(entities.c.replays).where(entities.c.id == entity_id).with_for_update()
            )
        ).first()
        if locked is None:
            return 0  # unknown
        # Read the outbox row only now, holding the entity's lock: read in the locking
        # statement, PostgreSQL would show the row as it was before the wait, possibly one
        # a completion has deleted since (see _queue_all).
        row = (
            await conn.execute(
                sa.select(outbox.c.id, outbox.c.state).where(outbox.c.entity_id == entity_id)
            )
        ).first()
        if row is not None and row.state == OutboxState.PENDING.value:
            return 0  # already on its way
        replays = locked.replays + 1
        await conn.execute(
            entities.update().where(entities.c.id == entity_id).values(replays=replays)
        )
        values = {
            "state": OutboxState.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "lease_owner": None,
            "lease_until": None,
            "replay": replays,
            "updated_at": now,
        }
        if row is None:
            await conn.execute(
                outbox.insert().values(entity_id=entity_id, created_at=now, **values)
            )
        else:
            await conn.execute(outbox.update().where(outbox.c.id == row.id).values(**values))
        return 1

    # --- events (what `syncd events` shows) ---------------------------------------------

    async def list_events(
        self,
        *,
        state: str | None = None,
        message_type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[EventSummary]:
        """Inbox messages with their state; "dead" means one of their entities is dead-lettered."""
        dead = (
            sa.select(facts.c.id)
            .join(outbox, outbox.c.entity_id == facts.c.entity_id)
            .where(facts.c.inbox_id == inbox.c.id, outbox.c.state == OutboxState.DEAD.value)
            .exists()
        )
        fact_count = (
            sa.select(sa.func.count()).where(facts.c.inbox_id == inbox.c.id).scalar_subquery()
        )
        stmt = (
            sa.select(
                inbox.c.id,
                inbox.c.received_at,
                inbox.c.message_type,
                inbox.c.message_id,
                inbox.c.source,
                inbox.c.state,
                inbox.c.error,
                dead.label("dead"),
                fact_count.label("facts"),
            )
            .order_by(inbox.c.id.desc())
            .limit(limit)
        )
        if state == "dead":
            stmt = stmt.where(dead)
        elif state is not None:
            stmt = stmt.where(inbox.c.state == state)
        if message_type is not None:
            stmt = stmt.where(inbox.c.message_type == message_type)
        if since is not None:
            stmt = stmt.where(inbox.c.received_at >= since)
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [
            EventSummary(
                id=r.id,
                received_at=r.received_at,
                message_type=r.message_type,
                message_id=r.message_id,
                source=r.source,
                state="dead" if r.dead else r.state,
                error=r.error,
                facts=int(r.facts),
            )
            for r in rows
        ]

    async def facts_of(self, inbox_id: int) -> list[FactRecord]:
        """The facts a message stated, in order."""
        stmt = (
            sa.select(
                facts.c.id,
                facts.c.inbox_id,
                entities.c.entity_type,
                entities.c.entity_key,
                facts.c.source,
                facts.c.outcome,
                facts.c.reason,
                facts.c.content_hash,
                facts.c.created_at,
            )
            .join(entities, entities.c.id == facts.c.entity_id)
            .where(facts.c.inbox_id == inbox_id)
            .order_by(facts.c.id)
        )
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [FactRecord.from_row(row) for row in rows]

    async def attempts_of(self, entity_id: int) -> list[AttemptRecord]:
        """Every ERP call made for an entity, oldest first."""
        stmt = (
            delivery_attempts.select()
            .where(delivery_attempts.c.entity_id == entity_id)
            .order_by(delivery_attempts.c.id)
        )
        async with self._read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [AttemptRecord.from_row(row) for row in rows]

    async def entity_ids_of_event(self, inbox_id: int) -> list[int]:
        """The entities a message's facts were about."""
        stmt = sa.select(facts.c.entity_id).where(facts.c.inbox_id == inbox_id).distinct()
        async with self._read() as conn:
            return [int(i) for i in (await conn.execute(stmt)).scalars()]

    async def dead_entity_ids(self, since: datetime | None = None) -> list[int]:
        """Entities whose delivery is dead-lettered (since a time, by last update)."""
        stmt = sa.select(outbox.c.entity_id).where(outbox.c.state == OutboxState.DEAD.value)
        if since is not None:
            stmt = stmt.where(outbox.c.updated_at >= since)
        async with self._read() as conn:
            return [int(i) for i in (await conn.execute(stmt)).scalars()]

    # --- status -------------------------------------------------------------------------

    async def oldest_pending(self) -> datetime | None:
        """When the oldest pending delivery was queued (its row's creation), if any."""
        async with self._read() as conn:
            stmt = sa.select(sa.func.min(outbox.c.created_at)).where(
                outbox.c.state == OutboxState.PENDING.value
            )
            value: datetime | None = (await conn.execute(stmt)).scalar_one()
        return value

    async def inbox_counts(self) -> dict[str, int]:
        """Inbox messages by state."""
        async with self._read() as conn:
            stmt = sa.select(inbox.c.state, sa.func.count()).group_by(inbox.c.state)
            return {state: int(n) for state, n in (await conn.execute(stmt)).all()}

    async def attempts_since(self, since: datetime) -> list[tuple[datetime, str]]:
        """(finished_at, outcome) of every ERP call since a time, oldest first."""
        async with self._read() as conn:
            stmt = (
                sa.select(delivery_attempts.c.finished_at, delivery_attempts.c.outcome)
                .where(delivery_attempts.c.finished_at >= since)
                .order_by(delivery_attempts.c.finished_at)
            )
            return [(r.finished_at, r.outcome) for r in (await conn.execute(stmt)).all()]

    async def last_runs(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The latest run of each (job, kind), and the latest successful one's finish time."""
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        async with self._read() as conn:
            newest = (
                sa.select(sa.func.max(poll_runs.c.id))
                .group_by(poll_runs.c.job, poll_runs.c.kind)
                .scalar_subquery()
            )
            for row in (
                await conn.execute(poll_runs.select().where(poll_runs.c.id.in_(newest)))
            ).all():
                latest[(row.job, row.kind)] = dict(row._mapping)
            ok = (
                sa.select(poll_runs.c.job, poll_runs.c.kind, sa.func.max(poll_runs.c.finished_at))
                .where(poll_runs.c.ok.is_(True))
                .group_by(poll_runs.c.job, poll_runs.c.kind)
            )
            for job, kind, finished in (await conn.execute(ok)).all():
                latest.setdefault((job, kind), {})["last_success_at"] = finished
        return latest

    # --- polling ------------------------------------------------------------------------

    async def get_cursor(self, job: str) -> datetime | None:
        """Where the job's last complete incremental pass started."""
        async with self._read() as conn:
            stmt = sa.select(poll_cursors.c.cursor_at).where(poll_cursors.c.job == job)
            value: datetime | None = (await conn.execute(stmt)).scalar_one_or_none()
        return value

    async def set_cursor(self, job: str, cursor_at: datetime) -> None:
        """Move the job's cursor (only after its whole pass committed)."""
        now = datetime.now(UTC)
        async with self._begin() as conn:
            updated = await conn.execute(
                poll_cursors.update()
                .where(poll_cursors.c.job == job)
                .values(cursor_at=cursor_at, updated_at=now)
            )
            if not updated.rowcount:
                await conn.execute(
                    poll_cursors.insert().values(job=job, cursor_at=cursor_at, updated_at=now)
                )

    async def record_run(
        self,
        job: str,
        kind: str,
        started_at: datetime,
        report: Mapping[str, Any],
        error: str | None,
    ) -> None:
        """Keep a poll or reconciliation run's report."""
        async with self._begin() as conn:
            await conn.execute(
                poll_runs.insert().values(
                    job=job,
                    kind=kind,
                    started_at=started_at,
                    finished_at=datetime.now(UTC),
                    ok=error is None,
                    report=dict(report),
                    error=error,
                )
            )

    async def recent_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest poll and reconciliation runs, newest first."""
        async with self._read() as conn:
            stmt = poll_runs.select().order_by(poll_runs.c.id.desc()).limit(limit)
            return [dict(row._mapping) for row in (await conn.execute(stmt)).all()]

    async def entities_by_keys(
        self, entity_type: str, keys: Sequence[str]
    ) -> dict[str, EntityRecord]:
        """Entities of one type by key (missing keys are absent)."""
        found: dict[str, EntityRecord] = {}
        async with self._read() as conn:
            for start in range(0, len(keys), INSERT_CHUNK):
                stmt = _ENTITY_SELECT.where(
                    entities.c.entity_type == entity_type,
                    entities.c.entity_key.in_(keys[start : start + INSERT_CHUNK]),
                )
                for row in (await conn.execute(stmt)).all():
                    record = EntityRecord.from_row(row)
                    found[record.entity_key] = record
        return found

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a named lease; True if ``owner`` holds it now.

        Used so scheduled polls run on one instance of several sharing a database: the
        holder renews it, and another instance takes it over once it has expired.
        """
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=ttl)
        async with self._begin() as conn:
            taken = await conn.execute(
                leases.update()
                .where(
                    leases.c.name == name,
                    sa.or_(leases.c.owner == owner, leases.c.expires_at < now),
                )
                .values(owner=owner, expires_at=expires)
            )
            if taken.rowcount:
                return True
            inserted = await conn.execute(
                _insert(self.dialect, leases)
                .values(name=name, owner=owner, expires_at=expires)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            return bool(inserted.rowcount)

    async def lease_holder(self, name: str) -> tuple[str, datetime] | None:
        """Who holds a lease and until when."""
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(leases.c.owner, leases.c.expires_at).where(leases.c.name == name)
                )
            ).first()
        return None if row is None else (row.owner, row.expires_at)

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
        if self._thread is not None and self._thread_engine is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, self._close_driver)
            await loop.run_in_executor(self._thread, self._thread_engine.dispose)
            self._thread.shutdown(wait=False)
            self._thread = None  # closing twice is harmless


def _describe(exc: BaseException) -> str:
    """A one-line reason for a driver error, without its SQL or parameters."""
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {text}" if text else type(original).__name__


_ENTITY_SELECT = sa.select(
    *entities.c,
    outbox.c.id.label("outbox_id"),
    outbox.c.state.label("outbox_state"),
    outbox.c.attempts,
    outbox.c.next_attempt_at,
    outbox.c.lease_until,
    outbox.c.last_status,
    outbox.c.last_error,
).select_from(entities.outerjoin(outbox, outbox.c.entity_id == entities.c.id))


_NOW = sa.bindparam("b_now", type_=UTCDateTime())


@dataclass(frozen=True)
class _MergeStatements:
    """The merge's statements, built once per store. A statement built anew for each pass
    spent more Python time in SQLAlchemy's construction and cache-key generation than in
    executing it; a constant one memoises its cache key."""

    pending_messages: sa.Select[Any]
    messages_done: sa.Update
    message_failed: sa.Update
    entities_by_key: sa.Select[Any]
    insert_entities: sa.Insert
    update_entities: sa.Update
    queue_outbox: Any  # the dialect's INSERT ... ON CONFLICT DO NOTHING
    revive_outbox: sa.Update
    insert_facts: sa.Insert

    @classmethod
    def build(cls, dialect: str) -> _MergeStatements:
        """The statements for ``dialect``; ``b_ids`` and ``b_keys`` take lists."""
        ids: Any = sa.bindparam("b_ids", expanding=True)
        return cls(
            pending_messages=sa.select(
                inbox.c.id, inbox.c.message_type, inbox.c.body, inbox.c.source
            )
            .where(inbox.c.state == InboxState.PENDING.value)
            .order_by(inbox.c.id)
            .limit(sa.bindparam("b_limit", type_=sa.Integer))
            .with_for_update(skip_locked=True),
            messages_done=inbox.update()
            .where(inbox.c.id.in_(ids))
            .values(state=InboxState.DONE.value, processed_at=_NOW),
            message_failed=inbox.update()
            .where(inbox.c.id == sa.bindparam("b_id"))
            .values(
                state=InboxState.FAILED.value, error=sa.bindparam("b_error"), processed_at=_NOW
            ),
            entities_by_key=_ENTITY_SELECT.where(
                entities.c.entity_type == sa.bindparam("b_type"),
                entities.c.entity_key.in_(sa.bindparam("b_keys", expanding=True)),
            )
            .order_by(entities.c.id)
            .with_for_update(of=entities),
            insert_entities=entities.insert().returning(
                entities.c.id, entities.c.entity_type, entities.c.entity_key
            ),
            update_entities=entities.update()
            .where(entities.c.id == sa.bindparam("b_id"))
            .values({c: sa.bindparam(f"b_{c}") for c in _ENTITY_WRITE_COLUMNS}),
            queue_outbox=_insert(dialect, outbox)
            .on_conflict_do_nothing(index_elements=["entity_id"])
            .returning(outbox.c.id),
            revive_outbox=outbox.update()
            .where(outbox.c.id.in_(ids))
            .values(
                state=OutboxState.PENDING.value,
                attempts=0,
                next_attempt_at=_NOW,
                lease_owner=None,
                lease_until=None,
                replay=0,
                updated_at=_NOW,
            ),
            insert_facts=facts.insert(),
        )


class _PendingMessage(NamedTuple):
    """An inbox message the merge takes up."""

    id: int
    message_type: str
    body: bytes
    source: str


class _MergeDb(Protocol):
    """The merge's reads and writes inside its transaction (see SqlStore._merge). Row
    dicts are keyed by column name; ``id`` names the row an update is for."""

    def pending_messages(self, limit: int) -> list[_PendingMessage]: ...

    def entities(self, entity_type: str, keys: Sequence[str]) -> list[EntityRecord]: ...

    def insert_entities(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
        """Insert new entities; the id of each by (entity_type, entity_key)."""
        ...

    def update_entities(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def queue_outbox(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert outbox rows where the entity has none; how many were inserted."""
        ...

    def revive_outbox(self, ids: Sequence[int], now: datetime) -> None: ...

    def insert_facts(self, rows: Sequence[dict[str, Any]]) -> None: ...

    def messages_done(self, ids: Sequence[int], now: datetime) -> None: ...

    def messages_failed(self, failed: Mapping[int, str], now: datetime) -> None: ...


class _AlchemyMerge:
    """_MergeDb with SQLAlchemy's statements (PostgreSQL)."""

    def __init__(self, conn: Connection, statements: _MergeStatements) -> None:
        self._conn = conn
        self._sql = statements

    def pending_messages(self, limit: int) -> list[_PendingMessage]:
        rows = self._conn.execute(self._sql.pending_messages, {"b_limit": limit})
        return [_PendingMessage(*row) for row in rows]

    def entities(self, entity_type: str, keys: Sequence[str]) -> list[EntityRecord]:
        chunk = {"b_type": entity_type, "b_keys": list(keys)}
        return [
            EntityRecord.from_row(r) for r in self._conn.execute(self._sql.entities_by_key, chunk)
        ]

    def insert_entities(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
        inserted = self._conn.execute(self._sql.insert_entities, list(rows))
        return {(row.entity_type, row.entity_key): row.id for row in inserted}

    def update_entities(self, rows: Sequence[dict[str, Any]]) -> None:
        columns = ("id", *_ENTITY_WRITE_COLUMNS)
        self._conn.execute(
            self._sql.update_entities, [{f"b_{c}": row[c] for c in columns} for row in rows]
        )

    def queue_outbox(self, rows: Sequence[dict[str, Any]]) -> int:
        return len(self._conn.execute(self._sql.queue_outbox, list(rows)).all())

    def revive_outbox(self, ids: Sequence[int], now: datetime) -> None:
        self._conn.execute(self._sql.revive_outbox, {"b_ids": list(ids), "b_now": now})

    def insert_facts(self, rows: Sequence[dict[str, Any]]) -> None:
        self._conn.execute(self._sql.insert_facts, list(rows))

    def messages_done(self, ids: Sequence[int], now: datetime) -> None:
        self._conn.execute(self._sql.messages_done, {"b_ids": list(ids), "b_now": now})

    def messages_failed(self, failed: Mapping[int, str], now: datetime) -> None:
        self._conn.execute(
            self._sql.message_failed,
            [{"b_id": i, "b_error": error, "b_now": now} for i, error in failed.items()],
        )


# The hot paths on PostgreSQL, as SQL for asyncpg (see SqlStore._asyncpg). Lists go
# in as arrays, so each statement has one text whatever the batch size, prepared once per
# connection. Timestamps are naive UTC, as UTCDateTime stores them.

#: The group commit: new messages ($9 their state), each dedupe key kept once; returns the
#: keys that were new.
_PG_ADD_MESSAGES = """
INSERT INTO inbox (dedupe_key, message_type, message_id, source, body, headers, remote_addr,
                   received_at, state)
SELECT dedupe_key, message_type, message_id, source, body, headers::json, remote_addr,
       received_at, $9
FROM unnest(
    $1::varchar[], $2::varchar[], $3::varchar[], $4::varchar[], $5::bytea[], $6::text[],
    $7::varchar[], $8::timestamp[]
) AS m(dedupe_key, message_type, message_id, source, body, headers, remote_addr, received_at)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING dedupe_key
"""

#: Lease up to $2 due rows to $3 until $4 ($1 now, $5 the pending state), oldest first,
#: skipping rows another worker has locked, and read them with their entities' state.
_PG_CLAIM = """
WITH due AS (
    SELECT id FROM outbox
    WHERE state = $5 AND next_attempt_at <= $1 AND (lease_until IS NULL OR lease_until < $1)
    ORDER BY next_attempt_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE outbox SET lease_owner = $3, lease_until = $4
    FROM due WHERE outbox.id = due.id
    RETURNING outbox.id, outbox.attempts, outbox.replay, outbox.entity_id, outbox.next_attempt_at
)
SELECT leased.id AS outbox_id, leased.attempts, leased.replay, e.id AS entity_id,
       e.entity_type, e.entity_key, e.state, e.content_hash, e.revision, e.source
FROM leased JOIN entities e ON e.id = leased.entity_id
ORDER BY leased.next_attempt_at, leased.id
"""

#: One attempt row per delivery (outcome $11, finished at $10), and each entity marked
#: delivered at the revision and hash that went out.
_PG_RECORD_DELIVERED = """
WITH done AS (
    SELECT * FROM unnest(
        $1::bigint[], $2::timestamp[], $3::integer[], $4::varchar[], $5::integer[],
        $6::varchar[], $7::varchar[], $8::boolean[], $9::varchar[]
    ) AS d(entity_id, started_at, status_code, idempotency_key, revision, content_hash,
           source, replay, worker)
), attempts AS (
    INSERT INTO delivery_attempts (entity_id, started_at, finished_at, outcome, status_code,
                                   idempotency_key, revision, content_hash, source, replay,
                                   worker)
    SELECT entity_id, started_at, $10, $11, status_code, idempotency_key, revision,
           content_hash, source, replay, worker
    FROM done
)
UPDATE entities SET delivered_hash = done.content_hash, delivered_revision = done.revision,
                    delivered_at = $10
FROM done WHERE entities.id = done.entity_id
"""

#: For each delivered row still leased to its worker: delete it if its entity is at the
#: revision (and replay) that went out, else make it due at once ($5) with fresh attempts.
_PG_SETTLE_DELIVERED = """
WITH current AS (
    SELECT o.id, e.revision = d.revision AND o.replay = d.replay AS unchanged
    FROM unnest($1::bigint[], $2::varchar[], $3::integer[], $4::integer[])
        AS d(outbox_id, owner, revision, replay)
    JOIN outbox o ON o.id = d.outbox_id AND o.lease_owner = d.owner
    JOIN entities e ON e.id = o.entity_id
), finished AS (
    DELETE FROM outbox WHERE id IN (SELECT id FROM current WHERE unchanged)
)
UPDATE outbox SET attempts = 0, next_attempt_at = $5, lease_owner = NULL, lease_until = NULL,
                  last_status = NULL, last_error = NULL, updated_at = $5
WHERE id IN (SELECT id FROM current WHERE NOT unchanged)
RETURNING id
"""


# The hot paths on a SQLite file, as SQL for the stdlib driver (see SqlStore._transact_sql).
# Lists of ids go in as one JSON array read with json_each, so each statement has one text
# whatever the batch size, prepared once by the driver's statement cache. Timestamps are
# text in the form SQLAlchemy writes for SQLite (_sqlite_time): they compare as text.

#: One message of the group commit; it is new if the statement changed a row.
_SQLITE_ADD_MESSAGE = """
INSERT INTO inbox (dedupe_key, message_type, message_id, source, body, headers, remote_addr,
                   received_at, state)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (dedupe_key) DO NOTHING
"""

#: Lease up to ?5 due rows (state ?3, due by ?4) to ?1 until ?2; returns their ids.
_SQLITE_CLAIM = """
UPDATE outbox SET lease_owner = ?1, lease_until = ?2
WHERE id IN (
    SELECT id FROM outbox
    WHERE state = ?3 AND next_attempt_at <= ?4 AND (lease_until IS NULL OR lease_until < ?4)
    ORDER BY next_attempt_at, id
    LIMIT ?5
)
RETURNING id
"""

#: The claimed rows (a JSON array of outbox ids) with their entities' state, oldest due first.
_SQLITE_CLAIMED = """
SELECT o.id AS outbox_id, o.attempts AS attempts, o.replay AS replay, e.id AS entity_id,
       e.entity_type AS entity_type, e.entity_key AS entity_key, e.state AS state,
       e.content_hash AS content_hash, e.revision AS revision, e.source AS source
FROM outbox o JOIN entities e ON e.id = o.entity_id
WHERE o.id IN (SELECT value FROM json_each(?))
ORDER BY o.next_attempt_at, o.id
"""

_SQLITE_INSERT_ATTEMPT = """
INSERT INTO delivery_attempts (entity_id, started_at, finished_at, outcome, status_code,
                               idempotency_key, revision, content_hash, source, replay, worker)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_SQLITE_MARK_DELIVERED = """
UPDATE entities SET delivered_hash = ?, delivered_revision = ?, delivered_at = ? WHERE id = ?
"""

#: Each delivered row's lease holder and replay, with its entity's current revision.
_SQLITE_OUTBOX_NOW = """
SELECT o.id AS id, o.lease_owner AS lease_owner, o.replay AS replay, e.revision AS revision
FROM outbox o JOIN entities e ON e.id = o.entity_id
WHERE o.id IN (SELECT value FROM json_each(?))
"""

_SQLITE_DELETE_OUTBOX = "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?))"

_SQLITE_REQUEUE_CHANGED = """
UPDATE outbox SET attempts = 0, next_attempt_at = ?, lease_owner = NULL, lease_until = NULL,
                  last_status = NULL, last_error = NULL, updated_at = ?
WHERE id IN (SELECT value FROM json_each(?))
"""


class _Sql(Protocol):
    """Plain SQL with ``?`` parameters inside a write transaction on SQLite."""

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    def mappings(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """The rows keyed by the names the statement gives its columns."""
        ...

    def run(self, sql: str, params: Sequence[Any]) -> int:
        """Execute once; the number of rows changed."""
        ...

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...


class _DriverSql:
    """_Sql on a sqlite3 connection (a SQLite file, in the store thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def mappings(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def run(self, sql: str, params: Sequence[Any]) -> int:
        return self._conn.execute(sql, params).rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, params)


class _EngineSql:
    """_Sql on a SQLAlchemy connection (an in-memory SQLite database, on the async engine)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._conn.exec_driver_sql(sql, tuple(params))]

    def mappings(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return [dict(m) for m in self._conn.exec_driver_sql(sql, tuple(params)).mappings()]

    def run(self, sql: str, params: Sequence[Any]) -> int:
        return self._conn.exec_driver_sql(sql, tuple(params)).rowcount

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self._conn.exec_driver_sql(sql, [tuple(p) for p in params])


#: The merge on SQLite (see _SqliteMerge); entity reads carry their outbox row, with the
#: column names of _ENTITY_SELECT.
_SQLITE_PENDING_MESSAGES = """
SELECT id, message_type, body, source FROM inbox WHERE state = ? ORDER BY id LIMIT ?
"""

_SQLITE_ENTITIES = """
SELECT e.id AS id, e.entity_type AS entity_type, e.entity_key AS entity_key,
       e.state AS state, e.content_hash AS content_hash, e.version_rank AS version_rank,
       e.version_ts AS version_ts, e.source AS source, e.revision AS revision,
       e.replays AS replays, e.updated_at AS updated_at, e.delivered_hash AS delivered_hash,
       e.delivered_revision AS delivered_revision, e.delivered_at AS delivered_at,
       o.id AS outbox_id, o.state AS outbox_state, o.attempts AS attempts,
       o.next_attempt_at AS next_attempt_at, o.lease_until AS lease_until,
       o.last_status AS last_status, o.last_error AS last_error
FROM entities e LEFT OUTER JOIN outbox o ON o.entity_id = e.id
WHERE e.entity_type = ? AND e.entity_key IN (SELECT value FROM json_each(?))
ORDER BY e.id
"""

_SQLITE_INSERT_ENTITY = """
INSERT INTO entities (entity_type, entity_key, state, content_hash, version_rank, version_ts,
                      source, revision, updated_at, replays)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
RETURNING id
"""

_SQLITE_UPDATE_ENTITY = """
UPDATE entities SET state = ?, content_hash = ?, version_rank = ?, version_ts = ?, source = ?,
                    revision = ?, updated_at = ?
WHERE id = ?
"""

#: A pending row for an entity that has none (one row per entity).
_SQLITE_QUEUE_OUTBOX = """
INSERT INTO outbox (entity_id, state, attempts, next_attempt_at, replay, created_at,
                    updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (entity_id) DO NOTHING
"""

_SQLITE_REVIVE_OUTBOX = """
UPDATE outbox SET state = ?, attempts = 0, next_attempt_at = ?, lease_owner = NULL,
                  lease_until = NULL, replay = 0, updated_at = ?
WHERE id IN (SELECT value FROM json_each(?))
"""

_SQLITE_INSERT_FACT = """
INSERT INTO facts (inbox_id, entity_id, source, outcome, reason, content_hash, version_rank,
                   version_ts, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_SQLITE_MESSAGES_DONE = """
UPDATE inbox SET state = ?, processed_at = ? WHERE id IN (SELECT value FROM json_each(?))
"""

_SQLITE_MESSAGE_FAILED = "UPDATE inbox SET state = ?, error = ?, processed_at = ? WHERE id = ?"


class _SqliteMerge:
    """_MergeDb as plain SQL on SQLite (see SqlStore._transact_sql)."""

    def __init__(self, sql: _Sql) -> None:
        self._sql = sql

    def pending_messages(self, limit: int) -> list[_PendingMessage]:
        rows = self._sql.rows(_SQLITE_PENDING_MESSAGES, (InboxState.PENDING.value, limit))
        return [_PendingMessage(*row) for row in rows]

    def entities(self, entity_type: str, keys: Sequence[str]) -> list[EntityRecord]:
        rows = self._sql.mappings(_SQLITE_ENTITIES, (entity_type, jsoncodec.dumps(list(keys))))
        return [_sqlite_entity(row) for row in rows]

    def insert_entities(self, rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], int]:
        ids = {}
        for row in rows:
            key = (row["entity_type"], row["entity_key"])
            values = (*key, *_sqlite_entity_write(row), row["replays"])
            [(entity_id,)] = self._sql.rows(_SQLITE_INSERT_ENTITY, values)
            ids[key] = entity_id
        return ids

    def update_entities(self, rows: Sequence[dict[str, Any]]) -> None:
        values = [(*_sqlite_entity_write(row), row["id"]) for row in rows]
        self._sql.run_many(_SQLITE_UPDATE_ENTITY, values)

    def queue_outbox(self, rows: Sequence[dict[str, Any]]) -> int:
        return sum(
            self._sql.run(
                _SQLITE_QUEUE_OUTBOX,
                (
                    row["entity_id"],
                    row["state"],
                    row["attempts"],
                    _sqlite_time(row["next_attempt_at"]),
                    row["replay"],
                    _sqlite_time(row["created_at"]),
                    _sqlite_time(row["updated_at"]),
                ),
            )
            for row in rows
        )

    def revive_outbox(self, ids: Sequence[int], now: datetime) -> None:
        at = _sqlite_time(now)
        self._sql.run(_SQLITE_REVIVE_OUTBOX, (OutboxState.PENDING.value, at, at, _id_list(ids)))

    def insert_facts(self, rows: Sequence[dict[str, Any]]) -> None:
        self._sql.run_many(
            _SQLITE_INSERT_FACT,
            [
                (
                    row["inbox_id"],
                    row["entity_id"],
                    row["source"],
                    row["outcome"],
                    row["reason"],
                    row["content_hash"],
                    row["version_rank"],
                    _sqlite_time_or_none(row["version_ts"]),
                    _sqlite_time(row["created_at"]),
                )
                for row in rows
            ],
        )

    def messages_done(self, ids: Sequence[int], now: datetime) -> None:
        done = (InboxState.DONE.value, _sqlite_time(now), _id_list(ids))
        self._sql.run(_SQLITE_MESSAGES_DONE, done)

    def messages_failed(self, failed: Mapping[int, str], now: datetime) -> None:
        at = _sqlite_time(now)
        self._sql.run_many(
            _SQLITE_MESSAGE_FAILED,
            [(InboxState.FAILED.value, error, at, i) for i, error in failed.items()],
        )


#: The timestamp columns of _SQLITE_ENTITIES.
_SQLITE_ENTITY_TIMES = (
    "version_ts",
    "updated_at",
    "delivered_at",
    "next_attempt_at",
    "lease_until",
)


def _sqlite_entity(m: dict[str, Any]) -> EntityRecord:
    """An EntityRecord from a _SQLITE_ENTITIES row (as a mapping, decoded in place)."""
    m["state"] = jsoncodec.loads(m["state"])
    for name in _SQLITE_ENTITY_TIMES:
        m[name] = _sqlite_parse_time(m[name])
    return EntityRecord.from_mapping(m)


def _sqlite_entity_write(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """An entities row's _ENTITY_WRITE_COLUMNS, in order, as SQLite parameters."""
    return (
        jsoncodec.dumps(row["state"]),
        row["content_hash"],
        row["version_rank"],
        _sqlite_time_or_none(row["version_ts"]),
        row["source"],
        row["revision"],
        _sqlite_time(row["updated_at"]),
    )


def _sqlite_time_or_none(value: datetime | None) -> str | None:
    return None if value is None else _sqlite_time(value)


def _sqlite_parse_time(text: str | None) -> datetime | None:
    """A timestamp column's text as the aware UTC datetime UTCDateTime returns (or None)."""
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


def _sqlite_time(value: datetime) -> str:
    """An aware datetime as SQLAlchemy stores it in SQLite: naive UTC text, microseconds."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store; use an aware UTC datetime")
    return _naive(value).isoformat(" ", "microseconds")


def _id_list(ids: Sequence[int]) -> str:
    """Ids as a JSON array, for ``IN (SELECT value FROM json_each(?))``."""
    return jsoncodec.dumps(list(ids))


def _naive(value: datetime) -> datetime:
    """An aware datetime as the naive UTC the store's timestamp columns hold."""
    return value.astimezone(UTC).replace(tzinfo=None)


def _claimed(row: Any, state: dict[str, Any]) -> ClaimedDelivery:
    """A claimed row (asyncpg Record or a mapping) with its decoded entity state."""
    return ClaimedDelivery(
        outbox_id=row["outbox_id"],
        entity_id=row["entity_id"],
        entity_type=row["entity_type"],
        entity_key=row["entity_key"],
        state=state,
        content_hash=row["content_hash"],
        revision=row["revision"],
        source=row["source"],
        attempts=row["attempts"],
        replay=row["replay"],
    )


_ENTITY_WRITE_COLUMNS = (
    "state",
    "content_hash",
    "version_rank",
    "version_ts",
    "source",
    "revision",
    "updated_at",
)


class _Pending:
    """One entity while a batch of facts is folded into it, before anything is written."""

    def __init__(self, entity: EntityRecord | None) -> None:
        self.entity = entity
        self.state: dict[str, Any] = {} if entity is None else entity.state
        self.content_hash = "" if entity is None else entity.content_hash
        self.version = Version() if entity is None else entity.version
        self.source = "" if entity is None else entity.source
        self.revision = 0 if entity is None else entity.revision
        self.delivered_hash = None if entity is None else entity.delivered_hash
        self.outbox_id = None if entity is None else entity.outbox_id
        self.outbox_state = None if entity is None else entity.outbox_state
        self.folded = False
        self.applied = False

    def current(self) -> Current | None:
        """What the next fact is compared with."""
        if self.entity is None and not self.folded:
            return None
        return Current(self.state, self.content_hash, self.version, self.delivered_hash)

    def fold(self, fact: Fact, decision: Decision) -> None:
        """Take a decision's state as the entity's."""
        self.state = dict(decision.state)
        self.content_hash = decision.content_hash
        self.version = decision.version
        self.folded = True
        if decision.outcome is Outcome.APPLIED:
            self.applied = True
            self.source = fact.source
            self.revision += 1

    def row(self, key: tuple[str, str], now: datetime) -> dict[str, Any]:
        """The entities row to write."""
        return {
            "entity_type": key[0],
            "entity_key": key[1],
            "state": self.state,
            "content_hash": self.content_hash,
            "version_rank": self.version.rank,
            "version_ts": self.version.timestamp,
            "source": self.source,
            "revision": self.revision,
            "replays": 0 if self.entity is None else self.entity.replays,
            "updated_at": now,
        }


def _changes_row(pending: _Pending, decision: Decision) -> bool:
    """Whether a decision changes the entity row: a nightly pass that finds everything as it
    was (same state, same version) must not rewrite every row it reads."""
    if decision.outcome is Outcome.STALE:
        return False
    if decision.outcome is Outcome.APPLIED or pending.current() is None:
        return True
    return decision.version != pending.version or dict(decision.state) != pending.state


def _fact_row(
    inbox_id: int | None, entity_id: int, fact: Fact, decision: Decision, now: datetime
) -> dict[str, Any]:
    return {
        "inbox_id": inbox_id,
        "entity_id": entity_id,
        "source": fact.source,
        "outcome": decision.outcome.value,
        "reason": decision.reason,
        "content_hash": decision.content_hash,
        "version_rank": fact.version.rank,
        "version_ts": fact.version.timestamp,
        "created_at": now,
    }


def _attempt_row(
    claim: ClaimedDelivery,
    owner: str,
    started_at: datetime,
    finished_at: datetime,
    outcome: str,
    status: int | None,
    error: str | None,
) -> dict[str, Any]:
    return {
        "entity_id": claim.entity_id,
        "started_at": started_at,
        "finished_at": finished_at,
        "outcome": outcome,
        "status_code": status,
        "error": error,
        "idempotency_key": claim.idempotency_key,
        "revision": claim.revision,
        "content_hash": claim.content_hash,
        "source": claim.source,
        "replay": bool(claim.replay),
        "worker": owner,
    }
