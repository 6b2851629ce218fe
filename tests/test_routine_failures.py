"""Routine failures are not dead letters (issue 12): a handler that keeps raising until
its step is out of attempts, and a command no handler of its worker takes, fail the
step (the saga compensates) and reach no dead-letter queue; the failure names its cause.
Only messages nobody can take are dead letters (tests/test_barrier.py, test_engine.py)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine.messages import MessageKind
from engine.states import SagaStatus, StepStatus
from engine.worker.worker import Registration, Worker
from tests.helpers import (
    EXAMPLE_WORKERS,
    FAST_RETRY,
    ORDER_STEPS,
    EmbeddedSystem,
    assert_compensated_in_reverse,
    fast_order_saga,
    history_events,
)


def without(worker: Worker, name: str, *, raising: bool) -> Worker:
    """A copy of ``worker`` whose command ``name`` always raises, or is not handled."""
    copy = Worker(worker.name)
    copy.handlers.update(worker.handlers)
    key = (MessageKind.COMMAND, name)
    original = copy.handlers.pop(key)
    if raising:
        calls: Counter[str] = Counter()

        async def broken(command: Any, context: Any) -> Any:
            calls[context.saga_id] += 1
            raise RuntimeError("provider down")

        copy.handlers[key] = Registration(original.name, original.kind, original.model, broken)
        copy.calls = calls  # type: ignore[attr-defined]
    return copy


async def no_dead_letters(system: EmbeddedSystem) -> None:
    """Nothing reached the dead-letter queue, nor its archive, once all is quiet."""
    await system.quiesce(10)
    assert system.broker.depth(system.topology.dead_letters) == 0
    assert await system.dead_letters() == []


async def test_a_step_out_of_retries_fails_and_compensates_without_a_dead_letter(
    tmp_path: Path,
) -> None:
    payment = without(EXAMPLE_WORKERS["payment"], "charge_payment", raising=True)
    workers = {**EXAMPLE_WORKERS, "payment": payment}
    async with EmbeddedSystem(
        tmp_path / "s.db", sagas=[fast_order_saga()], workers=workers
    ) as system:
        saga_id = await system.start_order()
        detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        assert detail.status is SagaStatus.COMPENSATED, detail.error
        attempts = FAST_RETRY.max_attempts
        assert payment.calls[saga_id] == attempts  # type: ignore[attr-defined]
        assert detail.error == (
            f"step 'charge_payment' failed after {attempts} attempts: RuntimeError: provider down"
        )
        # Only the last attempt is known to have rolled back: the step is compensated
        # too (a no-op at the barrier), then the one before it.
        assert history_events(detail, "step_compensated") == ["charge_payment", "reserve_inventory"]
        assert_compensated_in_reverse(detail)
        await no_dead_letters(system)


async def test_a_command_without_handler_fails_its_step_at_once_naming_the_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipment = without(EXAMPLE_WORKERS["shipment"], "create_shipment", raising=False)
    workers = {**EXAMPLE_WORKERS, "shipment": shipment}
    # A step timeout far beyond the wait below: only the worker's reply can end it.
    async with EmbeddedSystem(
        tmp_path / "s.db", sagas=[fast_order_saga(timeout=600)], workers=workers
    ) as system:
        with caplog.at_level(logging.ERROR, logger="saga.worker"):
            saga_id = await system.start_order()
            detail = (await system.wait_all_terminal(10, [saga_id]))[saga_id]
        cause = "worker 'shipment' has no handler for command 'create_shipment'"
        assert detail.status is SagaStatus.COMPENSATED, detail.error
        assert detail.error == f"step 'create_shipment' failed: {cause}"
        steps = {s.name: s for s in detail.steps}
        assert steps["create_shipment"].status is StepStatus.FAILED
        assert steps["create_shipment"].error == cause
        assert history_events(detail, "step_compensated") == list(reversed(ORDER_STEPS[:2]))
        assert f"{cause} (saga {saga_id})" in caplog.messages
        await no_dead_letters(system)
