"""Kafka's mark bookkeeping against a scripted consumer: the windows between aiokafka
moving a position and the subscription booking what it fetched, which a real broker
opens only now and then."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from engine.transport.base import Mark
from engine.transport.kafka import KafkaSubscription, KafkaTransport

TP = TopicPartition("replies", 0)


class ScriptedConsumer:
    """What ``settled_past`` and ``_fill`` ask of aiokafka: one assigned partition
    whose position moves, as aiokafka's does, when ``getmany`` returns a batch."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.pos = 0
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.returned = asyncio.Event()

    def assignment(self) -> set[Any]:
        return {TP}

    async def position(self, tp: Any) -> int:
        return self.pos

    async def getmany(self, timeout_ms: int) -> dict[Any, list[Any]]:
        self.asked.set()
        await self.release.wait()
        self.pos += self.batch
        self.returned.set()  # wakes the test once this call has returned
        return {TP: [SimpleNamespace(offset=n) for n in range(self.batch)]}


async def test_a_batch_fetched_but_not_yet_booked_keeps_its_mark_unsettled() -> None:
    subscription = KafkaSubscription(KafkaTransport("127.0.0.1:9"), "replies", "engine")
    await subscription._consumer.stop()  # never started; the script stands in for it
    consumer = ScriptedConsumer(batch=3)
    subscription._consumer = consumer
    mark = Mark(0, {TP: 3})
    assert not await subscription.settled_past(mark)

    filling = asyncio.create_task(subscription._fill())
    await consumer.asked.wait()
    consumer.release.set()
    await consumer.returned.wait()
    # The window: getmany returned and moved the position past the mark, and _fill
    # has not yet booked the batch as pending.
    fetch = subscription._fetch
    assert fetch is not None and fetch.done()
    assert consumer.pos == 3 and not subscription._partitions
    assert not await subscription.settled_past(mark)

    await filling
    assert sorted(subscription._partitions[TP].pending) == [0, 1, 2]
    assert not await subscription.settled_past(mark)
