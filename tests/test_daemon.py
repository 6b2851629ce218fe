"""``sagactl engine`` / ``sagactl worker`` as processes: clean errors and clean stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import fresh_database, sagactl, service_url


def env_for(db: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "SAGA_DATABASE_URL": f"sqlite:///{db}", **extra}


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    db = tmp_path / "d.db"
    assert sagactl(env_for(db), "db", "upgrade").returncode == 0
    return db


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


#: A failed start must say so quickly, not after a client library's long retry.
PROMPT = 15.0


def fails_in_one_line(env: dict[str, str], *args: str) -> str:
    """Run ``sagactl ARGS`` at its default log level: it must exit 1 promptly with
    exactly one line on stderr (no library chatter before it), and return that line."""
    began = time.monotonic()
    proc = sagactl(env, *args)
    took = time.monotonic() - began
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("sagactl: error: "), lines[0]
    assert took < PROMPT, f"took {took:.1f}s: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (["engine", "--broker-url", "bogus://x"], {}, "unsupported broker URL 'bogus://x'"),
        (["worker", "nope", "--broker-url", "memory://"], {}, "unknown worker 'nope'"),
        (["worker", "no.such.module:worker"], {}, "cannot import worker module"),
        (["worker", "engine:Engine"], {}, "is not a saga-engine Worker"),
        (["engine"], {"SAGA_SAGAS": "no.such.sagas"}, "cannot import saga module"),
        (["engine", "--broker-url", "memory://"], {"SAGA_SAGAS": ""}, "no sagas to serve"),
        (["worker", "payment"], {"SAGA_WORKERS": ""}, "SAGA_WORKERS is empty"),
        (
            ["engine", "--broker-url", "kafka://127.0.0.1:1"],
            {},
            "cannot reach Kafka at 127.0.0.1:1",
        ),
        (
            ["worker", "payment", "--migrate", "--broker-url", "kafka://127.0.0.1:1"],
            {},
            "cannot reach Kafka at 127.0.0.1:1",
        ),
        (
            ["worker", "inventory", "--broker-url", "amqp://saga:saga@127.0.0.1:1/"],
            {},
            "cannot reach RabbitMQ at 127.0.0.1:1",
        ),
        (
            ["engine", "--migrate", "--broker-url", "amqp://saga:saga@127.0.0.1:1/"],
            {},
            "cannot reach RabbitMQ at 127.0.0.1:1",
        ),
        (
            ["engine"],
            {"SAGA_PRUNE_INTERVAL": "soon", "SAGA_METRICS_PORT": "x"},
            "bad setting SAGA_METRICS_PORT: Input should be a valid integer",
        ),
        (["worker", "payment"], {"SAGA_PRUNE_INTERVAL": "soon"}, "SAGA_PRUNE_INTERVAL: not an age"),
        (["engine"], {"SAGA_DATABASE_URL": "nonsense"}, "not a database URL: 'nonsense'"),
    ],
)
def test_bad_configuration_exits_1_with_one_clear_line(
    migrated: Path, args: list[str], extra: dict[str, str], message: str
) -> None:
    assert message in fails_in_one_line(env_for(migrated, **extra), *args)


def test_unmigrated_or_unreachable_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    assert "has no saga tables" in fails_in_one_line(env_for(empty), "engine")
    unreachable = {**os.environ, "SAGA_DATABASE_URL": "postgresql://saga:saga@127.0.0.1:1/saga"}
    for args in (["worker", "payment"], ["engine", "--migrate"]):
        line = fails_in_one_line(unreachable, *args)
        assert "postgresql+asyncpg://saga:***@127.0.0.1:1/saga: " in line  # no password
        assert "Connect call failed" in line


@pytest.mark.integration
async def test_real_services_refusing_or_unmigrated_fail_in_one_line() -> None:
    """On real PostgreSQL, Kafka and RabbitMQ: an unmigrated database, and each broker
    on a port that refuses, with a database that is fine."""
    postgres = service_url("SAGA_TEST_POSTGRES_URL")
    kafka = service_url("SAGA_TEST_KAFKA_URL")
    service_url("SAGA_TEST_AMQP_URL")
    async with fresh_database(postgres, migrate=False) as unmigrated:
        env = {**os.environ, "SAGA_DATABASE_URL": unmigrated, "SAGA_BROKER_URL": kafka}
        for args in (["engine"], ["worker", "shipment"]):
            line = await asyncio.to_thread(fails_in_one_line, env, *args)
            assert "has no saga tables; run 'sagactl db upgrade'" in line
    async with fresh_database(postgres) as migrated_pg:
        env = {**os.environ, "SAGA_DATABASE_URL": migrated_pg}
        for broker, what in (
            ("kafka://127.0.0.1:1", "cannot reach Kafka at 127.0.0.1:1"),
            ("amqp://saga:saga@127.0.0.1:1/", "cannot reach RabbitMQ at 127.0.0.1:1"),
        ):
            for args in (["engine", "--migrate"], ["worker", "payment"]):
                line = await asyncio.to_thread(
                    fails_in_one_line, {**env, "SAGA_BROKER_URL": broker}, *args
                )
                assert what in line


def test_a_started_daemon_logs_its_own_lines_and_no_library_chatter(tmp_path: Path) -> None:
    """``--migrate`` on an empty database: Alembic's plugin setup and migration steps
    stay quiet at the default level; saga-engine's own INFO lines still come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "engine", "--migrate", "--broker-url", "memory://"],
        env=env_for(tmp_path / "fresh.db"),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    before = []
    for line in proc.stderr:  # until it is consuming
        before.append(line)
        if " consuming " in line:
            break
    assert proc.poll() is None, "".join(before)
    proc.send_signal(signal.SIGTERM)
    after = proc.stderr.read()
    assert proc.wait(timeout=30) == 0, after
    assert not [line for line in before if " saga." not in line], "".join(before)
    assert " INFO saga.daemon: engine " in before[-1]
    assert "alembic" not in "".join(before) + after


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
