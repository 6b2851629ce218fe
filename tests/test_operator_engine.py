"""Operator repair against a running system: engine and example workers on SQLite and
the in-memory broker, judged by the participants' ledgers."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from engine.advance import Advancer
from engine.definition import RetryPolicy, Saga
from engine.errors import DeadLetterNotFoundError, OperationRefused
from engine.messages import decode, encode
from engine.registry import SagaRegistry
from engine.states import SagaStatus, StepStatus
from engine.store.schema import outbox
from engine.transport.base import DEAD_LETTER_ID, DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.transport.memory import MemoryTransport
from engine.views import SagaDetail
from engine.worker.worker import Registration, Worker
from sagas.order import place_order
from tests.helpers import (
    EXAMPLE_WORKERS,
    FAST_RETRY,
    QUANTITY,
    EmbeddedSystem,
    assert_books_balance,
    history_events,
    order_input,
)
from workers import inventory

#: Three quick compensation attempts, then the saga parks.
SHORT_COMPENSATION = RetryPolicy(max_attempts=3, initial_backoff=0.02, max_backoff=0.05, jitter=0)


def short_saga() -> Saga:
    return Saga(
        name=place_order.name,
        version=place_order.version,
        input=place_order.input,
        steps=[
            replace(s, retry=FAST_RETRY, compensation_retry=SHORT_COMPENSATION)
            for s in place_order.steps
        ],
    )


class Breakable:
    """A copy of a worker whose handler ``name`` raises while ``broken`` is set."""

    def __init__(self, worker: Worker, name: str) -> None:
        self.broken = True
        self.calls = 0
        self.worker = Worker(worker.name)
        for key, reg in worker.handlers.items():
            self.worker.handlers[key] = self._wrap(reg) if reg.name == name else reg

    def _wrap(self, reg: Registration) -> Registration:
        async def handler(command: Any, context: Any) -> Any:
            self.calls += 1
            if self.broken:
                raise RuntimeError(f"{reg.name} is broken")
            return await reg.handler(command, context)

        return Registration(reg.name, reg.kind, reg.model, handler)


async def test_operator_retry_completes_a_saga_parked_by_a_failing_compensation(
    tmp_path: Path,
) -> None:
    release = Breakable(inventory.worker, "release_inventory")
    workers = {**EXAMPLE_WORKERS, "inventory": release.worker}
    async with EmbeddedSystem(tmp_path / "retry.db", sagas=[short_saga()], workers=workers) as sys:
        saga_id = await sys.start_order("charge_payment")  # reserve, then the charge fails
        parked = await sys.wait_status(
            saga_id, lambda d: d.status is SagaStatus.PARKED, 10, "the saga to park"
        )
        assert release.calls == 3
        assert "compensation of step 'reserve_inventory' failed 3 times" in (parked.error or "")
        assert (await sys.effects())[saga_id].reserved == QUANTITY  # not undone yet

        release.broken = False  # the participant is repaired
        result = await sys.client.retry(saga_id, actor="alice", reason="inventory fixed")
        assert result.status is SagaStatus.COMPENSATING
        assert [d.attempt for d in result.dispatched] == [4]
        final = await sys.wait_status(
            saga_id, lambda d: d.status is SagaStatus.COMPENSATED, 10, "the compensation"
        )
        assert release.calls == 4
        assert_books_balance(final, await sys.effects())
        retried = [h for h in final.history if h.event == "retried"]
        assert [(h.actor, h.step) for h in retried] == [("alice", "reserve_inventory")]
        assert (retried[0].detail or "").startswith("reason: inventory fixed; ")
        assert history_events(final, "step_compensated") == ["reserve_inventory"]
        totals = await sys.totals()
        assert totals.stock_conserved and totals.money_conserved


async def test_operator_cancel_undoes_the_step_in_flight_and_the_books_balance(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(
        tmp_path / "cancel.db", run_workers=["inventory", "shipment"]
    ) as system:
        saga_id = await system.start_order()

        def charging(d: SagaDetail) -> bool:
            return any(s.name == "charge_payment" and s.attempts == 1 for s in d.steps)

        await system.wait_status(saga_id, charging, 10, "the charge to be dispatched")
        result = await system.client.cancel(saga_id, actor="bob", reason="fraud suspected")
        assert result.summary == "compensating 'charge_payment', 'reserve_inventory'"
        # Only now does the payment participant run: it sees the charge, then the refund.
        await system.start_worker("payment")
        final = await system.wait_status(
            saga_id, lambda d: d.status.is_terminal, 10, "the cancelled saga to settle"
        )
        assert final.status is SagaStatus.COMPENSATED
        assert final.error == "cancelled by bob: fraud suspected"
        steps = {s.name: s.status for s in final.steps}
        assert steps == {
            "reserve_inventory": StepStatus.COMPENSATED,
            "charge_payment": StepStatus.COMPENSATED,
            "create_shipment": StepStatus.PENDING,
        }
        assert history_events(final, "step_compensated") == [
            "charge_payment",
            "reserve_inventory",
        ]
        effect = (await system.effects()).get(saga_id)
        assert effect is not None
        assert (effect.reserved, effect.net_charged_cents, effect.shipped) == (0, 0, False)
        assert effect.charges == effect.refunds <= 1
        totals = await system.totals()
        assert totals.stock_conserved and totals.money_conserved
        assert totals.charged_cents - totals.refunded_cents == 0


# -- the dead-letter archive ------------------------------------------------------------

#: A saga this engine does not know until the test "deploys" it.
legacy = Saga(
    name="legacy",
    version=1,
    input=place_order.input,
    steps=[replace(place_order.steps[0], retry=FAST_RETRY)],
)


async def test_a_reply_of_a_saga_no_engine_serves_is_kept_until_one_is_deployed(
    tmp_path: Path,
) -> None:
    """Before definition fingerprints such a reply was a dead letter an operator had
    to replay; now its saga is held, visibly, and resumes by itself once deployed."""
    async with EmbeddedSystem(tmp_path / "held.db") as system:
        # Started by a deployment that loads it (the one write path, as its client).
        starter = Advancer(SagaRegistry([legacy]), wake=system._wake)
        saga_id = "legacy-1"
        data = legacy.parse_input(order_input()).model_dump(mode="json")
        await starter.start(system.store, legacy, saga_id, data)
        held = await system.wait_status(
            saga_id, lambda d: d.held is not None, 10, "the saga to be held"
        )
        why = "no running engine loads legacy v1 (this one loads no version of it)"
        assert (held.status, held.held) == (SagaStatus.RUNNING, why)
        assert [(h.event, h.detail) for h in held.history][1:] == [("held", why)]
        assert await system.client.dead_letters() == []
        assert [h.model_dump() for h in (await system.client.stats()).held] == [
            {"name": "legacy", "version": 1, "count": 1, "reason": why}
        ]
        assert [s.id for s in await system.client.list(held=True)] == [saga_id]

        system.registry.register(legacy)  # the definition is deployed
        final = await system.wait_status(
            saga_id, lambda d: d.status is SagaStatus.COMPLETED, 10, "the held saga to resume"
        )
        assert final.held is None
        assert [h.event for h in final.history] == [
            "started",
            "held",
            "resumed",
            "step_succeeded",
            "completed",
        ]
        assert "1 kept reply applied" in (final.history[2].detail or "")
        assert await system.client.dead_letters() == []
        assert (await system.effects())[saga_id].reserved == QUANTITY


async def test_an_undecodable_command_is_archived_and_a_replay_sends_it_round_again(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(tmp_path / "garbage.db") as system:
        await _publish(system, [Message("saga.commands.inventory", "k1", b"{not json")])
        (letter,) = await system.dead_letters(1)
        assert letter.source == "saga.commands.inventory"
        assert letter.reason.startswith("not a saga envelope")
        assert (letter.saga_id, letter.kind, letter.body) == (None, None, "{not json")
        result = await system.client.replay_dead_letter(letter.id, actor="carol")
        assert result.saga_id is None
        first, again = await system.dead_letters(2)
        assert first.id == letter.id and first.replayed_by == "carol"
        assert (again.source, again.key, again.body, again.reason) == (
            letter.source,
            "k1",
            "{not json",
            letter.reason,
        )
        assert again.headers[DEAD_LETTER_ID] != letter.headers[DEAD_LETTER_ID]
        # The replay went out without the first dead-lettering's headers.
        assert again.replayed_at is None
        saga_id = await system.start_order()  # the worker kept going
        assert (await system.wait_all_terminal(10, [saga_id]))[saga_id].status is (
            SagaStatus.COMPLETED
        )


async def test_replay_refuses_a_binary_body_and_a_message_its_saga_no_longer_awaits(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(tmp_path / "refuse.db") as system:
        saga_id = await system.start_order()
        done = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert done.status is SagaStatus.COMPLETED
        async with system.db.connect() as conn:
            first = (await conn.execute(select(outbox.c.body).order_by(outbox.c.id))).scalar()
        stale = decode(str(first).encode())  # the saga's first command, long answered
        await _publish(
            system,
            [
                Message("saga.replies", "bin", b"\xff\xfe\x00binary"),
                # As a participant that could not take it would have dead-lettered it:
                Message(
                    "saga.dead-letters",
                    saga_id,
                    encode(stale),
                    {DEAD_LETTER_REASON: "handler crashed", DEAD_LETTER_SOURCE: "saga.commands.x"},
                ),
            ],
        )
        letters = {d.source: d for d in await system.dead_letters(2)}
        binary, command = letters["saga.replies"], letters["saga.commands.x"]
        assert binary.body_encoding == "base64"
        assert base64.b64decode(binary.body) == b"\xff\xfe\x00binary"
        with pytest.raises(OperationRefused, match="its body is not text"):
            await system.client.replay_dead_letter(binary.id, actor="dan")
        with pytest.raises(
            OperationRefused,
            match=(
                rf"dead letter {command.id} is a command reserve_inventory \(attempt 1\) of step "
                rf"'reserve_inventory' that saga {saga_id} no longer waits for \(it is completed "
                r"and waits for no reply\).*--force"
            ),
        ):
            await system.client.replay_dead_letter(command.id, actor="dan")
        forced = await system.client.replay_dead_letter(command.id, actor="dan", force=True)
        assert forced.destination == "saga.commands.x"
        history = [h.event for h in (await system.client.get(saga_id)).history]
        assert history[-2:] == ["dead_lettered", "dead_letter_replayed"]
        with pytest.raises(DeadLetterNotFoundError, match="no dead letter with id 999"):
            await system.client.replay_dead_letter(999, actor="dan")


async def test_a_redelivered_dead_letter_is_archived_once(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "once.db") as system:
        message = Message(
            "saga.dead-letters",
            "k",
            b"x",
            {DEAD_LETTER_ID: "abc", DEAD_LETTER_REASON: "r", DEAD_LETTER_SOURCE: "s"},
        )
        assert system.engine is not None
        first = await system.engine.archive.archive(message)
        assert first is not None
        assert await system.engine.archive.archive(message) is None
        # A dead letter from elsewhere (no headers of ours) is kept with what is known.
        bare = await system.engine.archive.archive(Message("saga.dead-letters", "k", b"y"))
        assert bare is not None and bare != first
        letters = await system.dead_letters(2)
        assert [(d.reason, d.source) for d in letters] == [("r", "s"), ("no reason given", "")]


async def _publish(system: EmbeddedSystem, messages: list[Message]) -> None:
    sender = MemoryTransport(system.broker)
    await sender.connect()
    await sender.publish(messages)
    await sender.close()
