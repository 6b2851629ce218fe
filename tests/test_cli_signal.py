"""``sagactl signal``: the application's event completes a large order's approval.

As in tests/test_cli_operator.py, no workers run: an Engine object applies scripted
replies to the large order's commands and fires its timers on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from engine.cli import app
from engine.client import SagaClient
from engine.clock import utc_now
from engine.database import create_engine
from engine.messages import Envelope, MessageKind, Outcome, decode
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.transport.memory import MemoryTransport
from sagas.large_order import large_order
from sagas.order import place_order
from tests.helpers import migrated_sqlite
from tests.test_cli import ORDER, assert_one_line_error, sagactl


class Driver:
    """Plays the participants' part for large orders: answers every command not yet
    answered, fires due timers."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.now = utc_now()
        self.answered: set[str] = set()

    async def _with_engine(self, action: Any) -> Any:
        database = create_engine(f"sqlite:///{self.db}")
        try:
            engine = Engine(
                SqlSagaStore(database),
                MemoryTransport(),
                SagaRegistry([large_order, place_order]),
                clock=lambda: self.now,
            )
            return await action(engine, database)
        finally:
            await database.dispose()

    def start(self, saga: str = "large_order") -> str:
        async def go(engine: Engine, database: Any) -> str:
            client = SagaClient(engine.store, engine.registry, clock=lambda: self.now)
            return await client.start(saga, ORDER)

        return str(asyncio.run(self._with_engine(go)))

    def succeed(self, saga_id: str, kind: MessageKind = MessageKind.COMMAND) -> list[str]:
        """Answer SUCCESS to the saga's unanswered commands (or compensations); the
        steps answered, in the order they were sent."""
        self.now += timedelta(seconds=1)

        async def go(engine: Engine, database: Any) -> list[str]:
            async with database.connect() as conn:
                rows = (
                    await conn.execute(
                        select(outbox.c.message_id, outbox.c.body)
                        .where(outbox.c.key == saga_id)
                        .order_by(outbox.c.id)
                    )
                ).all()
            steps = []
            for message_id, body in rows:
                envelope: Envelope = decode(body.encode())
                if message_id in self.answered or envelope.kind is not kind:
                    continue
                self.answered.add(message_id)
                assert await engine.handle_reply(envelope.reply(Outcome.SUCCESS))
                steps.append(envelope.step)
            return steps

        answered: list[str] = asyncio.run(self._with_engine(go))
        return answered

    def fire(self, after: timedelta = timedelta(hours=1)) -> int:
        self.now += after

        async def go(engine: Engine, database: Any) -> int:
            return await engine.fire_due_timers()

        fired: int = asyncio.run(self._with_engine(go))
        return fired

    def waiting(self) -> str:
        """A large order at its approval: both branches of the group succeeded."""
        saga_id = self.start()
        assert sorted(self.succeed(saga_id)) == ["charge_payment", "reserve_inventory"]
        assert step(show(self.db, saga_id), "manager_approval")["status"] == "dispatched"
        return saga_id


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return migrated_sqlite(tmp_path / "signal.db")


@pytest.fixture
def driver(db: Path) -> Driver:
    return Driver(db)


@pytest.fixture
def eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """sagactl's consoles as wide as a standard terminal."""
    for console in (app.stdout, app.stderr):
        monkeypatch.setattr(console, "_width", 80)


def show(db: Path, saga_id: str) -> Any:
    result = sagactl(db, "--json", "show", saga_id)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def step(detail: Any, name: str) -> Any:
    return next(s for s in detail["steps"] if s["name"] == name)


def test_signal_completes_the_wait_and_the_saga_goes_on(
    db: Path, driver: Driver, eighty_columns: None
) -> None:
    saga_id = driver.waiting()
    decision = '{"approved": true, "by": "dana"}'
    result = sagactl(  # by its short id, as `sagactl list` shows it
        db, "signal", saga_id[:8], "manager_approval", "--payload", decision, "--actor", "dana"
    )
    assert result.exit_code == 0, result.output
    # Each on a line of its own, whole, within 80 columns.
    assert result.stdout.splitlines() == [
        f"saga {saga_id} signalled by dana: running -> running",
        "  step 'manager_approval' completed",
    ]
    assert max(len(line) for line in result.stdout.splitlines()) <= 80

    detail = show(db, saga_id)
    assert step(detail, "manager_approval")["reply"] == {"approved": True, "by": "dana"}
    assert step(detail, "check_approval")["reply"] == {"approved_by": "dana"}
    assert step(detail, "cooling_off")["status"] == "dispatched"  # its timer runs
    assert driver.fire() == 1
    assert driver.succeed(saga_id) == ["create_shipment"]
    assert show(db, saga_id)["status"] == "completed"

    table = sagactl(db, "show", saga_id)
    assert table.exit_code == 0
    assert "prepare[1]" in table.stdout
    assert "signal_received" in table.stdout

    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval"),
        f"saga {saga_id} is completed: it takes no signal now",
    )


