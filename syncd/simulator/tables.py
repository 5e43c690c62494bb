"""Record tables of the simulated MasonHub: by id, by customer_identifier, and by update time.

MasonHub's bulk API is offset paging with ``sdt``/``edt`` windows on ``updated_at``. A table
answers those searches without scanning: records are in dicts keyed by id and by
customer_identifier, and an index keeps every id sorted by ``(updated_at, sequence)``, so a
window is two bisections and a page is a slice, at 100,000 records as at 10.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, Generic, Protocol, TypeVar

_Entry = tuple[datetime, int, str]
_AT: Callable[[_Entry], datetime] = itemgetter(0)


class Record(Protocol):
    """What a table needs of a record."""

    @property
    def id(self) -> str: ...

    @property
    def customer_identifier(self) -> str: ...

    @property
    def updated_at(self) -> datetime: ...


R = TypeVar("R", bound=Record)


class UpdateIndex:
    """Record ids ordered by ``(updated_at, sequence)``, for ``sdt``/``edt`` windows.

    An update moves the record's one entry. The clock only goes forward, so the new entry
    lands at or near the end and the old one is found by bisection: updates and searches are
    O(log n) plus a short memmove, never a scan.
    """

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._current: dict[str, _Entry] = {}
        self._sequence = itertools.count()
        #: How many index entries the last search read: tests check it is the page, not n.
        self.last_examined = 0

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self, record_id: str, updated_at: datetime) -> None:
        """Place ``record_id`` at ``updated_at``, moving its previous entry if it had one."""
        old = self._current.get(record_id)
        if old is not None:
            del self._entries[bisect_left(self._entries, old)]
        entry = (updated_at, next(self._sequence), record_id)
        insort(self._entries, entry)
        self._current[record_id] = entry

    def bounds(self, sdt: datetime | None, edt: datetime | None) -> tuple[int, int]:
        """The slice of entries with ``sdt <= updated_at <= edt`` (either end open if None)."""
        start = 0 if sdt is None else bisect_left(self._entries, sdt, key=_AT)
        end = len(self._entries) if edt is None else bisect_right(self._entries, edt, key=_AT)
        return start, max(start, end)

    def page(
        self, sdt: datetime | None, edt: datetime | None, offset: int, limit: int
    ) -> list[str]:
        """Ids of one page of the window, oldest update first."""
        start, end = self.bounds(sdt, edt)
        first = start + offset
        ids = [entry[2] for entry in self._entries[first : min(first + limit, end)]]
        self.last_examined = len(ids)
        return ids

    def ids(self, sdt: datetime | None, edt: datetime | None) -> Iterator[str]:
        """Every id of the window, oldest update first, read lazily."""
        start, end = self.bounds(sdt, edt)
        self.last_examined = 0
        for position in range(start, end):
            self.last_examined += 1
            yield self._entries[position][2]


@dataclass(frozen=True)
class Search:
    """One search of a table, its query already parsed and checked."""

    ids: Sequence[str] = ()
    cids: Sequence[str] = ()
    sdt: datetime | None = None
    edt: datetime | None = None
    where: Callable[[Any], bool] | None = None
    offset: int = 0
    limit: int = 30


class Table(Generic[R]):
    """Records of one kind: by MasonHub id, by customer_identifier, in creation order, by update.

    Without ``sdt``/``edt`` a search pages in creation order (stable while records change);
    with them it pages in update order, as an incremental poll reads.
    """

    def __init__(self) -> None:
        self.by_id: dict[str, R] = {}
        self.by_cid: dict[str, R] = {}
        self._created: list[str] = []
        self.index = UpdateIndex()

    def __len__(self) -> int:
        return len(self._created)

    def __iter__(self) -> Iterator[R]:
        return (self.by_id[record_id] for record_id in self._created)

    def __contains__(self, key: object) -> bool:
        return key in self.by_id or key in self.by_cid

    def nth(self, position: int) -> R:
        """The record created ``position``-th (0 first)."""
        return self.by_id[self._created[position]]

    def get(self, key: str) -> R | None:
        """The record whose MasonHub id or customer_identifier is ``key``."""
        return self.by_id.get(key) or self.by_cid.get(key)

    def add(self, record: R) -> R:
        """Store a new record."""
        self.by_id[record.id] = record
        self.by_cid[record.customer_identifier] = record
        self._created.append(record.id)
        self.index.touch(record.id, record.updated_at)
        return record

    def touched(self, record: R) -> None:
        """Re-index a record whose ``updated_at`` changed."""
        self.index.touch(record.id, record.updated_at)

    def search(self, search: Search) -> list[R]:
        """One page of the records matching ``search``."""
        if search.ids or search.cids:
            return self._lookup(search)
        windowed = search.sdt is not None or search.edt is not None
        if search.where is None:
            if windowed:
                ids: Sequence[str] = self.index.page(
                    search.sdt, search.edt, search.offset, search.limit
                )
            else:
                ids = self._created[search.offset : search.offset + search.limit]
                self.index.last_examined = len(ids)
            return [self.by_id[record_id] for record_id in ids]
        # A status filter has no index of its own: read the window lazily, stop at the page.
        source = self.index.ids(search.sdt, search.edt) if windowed else iter(self._created)
        matches = (r for r in (self.by_id[i] for i in source) if search.where(r))
        return list(itertools.islice(matches, search.offset, search.offset + search.limit))

    def _lookup(self, search: Search) -> list[R]:
        found = _unique(
            itertools.chain(
                (self.by_id.get(i) for i in search.ids),
                (self.by_cid.get(c) for c in search.cids),
            )
        )
        if search.ids and search.cids:
            found = [
                r for r in found if r.id in search.ids and r.customer_identifier in search.cids
            ]
        matching = [r for r in found if _in_window(r, search)]
        return matching[search.offset : search.offset + search.limit]


def _unique(records: Iterable[R | None]) -> list[R]:
    seen: set[str] = set()
    result = []
    for record in records:
        if record is not None and record.id not in seen:
            seen.add(record.id)
            result.append(record)
    return result


def _in_window(record: Record, search: Search) -> bool:
    if search.sdt is not None and record.updated_at < search.sdt:
        return False
    if search.edt is not None and record.updated_at > search.edt:
        return False
    return search.where is None or search.where(record)
