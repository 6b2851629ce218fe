"""The last attempt at the worker: the engine says which attempt is its last, and a
worker whose handler raises on it replies an error as on any other attempt and
acknowledges the command: the engine fails the step (the saga compensates). A routine
failure is not a dead letter (issue 12); see tests/test_routine_failures.py end to end."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from engine.messages import LAST_ATTEMPT_HEADER, Envelope, MessageKind, Outcome, encode
from engine.statemachine import Transition, new_saga
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.worker.barrier import SqlBarrier
from engine.worker.runner import WorkerRunner
from engine.worker.worker import HandlerContext, Worker
from sagas.order import place_order
from tests.helpers import FakeDelivery, envelopes, order_input

TOPOLOGY = Topology()
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_commands_and_compensations_name_their_last_attempt() -> None:
    state = new_saga(place_order, "s1", order_input(), NOW)
    transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY)
    transition.start()
    (command,) = transition.messages
    step = place_order.steps[0]
    assert command.envelope.headers[LAST_ATTEMPT_HEADER] == str(step.retry.max_attempts)

    reply = command.envelope.reply(Outcome.SUCCESS)
    transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY)
    transition.on_reply(reply)
    (charge,) = transition.messages
    failure = charge.envelope.reply(Outcome.FAILURE, error="no money")
    transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY)
    transition.on_reply(failure)
    (release,) = transition.messages
    assert release.envelope.kind is MessageKind.COMPENSATION
    assert release.envelope.headers[LAST_ATTEMPT_HEADER] == str(
        step.compensation_retry.max_attempts
    )


def test_an_operator_retry_moves_the_last_attempt_with_the_fresh_budget() -> None:
    state = new_saga(place_order, "s1", order_input(), NOW)
    transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY, rng=random.Random(1))
    transition.start()
    step = place_order.steps[0]
    for attempt in range(1, step.retry.max_attempts):
        error = transition.messages[-1].envelope.reply(Outcome.ERROR, error="down")
        transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY)
        transition.on_reply(error)
        assert state.timer is not None
        transition = Transition(place_order, state, now=state.timer.due_at, topology=TOPOLOGY)
        transition.on_timer(state.timer)
        (command,) = transition.messages
        assert command.envelope.attempt == attempt + 1
        assert command.envelope.headers[LAST_ATTEMPT_HEADER] == str(step.retry.max_attempts)
    state.steps[step.name].attempt_base = step.retry.max_attempts  # what a retry does
    transition = Transition(place_order, state, now=NOW, topology=TOPOLOGY)
    transition._dispatch(step)
    (command,) = transition.messages
    assert command.envelope.headers[LAST_ATTEMPT_HEADER] == str(2 * step.retry.max_attempts)


def poisoned() -> Worker:
    worker = Worker("payment")

    @worker.command("charge_payment")
    async def charge(cmd: dict[str, object], ctx: HandlerContext) -> None:
        raise TypeError("handler bug")

    return worker


def command(attempt: int, last: int | None) -> Envelope:
    headers = {LAST_ATTEMPT_HEADER: str(last)} if last is not None else {}
    return Envelope(
        saga_id="s1",
        saga_name="place_order",
        saga_version=1,
        step="charge_payment",
        kind=MessageKind.COMMAND,
        name="charge_payment",
        attempt=attempt,
        headers=headers,
    )


async def handle(db: AsyncEngine, envelope: Envelope) -> tuple[list[str], list[Envelope]]:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    await transport.connect()
    runner = WorkerRunner(poisoned(), transport, SqlBarrier(db), topology=TOPOLOGY)
    delivery = FakeDelivery(Message(TOPOLOGY.commands("payment"), "s1", encode(envelope)))
    await runner.handle_delivery(delivery)
    await transport.close()
    return delivery.settled, envelopes(broker.drain(TOPOLOGY.replies))


async def test_a_handler_raising_before_the_last_attempt_is_retried(db: AsyncEngine) -> None:
    how, replies = await handle(db, command(attempt=3, last=4))
    assert how == ["ack"]
    assert [(r.outcome, r.error) for r in replies] == [(Outcome.ERROR, "TypeError: handler bug")]


async def test_a_handler_raising_on_the_last_attempt_replies_and_is_acknowledged(
    db: AsyncEngine,
) -> None:
    how, replies = await handle(db, command(attempt=4, last=4))
    # The saga hears of it (and gives up on the step); nothing is dead-lettered.
    assert [(r.outcome, r.error) for r in replies] == [(Outcome.ERROR, "TypeError: handler bug")]
    assert how == ["ack"]


async def test_without_the_header_a_worker_never_dead_letters_a_failing_attempt(
    db: AsyncEngine,
) -> None:
    how, _ = await handle(db, command(attempt=9, last=None))
    assert how == ["ack"]
