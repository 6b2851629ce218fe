"""``sagactl engine`` / ``sagactl worker`` as processes: clean errors and clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import sagactl


def env_for(db: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SAGA_DATABASE_URL": f"sqlite:///{db}", **extra}


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    db = tmp_path / "d.db"
    assert sagactl(env_for(db), "db", "upgrade").returncode == 0
    return db


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["engine", "--broker-url", "bogus://x"], "unsupported broker URL 'bogus://x'"),
        (["worker", "nope", "--broker-url", "memory://"], "unknown worker 'nope'"),
        (["worker", "no.such.module:worker"], "cannot import worker module"),
        (["worker", "engine:Engine"], "is not a saga-engine Worker"),
        (["engine", "--broker-url", "kafka://127.0.0.1:1"], "cannot reach Kafka at 127.0.0.1:1"),
        (
            ["worker", "inventory", "--broker-url", "amqp://saga:saga@127.0.0.1:1/"],
            "cannot reach RabbitMQ at 127.0.0.1:1",
        ),
    ],
)
def test_bad_configuration_exits_1_with_one_clear_line(
    migrated: Path, args: list[str], message: str
) -> None:
    proc = sagactl(env_for(migrated), *args, "--log-level", "critical")
    assert proc.returncode == 1, proc.stderr
    assert last_line(proc.stderr).startswith("sagactl: error: ")
    assert message in last_line(proc.stderr)
    assert "Traceback" not in proc.stderr


def test_unmigrated_or_unreachable_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    proc = sagactl(env_for(empty), "engine", "--log-level", "critical")
    assert proc.returncode == 1
    assert "has no saga tables" in last_line(proc.stderr)
    proc = sagactl(
        {**os.environ, "SAGA_DATABASE_URL": "postgresql://saga:saga@127.0.0.1:1/saga"},
        "worker",
        "payment",
        "--log-level",
        "critical",
    )
    assert proc.returncode == 1
    assert "cannot reach database" in last_line(proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("args", [["engine"], ["worker", "shipment"]])
def test_signal_stops_the_daemon_cleanly(migrated: Path, args: list[str], sig: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *args, "--broker-url", "memory://"],
        env=env_for(migrated),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    started = time.monotonic()
    for line in proc.stderr:  # wait until it is consuming
        if "consuming" in line:
            break
    assert proc.poll() is None, "daemon exited before it was consuming"
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(timeout=30) == 0, rest
    assert "draining" in rest
    assert "stopped" in rest
    assert time.monotonic() - started < 30
