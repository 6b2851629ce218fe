from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from engine.errors import TransportError
from engine.transport.base import (
    DEAD_LETTER_ID,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    Delivery,
    Message,
)
from engine.transport.memory import MemoryBroker, MemorySubscription, MemoryTransport
from tests.helpers import wait_until

DEST = "saga.commands.test"


def msg(n: int, dest: str = DEST) -> Message:
    return Message(dest, key=f"k{n}", body=f"body-{n}".encode(), headers={"n": str(n)})


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    t = MemoryTransport(MemoryBroker())
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


async def next_delivery(sub: MemorySubscription, timeout: float = 1.0) -> Delivery:
    iterator = sub.__aiter__()
    return await asyncio.wait_for(anext(iterator), timeout)


async def nothing_arrives(sub: MemorySubscription, within: float = 0.05) -> bool:
    try:
        await next_delivery(sub, within)
    except TimeoutError:
        return True
    return False


async def test_publish_requires_connect() -> None:
    t = MemoryTransport()
    with pytest.raises(TransportError, match="not connected"):
        await t.publish([msg(1)])
    with pytest.raises(TransportError, match="not connected"):
        await t.subscribe(DEST, group="g")


async def test_delivery_is_asynchronous_and_keeps_order(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    received: list[bytes] = []

    async def consume() -> None:
        async for delivery in sub:
            received.append(delivery.message.body)
            await delivery.ack()
            if len(received) == 3:
                return

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await transport.publish([msg(1), msg(2)])
    await transport.publish([msg(3)])
    await asyncio.wait_for(consumer, 1)
    assert received == [b"body-1", b"body-2", b"body-3"]


async def test_message_fields_survive(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(7)])
    delivery = await next_delivery(sub)
    assert delivery.message == msg(7)
    assert delivery.redelivered is False


async def test_ack_removes_the_message(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(1)])
    delivery = await next_delivery(sub)
    await delivery.ack()
    await sub.close()
    assert transport.broker.depth(DEST) == 0
    other = await transport.subscribe(DEST, group="g")
    assert await nothing_arrives(other)


async def test_nack_redelivers_flagged_as_redelivered(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(1), msg(2)])
    first = await next_delivery(sub)
    assert first.message.body == b"body-1"
    await first.nack()
    again = await next_delivery(sub)
    assert again.message.body == b"body-1"  # back at the front, ahead of msg 2
    assert again.redelivered is True
    await again.ack()
    second = await next_delivery(sub)
    assert (second.message.body, second.redelivered) == (b"body-2", False)


async def test_settling_twice_has_no_second_effect(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(1)])
    delivery = await next_delivery(sub)
    await delivery.ack()
    await delivery.nack()
    await delivery.dead_letter("late")
    assert transport.broker.depth(DEST) == 0
    assert transport.broker.depth(transport.broker.dead_letters) == 0


async def test_closing_a_subscription_redelivers_unacked_to_another(
    transport: MemoryTransport,
) -> None:
    first = await transport.subscribe(DEST, group="g")
    second = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(1), msg(2)])
    one = await next_delivery(first)
    two = await next_delivery(first)
    await one.ack()
    assert two.message.body == b"body-2"
    await first.close()
    redelivered = await next_delivery(second)
    assert redelivered.message.body == b"body-2"
    assert redelivered.redelivered is True
    await redelivered.ack()  # late settle of the closed subscription's delivery is a no-op
    await two.ack()
    assert await nothing_arrives(second)


async def test_transport_close_returns_in_flight_messages() -> None:
    broker = MemoryBroker()
    a, b = MemoryTransport(broker), MemoryTransport(broker)
    await a.connect()
    await b.connect()
    sub_a = await a.subscribe(DEST, group="g")
    await b.publish([msg(1)])
    delivery = await next_delivery(sub_a)
    assert delivery.message.body == b"body-1"
    await a.close()
    sub_b = await b.subscribe(DEST, group="g")
    again = await next_delivery(sub_b)
    assert again.message.body == b"body-1" and again.redelivered
    await b.close()


async def test_iteration_ends_when_the_subscription_closes(transport: MemoryTransport) -> None:
    sub = await transport.subscribe(DEST, group="g")
    seen: list[Delivery] = []

    async def consume() -> None:
        async for delivery in sub:
            seen.append(delivery)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    await sub.close()
    await asyncio.wait_for(consumer, 1)
    assert seen == []


async def test_dead_letter_keeps_body_and_adds_reason_and_source(
    transport: MemoryTransport,
) -> None:
    sub = await transport.subscribe(DEST, group="g")
    await transport.publish([msg(5)])
    delivery = await next_delivery(sub)
    await delivery.dead_letter("cannot decode")
    broker = transport.broker
    assert broker.depth(DEST) == 0
    dead = broker.drain(broker.dead_letters)
    assert len(dead) == 1
    assert dead[0].destination == broker.dead_letters
    assert (dead[0].key, dead[0].body) == ("k5", b"body-5")
    headers = dict(dead[0].headers)
    assert len(headers.pop(DEAD_LETTER_ID)) == 32
    assert headers == {
        "n": "5",
        DEAD_LETTER_REASON: "cannot decode",
        DEAD_LETTER_SOURCE: DEST,
    }
    assert broker.depth(broker.dead_letters) == 0


async def test_dead_letters_can_be_consumed(transport: MemoryTransport) -> None:
    broker = transport.broker
    sub = await transport.subscribe(DEST, group="g")
    dead_sub = await transport.subscribe(broker.dead_letters, group="ops")
    await transport.publish([msg(1)])
    await (await next_delivery(sub)).dead_letter("bad")
    dead = await next_delivery(dead_sub)
    assert dead.message.headers[DEAD_LETTER_REASON] == "bad"


async def test_competing_consumers_get_distinct_messages(transport: MemoryTransport) -> None:
    subs = [await transport.subscribe(DEST, group="g") for _ in range(3)]
    got: dict[int, list[bytes]] = {i: [] for i in range(3)}
    total = 30

    async def consume(i: int) -> None:
        async for delivery in subs[i]:
            got[i].append(delivery.message.body)
            await delivery.ack()
            await asyncio.sleep(0.001)  # let the others take turns

    consumers = [asyncio.create_task(consume(i)) for i in range(3)]
    await asyncio.sleep(0)
    await transport.publish([msg(n) for n in range(total)])

    async def all_in() -> bool:
        return sum(len(v) for v in got.values()) == total

    await wait_until(all_in, 2, "every message to be consumed")
    for sub in subs:
        await sub.close()
    await asyncio.wait_for(asyncio.gather(*consumers), 1)
    everything = [b for v in got.values() for b in v]
    assert sorted(everything) == sorted(f"body-{n}".encode() for n in range(total))
    assert len(set(everything)) == total
    assert sum(1 for v in got.values() if v) >= 2


async def test_destinations_are_separate(transport: MemoryTransport) -> None:
    sub = await transport.subscribe("other", group="g")
    await transport.publish([msg(1), msg(2, "other")])
    delivery = await next_delivery(sub)
    assert delivery.message.body == b"body-2"
    assert transport.broker.depth(DEST) == 1
