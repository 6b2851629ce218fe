"""Database URLs, engines and schema migrations.

SQLite needs care to be a correct embedded store: WAL for readers beside the writer,
a busy timeout instead of instant "database is locked", and ``BEGIN IMMEDIATE`` so a
transaction takes the write lock up front rather than failing when it upgrades.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from engine.errors import ConfigError, DatabaseError
from engine.redact import redact

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}

#: SQLSTATE classes of errors that pass: connection exception, transaction rollback
#: (serialization failure, deadlock), insufficient resources, operator intervention
#: (shutdown, query cancelled), system error.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass by itself (the database or the network is away or busy)
    rather than being this message's own problem (a value the database refuses, a bug).

    A transient error is everyone's: whoever meets it retries later and dead-letters
    nothing. Anything else fails one message, which is retried a bounded number of
    times and then set aside with the error as its reason.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    for error in chain:  # the database's own word first
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    for error in chain:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, OperationalError | InterfaceError | DisconnectionError | OSError):
            return True
    return False


def error_text(exc: BaseException) -> str:
    """One line saying what failed: the database's own message where there is one."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {_reason(exc)}"


def parse_url(url: str) -> URL:
    """Accept plain ``sqlite:///`` and ``postgresql://`` URLs and pick the async driver."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {redact(url)!r}") from None
    if parsed.drivername in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() not in _DRIVERS:
        raise ConfigError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact(url)!r}: "
            "use sqlite:///file.db or postgresql://user:pass@host/db"
        )
    return parsed


def sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def create_engine(url: str, *, must_exist: bool = False, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url``; with ``must_exist`` a missing SQLite file is an error."""
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if must_exist and path is not None and not path.exists():
        raise DatabaseError(
            f"database file {str(path)!r} does not exist; create it with 'sagactl db upgrade'"
        )
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30})
    else:
        kwargs.setdefault("pool_size", 10)
    try:
        engine = create_async_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"no driver for {parsed.drivername}: install saga-engine[postgres] ({exc})"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _tune_sqlite(engine)
    elif not kwargs.get("pool_pre_ping"):
        _drop_closed_connections(engine)
    return engine


def _drop_closed_connections(engine: AsyncEngine) -> None:
    """Replace a pooled connection the server closed (a restart, a terminated backend)
    when it is checked out, instead of failing the transaction that gets it.

    ``pool_pre_ping`` does the same with a round trip per checkout (three on asyncpg:
    BEGIN, an empty query, ROLLBACK), on the path of every message; asyncpg already
    knows a connection whose server hung up, so asking it costs nothing.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", None)
        is_closed = getattr(driver, "is_closed", None)
        if is_closed is not None and is_closed():
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError("the server closed this pooled connection")


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).parent


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(_alembic_config()).get_heads())


async def upgrade(engine: AsyncEngine, revision: str = "heads") -> None:
    """Apply the Alembic migrations up to ``revision`` on ``engine``'s database."""
    from alembic import command

    def run(connection: Connection) -> None:
        command.upgrade(_alembic_config(connection), revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    except (DBAPIError, OSError) as exc:
        raise DatabaseError(f"cannot migrate {engine.url!r}: {_reason(exc)}") from None


async def current_revisions(engine: AsyncEngine) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    def read(connection: Connection) -> set[str]:
        if not inspect(connection).has_table("alembic_version"):
            return set()
        return set(MigrationContext.configure(connection).get_current_heads())

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(read)
    except (DBAPIError, OSError) as exc:
        raise DatabaseError(f"cannot reach database {engine.url!r}: {_reason(exc)}") from None


async def check_schema(engine: AsyncEngine) -> None:
    """Fail clearly if the database is not migrated to this code's schema."""
    current = await current_revisions(engine)
    if current != head_revisions():
        state = "has no saga tables" if not current else f"is at revision {sorted(current)}"
        raise DatabaseError(
            f"database {engine.url!r} {state}; run 'sagactl db upgrade' to migrate it"
        )


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
