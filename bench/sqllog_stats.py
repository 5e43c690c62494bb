"""Summarise a syncd log written under ``bench/ingest.py --patch sqllog,locktrace --keep``.

Prints, per SQL statement, how often it ran (also per accepted webhook) and how SQLAlchemy's
statement cache served it ([generated in], [cached since], [no key]), then the last write-lock
trace: per writer task, transactions, time waited for the SQLite write lock and time held.

    .venv/bin/python bench/sqllog_stats.py /tmp/syncd-bench-XXXX/sqlite-fixed0.log
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

_CACHE = re.compile(r"\[(generated in|cached since|no key|raw sql)")


def summarize(log: Path, top: int) -> list[str]:
    statements: defaultdict[str, Counter[str]] = defaultdict(Counter)
    last_sql: str | None = None
    lock: dict[str, Any] = {}
    accepted = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        event = str(entry.get("event", ""))
        if event == "webhook.accepted":
            accepted += 1
        elif event == "bench.locktrace":
            lock = entry["writers"]
        elif str(entry.get("logger", "")).startswith("sqlalchemy"):
            cached = _CACHE.match(event)
            if cached is None:
                last_sql = re.sub(r"\(\?(, \?)*\)", "(?...)", " ".join(event.split()))[:80]
            elif last_sql is not None:
                statements[last_sql][cached.group(1)] += 1
    lines = [f"webhooks accepted: {accepted}", "runs  per webhook  cache  statement"]
    ranked = sorted(statements.items(), key=lambda kv: -sum(kv[1].values()))
    for sql, cache in ranked[:top]:
        runs = sum(cache.values())
        lines.append(f"{runs:6d} {runs / max(accepted, 1):6.2f}  {dict(cache)}  {sql}")
    lines.append("write lock (ms): writer, transactions, wait mean/max, hold mean/max")
    for writer, s in lock.items():
        lines.append(
            f"  {writer}: {s['n']}, {s['wait_ms_mean']}/{s['wait_ms_max']}, "
            f"{s['hold_ms_mean']}/{s['hold_ms_max']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print("\n".join(summarize(args.log, args.top)))


if __name__ == "__main__":
    main()
