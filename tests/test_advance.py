"""The one unit of work that advances sagas (engine/advance.py): the only place a
transition is made, and batches that cost the database the same few statements
whatever their size."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event

import engine
from engine.advance import Advancer
from engine.client import SagaClient
from engine.messages import Envelope, Outcome, decode
from engine.registry import SagaRegistry
from engine.states import SagaStatus
from engine.store.sql import SqlSagaStore
from tests.helpers import fast_order_saga, history_events, order_input

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 30.0


def test_transition_is_constructed_in_the_advance_module_only() -> None:
    # Every event source goes through engine/advance.py: a second place that makes
    # a Transition would be a second copy of load, decide, trace, write, count, wake.
    root = Path(engine.__file__).parent
    places: list[str] = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name == "Transition":
                    places.append(f"{path.relative_to(root.parent).as_posix()}:{node.lineno}")
    assert places, "no Transition( found at all: the walk is broken"
    assert all(p.startswith("engine/advance.py:") for p in places), places


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@contextmanager
def statements(store: SqlSagaStore) -> Iterator[list[str]]:
    """The SQL statements the store sends while inside."""
    sent: list[str] = []

    def count(*args: Any) -> None:
        sent.append(str(args[2]).split(None, 1)[0])

    event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", count)


async def _commands(store: SqlSagaStore, at: datetime) -> list[Envelope]:
    """The unsent commands, marked sent at ``at``."""
    async with store.transaction() as tx:
        rows = await tx.claim_outbox(1000)
        await tx.mark_sent([r.id for r in rows], at)
    return [decode(r.body) for r in rows]


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    any_store: SqlSagaStore,
) -> None:
    store = any_store
    saga = fast_order_saga(timeout=TIMEOUT)
    registry = SagaRegistry([saga])
    clock = Clock()
    client = SagaClient(store, registry, clock=clock)
    advancer = Advancer(registry, clock=clock)
    replies: dict[int, list[str]] = {}
    timers: dict[int, list[str]] = {}
    for size in (2, 8):
        clock.now = NOW
        ids = [await client.start(saga, order_input()) for _ in range(size)]
        reserved = [
            c.reply(Outcome.SUCCESS, payload={"reservation": f"r-{c.saga_id}"})
            for c in await _commands(store, clock.now)
        ]
        with statements(store) as replies[size]:
            async with store.transaction() as tx:
                results, changed = await advancer.replies(tx, reserved)
        assert len(results) == len(changed) == size
        # Every charge command went out at once and got no reply: each step times out.
        assert len(await _commands(store, clock.now)) == size
        clock.now = NOW + timedelta(seconds=TIMEOUT + 1)
        with statements(store) as timers[size]:
            async with store.transaction() as tx:
                fired, changed = await advancer.timers(tx, clock.now, 100)
        assert fired == len(changed) == size
        for saga_id in ids:
            detail = await store.get_saga(saga_id)
            assert detail is not None and detail.status is SagaStatus.COMPENSATING
            assert history_events(detail, "step_timed_out") == ["charge_payment"]
        assert len(await _commands(store, clock.now)) == size  # the compensations
    assert len(replies[8]) == len(replies[2]), (replies[2], replies[8])
    # A timeout asks, for its own saga, whether its command went out late (two reads);
    # the rest (due timers, sagas, writes) is the same few statements for any number.
    assert len(timers[8]) - len(timers[2]) <= 2 * (8 - 2), (timers[2], timers[8])
