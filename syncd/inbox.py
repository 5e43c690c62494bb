"""Group commit for the inbox: concurrent webhook requests share one transaction.

Each request hands its messages over and waits; the 200 goes out only after the
transaction holding them has committed (see :mod:`syncd.batching`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from syncd.batching import Batcher
from syncd.store import NewMessage, Store


class GroupCommitter:
    """Batches inbox inserts from concurrent requests into shared transactions."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 1000,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._batcher: Batcher[Sequence[NewMessage], list[bool]] = Batcher(
            self._flush, name="syncd.inbox.group-commit", max_batch=max_batch, weight=len
        )
        self.committed_messages = 0

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The writer task (for supervision)."""
        return self._batcher.task

    @property
    def busy(self) -> bool:
        """True while a commit is in progress or requests wait for the next one."""
        return self._batcher.busy

    @property
    def commits(self) -> int:
        """Transactions committed so far."""
        return self._batcher.flushes

    async def start(self) -> None:
        """Start the writer task."""
        await self._batcher.start()

    async def stop(self) -> None:
        """Finish what is queued, then stop the writer task."""
        await self._batcher.stop()

    async def submit(self, messages: Sequence[NewMessage]) -> list[bool]:
        """Store messages durably; True for each one not seen before.

        Returns only after the transaction holding them has committed. Raises
        StoreUnavailable if it did not.
        """
        return await self._batcher.submit(messages)

    async def _flush(self, requests: list[Sequence[NewMessage]]) -> list[list[bool]]:
        is_new = await self._store.add_messages([m for r in requests for m in r])
        self.committed_messages += len(is_new)
        if self._on_commit is not None and any(is_new):
            # After the callers' answers: their handlers resume first and send the 200s,
            # instead of the merge starting in the store thread and slowing them down.
            asyncio.get_running_loop().call_soon(self._on_commit)
        results, offset = [], 0
        for request in requests:
            results.append(is_new[offset : offset + len(request)])
            offset += len(request)
        return results
