"""``sagactl`` at 80 columns and in pipes (issue 13): short ids and plain columns in
``list``, relative times, ``--output jsonl``, ``show --follow``, ``start --wait``,
``--input -``, ``dlq show`` and what a saga awaits.

No engine runs: the Driver of tests/test_cli_operator.py plays the participants,
from a thread where a command must wait for a saga to move.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from engine.cli import app
from engine.cli.app import EXIT_COMPENSATED, EXIT_TIMEOUT, cli
from engine.client import SagaClient
from engine.database import create_engine
from engine.messages import Outcome
from engine.store.sql import SqlSagaStore
from tests.e2e import fresh_database, service_url
from tests.helpers import migrated_sqlite
from tests.test_cli import ORDER, assert_one_line_error
from tests.test_cli_operator import Driver, archive, letter

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
BORDERS = set("│┃─━┏┓└┘")


def ctl(db: Path | str, *args: str, input: str | None = None) -> Result:
    """``sagactl`` as a pipe sees it: stdout and stdin no terminal, COLUMNS=80."""
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return CliRunner(env={"COLUMNS": "80"}).invoke(
        cli, ["--database-url", url, *args], input=input, prog_name="sagactl"
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return migrated_sqlite(tmp_path / "reads.db")


@pytest.fixture
def driver(db: Path) -> Driver:
    return Driver(db)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """sagactl's stdout a terminal 80 columns wide (without colour, to read it)."""
    console = Console(soft_wrap=False, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(app, "stdout", console)


@contextmanager
def meanwhile(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` in a thread while the block runs a command; its failure fails
    the test."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    thread.join(timeout=60)
    assert not thread.is_alive(), "the driver thread did not finish"
    if errors:
        raise errors[0]


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for ``condition``, checking every 20 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def stored(db: Path, saga_id: str) -> bool:
    """Whether the saga is in the database (read directly: CliRunner swaps the
    process's stdout, so it must not run in two threads at once)."""

    async def go() -> bool:
        database = create_engine(f"sqlite:///{db}")
        try:
            return await SqlSagaStore(database).get_saga(saga_id) is not None
        finally:
            await database.dispose()

    return asyncio.run(go())


def test_list_in_a_pipe_is_one_plain_line_per_saga(db: Path, driver: Driver) -> None:
    ids = [driver.start() for _ in range(3)]
    driver.reply(ids[0], Outcome.FAILURE, error="out of stock [/]\nsorry")

    lines = ok(ctl(db, "list")).splitlines()
    assert lines[0].split() == ["id", "saga", "status", "created", "ran"]
    assert len(lines) == 1 + 3  # a header, one line per saga
    assert all(len(line) <= 80 for line in lines)
    assert not BORDERS & set("".join(lines)) and "\x1b" not in "".join(lines)
    for saga_id in ids:
        (line,) = [x for x in lines if x.startswith(saga_id[:8] + "  ")]  # the short id
        assert "place_order v1" in line
        assert "just now" in line or re.search(r"\d+s ago", line), line
    assert "compensated" in next(x for x in lines if x.startswith(ids[0][:8]))

    wide = ok(ctl(db, "list", "--wide")).splitlines()
    assert wide[0].split() == ["id", "saga", "status", "created", "updated", "ran", "error"]
    failed = next(x for x in wide if x.startswith(ids[0]))  # the whole id
    assert failed.endswith("step 'reserve_inventory' failed: out of stock [/]\\nsorry")

    iso = ok(ctl(db, "list", "--time-format", "iso")).splitlines()
    assert all(len(ISO.findall(line)) == 1 for line in iso[1:])
    raw = ok(ctl(db, "--time-format", "raw", "list", "--wide")).splitlines()
    assert all(line.count("+00:00") == 2 for line in raw[1:])

    long_id = "order-2026-11-30-customer-alice-0001"  # no UUID: shown whole, never cut
    ok(ctl(db, "start", "place_order", "--input", json.dumps(ORDER), "--id", long_id))
    lines = ok(ctl(db, "list")).splitlines()
    assert len(lines) == 1 + 4 and lines[1].startswith(long_id + "  ")  # newest first

    rows = [json.loads(x) for x in ok(ctl(db, "list", "-o", "jsonl")).splitlines()]
    assert rows[0]["id"] == long_id and {r["id"] for r in rows[1:]} == set(ids)
    assert all(r["created_at"].endswith("Z") for r in rows)
    assert json.loads(ok(ctl(db, "list", "--json"))) == rows  # --json unchanged
    assert json.loads(ok(ctl(db, "list", "-o", "jsonl", "--json"))) == rows  # last wins


def test_list_on_a_terminal_cuts_long_values_to_80_columns(
    db: Path, driver: Driver, terminal: None
) -> None:
    saga_id = driver.start()
    long_id = "order-2026-11-30-customer-alice-0001-" + "x" * 20
    result = ctl(db, "start", "place_order", "--input", json.dumps(ORDER), "--id", long_id[:36])
    ok(result)
    out = ok(ctl(db, "list"))
    lines = out.splitlines()
    assert lines[0].startswith("2 saga(s), newest first")
    assert all(len(line) <= 80 for line in lines), out
    assert any(saga_id[:8] in line for line in lines)
    assert any("…" in line and long_id[:8] in line for line in lines), out


def test_show_says_what_the_saga_awaits(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    detail = json.loads(ok(ctl(db, "show", saga_id[:8], "--json")))  # a short id does
    assert detail["id"] == saga_id
    (awaits,) = detail["awaits"]
    assert awaits["step"] == "reserve_inventory"
    assert (awaits["waits_for"], awaits["attempt"], awaits["unsent"]) == ("reply", 1, True)
    assert awaits["deadline"] is not None and awaits["next_retry"] is None
    assert detail["steps"][0]["status"] == "dispatched"  # as stored; unsent is said above
    text = ok(ctl(db, "show", saga_id))
    line = next(x for x in text.splitlines() if x.startswith("  reserve_inventory: "))
    assert "reply to attempt 1, times out " in line and "command unsent" in line

    driver.reply(saga_id, Outcome.ERROR, error="inventory db down")  # a retry backoff
    (backoff,) = json.loads(ok(ctl(db, "show", saga_id, "--json")))["awaits"]
    assert (backoff["waits_for"], backoff["attempt"], backoff["unsent"]) == ("retry", 2, False)
    assert backoff["next_retry"] is not None and backoff["deadline"] is None
    text = ok(ctl(db, "show", saga_id, "--time-format", "iso"))
    line = next(x for x in text.splitlines() if x.startswith("  reserve_inventory: "))
    assert re.search(r"attempt 2 goes at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", line), line

    assert driver.fire() >= 1  # the retry goes
    driver.reply(saga_id, Outcome.FAILURE, error="out of stock")
    finished = json.loads(ok(ctl(db, "show", saga_id, "--json")))
    assert (finished["status"], finished["awaits"]) == ("compensated", [])


def test_short_ids_must_be_unambiguous(db: Path) -> None:
    order = json.dumps(ORDER)
    for saga_id in ("dup-1", "dup-2"):
        ok(ctl(db, "start", "place_order", "--input", order, "--id", saga_id))
    assert_one_line_error(ctl(db, "show", "dup-"), "start of several saga ids", "dup-1, dup-2")
    assert_one_line_error(ctl(db, "cancel", "dup"), "no saga with id 'dup'")  # under 4
    assert "cancelled" in ok(ctl(db, "cancel", "dup-2", "--reason", "test"))
    assert_one_line_error(ctl(db, "retry", "nope"), "no saga with id 'nope'")


def test_show_follow_streams_the_history_until_the_saga_ends(
    db: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "POLL_INTERVAL", 0.05)
    saga_id = driver.start()
    read = threading.Event()
    read_saga = SagaClient._detail  # what follow reads on every poll

    async def read_and_tell(self: SagaClient, saga: str) -> Any:
        detail = await read_saga(self, saga)
        read.set()
        return detail

    monkeypatch.setattr(SagaClient, "_detail", read_and_tell)

    def complete() -> None:
        assert read.wait(30)  # sagactl saw it running: it must follow it to its end
        for _ in range(3):
            driver.reply(saga_id, Outcome.SUCCESS)

    with meanwhile(complete):
        result = ctl(db, "show", saga_id, "--follow")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    history = json.loads(ok(ctl(db, "show", saga_id, "--json")))["history"]
    assert lines[0] == f"saga {saga_id}  place_order v1"
    assert [x.split()[1] for x in lines[1:-1]] == [h["event"] for h in history]
    assert all(ISO.match(x) for x in lines[1:-1])  # instants, not "ago"
    assert lines[-1].startswith("completed in ")

    compensated = driver.start()
    driver.reply(compensated, Outcome.FAILURE, error="out of stock")
    streamed = ctl(db, "show", compensated, "-f", "-o", "jsonl")
    assert streamed.exit_code == EXIT_COMPENSATED, streamed.output
    events = [json.loads(x)["event"] for x in streamed.stdout.splitlines()]
    assert events[0] == "started" and events[-1] == "compensated"


def test_start_wait_exits_with_the_outcome(
    db: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "POLL_INTERVAL", 0.05)
    order = json.dumps(ORDER)

    def answer(saga_id: str, outcomes: list[Outcome]) -> Callable[[], None]:
        def go() -> None:
            until(lambda: stored(db, saga_id))
            for outcome in outcomes:
                driver.reply(saga_id, outcome, error=None if outcome is Outcome.SUCCESS else "no")

        return go

    with meanwhile(answer("w-ok", [Outcome.SUCCESS] * 3)):
        done = ctl(db, "start", "place_order", "--input", order, "--id", "w-ok", "--wait")
    assert done.exit_code == 0, done.output
    first, second = done.stdout.splitlines()
    assert first == "w-ok" and second.startswith("completed in ")

    with meanwhile(answer("w-bad", [Outcome.FAILURE])):
        bad = ctl(
            db, "-o", "json", "start", "place_order", "--input", order, "--wait", "--id", "w-bad"
        )
    assert bad.exit_code == EXIT_COMPENSATED, bad.output
    outcome = json.loads(bad.stdout)
    assert (outcome["id"], outcome["status"]) == ("w-bad", "compensated")
    assert outcome["error"] == "step 'reserve_inventory' failed: no"

    late = ctl(db, "start", "place_order", "--input", order, "--wait", "--timeout", "0.2s")
    assert late.exit_code == EXIT_TIMEOUT, late.output
    assert "did not finish within 0.2s" in late.stderr
    usage = ctl(db, "start", "place_order", "--input", order, "--timeout", "1s")
    assert usage.exit_code == 2 and "--timeout is for --wait" in usage.stderr


def test_input_from_stdin_and_its_errors(db: Path) -> None:
    saga_id = ok(ctl(db, "start", "place_order", "--input", "-", input=json.dumps(ORDER)))
    detail = json.loads(ok(ctl(db, "show", saga_id.strip(), "--json")))
    assert detail["input"] == ORDER
    assert_one_line_error(
        ctl(db, "start", "place_order", "--input", "-", input='{"sku": '),
        "invalid JSON for --input (from stdin): Expecting value at line 1 column 9",
    )
    assert_one_line_error(
        ctl(db, "start", "place_order", "--input", "-", input=""), "--input -: stdin is empty"
    )


def test_every_table_in_a_pipe_is_plain_one_line_per_row(db: Path, driver: Driver) -> None:
    saga_id = driver.start()
    error = "card declined: " + "the issuer gave no reason at all " * 4
    driver.reply(saga_id, Outcome.FAILURE, error=error)
    archive(db, letter(b"x", "poison " + "y" * 120))
    for args in (
        ["show", saga_id],
        ["stats"],
        ["dlq", "list"],
        ["prune", "--older-than", "0s", "--dry-run"],
    ):
        text = ok(ctl(db, *args))
        assert not BORDERS & set(text) and "\x1b" not in text, (args, text)
    history = ok(ctl(db, "show", saga_id)).splitlines()
    failed = next(line for line in history if " step_failed " in line)
    assert failed.endswith(error.rstrip()), failed  # the whole detail, on its row
    steps = history[history.index("steps") + 1 :]
    assert steps[0].split() == ["#", "step", "state", "attempts", "started", "took"]
    (letter_row,) = ok(ctl(db, "dlq", "list")).splitlines()[1:]
    assert letter_row.endswith("poison " + "y" * 120 + "  -")


def test_dlq_show_prints_one_dead_letter_escaped(db: Path) -> None:
    body = b'{"order": "\x1b[2J[/]"}'
    (letter_id,) = archive(db, letter(body, "poison [b]pill[/b]\nsecond line"))
    text = ok(ctl(db, "dlq", "show", str(letter_id)))
    assert "\x1b" not in text
    assert re.search(r"^reason +poison \[b\]pill\[/b\]\\nsecond line *$", text, re.M), text
    assert "  traceparent: 00-x" in text
    assert '  {"order": "\\x1b[2J[/]"}' in text
    assert re.search(r"^source +saga\.commands\.inventory *$", text, re.M)
    shown = json.loads(ok(ctl(db, "dlq", "show", str(letter_id), "--json")))
    assert shown["body"] == body.decode() and shown["headers"]["traceparent"] == "00-x"
    assert shown["received_at"].endswith("Z")
    assert_one_line_error(ctl(db, "dlq", "show", "999"), "no dead letter with id 999")


@pytest.mark.integration
async def test_awaits_short_ids_and_piped_list_on_postgresql() -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:

        async def run(*args: str) -> str:
            result = await asyncio.to_thread(ctl, url, *args)  # sagactl runs its own loop
            return ok(result)

        order = json.dumps(ORDER)
        first = (await run("start", "place_order", "--input", order)).strip()
        await run("start", "place_order", "--input", order, "--id", "pg-dup-1")
        await run("start", "place_order", "--input", order, "--id", "pg-dup-2")
        lines = (await run("list")).splitlines()
        assert len(lines) == 4 and lines[-1].startswith(first[:8] + "  ")
        detail = json.loads(await run("show", first[:8], "--json"))
        assert detail["id"] == first
        (awaits,) = detail["awaits"]
        assert (awaits["step"], awaits["waits_for"], awaits["unsent"]) == (
            "reserve_inventory",
            "reply",
            True,
        )
        assert awaits["queued_at"].endswith("Z")
        ambiguous = await asyncio.to_thread(ctl, url, "show", "pg-dup")
        assert_one_line_error(ambiguous, "start of several saga ids")
