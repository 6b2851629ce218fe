"""Routing you can trust, on the real brokers.

RabbitMQ: a message no queue receives (its destination is outside the publisher's
prefix, and no consumer bound a queue for it) is returned by the broker: the relay
keeps its outbox row pending, says so once naming the destination, sends the others,
and delivers it once a consumer declares the queue. Kafka: the relay warns once when
it published to a topic no consumer group reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from engine.clock import utc_now
from engine.relay import OutboxRelay
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from tests.brokers import BrokerObjects, drop_after_test
from tests.e2e import service_url
from tests.services import BROKERS

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


async def _pending(store: SqlSagaStore) -> list[str]:
    """Destinations of the outbox rows not sent yet."""
    async with store.transaction() as tx:
        return [row.destination for row in await tx.claim_outbox(100)]


def relay_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "saga.relay" and r.levelno >= logging.WARNING]


async def _add_rows(store: SqlSagaStore, *destinations: str) -> None:
    async with store.transaction() as tx:
        for n, destination in enumerate(destinations):
            await tx.add_raw_outbox(destination, f"saga-{n}", f"body-{n}", {}, utc_now())


async def test_rabbitmq_unroutable_row_stays_pending_until_a_queue_appears(
    store: SqlSagaStore, caplog: pytest.LogCaptureFixture
) -> None:
    url = service_url(BROKERS["rabbitmq"])
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    # A row another deployment's client wrote: outside this engine's prefix.
    foreign = f"{topology.prefix}x.commands.flights"
    own = topology.commands("inventory")
    drop_after_test(
        BrokerObjects(
            url, topology.prefix, (foreign, own, topology.dead_letters), exchange=topology.prefix
        )
    )
    publisher = transport_from_url(url, topology)
    consumer = transport_from_url(url, topology)
    await publisher.connect()
    await consumer.connect()
    relay = OutboxRelay(store, publisher, unroutable_pause=0.2, max_unroutable_pause=0.5)
    try:
        await _add_rows(store, foreign, own)
        with caplog.at_level(logging.INFO, logger="saga.relay"):
            assert await relay.relay_once() == 1  # the own one went
            assert await _pending(store) == [foreign]
            assert await relay.relay_once() == 0  # held back: not published again now
            warnings = relay_warnings(caplog)
            assert len(warnings) == 1, caplog.text
            assert foreign in warnings[0].getMessage()
            assert "stay pending" in warnings[0].getMessage()

            subscription = await consumer.subscribe(foreign, group="flights")
            deadline = time.monotonic() + TIMEOUT
            while await _pending(store):
                assert time.monotonic() < deadline, "the held row never went"
                await relay.relay_once()
                await asyncio.sleep(0.1)
            assert f"messages to {foreign} are routed again" in caplog.text
            assert len(relay_warnings(caplog)) == 1

        async with asyncio.timeout(TIMEOUT):
            async for delivery in subscription:
                assert delivery.message.destination == foreign
                assert delivery.message.body == b"body-0"
                await delivery.ack()
                break
    finally:
        await consumer.close()
        await publisher.close()


async def test_kafka_warns_once_about_a_topic_no_consumer_group_reads(
    store: SqlSagaStore, caplog: pytest.LogCaptureFixture
) -> None:
    url = service_url(BROKERS["kafka"])
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    drop_after_test(BrokerObjects(url, topology.prefix))
    read, unread = topology.commands("inventory"), topology.commands("flights")
    transport = transport_from_url(url, topology, destinations=[read, unread])
    await transport.connect()
    try:
        # A group that read ``read`` (and committed where it is).
        subscription = await transport.subscribe(read, group=topology.group("worker"))
        await transport.publish([Message(read, "k", b"first")])
        async with asyncio.timeout(TIMEOUT):
            async for delivery in subscription:
                await delivery.ack()
                break
        has_readers = transport.has_readers  # type: ignore[attr-defined]
        deadline = time.monotonic() + TIMEOUT
        while not await has_readers(read):
            assert time.monotonic() < deadline, "the group's commit never showed"
            await asyncio.sleep(0.2)
        await subscription.close()

        relay = OutboxRelay(store, transport, reader_check_delay=0)
        await _add_rows(store, read, unread, unread)
        with caplog.at_level(logging.INFO, logger="saga.relay"):
            assert await relay.relay_once() == 3
            await _add_rows(store, unread)
            assert await relay.relay_once() == 1  # asked once per topic
            async with asyncio.timeout(TIMEOUT):
                while relay._checks:
                    await asyncio.gather(*relay._checks)
        warnings = [r.getMessage() for r in relay_warnings(caplog)]
        assert len(warnings) == 1, caplog.text
        assert f"no consumer group reads {unread}" in warnings[0]
        assert read not in warnings[0]
    finally:
        await transport.close()
