"""``sagactl prune``: ages, dry run, JSON and table output, what stays."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.database import create_engine, upgrade
from engine.states import SagaStatus
from engine.store.sql import SqlSagaStore
from tests.test_cli import assert_one_line_error, sagactl
from tests.test_prune import Script


@pytest.fixture
def db(tmp_path: Path) -> tuple[Path, dict[SagaStatus, str]]:
    """A saga in every state, all last changed in 2020, plus one completed yesterday."""
    path = tmp_path / "prune.db"

    async def build() -> dict[SagaStatus, str]:
        engine = create_engine(f"sqlite:///{path}")
        try:
            await upgrade(engine)
            script = Script(SqlSagaStore(engine))
            ids = {status: await script.saga(status) for status in SagaStatus}
            script.now = datetime.now(UTC) - timedelta(days=1)
            await script.saga(SagaStatus.COMPLETED)
            return ids
        finally:
            await engine.dispose()

    return path, asyncio.run(build())


def statuses(db: Path) -> dict[str, str]:
    result = sagactl(db, "--json", "list", "--limit", "100")
    assert result.exit_code == 0, result.stderr
    return {s["id"]: s["status"] for s in json.loads(result.stdout)}


@pytest.mark.parametrize("age", ["3x", "30", "-5d", "thirty days", ""])
def test_a_bad_age_is_refused_with_the_accepted_forms(
    db: tuple[Path, dict[SagaStatus, str]], age: str
) -> None:
    path, _ = db
    result = sagactl(path, "prune", "--older-than", age)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--older-than'" in result.stderr
    assert "30d, 12h, 90m or 3600s" in result.stderr
    assert len(statuses(path)) == 6


def test_the_age_is_required(db: tuple[Path, dict[SagaStatus, str]]) -> None:
    result = sagactl(db[0], "prune")
    assert result.exit_code == 2
    assert "Missing option '--older-than'" in result.stderr


def test_dry_run_counts_and_removes_nothing(db: tuple[Path, dict[SagaStatus, str]]) -> None:
    path, _ = db
    result = sagactl(path, "prune", "--older-than", "30d", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["older_than_seconds"] == 30 * 86400
    assert report["rows"]["sagas"] == 2
    assert report["rows"]["steps"] == 6
    assert report["rows"]["inbox"] > 0 and report["rows"]["outbox"] > 0
    assert len(statuses(path)) == 6


def test_prune_removes_old_finished_sagas_and_keeps_the_rest(
    db: tuple[Path, dict[SagaStatus, str]],
) -> None:
    path, ids = db
    dry = json.loads(sagactl(path, "--json", "prune", "--older-than", "30d", "--dry-run").stdout)
    result = sagactl(path, "--json", "prune", "--older-than", "720h", "--batch", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == dry["rows"]
    assert report["batches"] == 3
    left = statuses(path)
    assert ids[SagaStatus.COMPLETED] not in left
    assert ids[SagaStatus.COMPENSATED] not in left
    assert sorted(left.values()) == ["compensating", "completed", "parked", "running"]
    show = sagactl(path, "show", ids[SagaStatus.COMPLETED])
    assert_one_line_error(show, "no saga with id")


def test_the_table_says_what_went(db: tuple[Path, dict[SagaStatus, str]]) -> None:
    path, _ = db
    result = sagactl(path, "prune", "--older-than", "30d")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "older than 30d" in out
    assert "removed" in out
    for label in ("sagas", "steps", "history entries", "sent outbox rows", "inbox rows"):
        assert label in out
    assert "1 batch(es)" in out
    dry = sagactl(path, "prune", "--older-than", "12h", "--dry-run")
    assert "would remove (dry run)" in dry.stdout
    assert "older than 12h" in dry.stdout


def test_an_unmigrated_database_is_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(
        sagactl(tmp_path / "missing.db", "prune", "--older-than", "1d"), "does not exist"
    )


def test_on_a_terminal_it_asks_first_unless_yes(
    db: tuple[Path, dict[SagaStatus, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone at a terminal is told how many sagas would go and must say yes;
    a script (stdin no terminal, as in the tests above) is not asked."""
    path, _ = db
    monkeypatch.setattr("engine.cli.app._interactive", lambda: True)
    declined = sagactl(path, "prune", "--older-than", "30d", input="n\n")
    assert declined.exit_code == 1, declined.output
    assert "remove 2 finished saga(s) last changed before " in declined.stderr
    assert declined.stderr.strip().endswith("sagactl: error: not confirmed: nothing removed")
    assert len(statuses(path)) == 6
    accepted = sagactl(path, "--json", "prune", "--older-than", "30d", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["rows"]["sagas"] == 2
    assert len(statuses(path)) == 4
    unasked = sagactl(path, "prune", "--older-than", "1s", "--yes", input="")
    assert unasked.exit_code == 0, unasked.output
    assert "remove" not in unasked.stderr and "removed" in unasked.stdout
    assert sorted(statuses(path).values()) == ["compensating", "parked", "running"]
