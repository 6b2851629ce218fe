"""The relay's part in routing, without a broker: rows no queue receives stay pending
and their destination is held back with a doubling pause; the others go.

``tests/test_routing.py`` does it on RabbitMQ and Kafka.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.clock import utc_now
from engine.errors import MessagesUnroutable
from engine.relay import OutboxRelay
from engine.store.sql import SqlSagaStore
from engine.transport.base import Message
from engine.transport.memory import MemoryBroker, MemoryTransport

NOWHERE = "other.commands.flights"


class NoQueueFor(MemoryTransport):
    """The in-process broker, except that nothing receives ``NOWHERE`` until bound."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker(dead_letters="dead-letters"))
        self.bound = False
        self.attempts: list[list[str]] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.attempts.append([m.destination for m in messages])
        lost = {i: m.destination for i, m in enumerate(messages) if m.destination == NOWHERE}
        await super().publish([m for m in messages if self.bound or m.destination != NOWHERE])
        if lost and not self.bound:
            raise MessagesUnroutable(lost, len(messages), "the test broker")


async def _pending(store: SqlSagaStore) -> list[str]:
    async with store.transaction() as tx:
        return [row.destination for row in await tx.claim_outbox(100)]


async def _add(store: SqlSagaStore, *destinations: str) -> None:
    async with store.transaction() as tx:
        for n, destination in enumerate(destinations):
            await tx.add_raw_outbox(destination, f"k{n}", "{}", {}, utc_now())


async def test_unroutable_rows_wait_with_a_growing_pause_and_go_once_bound(
    store: SqlSagaStore,
) -> None:
    transport = NoQueueFor()
    await transport.connect()
    relay = OutboxRelay(store, transport, unroutable_pause=60, max_unroutable_pause=100)
    await _add(store, NOWHERE, "saga.commands.inventory", NOWHERE)

    assert await relay.relay_once() == 1
    assert await _pending(store) == [NOWHERE, NOWHERE]
    assert relay.held[NOWHERE].pause == 60

    # Held back: later rows go, the held ones are not even claimed.
    await _add(store, "saga.commands.payment")
    assert await relay.relay_once() == 1
    assert transport.attempts[-1] == ["saga.commands.payment"]

    relay.held[NOWHERE].until = 0  # the pause is over: tried again, still nothing
    assert await relay.relay_once() == 0
    assert relay.held[NOWHERE].pause == 100  # doubled, capped

    transport.bound = True
    relay.held[NOWHERE].until = 0
    assert await relay.relay_once() == 2
    assert await _pending(store) == []
    assert NOWHERE not in relay.held
    assert relay.published == 4
