"""Small asyncio helpers shared by the engine's loops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")


async def wait_either(stop: asyncio.Event, other: asyncio.Event | None, timeout: float) -> None:
    """Sleep up to ``timeout``, waking early when either event is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if other is not None:
        waiters.append(asyncio.ensure_future(other.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class _End:
    pass


async def batched(source: AsyncIterable[T], max_size: int) -> AsyncIterator[list[T]]:
    """``source``'s items in lists: whatever arrived while the last list was being
    handled, up to ``max_size``. Never waits for a list to fill, so an idle system
    gets lists of one; at most ``max_size`` items wait unhandled (back-pressure)."""
    queue: asyncio.Queue[T | _End] = asyncio.Queue(max_size)
    ended = False

    async def pump() -> None:
        nonlocal ended
        try:
            async for item in source:
                await queue.put(item)
        finally:
            ended = True
            if queue.empty():  # wake a reader blocked on the empty queue
                queue.put_nowait(_End())

    pumping = asyncio.create_task(pump())
    try:
        while not (ended and queue.empty()):
            first = await queue.get()
            if isinstance(first, _End):
                break
            batch = [first]
            while len(batch) < max_size and not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, _End):
                    break
                batch.append(item)
            yield batch
        if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
            raise pumping.exception()  # type: ignore[misc]
    finally:
        pumping.cancel()


class Closing:
    """``async with`` for a class whose :meth:`close` releases what it holds."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
