"""sagactl's operator commands: retry, cancel, dlq list/replay and stats.

The sagas are driven into the wanted state without workers: an Engine object applies
scripted replies and fires timers on a clock the test moves, so every state is exact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from pydantic import BaseModel
from sqlalchemy import select

from engine.client import SagaClient
from engine.clock import utc_now
from engine.database import create_engine, upgrade
from engine.definition import Saga, Step
from engine.messages import Envelope, Outcome, decode
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.states import SagaStatus
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.transport.memory import MemoryTransport
from sagas import order as order_sagas
from tests.test_cli import ORDER, assert_one_line_error, sagactl


class _Other(BaseModel):
    x: int


#: A saga only this module defines: ``--sagas tests.test_cli_operator`` loads it alone.
other_saga = Saga(
    name="other",
    version=1,
    input=_Other,
    steps=[Step(name="only", participant="nobody", command=lambda ctx: {})],
)


class Driver:
    """Plays the participants' part: replies to what the saga awaits, fires timers."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.now = utc_now()

    async def _with_engine(self, action: Any) -> Any:
        database = create_engine(f"sqlite:///{self.db}")
        try:
            engine = Engine(
                SqlSagaStore(database),
                MemoryTransport(),
                SagaRegistry([order_sagas.place_order]),
                clock=lambda: self.now,
            )
            return await action(engine, database)
        finally:
            await database.dispose()

    def start(self) -> str:
        async def go(engine: Engine, database: Any) -> str:
            client = SagaClient(engine.store, engine.registry, clock=lambda: self.now)
            return await client.start("place_order", ORDER)

        return asyncio.run(self._with_engine(go))

    def awaited(self, saga_id: str) -> Envelope:
        async def go(engine: Engine, database: Any) -> Envelope:
            async with database.connect() as conn:
                bodies = (
                    await conn.execute(
                        select(outbox.c.body).where(outbox.c.key == saga_id).order_by(outbox.c.id)
                    )
                ).scalars()
                return [decode(b.encode()) for b in bodies][-1]

        result: Envelope = asyncio.run(self._with_engine(go))
        return result

    def reply(self, saga_id: str, outcome: Outcome, error: str | None = None) -> None:
        message = self.awaited(saga_id)
        self.now += timedelta(seconds=1)

        async def go(engine: Engine, database: Any) -> None:
            assert await engine.handle_reply(message.reply(outcome, error=error))

        asyncio.run(self._with_engine(go))

    def fire(self) -> int:
        self.now += timedelta(hours=1)

        async def go(engine: Engine, database: Any) -> int:
            return await engine.fire_due_timers()

        fired: int = asyncio.run(self._with_engine(go))
        return fired

    def park(self) -> str:
        """A saga whose compensation (release_inventory) failed 8 times: parked."""
        saga_id = self.start()
        self.reply(saga_id, Outcome.SUCCESS)
        self.reply(saga_id, Outcome.FAILURE, error="card declined")
        for _ in range(7):
            self.reply(saga_id, Outcome.ERROR, error="inventory db down")
            assert self.fire() >= 1
        self.reply(saga_id, Outcome.ERROR, error="inventory db down")
        assert show(self.db, saga_id)["status"] == "parked"
        return saga_id


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "ops.db"

    async def migrate() -> None:
        engine = create_engine(f"sqlite:///{path}")
        await upgrade(engine)
        await engine.dispose()

    asyncio.run(migrate())
    return path


@pytest.fixture
def driver(db: Path) -> Driver:
    return Driver(db)


