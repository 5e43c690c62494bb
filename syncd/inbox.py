"""Group commit for the inbox: concurrent webhook requests share one transaction.

Each request hands its messages to :class:`GroupCommitter` and waits. One writer task takes
everything queued so far, stores it in a single transaction, and only then answers every
waiting request. While a commit is in flight new requests queue up for the next one, so
batches grow with load and a lone request is never delayed by a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from syncd.errors import StoreUnavailable
from syncd.store import NewMessage, Store

log = structlog.get_logger(__name__)


@dataclass
class _Pending:
    messages: Sequence[NewMessage]
    future: asyncio.Future[list[bool]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


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
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.commits = 0
        self.committed_messages = 0

    async def start(self) -> None:
        """Start the writer task."""
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name="syncd.inbox.group-commit")

    async def stop(self) -> None:
        """Finish what is queued, then stop the writer task."""
        if self.task is None:
            return
        await self._queue.join()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    async def submit(self, messages: Sequence[NewMessage]) -> list[bool]:
        """Store messages durably; True for each one not seen before.

        Returns only after the transaction holding them has committed. Raises
        StoreUnavailable if it did not.
        """
        if self.task is None:
            raise StoreUnavailable("the inbox writer is not running")
        pending = _Pending(messages)
        self._queue.put_nowait(pending)
        return await pending.future

    def _take_batch(self, first: _Pending) -> list[_Pending]:
        batch, size = [first], len(first.messages)
        while size < self._max_batch and not self._queue.empty():
            item = self._queue.get_nowait()
            batch.append(item)
            size += len(item.messages)
        return batch

    async def _run(self) -> None:
        while True:
            batch = self._take_batch(await self._queue.get())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Pending]) -> None:
        messages = [m for item in batch for m in item.messages]
        try:
            is_new = await self._store.add_messages(messages)
        except StoreUnavailable as exc:
            log.warning("inbox.commit_failed", error=str(exc), messages=len(messages))
            for item in batch:
                _settle(item.future, exc=exc)
            return
        except Exception as exc:
            # A bug must not leave requests hanging or acknowledged: fail them all as 503.
            log.exception("inbox.commit_error", messages=len(messages))
            for item in batch:
                _settle(item.future, exc=StoreUnavailable(f"inbox commit failed: {exc!r}"))
            return
        self.commits += 1
        self.committed_messages += len(messages)
        if self._on_commit is not None and any(is_new):
            self._on_commit()
        offset = 0
        for item in batch:
            _settle(item.future, result=is_new[offset : offset + len(item.messages)])
            offset += len(item.messages)


def _settle(
    future: asyncio.Future[list[bool]],
    *,
    result: list[bool] | None = None,
    exc: BaseException | None = None,
) -> None:
    # The waiting request may have been cancelled (client went away); its rows are stored
    # or not exactly as the transaction says, and MasonHub will retry what it did not see.
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result or [])
