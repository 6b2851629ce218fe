"""engine._aio: the batching of a consumer's deliveries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine._aio import batched


async def _feed(queue: asyncio.Queue[int | None]) -> AsyncIterator[int]:
    while (item := await queue.get()) is not None:
        yield item


async def test_items_that_arrived_meanwhile_come_together_and_none_is_waited_for() -> None:
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    batches = batched(_feed(queue), 3)
    queue.put_nowait(1)
    assert await anext(batches) == [1]  # alone: it does not wait for more
    for item in (2, 3, 4, 5):
        queue.put_nowait(item)
    await asyncio.sleep(0.01)  # all four reach the pump while nobody reads
    assert await anext(batches) == [2, 3, 4]  # at most max_size
    assert await anext(batches) == [5]
    queue.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_the_end_of_the_source_delivers_what_is_left_first() -> None:
    async def three() -> AsyncIterator[int]:
        for item in (1, 2, 3):
            yield item

    assert [b async for b in batched(three(), 2)] in ([[1, 2], [3]], [[1], [2, 3]], [[1], [2], [3]])
    assert [i for b in [b async for b in batched(three(), 10)] for i in b] == [1, 2, 3]


async def test_a_failing_source_fails_the_reader_after_its_items() -> None:
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise ConnectionError("broker gone")

    batches = batched(broken(), 5)
    assert await anext(batches) == [1]
    with pytest.raises(ConnectionError, match="broker gone"):
        await anext(batches)


async def test_the_pump_holds_back_when_the_reader_is_slow() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[int]:
        nonlocal pulled
        while True:
            pulled += 1
            yield pulled

    batches = batched(endless(), 4)
    first = await anext(batches)
    assert first == list(range(1, len(first) + 1)) and 1 <= len(first) <= 4
    await asyncio.sleep(0.05)
    # Unread: the queue's max_size, plus the one item the pump waits to put.
    assert pulled == len(first) + 4 + 1
    await batches.aclose()
