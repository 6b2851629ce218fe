"""The engine's migrations and the participants' histories beside them.

The engine's history makes only the engine's and the barrier's tables; the example's
ledgers have a history of their own (``workers/migrations``, version table
``saga_example_version``), and so may every participant; a database that the old
revision 0003 gave the example's tables upgrades as it is, its rows kept.
"""

from __future__ import annotations

import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.cli.app import cli
from engine.database import (
    check_schema,
    create_engine,
    current_revisions,
    head_revisions,
    migrations_dir,
    upgrade,
)
from engine.errors import ConfigError
from engine.store.schema import metadata
from tests.e2e import fresh_database, service_url
from workers import inventory, ledger, payment, shipment

ROOT = Path(__file__).resolve().parents[1]
ENGINE_TABLES = {t.name for t in metadata.sorted_tables} | {"alembic_version"}
EXAMPLE_TABLES = {
    t.name
    for m in (inventory.metadata, payment.metadata, shipment.metadata)
    for t in m.sorted_tables
}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def empty(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An empty database: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        database = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        try:
            yield database
        finally:
            await database.dispose()
        return
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL"), migrate=False) as url:
        database = create_engine(url)
        try:
            yield database
        finally:
            await database.dispose()


async def tables(database: AsyncEngine) -> set[str]:
    async with database.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def example_revision(database: AsyncEngine) -> str:
    async with database.connect() as conn:
        return str(
            (await conn.execute(text("SELECT version_num FROM saga_example_version"))).one()[0]
        )


async def test_the_engines_migrations_make_only_the_engines_tables(empty: AsyncEngine) -> None:
    await upgrade(empty)
    assert await tables(empty) == ENGINE_TABLES
    await check_schema(empty)


async def test_the_examples_history_is_its_own(empty: AsyncEngine) -> None:
    await upgrade(empty, scripts=[ledger.MIGRATIONS])
    assert await tables(empty) == ENGINE_TABLES | EXAMPLE_TABLES | {"saga_example_version"}
    assert await current_revisions(empty) == head_revisions()
    assert await example_revision(empty) == "example_0001"
    await upgrade(empty, scripts=[ledger.MIGRATIONS])  # at its head: nothing to do
    await check_schema(empty)


async def test_a_database_the_old_0003_gave_the_examples_tables_keeps_them(
    empty: AsyncEngine,
) -> None:
    """An operator who migrated with the old 0003 (which made the example's tables in
    every database) upgrades as usual: the engine's history goes on from where it was,
    and the example's history adopts the tables with their rows."""
    await upgrade(empty, "0002")
    async with empty.begin() as conn:  # what the old 0003 made (the drift test's twin)
        for m in (inventory.metadata, payment.metadata, shipment.metadata):
            await conn.run_sync(m.create_all)
        await conn.execute(insert(inventory.stock).values(sku="kept", available=2, received=2))
    await upgrade(empty, "0003")
    await upgrade(empty)
    assert await current_revisions(empty) == head_revisions()
    assert await tables(empty) == ENGINE_TABLES | EXAMPLE_TABLES  # nothing dropped

    await upgrade(empty, scripts=[ledger.MIGRATIONS])
    assert await example_revision(empty) == "example_0001"
    async with empty.connect() as conn:
        assert (await conn.execute(select(inventory.stock.c.sku))).scalars().all() == ["kept"]


async def test_a_participant_history_needs_a_version_table_of_its_own(
    tmp_path: Path, db: AsyncEngine
) -> None:
    scripts = tmp_path / "mine"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(
        "from engine.database import run_env\nrun_env(version_table='alembic_version')\n"
    )
    with pytest.raises(ConfigError, match="give run_env a version_table of their own"):
        await upgrade(db, scripts=[scripts])
    with pytest.raises(ConfigError, match="no Alembic scripts directory"):
        await upgrade(db, scripts=[tmp_path / "nowhere"])


async def test_the_engines_migrations_are_found_by_path_not_by_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A project's own ``migrations`` package, imported first, changes nothing."""
    theirs = types.ModuleType("migrations")
    theirs.__file__ = str(tmp_path / "migrations" / "__init__.py")
    monkeypatch.setitem(sys.modules, "migrations", theirs)
    assert migrations_dir() == ROOT / "migrations"
    database = create_engine(f"sqlite:///{tmp_path / 'by-path.db'}")
    try:
        await upgrade(database)
        await check_schema(database)
    finally:
        await database.dispose()


def test_sagactl_db_upgrade_applies_participant_histories(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    done = runner.invoke(
        cli, ["--database-url", url, "db", "upgrade", "--scripts", ledger.MIGRATIONS]
    )
    assert done.exit_code == 0, done.output
    assert "to heads" in done.stderr
    missing = runner.invoke(
        cli, ["--database-url", url, "db", "upgrade", "--scripts", str(tmp_path / "none")]
    )
    assert missing.exit_code == 1
    assert missing.stderr.strip().splitlines() == [
        f"sagactl: error: no Alembic scripts directory {str(tmp_path / 'none')!r}"
    ]


def _alembic_heads(location: Path) -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(location))
    return set(ScriptDirectory.from_config(config).get_heads())


def test_the_heads_are_read_as_alembic_reads_them_without_importing_it(tmp_path: Path) -> None:
    # check_schema reads the heads itself (sagactl starts faster without Alembic):
    # the engine's own history, and a branched one written the ways Alembic writes.
    assert head_revisions() == _alembic_heads(migrations_dir())
    versions = tmp_path / "versions"
    versions.mkdir()
    scripts = {
        "a": 'revision = "a"\ndown_revision = None\n',
        "b": 'revision: str = "b"\ndown_revision: str | None = "a"\n',
        "c": "revision = 'c'\ndown_revision = 'a'\n",
        "m": 'revision = "m"\ndown_revision = ("b", "c")\n',  # a merge
        "d": 'revision = "d"\ndown_revision = "a"\nbranch_labels = ("other",)\n',
    }
    for name, body in scripts.items():
        (versions / f"{name}.py").write_text(f'"""{name}"""\n{body}\n\ndef upgrade():\n    pass\n')
    (versions / "__init__.py").write_text("")

    assert head_revisions(tmp_path) == _alembic_heads(tmp_path) == {"m", "d"}


async def test_running_sagas_keep_their_reply_token_and_timer_through_the_graph_state(
    empty: AsyncEngine,
) -> None:
    """0009 moves the one awaited token of a saga row to its step's row and keys timers
    by step: a saga in flight when the engine is upgraded waits for the same reply and
    fires the same timer afterwards."""
    from datetime import UTC, datetime

    from engine.messages import MessageKind
    from engine.model import Awaiting, Timer, TimerKind
    from engine.store.sql import SqlSagaStore

    await upgrade(empty, "0007")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    async with empty.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO saga_instances (id, name, version, status, input, awaiting_step, "
                "awaiting_kind, awaiting_attempt, row_version, created_at, updated_at) VALUES "
                "('s1', 'order', 1, 'compensating', '{}', 'pay', 'compensation', 2, 3, :at, :at)"
            ),
            {"at": at},
        )
        for position, (name, status, attempt, comp) in enumerate(
            [("reserve", "succeeded", 1, 0), ("pay", "compensating", 1, 2)]
        ):
            await conn.execute(
                text(
                    "INSERT INTO saga_steps (saga_id, name, position, status, attempt, "
                    "compensation_attempt) VALUES ('s1', :n, :p, :s, :a, :c)"
                ),
                {"n": name, "p": position, "s": status, "a": attempt, "c": comp},
            )
        await conn.execute(
            text(
                "INSERT INTO saga_timers (saga_id, kind, step, attempt, due_at) "
                "VALUES ('s1', 'compensation_timeout', 'pay', 2, :at)"
            ),
            {"at": at},
        )
    await upgrade(empty)
    store = SqlSagaStore(empty)
    async with store.transaction() as tx:
        state = await tx.load_saga("s1")
    assert state is not None
    assert state.tokens() == [Awaiting("pay", MessageKind.COMPENSATION, 2)]
    assert state.timers() == [Timer(TimerKind.COMPENSATION_TIMEOUT, "pay", 2, at)]
    assert state.steps["reserve"].awaiting is None


