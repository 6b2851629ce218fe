"""The transport contract, and Kafka's own offset bookkeeping, on a real broker."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from engine.errors import MessagesRefused, PublishError, TransportError
from engine.transport.base import Message, Transport
from engine.transport.kafka import KafkaTransport
from engine.transport.kafka_options import KafkaOptions
from tests.services import closed_port, service_url, silent_server
from tests.transport_contract import Connect, Inbox, MakeTransport, Names, TransportContract, bodies

#: The broker's default message.max.bytes (the topics here do not change it).
BROKER_LIMIT = 1_048_588
PRODUCER_LIMIT = 8 * 1024 * 1024


@pytest.fixture
def kafka_servers() -> str:
    url = service_url("SAGA_TEST_KAFKA_URL")
    return url.split("://", 1)[1].strip("/")


@pytest.mark.integration
class TestKafkaTransport(TransportContract):
    @pytest.fixture
    def broker_url(self) -> str:
        return service_url("SAGA_TEST_KAFKA_URL")

    @pytest.fixture
    def make_transport(self, kafka_servers: str) -> MakeTransport:
        def make(dead_letters: str) -> Transport:
            # Above the broker's own limit, so that over-sized messages reach the
            # broker and it is the broker that refuses them.
            return KafkaTransport(
                kafka_servers,
                dead_letter_topic=dead_letters,
                options=KafkaOptions(max_request_size=PRODUCER_LIMIT),
            )

        return make

    @pytest.fixture
    def oversized(self) -> int:
        return BROKER_LIMIT + 1024

    @pytest.fixture
    def unreachable_transport(self) -> Transport:
        return KafkaTransport(f"127.0.0.1:{closed_port()}")

    # -- Kafka specifics -------------------------------------------------------------

    async def test_topics_are_created_with_the_configured_partitions(
        self, kafka_servers: str, names: Names
    ) -> None:
        transport = KafkaTransport(kafka_servers, options=KafkaOptions(partitions=3))
        await transport.connect()
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_servers)
        await admin.start()
        try:
            await transport.ensure_topics([names.destination])
            # A second transport finds the topic there already: that is not an error.
            again = KafkaTransport(kafka_servers, options=KafkaOptions(partitions=3))
            await again.connect()
            try:
                await again.ensure_topics([names.destination])
            finally:
                await again.close()
            (described,) = await admin.describe_topics([names.destination])
        finally:
            await admin.close()
            await transport.close()
        assert described["error_code"] == 0
        assert len(described["partitions"]) == 3

    async def test_a_nack_replays_the_partition_in_order(
        self, transport: Transport, names: Names
    ) -> None:
        # A serial consumer, as the engine is: the next message is pulled only after
        # the previous one was settled, so the nack comes before 2 and 3 are handed out.
        subscription = await transport.subscribe(names.destination, group=names.group)
        await transport.publish([names.message("saga-1", n) for n in (1, 2, 3)])
        deliveries = aiter(subscription)
        async with asyncio.timeout(self.receive_timeout):
            first = await anext(deliveries)
            await first.nack()
            got = [await anext(deliveries) for _ in range(3)]
        await subscription.close()

        assert bodies(got) == [b"saga-1:1", b"saga-1:2", b"saga-1:3"]
        assert [d.redelivered for d in got] == [True, False, False]

    async def test_nacks_in_a_row_replay_from_the_lowest(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        # A worker hands back a whole batch when its replies cannot be published: each
        # nack must leave the earlier ones to be delivered again, not seek past them.
        transport = await connect()
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        await transport.publish([names.message("saga-1", n) for n in (1, 2, 3)])
        one, two, three = await inbox.take_many(3, self.receive_timeout)
        await one.nack()
        await two.nack()
        await three.ack()
        again = await inbox.take_many(2, self.receive_timeout)
        assert bodies(again) == [b"saga-1:1", b"saga-1:2"]
        assert [d.redelivered for d in again] == [True, True]

    async def test_only_the_contiguous_acked_prefix_is_committed(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        first_transport = await connect()
        first = await self.consume(first_transport, names.destination, names.group, inboxes)
        await first_transport.publish([names.message("saga-1", n) for n in (1, 2, 3, 4)])
        one, _two, three, _four = await first.take_many(4, self.receive_timeout)
        await one.ack()
        await three.ack()  # acked, but behind the unsettled "two": not committable
        await first.close()

        second = await self.consume(await connect(), names.destination, names.group, inboxes)
        got = await second.take_many(3, self.receive_timeout)

        assert bodies(got) == [b"saga-1:2", b"saga-1:3", b"saga-1:4"]

    async def test_acks_share_commits_and_the_last_ack_is_committed(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        first_transport = await connect()
        first = await self.consume(first_transport, names.destination, names.group, inboxes)
        subscription: Any = first.subscription
        commits = 0
        commit = subscription._consumer.commit

        async def counting(*args: Any, **kwargs: Any) -> None:
            nonlocal commits
            commits += 1
            await commit(*args, **kwargs)

        subscription._consumer.commit = counting
        await first_transport.publish([names.message("saga-1", n) for n in range(40)])
        for delivery in await first.take_many(40, self.receive_timeout):
            await delivery.ack()
        await first.close()
        # Acks made while a commit was in flight ride on the next one.
        assert 1 <= commits < 40, commits

        await first_transport.publish([names.message("saga-1", 99)])
        second = await self.consume(await connect(), names.destination, names.group, inboxes)
        (got,) = await second.take_many(1, self.receive_timeout)
        assert bodies([got]) == [b"saga-1:99"]  # every acked one stayed committed

    async def test_the_producer_refuses_a_message_over_its_max_request_size(
        self, kafka_servers: str, names: Names, inboxes: list[Inbox]
    ) -> None:
        transport = KafkaTransport(kafka_servers, options=KafkaOptions(max_request_size=64 * 1024))
        await transport.connect()
        try:
            inbox = await self.consume(transport, names.destination, names.group, inboxes)
            big = Message(names.destination, "saga-1", b"x" * 100_000)
            with pytest.raises(MessagesRefused) as caught:
                await transport.publish(
                    [names.message("saga-1", 1), big, names.message("saga-1", 2)]
                )
            assert list(caught.value.refused) == [1]
            assert "max_request_size" in caught.value.refused[1]
            got = await inbox.take_many(2, self.receive_timeout)
            assert bodies(got) == [b"saga-1:1", b"saga-1:2"]
        finally:
            await transport.close()

    async def test_the_publish_after_a_refusal_of_the_last_message_goes_through(
        self, transport: Transport, names: Names, inboxes: list[Inbox], oversized: int
    ) -> None:
        # The refused batch left a gap in the producer's sequence of its partition:
        # without a fresh producer the next publish there would fail.
        inbox = await self.consume(transport, names.destination, names.group, inboxes)
        big = Message(names.destination, "saga-1", b"x" * oversized)
        with pytest.raises(MessagesRefused) as caught:
            await transport.publish([names.message("saga-1", 1), big])
        assert list(caught.value.refused) == [1]
        await transport.publish([names.message("saga-1", 2)])
        got = await inbox.take_many(2, self.receive_timeout)
        assert bodies(got) == [b"saga-1:1", b"saga-1:2"]

    async def test_a_mark_covers_the_partitions_other_members_of_the_group_own(
        self, connect: Connect, names: Names, inboxes: list[Inbox]
    ) -> None:
        # Two engine replicas: a reply waiting on the other one's partitions is no
        # less a reply, so one member's mark is settled only once the group's is.
        ours = await self.consume(await connect(), names.destination, names.group, inboxes)
        theirs = await self.consume(await connect(), names.destination, names.group, inboxes)
        members: list[Any] = [ours.subscription, theirs.subscription]
        deadline = time.monotonic() + 60
        while not all(m._consumer.assignment() for m in members):
            assert time.monotonic() < deadline, "the group never gave both members partitions"
            await asyncio.sleep(0.1)
        owned = [{tp.partition for tp in m._consumer.assignment()} for m in members]
        assert not owned[0] & owned[1]

        publisher = await connect()
        await publisher.publish([names.message(f"saga-{k}", 1) for k in range(24)])
        mark = await self.mark_now(ours.subscription)
        got: dict[int, list[Any]] = {0: [], 1: []}
        while len(got[0]) + len(got[1]) < 24:
            assert time.monotonic() < deadline, f"only {got} of 24 arrived"
            for i, inbox in enumerate((ours, theirs)):
                while not inbox.queue.empty():
                    got[i].append(inbox.queue.get_nowait())
            await asyncio.sleep(0.05)
        assert got[0] and got[1]
        for delivery in got[0]:
            await delivery.ack()
        assert not await ours.subscription.settled_past(mark)  # theirs are in hand
        for delivery in got[1]:
            await delivery.ack()
        await self.settled_within(ours.subscription, mark)

    async def test_a_silent_broker_fails_within_the_connect_timeout(self) -> None:
        async with silent_server() as port:
            transport = KafkaTransport(f"127.0.0.1:{port}", connect_timeout=1.0)
            started = time.monotonic()
            with pytest.raises(TransportError, match=f"cannot reach Kafka at 127.0.0.1:{port}"):
                await transport.connect()
            assert time.monotonic() - started < 5
            await transport.close()


# -- the publish bound, without a broker: a producer that never confirms or fails ------


class _Producer:
    """Stands in for AIOKafkaProducer: hands out delivery futures it settles (or not)."""

    def __init__(self, outcome: BaseException | str | None) -> None:
        self.outcome = outcome
        self.futures: list[asyncio.Future[None]] = []

    async def send(self, topic: str, value: bytes, **kwargs: object) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if isinstance(self.outcome, BaseException):
            future.set_exception(self.outcome)
        elif self.outcome is None:
            future.set_result(None)
        self.futures.append(future)  # "never": left pending, as with a hung broker
        return future

    async def stop(self) -> None:
        for future in self.futures:
            if not future.done():
                future.cancel()


def _stubbed(outcome: BaseException | str | None, timeout: float) -> KafkaTransport:
    transport = KafkaTransport("127.0.0.1:9", publish_timeout=timeout)
    transport._producer = _Producer(outcome)
    transport._topics.add("t")  # no admin round trip
    return transport


async def test_publish_gives_up_after_the_publish_timeout() -> None:
    transport = _stubbed("never", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"did not confirm 2 of 2 messages within 0.2s"):
        await transport.publish([Message("t", "k", b"1"), Message("t", "k", b"2")])
    assert time.monotonic() - started < 1
    await transport.close()


async def test_a_broker_error_on_delivery_is_a_publish_error() -> None:
    from aiokafka.errors import NotEnoughReplicasError

    transport = _stubbed(NotEnoughReplicasError(), timeout=5)
    with pytest.raises(PublishError, match="refused a publish"):
        await transport.publish([Message("t", "k", b"1")])
    await transport.close()


async def test_publish_returns_once_every_delivery_is_confirmed() -> None:
    transport = _stubbed(None, timeout=5)
    await transport.publish([Message("t", "k", b"1"), Message("t", "k", b"2")])
    assert all(f.done() for f in transport._producer.futures)
    await transport.close()


async def test_an_invalid_topic_name_is_refused_and_the_rest_is_published() -> None:
    transport = _stubbed(None, timeout=5)
    sent = [Message("t", "k", b"1"), Message("no such topic!", "k", b"2"), Message("t", "k", b"3")]
    with pytest.raises(MessagesRefused) as caught:
        await transport.publish(sent)
    assert caught.value.refused == {1: "invalid topic name 'no such topic!'"}
    assert len(transport._producer.futures) == 2 and all(
        f.done() for f in transport._producer.futures
    )
    await transport.close()


async def test_publish_before_connect_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="not connected"):
        await KafkaTransport("127.0.0.1:9").publish([Message("t", "k", b"1")])


# -- new topics are waited for until the broker's metadata shows them -----------------


class _Admin:
    """Stands in for AIOKafkaAdminClient: the topic shows up in the metadata late."""

    def __init__(self, unknown_for: int) -> None:
        self.unknown_for = unknown_for
        self.described = 0

    async def create_topics(self, new: list[Any]) -> Any:
        return SimpleNamespace(topic_errors=[(t.name, 0) for t in new])

    async def describe_topics(self, names: list[str]) -> list[dict[str, object]]:
        self.described += 1
        if self.described <= self.unknown_for:
            return [{"topic": n, "error_code": 3, "partitions": []} for n in names]
        partitions = [{"partition": p, "leader": 1} for p in range(4)]
        return [{"topic": n, "error_code": 0, "partitions": partitions} for n in names]

    async def close(self) -> None:
        return None


async def test_a_created_topic_is_used_only_once_the_broker_metadata_shows_it() -> None:
    # Subscribing before that gets a consumer no partitions for five minutes (its
    # metadata refresh interval): a worker that would not see its first commands.
    transport = KafkaTransport("127.0.0.1:9", connect_timeout=5)
    transport._admin = admin = _Admin(unknown_for=3)
    await transport.ensure_topics(["fresh"])
    assert admin.described == 4
    await transport.ensure_topics(["fresh"])  # known now: no more round trips
    assert admin.described == 4


async def test_a_topic_that_never_shows_up_is_a_transport_error() -> None:
    transport = KafkaTransport("127.0.0.1:9", connect_timeout=0.3)
    transport._admin = _Admin(unknown_for=1_000_000)
    with pytest.raises(TransportError, match=r"topics \['ghost'\].*not in the broker's metadata"):
        await transport.ensure_topics(["ghost"])


# -- who reads a topic -------------------------------------------------------------------


class _Groups:
    """Stands in for AIOKafkaAdminClient: consumer groups and the topics each committed
    offsets on; counts the offset requests."""

    def __init__(self, committed: dict[str, list[str]]) -> None:
        self.committed = committed
        self.asked: list[str] = []

    async def list_consumer_groups(self) -> list[tuple[str, str]]:
        return [(group, "consumer") for group in self.committed]

    async def list_consumer_group_offsets(self, group: str) -> dict[Any, object]:
        self.asked.append(group)
        return {TopicPartition(t, 0): 1 for t in self.committed[group]}


async def test_readers_of_a_topic_are_looked_for_among_its_deployments_groups_first() -> None:
    # A shared cluster holds many groups: the deployment's own answer alone.
    others = {f"other{i}.worker": [f"other{i}.commands.inventory"] for i in range(50)}
    transport = KafkaTransport("127.0.0.1:9")
    transport._admin = admin = _Groups(
        {**others, "d1.worker-inventory": ["d1.commands.inventory"], "d1.engine": []}
    )
    assert await transport.has_readers("d1.commands.inventory")
    assert sorted(admin.asked) == ["d1.engine", "d1.worker-inventory"]
    # Read by a group named unlike it: found among the others.
    admin.asked.clear()
    admin.committed["reporting"] = ["d1.commands.payment"]
    assert await transport.has_readers("d1.commands.payment")
    assert len(admin.asked) == len(admin.committed)
    # Read by nobody: every group was asked, once.
    admin.asked.clear()
    assert not await transport.has_readers("d1.commands.shipment")
    assert sorted(admin.asked) == sorted(admin.committed)


# -- a producer that can never send again is replaced ----------------------------------


class _Wedged(_Producer):
    """What aiokafka's idempotent producer does once its sender died of an
    OutOfOrderSequenceNumber (a batch in flight while the broker restarted): every
    send raises the same error, forever."""

    def __init__(self) -> None:
        super().__init__(None)
        self.stopped = False

    async def send(self, topic: str, value: bytes, **kwargs: object) -> asyncio.Future[None]:
        from aiokafka.errors import OutOfOrderSequenceNumber

        raise OutOfOrderSequenceNumber()

    async def stop(self) -> None:
        self.stopped = True


class _Fresh(_Producer):
    def __init__(self) -> None:
        super().__init__(None)
        self.started = False

    async def start(self) -> None:
        self.started = True


async def test_a_producer_wedged_by_a_broker_restart_is_replaced() -> None:
    transport = _stubbed(None, timeout=5)
    transport._producer = wedged = _Wedged()
    fresh = _Fresh()
    transport._new_producer = lambda: fresh  # type: ignore[method-assign]
    with pytest.raises(PublishError, match="OutOfOrderSequenceNumber"):
        await transport.publish([Message("t", "k", b"1")])
    assert wedged.stopped and fresh.started and transport._producer is fresh
    await transport.publish([Message("t", "k", b"1")])  # the relay's retry goes through
    assert len(fresh.futures) == 1
    await transport.close()


async def test_an_ordinary_refusal_keeps_the_producer() -> None:
    from aiokafka.errors import NotEnoughReplicasError

    transport = _stubbed(NotEnoughReplicasError(), timeout=5)
    producer = transport._producer
    with pytest.raises(PublishError):
        await transport.publish([Message("t", "k", b"1")])
    assert transport._producer is producer
    await transport.close()
