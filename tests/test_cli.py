"""sagactl: output, JSON, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from engine.cli.app import cli

ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 1,
    "amount_cents": 500,
    "address": "1 Main Street",
}


def sagactl(db: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["--database-url", f"sqlite:///{db}", *args], input=input, prog_name="sagactl"
    )


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sagactl: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """One demo run shared by the read-only tests below."""
    db = tmp_path_factory.mktemp("demo") / "saga.db"
    result = sagactl(db, "--json", "demo", "--orders", "30", "--seed", "3")
    assert result.exit_code == 0, result.stderr
    return db, json.loads(result.stdout)


def test_demo_finishes_every_order_and_balances(demo_db: tuple[Path, dict[str, object]]) -> None:
    _, summary = demo_db
    assert summary["orders"] == 30
    assert summary["unfinished"] == 0
    assert summary["stock_conserved"] is True
    assert summary["money_conserved"] is True
    assert summary["inconsistent_orders"] == 0
    outcomes = summary["outcomes"]
    assert isinstance(outcomes, dict)
    assert sum(outcomes.values()) == 30
    assert outcomes.get("completed", 0) > 0
    assert any(k.startswith("compensated (failed at") for k in outcomes)


def test_demo_runs_large_orders_approved_and_rejected_by_signal(
    demo_db: tuple[Path, dict[str, object]],
) -> None:
    db, summary = demo_db
    outcomes = summary["outcomes"]
    assert isinstance(outcomes, dict)
    # One in ten orders is a large order; the second of them is rejected.
    assert outcomes["large_order: completed"] == 2
    assert outcomes["large_order: compensated (failed at check_approval)"] == 1
    assert (summary["signals"], summary["signals_refused"]) == (3, 0)
    rejected = json.loads(
        sagactl(db, "--json", "list", "--saga", "large_order", "--status", "compensated").stdout
    )
    detail = json.loads(sagactl(db, "--json", "show", rejected[0]["id"]).stdout)
    undone = [h["step"] for h in detail["history"] if h["event"] == "step_compensated"]
    by_completion = sorted(
        (s for s in detail["steps"] if s["name"] in ("reserve_inventory", "charge_payment")),
        key=lambda s: s["completed"],
        reverse=True,
    )
    assert undone == [s["name"] for s in by_completion]


def test_demo_human_output_shows_tables(tmp_path: Path) -> None:
    result = sagactl(tmp_path / "d.db", "demo", "--orders", "12", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "outcomes" in result.stdout
    assert "stock conserved: yes" in result.stdout
    assert "money conserved: yes" in result.stdout
    assert "sagas/s" in result.stdout
    assert "large_order: completed" in result.stdout
    assert "1 signal(s) sent to sagas waiting for them" in result.stdout


def test_list_json_newest_first_with_filters(demo_db: tuple[Path, dict[str, object]]) -> None:
    db, _ = demo_db
    result = sagactl(db, "list", "--json", "--limit", "100")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 30
    created = [r["created_at"] for r in rows]
    assert created == sorted(created, reverse=True)
    assert {r["status"] for r in rows} <= {"completed", "compensated"}

    completed = json.loads(sagactl(db, "--json", "list", "--status", "completed").stdout)
    assert completed and all(r["status"] == "completed" for r in completed)
    limited = json.loads(sagactl(db, "--json", "list", "--limit", "5").stdout)
    assert [r["id"] for r in limited] == [r["id"] for r in rows[:5]]
    none = json.loads(sagactl(db, "--json", "list", "--saga", "no_such_saga").stdout)
    assert none == []


def test_show_json_and_table(demo_db: tuple[Path, dict[str, object]]) -> None:
    db, _ = demo_db
    rows = json.loads(sagactl(db, "--json", "list", "--status", "compensated").stdout)
    saga_id = rows[0]["id"]
    detail = json.loads(sagactl(db, "show", saga_id, "--json").stdout)
    assert detail["id"] == saga_id
    assert [s["name"] for s in detail["steps"]] == [
        "reserve_inventory",
        "charge_payment",
        "create_shipment",
    ]
    assert detail["error"]
    assert any(s["status"] in ("failed", "timed_out") for s in detail["steps"])
    assert detail["history"][0]["event"] == "started"
    assert detail["history"][-1]["event"] == "compensated"

    table = sagactl(db, "show", saga_id)
    assert table.exit_code == 0
    assert saga_id in table.stdout
    assert "reserve_inventory" in table.stdout
    assert "history" in table.stdout


def test_list_table(
    demo_db: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, _ = demo_db
    # The table (with its title) is for a terminal; a pipe gets plain columns.
    monkeypatch.setattr("engine.cli.app.stdout", Console(soft_wrap=False, force_terminal=True))
    result = sagactl(db, "list", "--limit", "3")
    assert result.exit_code == 0
    assert "3 saga(s), newest first" in result.stdout


def test_start_records_saga_and_first_command(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    result = sagactl(db, "--json", "start", "place_order", "--input", json.dumps(ORDER))
    assert result.exit_code == 0, result.stderr
    saga_id = json.loads(result.stdout)["id"]
    detail = json.loads(sagactl(db, "--json", "show", saga_id).stdout)
    assert detail["status"] == "running"
    assert detail["input"] == ORDER
    assert detail["steps"][0]["status"] == "dispatched"
    assert detail["steps"][0]["attempts"] == 1

    input_file = tmp_path / "order.json"
    input_file.write_text(json.dumps(ORDER))
    again = sagactl(db, "start", "place_order", "--input", f"@{input_file}", "--id", "fixed-1")
    assert again.exit_code == 0, again.stderr
    assert again.stdout.strip() == "fixed-1"
    duplicate = sagactl(db, "start", "place_order", "--input", json.dumps(ORDER), "--id", "fixed-1")
    assert_one_line_error(duplicate, "already exists")


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    db = tmp_path / "e.db"
    assert sagactl(db, "db", "upgrade").exit_code == 0
    assert_one_line_error(
        sagactl(db, "start", "no_such_saga", "--input", "{}"), "unknown saga 'no_such_saga'"
    )
    assert_one_line_error(
        sagactl(db, "start", "place_order", "--input", "{not json"), "invalid JSON"
    )
    bad = dict(ORDER, quantity=0)
    assert_one_line_error(
        sagactl(db, "start", "place_order", "--input", json.dumps(bad)),
        "invalid input for saga 'place_order'",
        "quantity",
    )
    assert_one_line_error(sagactl(db, "show", "no-such-id"), "no saga with id 'no-such-id'")
    assert_one_line_error(
        sagactl(db, "--sagas", "no.such.module", "start", "place_order", "--input", "{}"),
        "cannot import saga module",
    )
    assert_one_line_error(
        sagactl(db, "start", "place_order", "--input", "@/nonexistent/order.json"),
        "cannot read input file",
    )


def test_missing_or_unmigrated_database(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    assert_one_line_error(sagactl(missing, "list"), "does not exist", "db upgrade")
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert_one_line_error(sagactl(empty, "list"), "has no saga tables", "db upgrade")
    assert_one_line_error(
        CliRunner().invoke(cli, ["--database-url", "mysql://x/y", "list"]), "unsupported database"
    )


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = sagactl(tmp_path / "u.db", "list", "--status", "bogus")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_installed_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("sagactl")
    proc = subprocess.run(
        [str(exe), "--database-url", f"sqlite:///{tmp_path / 'none.db'}", "show", "x"],
        capture_output=True,
        text=True,
        env={**os.environ, "SAGA_DATABASE_URL": ""},
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("sagactl: error: ")
    assert "Traceback" not in proc.stderr
