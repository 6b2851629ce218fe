"""``sagactl new saga`` / ``new worker``: what they write, and what they refuse.

That the written saga runs (its own test passes on the embedded runner, and as
daemons) is tests/test_walkthrough.py's part, which follows the README.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from engine.cli.app import cli


def new(directory: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["new", *args, "--dir", str(directory)])


def files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def lint(directory: Path) -> subprocess.CompletedProcess[str]:
    """ruff as a user's project would run it (its own defaults, 88 columns)."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select=E,F,W,I,B,UP,SIM", "."],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_and_a_saga_with_its_test_in_the_project(tmp_path: Path) -> None:
    for name in ("flight", "hotel"):
        assert new(tmp_path, "worker", name).exit_code == 0
    made = new(tmp_path, "saga", "book_trip", "--participant", "flight", "-p", "hotel")

    assert made.exit_code == 0, made.output
    assert files(tmp_path) == {
        *(
            f"{p}/{f}"
            for p in ("flight", "hotel")
            for f in (
                "__init__.py",
                "commands.py",
                "worker.py",
                "migrations/alembic.ini",
                "migrations/env.py",
                "migrations/script.py.mako",
                f"migrations/versions/{p}_0001_reservations.py",
            )
        ),
        "sagas/__init__.py",
        "sagas/book_trip.py",
        "tests/test_book_trip.py",
    }
    assert f"wrote {tmp_path / 'sagas' / 'book_trip.py'}" in made.output
    assert "python -m pytest tests/test_book_trip.py" in made.output
    env = (tmp_path / "hotel" / "migrations" / "env.py").read_text()
    assert 'run_env(version_table="hotel_version", target_metadata=metadata)' in env
    saga = (tmp_path / "sagas" / "book_trip.py").read_text()
    assert saga.index('participant="flight"') < saga.index('participant="hotel"')
    linted = lint(tmp_path)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_a_saga_of_one_participant_names_the_worker_still_to_write(tmp_path: Path) -> None:
    made = new(tmp_path, "saga", "pay", "-p", "payment")

    assert made.exit_code == 0, made.output
    assert "sagactl new worker payment" in made.output
    test = (tmp_path / "tests" / "test_pay.py").read_text()
    assert 'run_saga(database, {"payment": too_many})' in test
    assert new(tmp_path, "worker", "payment").exit_code == 0  # after the saga: as well
    linted = lint(tmp_path)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_nothing_is_overwritten_and_nothing_half_written(tmp_path: Path) -> None:
    (tmp_path / "sagas").mkdir()
    (tmp_path / "sagas" / "__init__.py").write_text("# mine\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_trip.py").write_text("# mine\n")

    refused = new(tmp_path, "saga", "trip", "-p", "hotel")

    assert refused.exit_code == 1
    assert f"{tmp_path / 'tests' / 'test_trip.py'} exists" in refused.output
    assert files(tmp_path) == {"sagas/__init__.py", "tests/test_trip.py"}
    (tmp_path / "tests" / "test_trip.py").unlink()
    assert new(tmp_path, "saga", "trip", "-p", "hotel").exit_code == 0
    assert (tmp_path / "sagas" / "__init__.py").read_text() == "# mine\n"  # shared, kept
    assert new(tmp_path, "worker", "hotel").exit_code == 0
    again = new(tmp_path, "worker", "hotel")
    assert again.exit_code == 1
    assert "exists: sagactl new never overwrites a file" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("worker", "Hotel"), "worker 'Hotel' is not a valid name"),
        (("worker", "car-rental"), "worker 'car-rental' is not a valid name"),
        (("worker", "class"), "worker 'class' is not a valid name"),
        (("worker", "json"), "would hide the Python module 'json'"),
        (("worker", "engine"), "would hide the Python module 'engine'"),
        (("saga", "9lives", "-p", "hotel"), "saga '9lives' is not a valid name"),
        (("saga", "trip", "-p", "hotel", "-p", "hotel"), "a participant is named twice"),
        (("saga", "trip", "-p", "asyncio"), "would hide the Python module 'asyncio'"),
    ],
)
def test_a_bad_name_is_one_clear_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    refused = new(tmp_path, *args)

    assert refused.exit_code == 1
    assert message in refused.output
    assert refused.output.count("\n") == 1
    assert files(tmp_path) == set()


def test_a_saga_needs_a_participant(tmp_path: Path) -> None:
    refused = new(tmp_path, "saga", "trip")

    assert refused.exit_code == 2
    assert "--participant" in refused.output
