"""Tests leave the shared brokers as they found them (tests/brokers.py)."""

from __future__ import annotations

import uuid

import aio_pika
import pytest
from aio_pika.exceptions import ChannelClosed
from aiokafka.admin import AIOKafkaAdminClient

from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from tests.brokers import (
    BrokerCleanupWarning,
    BrokerObjects,
    drop,
    drop_after_test,
    drop_queued,
    drop_topology,
    saga_participants,
    topology_objects,
)
from tests.services import BROKERS, closed_port, service_url


def test_a_topology_is_its_replies_dead_letters_commands_and_exchange() -> None:
    objects = topology_objects("amqp://h/", "t1", {"payment", "inventory"})
    assert objects.queues == (
        "t1.dead-letters",
        "t1.replies",
        "t1.commands.inventory",
        "t1.commands.payment",
    )
    assert objects.exchange == "t1"
    assert saga_participants(["sagas.order"]) == {"inventory", "payment", "shipment"}
    # A graph saga's participants are those of its steps inside groups too.
    assert saga_participants(["sagas.large_order"]) == {"inventory", "payment", "shipment"}


@pytest.mark.parametrize(
    "url", ["kafka://127.0.0.1:{port}", "amqp://saga:secret@127.0.0.1:{port}/"]
)
async def test_an_unreachable_broker_is_a_warning_not_a_failure(url: str) -> None:
    url = url.format(port=closed_port())
    with pytest.warns(BrokerCleanupWarning, match="left behind") as caught:
        await drop(topology_objects(url, "t1", ["payment"]), timeout=5)
    assert "secret" not in str(caught[0].message)


def test_what_a_test_queued_is_dropped_when_it_ends() -> None:
    url = f"amqp://saga:saga@127.0.0.1:{closed_port()}/"
    drop_after_test(BrokerObjects(url, "t1", ("t1.replies",)))
    with pytest.warns(BrokerCleanupWarning, match=r"the t1\.\* objects on amqp://127.0.0.1"):
        drop_queued(timeout=5)
    drop_queued()  # nothing queued any more: nothing to do


@pytest.mark.integration
@pytest.mark.parametrize("broker", sorted(BROKERS))
async def test_everything_a_deployment_declares_is_dropped(broker: str) -> None:
    url = service_url(BROKERS[broker])
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    transport = transport_from_url(url, topology)
    await transport.connect()
    try:
        destinations = [topology.commands("inventory"), topology.replies, topology.dead_letters]
        await transport.publish([Message(d, "k", b"x") for d in destinations])
        subscription = await transport.subscribe(topology.replies, group=topology.group("e"))
        await subscription.close()
    finally:
        await transport.close()

    await drop_topology(url, topology.prefix, ["inventory"])

    if broker == "kafka":
        admin = AIOKafkaAdminClient(bootstrap_servers=url.split("://", 1)[1])
        await admin.start()
        try:
            left = [t for t in await admin.list_topics() if t.startswith(topology.prefix)]
        finally:
            await admin.close()
        assert left == []
        return
    connection = await aio_pika.connect(url)
    try:
        for queue in destinations:
            channel = await connection.channel()
            with pytest.raises(ChannelClosed, match="NOT_FOUND"):
                await channel.declare_queue(queue, passive=True)
        channel = await connection.channel()
        with pytest.raises(ChannelClosed, match="NOT_FOUND"):
            await channel.declare_exchange(topology.prefix, passive=True)
    finally:
        await connection.close()
