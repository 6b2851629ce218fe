"""sagactl never reads text from a saga, a handler or an operator as terminal markup
(issue 10): ``[/]`` once crashed ``show`` and ``list``, ``[link=...]`` printed a live
hyperlink, and a newline or ESC in a value reached the terminal as is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from engine.cli.app import cli
from engine.cli.render import shown
from engine.client import SagaClient
from engine.errors import LimitError
from engine.redact import escape_controls
from tests.e2e import fresh_database, service_url
from tests.test_cli import ORDER, assert_one_line_error, sagactl
from tests.test_cli_operator import Driver

HOSTILE = "see [/] and [link=https://evil.example]click here[/link] [bold]x\nnext\x1b[2J"


def test_shown_escapes_markup_and_control_characters() -> None:
    text = shown("a [/] b\n\x1b[31m")
    assert "\n" not in text and "\x1b" not in text
    assert "\\n" in text and "\\x1b" in text
    assert "\\[/]" in text  # rich's escape: printed as the literal "[/]"


def test_list_and_show_print_hostile_text_literally(tmp_path: Path) -> None:
    db = tmp_path / "saga.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    started = sagactl(
        db,
        "start",
        "place_order",
        "--input",
        json.dumps({**ORDER, "address": HOSTILE}),
        "--id",
        "hostile-1",
    )
    assert started.exit_code == 0, started.output
    cancelled = sagactl(db, "cancel", "hostile-1", "--reason", HOSTILE)
    assert cancelled.exit_code == 0, cancelled.output

    listed = sagactl(db, "list")
    assert listed.exit_code == 0, listed.output
    assert "hostile-1" in listed.stdout

    detail = sagactl(db, "show", "hostile-1")
    assert detail.exit_code == 0, detail.output
    out = detail.stdout
    assert "\x1b" not in out  # no ESC reaches the terminal (CliRunner has no colour)
    assert "[link=https://evil.example]click here[/link]" in out.replace("\n", "")
    assert "[/]" in out and "[bold]x" in out
    assert "\\nnext" in out  # the newline shown escaped, the value on its line


def test_an_id_with_markup_is_printed_literally_everywhere(tmp_path: Path) -> None:
    """``start --id '[/]...'`` once stored the saga, then crashed printing its id."""
    db = tmp_path / "saga.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    marked = "[/][link=https://e.x]i[/link]"
    started = sagactl(db, "start", "place_order", "--input", json.dumps(ORDER), "--id", marked)
    assert started.exit_code == 0, started.output
    assert started.stdout == marked + "\n"
    listed = sagactl(db, "list")
    assert listed.exit_code == 0 and marked in listed.stdout, listed.output
    detail = sagactl(db, "show", marked)
    assert detail.exit_code == 0 and f"saga {marked} " in detail.stdout, detail.output


def test_a_hostile_reason_and_actor_go_through_retry_to_history_and_json(tmp_path: Path) -> None:
    db = tmp_path / "ops.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    saga_id = Driver(db).park()
    actor = "ops [bold]x[/]"
    retried = sagactl(db, "retry", saga_id, "--reason", HOSTILE, "--actor", actor)
    assert retried.exit_code == 0, retried.output
    assert f"retried by {actor}:" in retried.stdout

    detail = sagactl(db, "show", saga_id)
    assert detail.exit_code == 0, detail.output
    assert "\x1b" not in detail.stdout
    line = next(x for x in detail.stdout.splitlines() if "retried by" in x)
    assert actor in line and "[link=https://evil.example]click here[/link]" in line
    assert "\\nnext\\x1b[2J" in line  # the reason's newline and ESC on its one line

    # --json gives back exactly what was stored, ESC and newline included.
    as_json = sagactl(db, "--json", "show", saga_id)
    assert as_json.exit_code == 0, as_json.output
    (entry,) = [h for h in json.loads(as_json.stdout)["history"] if h["actor"] == actor]
    assert entry["detail"].startswith(f"reason: {HOSTILE}; ")
    listed = sagactl(db, "--json", "list")
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["id"] == saga_id


def test_operator_text_is_refused_in_one_line_before_anything_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "saga.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    order = json.dumps(ORDER)
    assert sagactl(db, "start", "place_order", "--input", order, "--id", "s-1").exit_code == 0
    before = sagactl(db, "--json", "show", "s-1").stdout
    refusals = [
        (["start", "place_order", "--input", order, "--id", "a\nb"], "--id holds a control"),
        (["start", "place_order", "--input", order, "--id", "a\x1b[2J"], "--id holds a control"),
        (["start", "place_order", "--input", order, "--id", "x" * 37], "the limit is 36"),
        (["start", "place_order", "--input", order, "--id", "\udcff"], "--id is not valid UTF-8"),
        (["cancel", "s-1", "--actor", "a\nb"], "--actor holds a control character (U+000A"),
        (["cancel", "s-1", "--actor", "x" * 201], "--actor is 201 characters long"),
        (["cancel", "s-1", "--reason", "x" * 2001], "--reason is 2,001 characters long"),
        (["cancel", "s-1", "--reason", "a\x00b"], "--reason holds a control character (U+0000"),
        (["cancel", "s-1", "--reason", "\udcff"], "--reason is not valid UTF-8 text"),
        (["retry", "s-1", "--reason", " "], "--reason must not be empty"),
        (["dlq", "replay", "1", "--actor", "a\tb"], "--actor holds a control character"),
        (["show", "\udcff"], "the saga id is not valid UTF-8 text"),
        (["list", "--saga", "a\nb"], "--saga holds a control character"),
    ]
    for args, message in refusals:
        assert_one_line_error(sagactl(db, *args), message)
    assert sagactl(db, "--json", "show", "s-1").stdout == before
    assert len(json.loads(sagactl(db, "--json", "list").stdout)) == 1

    async def through_the_client() -> None:
        """A program cannot store what sagactl refuses: the same checks."""
        async with await SagaClient.connect(f"sqlite:///{db}", ["sagas.order"]) as client:
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: client.start("place_order", ORDER, saga_id="a\nb"),
                lambda: client.cancel("s-1", actor="a\x1bb"),
                lambda: client.cancel("s-1", actor="ops", reason="x" * 2001),
                lambda: client.retry("s-1", actor=" "),
                lambda: client.replay_dead_letter(1, actor="ops", reason="a\x00"),
            ]
            for call in calls:
                with pytest.raises(LimitError):
                    await call()

    asyncio.run(through_the_client())
    assert sagactl(db, "--json", "show", "s-1").stdout == before


@pytest.mark.integration
async def test_hostile_text_round_trips_through_postgresql() -> None:
    """The same on PostgreSQL: stored as written (JSON input, history, error), given
    back exactly by ``--json``, shown escaped."""
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:

        async def run(*args: str) -> Result:
            # In a thread: sagactl runs its own event loop.
            result = await asyncio.to_thread(
                CliRunner().invoke, cli, ["--database-url", url, *args], prog_name="sagactl"
            )
            assert result.exit_code == 0, result.output
            return result

        saga_id, actor = "[/]hostile", "ops [b]"
        hostile_input = json.dumps({**ORDER, "address": HOSTILE})
        await run("start", "place_order", "--input", hostile_input, "--id", saga_id)
        await run("cancel", saga_id, "--reason", HOSTILE, "--actor", actor)
        detail = json.loads((await run("--json", "show", saga_id)).stdout)
        assert detail["input"]["address"] == HOSTILE
        assert detail["error"] == f"cancelled by {actor}: {HOSTILE}"
        assert [h["actor"] for h in detail["history"]].count(actor) == 1
        listed, shown_ = (await run("list")).stdout, (await run("show", saga_id)).stdout
        for out in (listed, shown_):
            assert saga_id in out and "\x1b" not in out
        operator = [x for x in shown_.splitlines() if x.startswith("  ") and f"by {actor}" in x]
        assert len(operator) == 1 and f"reason: {escape_controls(HOSTILE)}" in operator[0]
