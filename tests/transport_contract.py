"""The transport contract: one suite, run against every Transport implementation.

A test module subclasses :class:`TransportContract` and provides two fixtures:
``make_transport`` (a factory of unconnected transports on one broker, given the
dead-letter destination) and ``unreachable_transport`` (one pointed at no broker); a
module on a real broker also provides ``broker_url``, so that each test's topics /
queues are dropped when it ends (``tests/brokers.py``). Every test uses fresh
destination, dead-letter and group names, so tests (and runs) never see each other's
messages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from engine.errors import MessagesRefused, PublishError, TransportError
from engine.transport.base import (
    DEAD_LETTER_ID,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    Delivery,
    Mark,
    Message,
    Subscription,
    Transport,
)
from tests.brokers import BrokerObjects, drop_after_test

MakeTransport = Callable[[str], Transport]
Connect = Callable[[], Awaitable[Transport]]


@dataclass(frozen=True)
class Names:
    destination: str
    dead_letters: str
    group: str

    def message(self, key: str, n: int, **headers: str) -> Message:
        return Message(self.destination, key, f"{key}:{n}".encode(), headers)


class Inbox:
    """Consumes a subscription in the background, as the engine and workers do.

    The test takes deliveries from it with a deadline; a consumer that crashed makes
    the next take fail with the consumer's error instead of a timeout.
    """

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for delivery in self.subscription:
            self.queue.put_nowait(delivery)

    async def take(self, timeout: float) -> Delivery:
        getter = asyncio.ensure_future(self.queue.get())
        try:
            await asyncio.wait([getter, self.task], timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if self.task.done():
            self.task.result()  # re-raises the consumer's error
            raise AssertionError("the subscription ended while a delivery was expected")
        raise AssertionError(f"no delivery within {timeout:g}s")

    async def take_many(self, count: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        return [await self.take(max(0.01, deadline - time.monotonic())) for _ in range(count)]

    async def close(self) -> None:
        await self.subscription.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def bodies(deliveries: list[Delivery]) -> list[bytes]:
    return [d.message.body for d in deliveries]


class TransportContract:
    """What the engine, the relay and the workers rely on from any broker."""

    #: How long a test waits for one expected delivery.
    receive_timeout = 20.0
    #: How long a publish to an unreachable broker may take to fail.
    unreachable_bound = 15.0

    # -- provided by each transport's module ------------------------------------------

    @pytest.fixture
    def make_transport(self) -> MakeTransport:
        raise NotImplementedError("a transport test module provides make_transport")

    @pytest.fixture
    def unreachable_transport(self) -> Transport:
        raise NotImplementedError("a transport test module provides unreachable_transport")

    @pytest.fixture
    def oversized(self) -> int:
        """A body size the broker of ``make_transport`` refuses for good (over its
        message size limit), while the client still sends it."""
        raise NotImplementedError("a transport test module provides oversized")

    @pytest.fixture
    def broker_url(self) -> str | None:
        """The real broker the destinations live on; None: nothing outlives the test."""
        return None

    # -- shared fixtures ------------------------------------------------------------

    @pytest.fixture
    def names(self, broker_url: str | None) -> Names:
        suffix = uuid.uuid4().hex[:12]
        names = Names(
            destination=f"contract.{suffix}",
            dead_letters=f"contract.{suffix}.dead-letters",
            group=f"contract-{suffix}",
        )
        if broker_url is not None:
            # The exchange is the transports' default one, shared: it stays.
            queues = (names.destination, names.dead_letters)
            drop_after_test(BrokerObjects(broker_url, names.destination, queues))
        return names

    @pytest.fixture
    async def connect(self, make_transport: MakeTransport, names: Names) -> AsyncIterator[Connect]:
        opened: list[Transport] = []

        async def open_transport() -> Transport:
            transport = make_transport(names.dead_letters)
            await transport.connect()
            opened.append(transport)
            return transport

        try:
            yield open_transport
        finally:
            for transport in reversed(opened):
                await transport.close()

    @pytest.fixture
    async def transport(self, connect: Connect) -> Transport:
        return await connect()

    @pytest.fixture
    async def inboxes(self) -> AsyncIterator[list[Inbox]]:
        opened: list[Inbox] = []
        try:
            yield opened
        finally:
            for inbox in opened:
                await inbox.close()

    async def consume(
        self, transport: Transport, destination: str, group: str, inboxes: list[Inbox]
    ) -> Inbox:
        inbox = Inbox(await transport.subscribe(destination, group=group))
        inboxes.append(inbox)
        return inbox

    # -- the contract -----------------------------------------------------------------

    async def test_delivers_body_key_and_headers(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        sent = [
            names.message("saga-1", 1, traceparent="00-abc-def-01", kind="command"),
            names.message("saga-2", 1),
        ]
        await transport.publish(sent)

        got = await inbox.take_many(2, self.receive_timeout)

        # Different keys: no order between them is promised.
        assert sorted((d.message for d in got), key=lambda m: m.key) == sent
        assert [d.redelivered for d in got] == [False, False]
        for delivery in got:
            await delivery.ack()

    async def test_publish_returns_once_the_broker_holds_the_messages(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        publisher = await connect()
        sent = [names.message("saga-1", n) for n in range(5)]
        await publisher.publish(sent)
        await publisher.close()  # nothing may still sit in a client-side buffer

        inbox = await self.consume(await connect(), names.destination, names.group, inboxes)
        got = await inbox.take_many(5, self.receive_timeout)

        assert bodies(got) == [m.body for m in sent]

    async def test_nack_redelivers_with_the_redelivered_flag(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        await transport.publish([names.message("saga-1", 1)])

        first = await inbox.take(self.receive_timeout)
        assert not first.redelivered
        await first.nack()
        again = await inbox.take(self.receive_timeout)

        assert again.message == first.message
        assert again.redelivered
        await again.ack()

    async def test_closed_subscription_hands_unacked_messages_to_the_next_consumer(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        first_transport = await connect()
        first = await self.consume(first_transport, names.destination, names.group, inboxes)
        await first_transport.publish([names.message("saga-1", n) for n in (1, 2, 3)])
        one, two = await first.take_many(2, self.receive_timeout)
        assert bodies([one, two]) == [b"saga-1:1", b"saga-1:2"]
        await one.ack()
        await first.close()  # "two" (and "3", taken or not) were never settled

        second_transport = await connect()
        await second_transport.publish([names.message("saga-1", 4)])
        second = await self.consume(second_transport, names.destination, names.group, inboxes)
        got = await second.take_many(3, self.receive_timeout)

        # The acked message is gone; the rest come back, in order, the one that was
        # handed out flagged as a redelivery.
        assert bodies(got) == [b"saga-1:2", b"saga-1:3", b"saga-1:4"]
        assert got[0].redelivered
        for delivery in got:
            await delivery.ack()

    async def test_an_ack_after_close_does_not_take_the_message_away(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        first_transport = await connect()
        first = await self.consume(first_transport, names.destination, names.group, inboxes)
        await first_transport.publish([names.message("saga-1", 1)])
        late = await first.take(self.receive_timeout)
        await first.close()
        await late.ack()  # too late: closing handed it back already

        second = await self.consume(await connect(), names.destination, names.group, inboxes)
        again = await second.take(self.receive_timeout)

        assert again.message == late.message
        assert again.redelivered
        await again.ack()

    async def test_each_keys_messages_arrive_in_publish_order(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        keys = [f"saga-{k}" for k in range(8)]
        per_key = 25
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        interleaved = [names.message(key, n) for n in range(per_key) for key in keys]
        for start in range(0, len(interleaved), 40):  # several publishes, several batches
            await transport.publish(interleaved[start : start + 40])

        got = []
        for _ in interleaved:  # ack as they come: a prefetch window must keep moving
            got.append(await inbox.take(self.receive_timeout))
            await got[-1].ack()

        seen: dict[str, list[int]] = {key: [] for key in keys}
        for delivery in got:
            key, n = delivery.message.body.decode().split(":")
            assert delivery.message.key == key
            seen[key].append(int(n))
        assert seen == {key: list(range(per_key)) for key in keys}

    async def test_dead_letter_parks_the_message_and_the_consumer_keeps_flowing(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        poison = names.message("saga-1", 1, traceparent="00-abc-def-01")
        await transport.publish([poison, names.message("saga-2", 1)])

        for delivery in await inbox.take_many(2, self.receive_timeout):
            if delivery.message == poison:
                await delivery.dead_letter("undecodable: not JSON")
            else:
                await delivery.ack()
        await transport.publish([names.message("saga-3", 1)])
        later = await inbox.take(self.receive_timeout)
        assert later.message.body == b"saga-3:1"
        await later.ack()

        parked = await self.consume(transport, names.dead_letters, f"{names.group}-dl", inboxes)
        letter = await parked.take(self.receive_timeout)
        assert letter.message.body == poison.body
        assert letter.message.key == poison.key
        headers = dict(letter.message.headers)
        assert len(headers.pop(DEAD_LETTER_ID)) == 32  # one id per dead-lettering
        assert headers == {
            **poison.headers,
            DEAD_LETTER_REASON: "undecodable: not JSON",
            DEAD_LETTER_SOURCE: names.destination,
        }
        await letter.ack()

    async def test_a_message_the_broker_refuses_does_not_hold_up_the_others(
        # ``oversized`` first: it may lower the broker's limit for connections made after.
        self,
        oversized: int,
        transport: Transport,
        names: Names,
        inboxes: list[Inbox],
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        big = Message(names.destination, "saga-2", b"x" * oversized)
        good = [names.message("saga-1", 1), names.message("saga-2", 1)]
        after = [names.message("saga-2", 2), names.message("saga-3", 1)]

        with pytest.raises(MessagesRefused) as caught:
            await transport.publish([*good, big, *after])

        # Only the big one is named; every other message was confirmed, and the
        # publisher goes on (a Kafka producer or RabbitMQ channel may be replaced).
        assert list(caught.value.refused) == [2]
        assert caught.value.refused[2] and "\n" not in str(caught.value)
        later = names.message("saga-2", 3)
        await transport.publish([later])
        expected = {m.body for m in [*good, *after, later]}
        seen: list[bytes] = []
        while not expected <= set(seen):
            delivery = await inbox.take(self.receive_timeout)
            seen.append(delivery.message.body)
            await delivery.ack()
        # The refused message was never delivered: it would have come before the next
        # message of its key. Its key's other messages kept their order.
        assert len(big.body) not in {len(b) for b in seen}
        firsts = [b for b in dict.fromkeys(seen) if b.startswith(b"saga-2:")]
        assert firsts == [b"saga-2:1", b"saga-2:2", b"saga-2:3"]

    async def test_unreachable_broker_raises_within_a_bound(
        self, unreachable_transport: Transport, names: Names
    ) -> None:
        started = time.monotonic()
        with pytest.raises((TransportError, PublishError)) as caught:
            await unreachable_transport.connect()
            await unreachable_transport.publish([names.message("saga-1", 1)])
        elapsed = time.monotonic() - started
        await unreachable_transport.close()

        assert elapsed < self.unreachable_bound
        assert "\n" not in str(caught.value)  # one clear line for logs and the CLI

    # -- marks: what the engine's reply watermark relies on ------------------------------

    async def mark_now(self, subscription: Subscription) -> Mark:
        """A mark, once the broker can give one (a Kafka consumer first needs the topic's
        metadata)."""
        deadline = time.monotonic() + self.receive_timeout
        while True:
            try:
                return await subscription.mark()
            except TransportError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def settled_within(self, subscription: Subscription, mark: Mark) -> None:
        deadline = time.monotonic() + self.receive_timeout
        while not await subscription.settled_past(mark):
            assert time.monotonic() < deadline, "the mark was never settled past"
            await asyncio.sleep(0.05)

    async def test_a_mark_is_settled_past_once_all_it_covers_is_acked_or_dead_lettered(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        subscription = inbox.subscription
        await transport.publish([names.message("saga-1", n) for n in range(3)])
        mark = await self.mark_now(subscription)
        assert not await subscription.settled_past(mark)

        one, two, three = await inbox.take_many(3, self.receive_timeout)
        await one.ack()
        await two.dead_letter("poison")
        assert not await subscription.settled_past(mark)  # "three" is still in hand
        await three.ack()
        await self.settled_within(subscription, mark)

        # What comes after a mark is not its business, but the next mark's.
        await transport.publish([names.message("saga-2", 1)])
        later = await self.mark_now(subscription)
        assert await subscription.settled_past(mark)
        assert not await subscription.settled_past(later)
        (last,) = await inbox.take_many(1, self.receive_timeout)
        assert last.message.body == b"saga-2:1"
        assert not await subscription.settled_past(later)
        await last.ack()
        await self.settled_within(subscription, later)

    async def test_a_mark_of_an_idle_subscription_is_settled_past(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        mark = await self.mark_now(inbox.subscription)
        await self.settled_within(inbox.subscription, mark)

    async def test_a_nacked_message_keeps_a_mark_unsettled_until_it_is_acked(
        self, transport: Transport, names: Names, inboxes: list[Inbox]
    ) -> None:
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        await transport.publish([names.message("saga-1", 1)])
        first = await inbox.take(self.receive_timeout)
        await first.nack()
        mark = await self.mark_now(inbox.subscription)
        assert not await inbox.subscription.settled_past(mark)
        again = await inbox.take(self.receive_timeout)
        assert again.message == first.message
        assert not await inbox.subscription.settled_past(mark)
        await again.ack()
        await self.settled_within(inbox.subscription, mark)
