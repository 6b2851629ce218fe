"""sagactl starts fast because it imports only what the command needs.

Checked on what is imported, never on time (performance is measured, not asserted):
``sagactl --help`` loads no database, broker, telemetry, migration or settings
library; ``sagactl list`` on SQLite loads the database but no broker client, no
telemetry SDK, no PostgreSQL driver or dialect, no Alembic and no write path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.database import create_engine, upgrade

#: Run ``sagactl ARGS`` in this interpreter, then print the top-level package names
#: and the full names of every module it imported, as JSON.
PROBE = """
import json, sys
from engine.cli.app import cli
try:
    cli(sys.argv[1:], prog_name="sagactl")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

#: Libraries a command that touches nothing but its own output must not load.
HEAVY = (
    "sqlalchemy",
    "pydantic",
    "pydantic_settings",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "aiokafka",
    "aio_pika",
    "opentelemetry",
    "prometheus_client",
)
#: What reading sagas from SQLite has no use for.
NOT_FOR_LIST = (
    "aiokafka",
    "aio_pika",
    "aiormq",
    "asyncpg",
    "opentelemetry.sdk",
    "prometheus_client",
    "engine.daemon",
    "engine.orchestrator",
    "engine.worker",
    # Nor migrations (the schema check reads the heads itself), the PostgreSQL
    # dialect, the write path (the state machine, the relay) or OpenTelemetry at all.
    "alembic",
    "sqlalchemy.dialects.postgresql",
    "engine.advance",
    "engine.statemachine",
    "engine.relay",
    "opentelemetry",
)


def imported(env: dict[str, str], *args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stdout
    return set(result["modules"])


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(p for p in packages if any(m == p or m.startswith(p + ".") for m in modules))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    return {**clean, "SAGA_DATABASE_URL": f"sqlite:///{tmp_path / 'saga.db'}"}


def test_help_imports_no_database_broker_telemetry_or_settings(env: dict[str, str]) -> None:
    modules = imported(env, "--help")
    assert loaded(modules, HEAVY) == []
    assert "asyncio" not in modules  # nothing runs: the event loop is not needed either


async def test_list_imports_no_broker_client_nor_telemetry_sdk(
    env: dict[str, str],
) -> None:
    database = create_engine(env["SAGA_DATABASE_URL"])
    await upgrade(database)
    await database.dispose()

    modules = imported(env, "list")

    assert "sqlalchemy.ext.asyncio" in modules  # the probe did read the database
    assert loaded(modules, NOT_FOR_LIST) == []