def test_a_saga_in_its_cooling_off_delay_can_still_be_cancelled(db: Path, driver: Driver) -> None:
    saga_id = driver.waiting()  # reserve_inventory answered before charge_payment
    ok = sagactl(db, "signal", saga_id, "manager_approval", "--payload", '{"approved": true}')
    assert ok.exit_code == 0, ok.output
    result = sagactl(db, "--json", "cancel", saga_id, "--actor", "erin", "--reason", "changed mind")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"] == (
        "compensating 'charge_payment', 'reserve_inventory'"
    )
    detail = show(db, saga_id)
    assert step(detail, "cooling_off")["status"] == "cancelled"
    # One compensation at a time, the latest completed first.
    assert driver.succeed(saga_id, MessageKind.COMPENSATION) == ["charge_payment"]
    assert driver.succeed(saga_id, MessageKind.COMPENSATION) == ["reserve_inventory"]
    detail = show(db, saga_id)
    assert detail["status"] == "compensated"
    assert step(detail, "check_approval")["status"] == "succeeded"  # nothing to undo
    assert driver.fire() == 0  # the delay's timer went with the cancel


def test_signal_json_kept_before_the_wait_then_a_rejection_compensates(
    db: Path, driver: Driver, tmp_path: Path
) -> None:
    saga_id = driver.start()
    payload = tmp_path / "decision.json"
    payload.write_text(json.dumps({"approved": False, "reason": "over budget"}))
    result = sagactl(
        db, "--json", "signal", saga_id, "manager_approval", "--payload", f"@{payload}",
        "--actor", "dana",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["action"], out["actor"]) == ("signal", "dana")
    assert (out["previous_status"], out["status"]) == ("running", "running")
    assert out["summary"] == "kept for step 'manager_approval', which the saga has not reached yet"
    assert out["dispatched"] == []

    # Once the group succeeds, the kept rejection fails the check: the saga compensates.
    driver.succeed(saga_id)
    detail = show(db, saga_id)
    assert detail["status"] == "compensating"
    assert detail["error"] == "step 'check_approval' failed: rejected by the manager: over budget"
    entries = [h for h in detail["history"] if h["event"] == "signal_received"]
    assert [(h["actor"], h["step"]) for h in entries] == [("dana", "manager_approval")]

    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval"),
        f"saga {saga_id} is compensating: it takes no signal now",
    )


def test_signal_errors(db: Path, driver: Driver, tmp_path: Path, eighty_columns: None) -> None:
    saga_id = driver.waiting()
    assert_one_line_error(
        sagactl(db, "signal", saga_id, "approval"),
        "saga 'large_order' v1 waits for no event 'approval' (it waits for: manager_approval)",
    )
    order = driver.start("place_order")
    assert_one_line_error(
        sagactl(db, "signal", order, "manager_approval"),
        "saga 'place_order' v1 waits for no event 'manager_approval' (it has no wait step)",
    )
    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval", "--payload", "{nope"),
        "invalid JSON for --payload",
    )
    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval", "--payload", "[true]"),
        "--payload must be a JSON object",
    )
    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval", "--payload", f"@{tmp_path}/none"),
        "payload file",  # "cannot read payload file" (--payload @file)
    )
    assert_one_line_error(sagactl(db, "signal", saga_id, "e" * 1000), "the event name")
    assert_one_line_error(
        sagactl(db, "signal", "no-such-id", "manager_approval"), "no saga with id 'no-such-id'"
    )
    # None of that touched the waiting saga; a second signal after the first is refused.
    assert step(show(db, saga_id), "manager_approval")["status"] == "dispatched"
    ok = sagactl(db, "signal", saga_id, "manager_approval", "--payload", '{"approved": true}')
    assert ok.exit_code == 0, ok.output
    assert_one_line_error(
        sagactl(db, "signal", saga_id, "manager_approval"),
        f"saga {saga_id} has already had its signal 'manager_approval'",
    )
