"""sagactl never reads text from a saga, a handler or an operator as terminal markup
(issue 10): ``[/]`` once crashed ``show`` and ``list``, ``[link=...]`` printed a live
hyperlink, and a newline or ESC in a value reached the terminal as is."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli.render import shown
from tests.test_cli import ORDER, sagactl

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
