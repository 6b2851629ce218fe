"""A step's timeout does not run out while its command is still in the outbox.

The fault suite found that a broker outage longer than a step timeout timed out (and
compensated) every saga dispatched during it, though no participant could have seen
their commands; a long enough outage would have parked them all once compensations
timed out too. A timeout now starts over while its message is unpublished.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.errors import TransportError
from engine.model import Timer, TimerKind
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus
from engine.topology import Topology
from engine.transport.base import Message, Subscription, Transport
from engine.transport.memory import MemoryBroker, MemoryTransport
from tests.helpers import EmbeddedSystem, fast_order_saga, order_input

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_postpone_restarts_the_timeout_and_says_so() -> None:
    saga = fast_order_saga(timeout=2.0)
    state = new_saga(saga, "s1", order_input(), NOW)
    Transition(saga, state, now=NOW, topology=Topology()).start()
    timer = state.timer
    assert timer is not None and timer.kind is TimerKind.STEP_TIMEOUT
    later = NOW + timedelta(seconds=5)
    transition = Transition(saga, state, now=later, topology=Topology())
    assert transition.postpone(timer)
    assert state.timer == Timer(timer.kind, timer.step, timer.attempt, later + timedelta(seconds=2))
    assert [h.event for h in transition.history] == ["timeout_postponed"]
    assert transition.messages == [] and state.status is SagaStatus.RUNNING
    assert not Transition(saga, state, now=later, topology=Topology()).postpone(timer)  # stale


def test_a_timeout_whose_message_went_out_late_runs_from_then() -> None:
    # No engine relayed the command when the step was written: the participant gets
    # its whole timeout from when the broker took it, not from the step's start.
    saga = fast_order_saga(timeout=2.0)
    state = new_saga(saga, "s1", order_input(), NOW)
    Transition(saga, state, now=NOW, topology=Topology()).start()
    timer = state.timer
    assert timer is not None
    sent = NOW + timedelta(seconds=1.5)
    transition = Transition(saga, state, now=NOW + timedelta(seconds=2), topology=Topology())
    assert transition.postpone(timer, sent)
    assert state.timer == Timer(timer.kind, timer.step, timer.attempt, sent + timedelta(seconds=2))
    (entry,) = transition.history
    assert entry.event == "timeout_postponed" and "published only at" in (entry.detail or "")


class Gate:
    """The engine's transport, refusing every publish until opened (a broker outage)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.open = False

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def publish(self, messages: Sequence[Message]) -> None:
        if not self.open:
            raise TransportError("broker unreachable")
        await self.inner.publish(messages)

    async def subscribe(self, destination: str, *, group: str) -> Subscription:
        return await self.inner.subscribe(destination, group=group)


async def test_a_broker_outage_longer_than_the_step_timeout_times_nothing_out(
    tmp_path: Path,
) -> None:
    gates: list[Gate] = []

    def transport(broker: MemoryBroker, role: str) -> Transport:
        if role != "engine":
            return MemoryTransport(broker)
        gates.append(Gate(MemoryTransport(broker)))
        return gates[-1]

    saga = fast_order_saga(timeout=0.3)
    async with EmbeddedSystem(
        tmp_path / "s.db", sagas=[saga], transport_factory=transport
    ) as system:
        saga_id = await system.start_order()
        # An outage of at least two timeouts (each postponed, none fired): waited for
        # by what the saga records, not by the clock, so a busy machine is no matter.
        detail = await system.wait_status(
            saga_id,
            lambda d: (
                [h.event for h in d.history].count("timeout_postponed") >= 2
                or d.status is not SagaStatus.RUNNING
            ),
            30,
            "two timeouts to be postponed",
        )
        assert detail.status is SagaStatus.RUNNING, detail.history
        assert [h.event for h in detail.history].count("timeout_postponed") >= 2
        gates[0].open = True
        done = await system.wait_status(
            saga_id, lambda d: d.status.is_terminal, 10, "the saga to finish"
        )
    assert done.status is SagaStatus.COMPLETED
    assert "step_timed_out" not in [h.event for h in done.history]
