"""bench/pipeline_cpu: CPU per message of each stage of syncd's pipeline, in-process.

The ingest benchmark runs the whole daemon, where the group commit, the merge and the
delivery workers share one core and their costs cannot be told apart in a py-spy profile
(SQLAlchemy's greenlets hide the caller of every statement). This script runs each stage on
its own over the same orderEvent bodies as bench/ingest.py and reports process CPU (event
loop plus the store's thread) per message at several batch sizes, on SQLite or, with
``--postgresql``, on a fresh database of the local PostgreSQL server (dropped afterwards):

- ``commit``: ``SqlStore.add_messages`` with B messages per transaction (the group commit);
- ``merge``: ``SqlStore.process_inbox(limit=B)`` until the inbox is drained;
- ``deliver``: ``claim_deliveries(limit=B)`` then ``complete_deliveries`` of what it claimed
  (no ERP call: the store's share of a delivery only).

    .venv/bin/python bench/pipeline_cpu.py [--messages 2000] [--sizes 1,8,32,200] [--postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import Payloads, PostgresBackend

from syncd.messages import parse_body
from syncd.store import Completion, NewMessage, SqlStore

HEADERS = {"content-type": "application/json", "user-agent": "wrk"}
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def new_messages(payloads: Payloads, count: int) -> list[NewMessage]:
    now = datetime.now(UTC)
    out = []
    for _ in range(count):
        _mid, body = payloads.one()
        for parsed in parse_body(body.encode()):
            out.append(
                NewMessage(
                    dedupe_key=parsed.dedupe_key,
                    message_type=parsed.message_type,
                    message_id=parsed.message_id,
                    source="webhook",
                    body=parsed.body,
                    received_at=now,
                    headers=HEADERS,
                    remote_addr="127.0.0.1",
                )
            )
    return out


@asynccontextmanager
async def database(size: int, scratch: Path, postgresql: bool) -> AsyncIterator[str]:
    """A fresh store URL: a SQLite file in ``scratch``, or a PostgreSQL database dropped after."""
    if not postgresql:
        yield f"sqlite+aiosqlite:///{scratch / f'p{size}.db'}"
        return
    # bench/ingest's database helper; it runs its own event loop, hence the thread.
    backend = PostgresBackend(PG_ADMIN, f"pipeline_cpu_{size}")
    await asyncio.to_thread(backend.create)
    try:
        yield backend.url
    finally:
        await asyncio.to_thread(backend.drop)


async def stage(
    size: int, count: int, payloads: Payloads, scratch: Path, postgresql: bool
) -> dict[str, float]:
    async with database(size, scratch, postgresql) as url:
        return await _stage(url, size, count, payloads)


async def _stage(url: str, size: int, count: int, payloads: Payloads) -> dict[str, float]:
    store = SqlStore(url)
    await store.migrate()
    rows = new_messages(payloads, count)
    result: dict[str, float] = {}

    cpu = time.process_time()
    for start in range(0, len(rows), size):
        await store.add_messages(rows[start : start + size])
    result["commit"] = (time.process_time() - cpu) / count

    cpu = time.process_time()
    merged = 0
    while True:
        done = await store.process_inbox(limit=size)
        merged += done.messages
        if not done.messages:
            break
    result["merge"] = (time.process_time() - cpu) / merged

    cpu = time.process_time()
    delivered = 0
    now = datetime.now(UTC)
    while True:
        claims = await store.claim_deliveries("bench", size, 60.0)
        if not claims:
            break
        await store.complete_deliveries([Completion(c, "bench", now, 200) for c in claims])
        delivered += len(claims)
    result["deliver"] = (time.process_time() - cpu) / max(1, delivered)
    result["delivered"] = delivered
    await store.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="1,8,32,200")
    parser.add_argument("--postgresql", action="store_true", help="the local server, not SQLite")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    payloads = Payloads(seed=1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="syncd-pipeline-cpu-") as tmp:
        # A first, unmeasured pass warms SQLAlchemy's statement cache and imports.
        await stage(8, 200, payloads, Path(tmp), args.postgresql)
        for size in (int(s) for s in args.sizes.split(",")):
            results[size] = await stage(size, args.messages, payloads, Path(tmp), args.postgresql)
    if args.json:
        print(json.dumps(results))
        return
    print("| batch | commit µs/msg | merge µs/msg | deliver (store) µs/msg |")
    print("|---:|---:|---:|---:|")
    for size, r in results.items():
        print(
            f"| {size} | {r['commit'] * 1e6:.0f} | {r['merge'] * 1e6:.0f} "
            f"| {r['deliver'] * 1e6:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
