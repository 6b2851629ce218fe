"""The transport contract, and RabbitMQ's own guarantees, on a real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from engine.errors import MessagesRefused, PublishError, TransportError
from engine.transport.base import Message, Transport
from engine.transport.rabbitmq import RabbitTransport
from tests.services import (
    closed_port,
    rabbit_message_limit,
    rabbitmqctl,
    run,
    service_url,
    silent_server,
)
from tests.transport_contract import Connect, Inbox, MakeTransport, Names, TransportContract, bodies

pytestmark = pytest.mark.integration


@pytest.fixture
def amqp_url() -> str:
    return service_url("SAGA_TEST_AMQP_URL")


class TestRabbitTransport(TransportContract):
    @pytest.fixture
    def broker_url(self, amqp_url: str) -> str:
        return amqp_url

    @pytest.fixture
    def make_transport(self, amqp_url: str) -> MakeTransport:
        def make(dead_letters: str) -> Transport:
            return RabbitTransport(amqp_url, dead_letter_queue=dead_letters)

        return make

    @pytest.fixture
    async def oversized(self) -> AsyncIterator[int]:
        # The broker's limit lowered for the channels this test opens (128 MiB by
        # default: a body that size costs seconds and hundreds of MiB to send).
        async with rabbit_message_limit() as limit:
            yield limit + 1024

    @pytest.fixture
    def unreachable_transport(self) -> Transport:
        return RabbitTransport(f"amqp://saga:saga@127.0.0.1:{closed_port()}/")

    # -- RabbitMQ specifics ------------------------------------------------------------

    async def test_a_mark_covers_what_another_consumer_of_the_queue_holds(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        # Two engine replicas compete for one queue: a reply the other one holds is no
        # less a reply, so a mark is settled only once both settled what came before.
        ours = await self.consume(await connect(), names.destination, names.group, inboxes)
        theirs = await self.consume(await connect(), names.destination, names.group, inboxes)
        publisher = await connect()
        await publisher.publish([names.message(f"saga-{k}", 1) for k in range(20)])
        mark = await self.mark_now(ours.subscription)
        got: dict[int, list[Any]] = {0: [], 1: []}
        deadline = time.monotonic() + self.receive_timeout
        while len(got[0]) + len(got[1]) < 20:
            assert time.monotonic() < deadline, f"only {got} of 20 arrived"
            for i, inbox in enumerate((ours, theirs)):
                while not inbox.queue.empty():
                    got[i].append(inbox.queue.get_nowait())
            await asyncio.sleep(0.05)
        assert got[0] and got[1], "the broker gave one consumer everything"
        for delivery in got[0]:
            await delivery.ack()
        # The marker must pass the other consumer, which holds it while it holds
        # deliveries that came before it.
        held: Any = theirs.subscription
        while not held._held:
            assert time.monotonic() < deadline, "the marker never reached the other consumer"
            await asyncio.sleep(0.05)
        assert not await ours.subscription.settled_past(mark)
        for delivery in got[1]:
            await delivery.ack()
        await self.settled_within(ours.subscription, mark)

    async def test_an_unroutable_publish_raises_instead_of_vanishing(
        self, amqp_url: str, names: Names
    ) -> None:
        transport = RabbitTransport(amqp_url, dead_letter_queue=names.dead_letters)
        await transport.connect()
        try:
            await transport.publish([names.message("saga-1", 1)])  # declares the queue
            channel = await aio_pika.connect(amqp_url)
            try:
                admin = await channel.channel()
                await admin.queue_delete(names.destination)  # gone behind our back
            finally:
                await channel.close()
            with pytest.raises(PublishError, match="could not route"):
                await transport.publish([names.message("saga-1", 2)])
        finally:
            await transport.close()

    async def test_broker_side_rejections_land_in_the_dead_letters(
        self, amqp_url: str, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        transport = await connect()
        await transport.publish([names.message("saga-1", 1)])
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(names.destination, ensure=False)
            incoming = await queue.get(timeout=5)
            assert incoming is not None
            await incoming.reject(requeue=False)  # the broker dead-letters it
        finally:
            await connection.close()

        parked = await self.consume(transport, names.dead_letters, names.group, inboxes)
        letter = await parked.take(self.receive_timeout)
        assert letter.message.body == b"saga-1:1"
        await letter.ack()

    async def test_a_silent_broker_fails_within_the_connect_timeout(self) -> None:
        async with silent_server() as port:
            transport = RabbitTransport(f"amqp://saga:saga@127.0.0.1:{port}/", connect_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(TransportError, match=f"cannot reach RabbitMQ at 127.0.0.1:{port}"):
                await transport.connect()
            assert time.monotonic() - started < 5
            await transport.close()

    @pytest.mark.faults
    async def test_consumers_come_back_by_themselves_after_a_broker_restart(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        ctl = rabbitmqctl()
        transport = await connect()
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        await transport.publish([names.message("saga-1", 0)])
        await (await inbox.take(self.receive_timeout)).ack()
        # Handed out but not acked when the broker goes away: must come back.
        await transport.publish([names.message("saga-2", n) for n in range(3)])
        unacked = await inbox.take_many(3, self.receive_timeout)

        await run([*ctl, "stop_app"])
        try:
            started = time.monotonic()
            with pytest.raises((PublishError, TransportError)):
                await transport.publish([names.message("saga-x", 0)])
            assert time.monotonic() - started < 15  # a down broker does not hang
        finally:
            await run([*ctl, "start_app"])
            await run([*ctl, "await_startup"])
        for delivery in unacked:
            await delivery.ack()  # their channel is gone: a no-op, not a crash

        # The backlog, published the way the relay does it: retry until confirmed.
        backlog = [names.message("saga-3", n) for n in range(20)]
        deadline = time.monotonic() + 60
        while True:
            try:
                await transport.publish(backlog)
                break
            except (PublishError, TransportError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

        got = await inbox.take_many(23, 60)
        for delivery in got:
            await delivery.ack()
        by_key: dict[str, list[bytes]] = {}
        for delivery in got:
            by_key.setdefault(delivery.message.key, []).append(delivery.message.body)
        assert sorted(by_key["saga-2"]) == bodies(unacked)
        assert by_key["saga-3"] == [m.body for m in backlog]
        assert all(d.redelivered for d in got if d.message.key == "saga-2")


def test_message_keys_travel_in_a_header_that_consumers_do_not_see() -> None:
    from engine.transport.rabbitmq import KEY_HEADER, _outgoing

    out = _outgoing(Message("d", "saga-1", b"x", {"a": "b"}))
    assert out.headers == {"a": "b", KEY_HEADER: "saga-1"}
    assert out.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


class _Channel:
    is_closed = False


class _Exchange:
    """Stands in for a publisher-confirm exchange: the broker closes the channel over
    any message whose body starts with ``bad`` (with a reason that names no limit)."""

    def __init__(self) -> None:
        self.published: list[bytes] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, mandatory: bool) -> None:
        await asyncio.sleep(0)
        if message.body.startswith(b"bad"):
            raise ChannelPreconditionFailed("PRECONDITION_FAILED - not for this queue")
        self.published.append(message.body)


async def test_a_refusal_that_names_no_culprit_is_found_by_publishing_one_at_a_time() -> None:
    transport = RabbitTransport("amqp://saga:saga@127.0.0.1:9/")
    transport._exchange = exchange = _Exchange()  # type: ignore[assignment]
    transport._channel = _Channel()  # type: ignore[assignment]
    transport._declared = {"d"}
    sent = [
        Message("d", "k1", b"1"),
        Message("d", "k2", b"bad 2"),
        Message("d", "k2", b"3"),
        Message("d", "k3", b"4"),
        Message("d", "k2", b"bad 5"),
    ]
    with pytest.raises(MessagesRefused) as caught:
        await transport.publish(sent)
    assert caught.value.refused == {
        1: "PRECONDITION_FAILED - not for this queue",
        4: "PRECONDITION_FAILED - not for this queue",
    }
    # Each good one confirmed once (none was confirmed and then sent again), and the
    # messages of k2 kept their order.
    assert sorted(exchange.published) == [b"1", b"3", b"4"]