def ok(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def show(db: Path, saga_id: str) -> Any:
    return ok(sagactl(db, "--json", "show", saga_id))


def operator_entries(detail: Any) -> Iterator[dict[str, Any]]:
    return (h for h in detail["history"] if h["actor"] != "engine")


# -- retry ---------------------------------------------------------------------------


def test_retry_resumes_a_parked_saga_and_records_who_and_why(db: Path, driver: Driver) -> None:
    saga_id = driver.park()
    result = ok(
        sagactl(db, "retry", saga_id, "--reason", "db is back", "--actor", "alice", "--json")
    )
    assert result["saga_id"] == saga_id
    assert (result["action"], result["actor"], result["reason"]) == ("retry", "alice", "db is back")
    assert (result["previous_status"], result["status"]) == ("parked", "compensating")
    assert result["dispatched"] == [
        {
            "destination": "saga.commands.inventory",
            "step": "reserve_inventory",
            "kind": "compensation",
            "name": "release_inventory",
            "attempt": 9,
        }
    ]
    assert "attempt 9" in result["summary"]
    assert driver.awaited(saga_id).attempt == 9

    detail = show(db, saga_id)
    assert detail["status"] == "compensating"
    (entry,) = operator_entries(detail)
    assert (entry["event"], entry["actor"], entry["step"]) == (
        "retried",
        "alice",
        "reserve_inventory",
    )
    assert entry["detail"].startswith("reason: db is back; compensation of step")
    table = sagactl(db, "show", saga_id)
    assert table.exit_code == 0
    assert "│ alice " in next(line for line in table.stdout.splitlines() if "retried" in line)
    assert f"retried by alice: reason: db is back; {result['summary']}" in table.stdout

    driver.reply(saga_id, Outcome.SUCCESS)
    assert show(db, saga_id)["status"] == "compensated"
    assert_one_line_error(sagactl(db, "retry", saga_id), "is compensated", "nothing to retry")


def test_retry_human_output_and_default_actor(
    db: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.cli.app.getpass.getuser", lambda: "ops-user")
    saga_id = driver.park()
    result = sagactl(db, "retry", saga_id)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"saga {saga_id} retried by ops-user: parked -> compensating"
    assert "compensation of step 'reserve_inventory' dispatched as attempt 9" in lines[1]
    queued = "queued compensation release_inventory of step reserve_inventory (attempt 9)"
    assert queued in lines[2]
    (entry,) = operator_entries(show(db, saga_id))
    assert entry["actor"] == "ops-user"
    assert entry["detail"].startswith("no reason given; ")


def test_retry_refuses_a_running_saga_with_a_step_in_flight(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    assert_one_line_error(
        sagactl(db, "retry", saga_id),
        f"saga {saga_id} is running",
        "command of step 'reserve_inventory' (attempt 1) is in flight",
    )
    assert_one_line_error(sagactl(db, "--json", "retry", saga_id), "in flight")
    assert list(operator_entries(show(db, saga_id))) == []


def test_retry_refuses_a_completed_saga(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    for _ in range(3):
        driver.reply(saga_id, Outcome.SUCCESS)
    assert show(db, saga_id)["status"] == "completed"
    assert_one_line_error(sagactl(db, "retry", saga_id), "is completed: there is nothing to retry")


def test_retry_during_a_backoff_dispatches_now(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    driver.reply(saga_id, Outcome.ERROR, error="flaky")
    result = ok(sagactl(db, "--json", "retry", saga_id, "--actor", "bob"))
    assert (result["previous_status"], result["status"]) == ("running", "running")
    assert [(d["kind"], d["attempt"]) for d in result["dispatched"]] == [("command", 2)]


# -- cancel --------------------------------------------------------------------------


def test_cancel_compensates_a_running_saga(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    driver.reply(saga_id, Outcome.SUCCESS)  # reserved; the charge is in flight
    result = ok(
        sagactl(db, "cancel", saga_id, "--reason", "customer called", "--actor", "carol", "--json")
    )
    assert (result["previous_status"], result["status"]) == ("running", "compensating")
    assert result["summary"] == "compensating 'charge_payment', 'reserve_inventory'"
    assert [(d["step"], d["name"], d["attempt"]) for d in result["dispatched"]] == [
        ("charge_payment", "refund_payment", 1)
    ]
    detail = show(db, saga_id)
    steps = {s["name"]: s for s in detail["steps"]}
    assert steps["charge_payment"]["status"] == "compensating"
    assert "cancelled by carol" in steps["charge_payment"]["error"]
    assert detail["error"] == "cancelled by carol: customer called"
    (entry,) = operator_entries(detail)
    assert (entry["event"], entry["actor"]) == ("cancelled", "carol")
    assert entry["detail"] == "reason: customer called; " + result["summary"]
    assert "step_cancelled" in [h["event"] for h in detail["history"]]

    driver.reply(saga_id, Outcome.SUCCESS)  # refund (nothing was charged: null compensation)
    driver.reply(saga_id, Outcome.SUCCESS)  # release
    assert show(db, saga_id)["status"] == "compensated"
    assert_one_line_error(sagactl(db, "cancel", saga_id), "is compensated", "cannot cancel")


def test_cancel_human_output(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    result = sagactl(db, "cancel", saga_id, "--actor", "dave")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"saga {saga_id} cancelled by dave: running -> compensating"
    )
    assert "compensating 'reserve_inventory'" in result.stdout


def test_cancel_refuses_compensating_and_parked_sagas(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    driver.reply(saga_id, Outcome.FAILURE, error="out of stock")
    # Nothing ran before the failed step: the saga is compensated at once.
    assert_one_line_error(sagactl(db, "cancel", saga_id), "is compensated")
    compensating = driver.start()
    driver.reply(compensating, Outcome.SUCCESS)
    driver.reply(compensating, Outcome.FAILURE, error="declined")
    assert_one_line_error(
        sagactl(db, "cancel", compensating), "is compensating", "already compensating"
    )
    parked = driver.park()
    assert_one_line_error(sagactl(db, "cancel", parked), "is parked", "retry it instead")


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["retry", "cancel"])
def test_unknown_id_missing_database_and_unknown_definition(
    db: Path, driver: Driver, tmp_path: Path, command: str
) -> None:
    assert_one_line_error(sagactl(db, command, "no-such-id"), "no saga with id 'no-such-id'")
    assert_one_line_error(
        sagactl(tmp_path / "missing.db", command, "x"), "does not exist", "db upgrade"
    )
    saga_id = driver.start()
    assert_one_line_error(
        sagactl(db, "--sagas", "tests.test_cli_operator", command, saga_id),
        f"cannot {command} saga {saga_id}: unknown saga 'place_order' v1",
        "--sagas",
    )
    assert_one_line_error(sagactl(db, command, saga_id, "--actor", " "), "--actor")
    assert show(db, saga_id)["status"] == "running"


def test_a_cancelled_saga_lists_as_compensating(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    ok(sagactl(db, "--json", "cancel", saga_id))
    listed = ok(sagactl(db, "--json", "list", "--status", SagaStatus.COMPENSATING.value))
    assert [r["id"] for r in listed] == [saga_id]
