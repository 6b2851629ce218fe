"""The relay's part in routing, without a broker: rows no queue receives stay pending
and their destination is held back with a doubling pause, the others go; past
``unroutable_timeout`` they are refused, naming the participant no worker serves.
Where the transport can tell, the relay asks who reads what it published to, and
says what it knows (the engine adds it to a step timeout's error).

``tests/test_routing.py`` does it on RabbitMQ and Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest

from engine.clock import utc_now
from engine.errors import MessagesUnroutable
from engine.relay import OutboxRelay, Undeliverable
from engine.store.base import StoreTransaction
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


async def test_rows_no_queue_receives_are_refused_past_the_bound_naming_the_participant(
    store: SqlSagaStore,
) -> None:
    transport = NoQueueFor()
    await transport.connect()
    refused: list[Undeliverable] = []

    async def undeliverable(
        tx: StoreTransaction, rows: Sequence[Undeliverable]
    ) -> Callable[[], None] | None:
        refused.extend(rows)
        return None

    relay = OutboxRelay(
        store,
        transport,
        unroutable_pause=60,
        max_unroutable_pause=100,
        unroutable_timeout=5,
        on_undeliverable=undeliverable,
    )
    await _add(store, NOWHERE)
    assert await relay.relay_once() == 0
    held = relay.held[NOWHERE]
    assert held.until == held.since + 5  # tried again at the bound, not a pause later
    assert relay.unserved(NOWHERE) == f"no queue is bound for {NOWHERE!r} (participant 'flights')"

    held.since -= 5  # the bound passed: still no queue
    held.until = 0
    assert await relay.relay_once() == 1
    reason = f"no queue is bound for {NOWHERE} after 5s: no worker serves participant 'flights'"
    assert [(r.record.destination, r.reason) for r in refused] == [(NOWHERE, reason)]
    assert await _pending(store) == []
    async with store.transaction() as tx:
        archived = await tx.load_dead_letter(1)
    assert archived is not None and (archived.source, archived.reason) == (NOWHERE, reason)

    await _add(store, NOWHERE)  # the next one is tried, and refused, at once
    assert await relay.relay_once() == 1
    assert len(refused) == 2 and relay.refused == 2

    transport.bound = True  # a consumer bound a queue at last
    await _add(store, NOWHERE)
    assert await relay.relay_once() == 1
    assert len(refused) == 2 and relay.published == 1
    assert NOWHERE not in relay.held and relay.unserved(NOWHERE) is None


class Readers(MemoryTransport):
    """The in-process broker, with a reader check whose answer the test sets."""

    def __init__(self) -> None:
        super().__init__(MemoryBroker(dead_letters="dead-letters"))
        self.readers = False
        self.asked = 0

    async def has_readers(self, destination: str) -> bool:
        self.asked += 1
        return self.readers

    def nobody_reads(self, destination: str) -> str:
        return f"nobody reads {destination}"


async def test_the_relay_asks_who_reads_after_publishing_and_again_after_more(
    store: SqlSagaStore, caplog: pytest.LogCaptureFixture
) -> None:
    transport = Readers()
    await transport.connect()
    relay = OutboxRelay(store, transport, reader_check_delay=0)
    unread = "saga.commands.flights"

    async def published(*destinations: str) -> None:
        await _add(store, *destinations)
        assert await relay.relay_once() == len(destinations)
        while relay._checks:
            await asyncio.gather(*relay._checks)

    assert relay.unserved(unread) is None  # nothing known before a publish
    with caplog.at_level(logging.WARNING, logger="saga.relay"):
        await published(unread, unread)
        assert relay.unserved(unread) == f"no worker consumes {unread!r} (participant 'flights')"
        await published(unread)  # asked again, said once
        assert transport.asked == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"nobody reads {unread}: its messages wait there unread (is a consumer of it "
        "running, with the same SAGA_TOPIC_PREFIX?)"
    ]
    transport.readers = True  # its worker started
    await published(unread)
    assert relay.unserved(unread) is None
    assert relay.unserved("saga.replies") is None