async def test_downgrading_below_the_graph_state_keeps_every_saga_and_its_token(
    empty: AsyncEngine,
) -> None:
    """Down to 0007 and back: no saga loses its steps (a SQLite batch that copies
    saga_instances would cascade to them), and the awaited token returns to the row."""
    from datetime import UTC, datetime

    from alembic import command

    from engine.database import _alembic_config
    from engine.messages import MessageKind
    from engine.model import Awaiting

    await upgrade(empty)
    async with empty.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO saga_instances (id, name, version, status, input, row_version, "
                "created_at, updated_at) VALUES ('s1', 'order', 1, 'running', '{}', 1, :at, :at)"
            ),
            {"at": datetime(2026, 1, 1, tzinfo=UTC)},
        )
        await conn.execute(
            text(
                "INSERT INTO saga_steps (saga_id, name, position, status, attempt, "
                "compensation_attempt, awaiting_kind) "
                "VALUES ('s1', 'pay', 0, 'dispatched', 3, 0, 'command')"
            )
        )

    def down(connection: Any) -> None:
        command.downgrade(_alembic_config(migrations_dir(), connection), "0007")

    async with empty.begin() as conn:
        await conn.run_sync(down)
    async with empty.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT awaiting_step, awaiting_kind, awaiting_attempt FROM saga_instances")
            )
        ).one()
        assert tuple(row) == ("pay", "command", 3)
        assert (await conn.execute(text("SELECT count(*) FROM saga_steps"))).scalar() == 1
    await upgrade(empty)
    from engine.store.sql import SqlSagaStore

    async with SqlSagaStore(empty).transaction() as tx:
        state = await tx.load_saga("s1")
    assert state is not None and state.tokens() == [Awaiting("pay", MessageKind.COMMAND, 3)]
