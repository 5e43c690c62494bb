"""bench/store_insert: CPU per group commit of ``SqlStore.add_messages``, beside executemany.

``add_messages`` builds ``insert(inbox).values([row, ...])``, a multi-VALUES statement that
SQLAlchemy cannot cache (its log says ``[no key]``), so every group commit builds and compiles
an INSERT with nine bind parameters per row. The alternative measured here passes the rows as
executemany parameters to one constant statement, which is compiled once and then cached
(SQLAlchemy's "insertmanyvalues" still sends one multi-row INSERT ... RETURNING per batch).
Both run on a fresh SQLite file (WAL, synchronous=FULL, as syncd sets it) and, unless
``--no-postgres``, a fresh PostgreSQL database that is dropped afterwards.

    .venv/bin/python bench/store_insert.py [--batches 200] [--no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from syncd.store import InboxState, NewMessage, SqlStore, inbox, metadata


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


BODY = b'{"message_type":"orderEvent","data":[' + b" " * 1060 + b"]}"
HEADERS = {"content-type": "application/json", "user-agent": "wrk"}
SIZES = (1, 8, 32, 64)

Insert = Callable[[Sequence[NewMessage]], Awaitable[list[bool]]]


def messages(tag: str, count: int) -> list[NewMessage]:
    now = datetime.now(UTC)
    return [
        NewMessage(
            dedupe_key=f"{tag}-{i}",
            message_type="orderEvent",
            message_id=f"{tag}-{i}",
            source="webhook",
            body=BODY,
            received_at=now,
            headers=HEADERS,
            remote_addr="127.0.0.1",
        )
        for i in range(count)
    ]


def executemany(store: SqlStore) -> Insert:
    """The same transaction as add_messages, with one cached statement and executemany."""
    insert = pg_insert if store.dialect == "postgresql" else sqlite_insert
    stmt = (
        insert(inbox)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(inbox.c.dedupe_key)
    )

    async def add(batch: Sequence[NewMessage]) -> list[bool]:
        async with store.engine.begin() as conn:
            result = await conn.execute(stmt, [_message_row(m) for m in batch])
            inserted = set(result.scalars())
        return [m.dedupe_key in inserted for m in batch]

    return add


async def measure(name: str, add: Insert, size: int, batches: int) -> str:
    for i in range(20):
        await add(messages(f"warm-{name}-{size}-{i}", size))
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(batches):
        await add(messages(f"{name}-{size}-{i}", size))
    cpu_ms = 1000 * (time.process_time() - cpu) / batches
    wall_ms = 1000 * (time.perf_counter() - wall) / batches
    return (
        f"{name:24s} rows/commit {size:3d}  CPU/commit {cpu_ms:6.2f} ms  "
        f"CPU/row {cpu_ms / size:6.3f} ms  wall/commit {wall_ms:6.2f} ms"
    )


async def run(url: str, batches: int) -> None:
    store = SqlStore(url)
    try:
        async with store.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        variants = {
            "add_messages (values)": store.add_messages,
            "executemany (proposed)": executemany(store),
        }
        assert await variants["executemany (proposed)"](messages("dup", 2)) == [True, True]
        assert await variants["executemany (proposed)"](messages("dup", 3)) == [False, False, True]
        print(f"{store.dialect}:")
        for size in SIZES:
            for name, add in variants.items():
                print("  " + await measure(name, add, size, batches))
    finally:
        await store.close()


async def with_postgres(admin_dsn: str, batches: int) -> None:
    import asyncpg

    name = f"syncd_bench_insert_{os.getpid()}"
    admin = make_url(admin_dsn).set(drivername="postgresql")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            url = admin.set(drivername="postgresql+asyncpg", database=name)
            await run(url.render_as_string(hide_password=False), batches)
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="commits per measurement")
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "SYNCD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="syncd-bench-insert-") as scratch:
        asyncio.run(run(f"sqlite+aiosqlite:///{Path(scratch) / 'insert.db'}", args.batches))
    if not args.no_postgres:
        asyncio.run(with_postgres(args.pg_dsn, args.batches))


if __name__ == "__main__":
    main()
