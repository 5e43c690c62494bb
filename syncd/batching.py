"""Group commit: concurrent callers share one flush (one transaction) instead of one each.

A single writer task takes everything submitted so far and flushes it together; callers
wait for their own item's result. While a flush is in flight new items queue for the
next one, so batches grow with load and a lone caller is never delayed by a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

from syncd.errors import StoreRejected, StoreUnavailable

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher(Generic[T, R]):
    """Batches ``submit`` calls from concurrent tasks into calls of ``flush``.

    ``flush`` gets the items in submission order and returns one result per item. If it
    raises, every caller in the batch gets the error (StoreUnavailable for anything that is
    not one already), so nothing is reported done that was not. When the store refused a
    value (StoreRejected), the items are flushed again one by one, so one caller's bad item
    fails only that caller.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        name: str,
        max_batch: int = 1000,
        weight: Callable[[T], int] = lambda _item: 1,
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._weight = weight
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.flushes = 0
        self._flushing = False

    @property
    def busy(self) -> bool:
        """True while a flush is in progress or items wait for the next one."""
        return self._flushing or not self._queue.empty()

    async def start(self) -> None:
        """Start the writer task."""
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Flush what is queued, then stop the writer task."""
        if self.task is None:
            return
        await self._queue.join()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None

    async def submit(self, item: T) -> R:
        """Flush ``item`` with whatever else is waiting; its result once that has committed."""
        return await self.submit_nowait(item)

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` for the next flush; the future is its result (see submit)."""
        if self.task is None:
            raise StoreUnavailable(f"{self._name} is not running")
        pending: _Pending[T, R] = _Pending(item)
        self._queue.put_nowait(pending)
        return pending.future

    def _take_batch(self, first: _Pending[T, R]) -> list[_Pending[T, R]]:
        batch, size = [first], self._weight(first.item)
        while size < self._max_batch and not self._queue.empty():
            pending = self._queue.get_nowait()
            batch.append(pending)
            size += self._weight(pending.item)
        return batch

    async def _run(self) -> None:
        while True:
            batch = self._take_batch(await self._queue.get())
            self._flushing = True
            try:
                await self._flush_batch(batch)
            finally:
                self._flushing = False
                for _ in batch:
                    self._queue.task_done()

    async def _flush_batch(self, batch: list[_Pending[T, R]]) -> None:
        try:
            results = await self._flush([p.item for p in batch])
        except StoreRejected as exc:
            if len(batch) == 1:
                log.warning("batch.item_rejected", batcher=self._name, error=exc.message)
                _fail(batch, exc)
                return
            log.warning("batch.rejected_alone", batcher=self._name, size=len(batch))
            for pending in batch:
                await self._flush_batch([pending])
            return
        except StoreUnavailable as exc:
            log.warning(
                "batch.flush_failed", batcher=self._name, error=exc.message, size=len(batch)
            )
            _fail(batch, exc)
            return
        except Exception as exc:
            # A bug must not leave callers hanging or told "done": fail them all.
            log.exception("batch.flush_error", batcher=self._name, size=len(batch))
            _fail(batch, StoreUnavailable(f"{self._name} failed: {exc!r}"))
            return
        self.flushes += 1
        for pending, result in zip(batch, results, strict=True):
            # A caller that went away (cancelled) is already done; its item was flushed.
            if not pending.future.done():
                pending.future.set_result(result)


def _fail(batch: Sequence[_Pending[T, R]], exc: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(exc)
