"""The transport contract on the in-process broker."""

from __future__ import annotations

import pytest

from engine.errors import TransportError
from engine.transport.base import Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from tests.transport_contract import MakeTransport, Names, TransportContract

#: The message size limit of the contract's in-process broker.
LIMIT = 64 * 1024


class TestMemoryTransport(TransportContract):
    receive_timeout = 2.0

    @pytest.fixture
    def make_transport(self) -> MakeTransport:
        brokers: dict[str, MemoryBroker] = {}

        def make(dead_letters: str) -> Transport:
            broker = brokers.setdefault(
                dead_letters, MemoryBroker(dead_letters=dead_letters, max_message_bytes=LIMIT)
            )
            return MemoryTransport(broker)

        return make

    @pytest.fixture
    def oversized(self) -> int:
        return LIMIT + 1

    @pytest.fixture
    def unreachable_transport(self) -> Transport:
        return MemoryTransport(MemoryBroker())

    async def test_unreachable_broker_raises_within_a_bound(
        self, unreachable_transport: Transport, names: Names
    ) -> None:
        # An in-process broker cannot be unreachable; the nearest failure is a
        # transport that is not (or no longer) connected, which must refuse at once.
        with pytest.raises(TransportError, match="not connected"):
            await unreachable_transport.publish([names.message("saga-1", 1)])
        await unreachable_transport.connect()
        await unreachable_transport.close()
        with pytest.raises(TransportError, match="not connected"):
            await unreachable_transport.publish([names.message("saga-1", 1)])
        with pytest.raises(TransportError, match="not connected"):
            await unreachable_transport.subscribe(names.destination, group=names.group)
