"""sagactl's operator commands: retry, cancel, dlq list/replay and stats.

The sagas are driven into the wanted state without workers: an Engine object applies
scripted replies and fires timers on a clock the test moves, so every state is exact.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from pydantic import BaseModel
from rich.console import Console
from sqlalchemy import select

from engine.client import SagaClient
from engine.clock import utc_now
from engine.database import create_engine
from engine.deadletters import DeadLetterArchive
from engine.definition import Saga, Step
from engine.messages import Envelope, Outcome, decode, encode
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.signing import KEY_HEADER, REPLAY_HEADER, SIGNATURE_HEADER
from engine.states import SagaStatus
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.transport.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.transport.memory import MemoryTransport
from sagas import order as order_sagas
from tests.helpers import migrated_sqlite
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
    return migrated_sqlite(tmp_path / "ops.db")


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
    # Piped, the history row is whole on one line: its actor and its full detail.
    row = next(line for line in table.stdout.splitlines() if "retried" in line)
    assert re.search(r"  retried +reserve_inventory +alice +reason: db is back; ", row), row
    assert row.endswith(result["summary"]), row
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


# -- dead letters --------------------------------------------------------------------


def archive(db: Path, *messages: Message) -> list[int]:
    async def go() -> list[int]:
        database = create_engine(f"sqlite:///{db}")
        try:
            keeper = DeadLetterArchive(SqlSagaStore(database))
            ids = [await keeper.archive(m) for m in messages]
        finally:
            await database.dispose()
        assert all(i is not None for i in ids)
        return [i for i in ids if i is not None]

    return asyncio.run(go())


def letter(body: bytes, reason: str, source: str = "saga.commands.inventory") -> Message:
    headers = {DEAD_LETTER_REASON: reason, DEAD_LETTER_SOURCE: source, "traceparent": "00-x"}
    return Message("saga.dead-letters", "key-1", body, headers)


def test_dlq_list_shows_reasons_newest_first(
    db: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    saga_id = driver.start()
    reply = driver.awaited(saga_id).reply(Outcome.SUCCESS)
    first, second = archive(
        db,
        letter(b"{garbage", "not a saga envelope: body: Invalid JSON"),
        letter(encode(reply), "unknown saga 'place_order' v1", source="saga.replies"),
    )
    rows = ok(sagactl(db, "dlq", "list", "--json"))
    assert [r["id"] for r in rows] == [second, first]
    newest, oldest = rows
    assert newest["reason"] == "unknown saga 'place_order' v1"
    assert (newest["source"], newest["saga_id"], newest["kind"], newest["step"]) == (
        "saga.replies",
        saga_id,
        "reply",
        "reserve_inventory",
    )
    assert (oldest["body"], oldest["body_encoding"], oldest["saga_id"]) == (
        "{garbage",
        "utf-8",
        None,
    )
    assert oldest["headers"]["traceparent"] == "00-x"
    assert [r["id"] for r in ok(sagactl(db, "--json", "dlq", "list", "--limit", "1"))] == [second]

    terminal = Console(soft_wrap=False, width=250, force_terminal=True, color_system=None)
    monkeypatch.setattr("engine.cli.app.stdout", terminal)
    table = sagactl(db, "dlq", "list")
    assert table.exit_code == 0
    assert "2 dead letter(s), newest first" in table.stdout
    assert "(not an envelope)" in table.stdout
    assert saga_id[:8] in table.stdout
    # In a pipe: a header and one whole line per letter, newest first, no border.
    monkeypatch.setattr("engine.cli.app.stdout", Console(soft_wrap=False, width=80))
    piped = sagactl(db, "dlq", "list")
    assert piped.exit_code == 0, piped.output
    header, *rows = piped.stdout.splitlines()
    assert header.split() == ["id", "received", "source", "saga", "message", "reason", "replayed"]
    assert [row.split()[0] for row in rows] == [str(second), str(first)]
    assert re.search(r"  unknown saga 'place_order' v1 +-$", rows[0]), rows[0]
    assert "(not an envelope)" in rows[1] and not set("│┃─━") & set("".join(rows))
    # The saga itself recorded the dead letter.
    entries = [h for h in show(db, saga_id)["history"] if h["event"] == "dead_lettered"]
    assert len(entries) == 1 and "unknown saga 'place_order' v1" in entries[0]["detail"]


def test_dlq_replay_queues_the_body_for_its_source_once(db: Path, driver: Driver) -> None:
    (garbage,) = archive(db, letter(b"{garbage", "not a saga envelope"))
    before = ok(sagactl(db, "--json", "stats"))["outbox"]["unsent"]
    result = ok(
        sagactl(db, "--json", "dlq", "replay", str(garbage), "--actor", "erin", "--reason", "why")
    )
    assert (result["destination"], result["actor"], result["reason"]) == (
        "saga.commands.inventory",
        "erin",
        "why",
    )
    assert result["dead_letter"]["replayed_by"] == "erin"
    stats = ok(sagactl(db, "--json", "stats"))
    assert stats["outbox"]["unsent"] == before + 1  # the relay of an engine publishes it
    assert stats["dead_letters"] == {"not_replayed": 0, "total": 1}
    assert ok(sagactl(db, "--json", "dlq", "list", "--pending")) == []
    assert_one_line_error(
        sagactl(db, "dlq", "replay", str(garbage)), f"dead letter {garbage} was already replayed"
    )


def test_dlq_replay_sends_as_archived_unless_re_signed(db: Path, driver: Driver) -> None:
    """A replay never has the engine sign a message blindly (it could be a forgery a
    worker refused): it goes with its own signature, or none; --re-sign vouches."""
    signed = {KEY_HEADER: "k0", SIGNATURE_HEADER: "ab" * 32}
    kept, vouched = archive(
        db,
        *(
            Message("saga.dead-letters", "key-1", b"{garbage", {**m.headers, **signed})
            for m in [letter(b"{garbage", "unknown signing key k0 on command")] * 2
        ),
    )
    ok(sagactl(db, "--json", "dlq", "replay", str(kept)))
    ok(sagactl(db, "--json", "dlq", "replay", str(vouched), "--re-sign"))

    async def rows() -> list[dict[str, str]]:
        database = create_engine(f"sqlite:///{db}")
        try:
            async with database.connect() as conn:
                query = select(outbox.c.headers).order_by(outbox.c.id)
                return list((await conn.execute(query)).scalars())
        finally:
            await database.dispose()

    as_archived, re_signed = asyncio.run(rows())
    assert as_archived == {"traceparent": "00-x", **signed, REPLAY_HEADER: str(kept)}
    assert re_signed == {"traceparent": "00-x"}  # the engine's relay signs it


def test_dlq_replay_human_output_and_errors(db: Path, driver: Driver, tmp_path: Path) -> None:
    saga_id = driver.start()
    for _ in range(3):
        driver.reply(saga_id, Outcome.SUCCESS)
    command = driver.awaited(saga_id)  # the last command: the saga no longer waits for it
    stale, binary = archive(
        db, letter(encode(command), "handler crashed"), letter(b"\xff\x00", "binary")
    )
    assert_one_line_error(
        sagactl(db, "dlq", "replay", str(stale)), "no longer waits for", "--force"
    )
    assert_one_line_error(sagactl(db, "dlq", "replay", str(binary)), "its body is not text")
    assert_one_line_error(sagactl(db, "dlq", "replay", "999"), "no dead letter with id 999")
    assert_one_line_error(
        sagactl(tmp_path / "none.db", "dlq", "list"), "does not exist", "db upgrade"
    )
    usage = sagactl(db, "dlq", "replay", "not-a-number")
    assert usage.exit_code == 2 and "Traceback" not in usage.output
    forced = sagactl(db, "dlq", "replay", str(stale), "--force", "--actor", "frank")
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.splitlines() == [
        f"dead letter {stale} (command create_shipment #1) queued for saga.commands.inventory "
        "by frank",
        f"  recorded in the history of saga {saga_id}",
    ]
    (entry,) = [h for h in show(db, saga_id)["history"] if h["event"] == "dead_letter_replayed"]
    assert entry["actor"] == "frank"
    assert entry["detail"].startswith("no reason given; dead letter")


# -- stats ---------------------------------------------------------------------------


def test_stats_counts_states_oldest_running_backlog_and_dead_letters(
    db: Path, driver: Driver
) -> None:
    empty = ok(sagactl(db, "--json", "stats"))
    assert empty["total"] == 0 and empty["oldest_running"] is None
    assert empty["outbox"] == {"unsent": 0, "oldest_unsent_age_seconds": None}

    parked = driver.park()  # first: parking moves the driver's clock by hours
    completed = driver.start()
    for _ in range(3):
        driver.reply(completed, Outcome.SUCCESS)
    oldest = driver.start()
    archive(db, letter(b"x", "poison"))
    stats = ok(sagactl(db, "stats", "--json"))
    assert stats["total"] == 3
    assert stats["by_status"] == {
        "running": 1,
        "compensating": 0,
        "completed": 1,
        "compensated": 0,
        "parked": 1,
    }
    assert stats["by_saga"] == {"place_order": {"completed": 1, "parked": 1, "running": 1}}
    assert stats["oldest_running"]["id"] == oldest
    assert stats["oldest_running"]["status"] == "running"
    assert stats["oldest_running"]["age_seconds"] >= 0
    # No relay ran: every command of the three sagas is still in the outbox.
    assert stats["outbox"]["unsent"] == 1 + 3 + 2 + 8
    assert stats["outbox"]["oldest_unsent_age_seconds"] >= 0
    assert stats["dead_letters"] == {"not_replayed": 1, "total": 1}
    assert stats["replies_deferred"] == 0
    assert parked != oldest

    table = sagactl(db, "stats")
    assert table.exit_code == 0, table.output
    assert "3 saga(s)" in table.stdout
    assert "place_order" in table.stdout
    assert f"oldest running: {oldest} (place_order, running)" in table.stdout
    assert "outbox backlog: 14 unsent" in table.stdout
    assert "dead letters: 1 not replayed (1 archived)" in table.stdout
    assert "replies set aside (saga not visible yet): 0" in table.stdout


def test_stats_needs_a_migrated_database(tmp_path: Path) -> None:
    assert_one_line_error(sagactl(tmp_path / "no.db", "stats"), "does not exist")
    empty = tmp_path / "empty.db"
    empty.touch()
    assert_one_line_error(sagactl(empty, "--json", "stats"), "has no saga tables")
