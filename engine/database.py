"""Database URLs, engines and schema migrations.

SQLite needs care to be a correct embedded store: WAL for readers beside the writer,
a busy timeout instead of instant "database is locked", and ``BEGIN IMMEDIATE`` so a
transaction takes the write lock up front rather than failing when it upgrades (a
connection that only reads says so, and takes no lock). That lock is the whole file's,
so a transaction must never wait on anything slow while it holds it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from engine.errors import ConfigError, DatabaseError
from engine.redact import redact
from engine.store.failures import connection_refusal, reason

# Which errors pass, as before; their home is engine.store.failures.
from engine.store.failures import error_text as error_text
from engine.store.failures import is_transient as is_transient

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",  # libpq takes both schemes
}

#: libpq's ``sslmode`` values, weakest first.
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: libpq parameters naming a file.
_FILE_PARAMETERS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
#: The libpq parameters a ``postgresql://`` URL may carry (``ssl`` is asyncpg's name
#: for ``sslmode``, accepted as before). asyncpg applies the TLS ones as libpq does.
POSTGRES_PARAMETERS = (
    "sslmode",
    *_FILE_PARAMETERS,
    "sslpassword",
    "connect_timeout",
    "application_name",
    "ssl",
)


def parse_url(url: str) -> URL:
    """Accept plain ``sqlite:///`` and ``postgresql://`` (or ``postgres://``) URLs and
    pick the async driver; a PostgreSQL URL's parameters are checked here."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a database URL: {redact(url)!r}") from None
    except ValueError as exc:  # e.g. a port that is not a number
        raise ConfigError(f"bad database URL {redact(url)!r}: {redact(str(exc))}") from None
    if parsed.drivername in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[parsed.drivername])
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact(url)!r}: "
            "use sqlite:///file.db or postgresql://user:pass@host/db"
        )
    if parsed.get_backend_name() == "postgresql":
        postgres_parameters(parsed)
    return parsed


def shown(url: URL) -> str:
    """``url`` as errors and logs show it: no password, no ``sslpassword``."""
    base = url.set(query={}).render_as_string(hide_password=True)
    query = [
        f"{key}={'***' if key == 'sslpassword' else value}"
        for key, values in url.query.items()
        for value in ((values,) if isinstance(values, str) else values)
    ]
    return f"{base}?{'&'.join(query)}" if query else base


def postgres_parameters(url: URL) -> dict[str, str]:
    """The libpq parameters of a PostgreSQL URL, checked; ``ssl`` becomes ``sslmode``.

    Anything unusable is a ConfigError of one line: an unknown or repeated parameter,
    an ``sslmode`` libpq does not have, a file that cannot be read, a verifying
    ``sslmode`` with no root certificate to verify against.
    """
    where = f"in database URL {shown(url)!r}"
    found: dict[str, str] = {}
    for key, value in url.query.items():
        if key not in POSTGRES_PARAMETERS:
            raise ConfigError(
                f"unsupported parameter {key!r} {where}; accepted: {', '.join(POSTGRES_PARAMETERS)}"
            )
        if not isinstance(value, str):
            raise ConfigError(f"parameter {key!r} given more than once {where}")
        found[key] = value
    if "ssl" in found:
        if "sslmode" in found:
            raise ConfigError(f"give sslmode or ssl (the same), not both, {where}")
        found["sslmode"] = found.pop("ssl")
    mode = found.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise ConfigError(f"sslmode={mode!r} {where}: use one of {', '.join(SSLMODES)}")
    for key in _FILE_PARAMETERS:
        if key in found and not _readable(found[key]):
            raise ConfigError(f"{key} file {found[key]!r} {where} does not exist or cannot be read")
    if mode in ("verify-ca", "verify-full") and _root_certificate(found) is None:
        raise ConfigError(
            f"sslmode={mode} {where} needs the CA that signed the server's certificate: "
            "add sslrootcert=/path/to/ca.pem"
        )
    timeout = found.get("connect_timeout")
    if timeout is not None and not (timeout.isdigit() and int(timeout) > 0):
        raise ConfigError(f"connect_timeout={timeout!r} {where}: use whole seconds above 0")
    return found


def postgres_connect_args(url: URL) -> dict[str, Any]:
    """``asyncpg.connect``'s keyword arguments for a PostgreSQL URL: the one mapping of
    its libpq parameters, used by the engine's pool and by the LISTEN connection.

    The TLS parameters go to asyncpg as the query of a DSN, which asyncpg reads as
    libpq does: ``require`` encrypts without checking the certificate unless a root
    certificate is given (``sslrootcert``, or libpq's default
    ``~/.postgresql/root.crt``), ``verify-ca`` checks the chain, ``verify-full`` also
    the host name; ``prefer`` (the default) and ``allow`` fall back to plain text.
    ``connect_timeout`` becomes asyncpg's ``timeout``.
    """
    parameters = postgres_parameters(url)
    args: dict[str, Any] = {
        key: value
        for key, value in {
            "host": url.host,
            "port": url.port,
            "user": url.username,
            "password": url.password,
            "database": url.database,
        }.items()
        if value is not None
    }
    libpq = {k: v for k, v in parameters.items() if k != "connect_timeout"}
    if libpq:
        args["dsn"] = "postgresql://?" + urlencode(libpq)
    if "connect_timeout" in parameters:
        args["timeout"] = float(parameters["connect_timeout"])
    return args


async def connect_postgres(url: URL, *, default_timeout: float | None = None) -> Any:
    """A new asyncpg connection to ``url`` (see :func:`postgres_connect_args`);
    ``default_timeout`` bounds the connect when the URL has no ``connect_timeout``."""
    args = postgres_connect_args(url)
    if default_timeout is not None:
        args.setdefault("timeout", default_timeout)
    return await _asyncpg_connect(args)


async def _asyncpg_connect(args: Mapping[str, Any]) -> Any:
    import asyncpg  # type: ignore[import-untyped]

    return await asyncpg.connect(**args)


def _readable(path: str) -> bool:
    file = Path(path).expanduser()
    return file.is_file() and os.access(file, os.R_OK)


def _root_certificate(parameters: Mapping[str, str]) -> str | None:
    """Where libpq (and asyncpg) look for the root certificate, if there is one."""
    for candidate in (
        parameters.get("sslrootcert"),
        os.environ.get("PGSSLROOTCERT"),
        "~/.postgresql/root.crt",
    ):
        if candidate and _readable(candidate):
            return candidate
    return None


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
        # asyncpg takes no libpq parameters as keywords (SQLAlchemy would hand them
        # over so): every connection is made from the one mapping instead, made once
        # (asyncpg reads the certificate files at each connect, so renewed ones count).
        kwargs.setdefault("async_creator", partial(_asyncpg_connect, postgres_connect_args(parsed)))
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


#: Execution option of a connection that only reads (see :func:`reading`).
READ_ONLY = "saga_read_only"


def one_writer(engine: AsyncEngine) -> bool:
    """Whether ``engine``'s database has one write lock for everything (SQLite).

    There a transaction that wrote, or began to write, holds up every other writer of
    the file (engine, relay, timers, other workers) until it ends; on PostgreSQL it
    holds only the rows it touched.
    """
    return engine.dialect.name == "sqlite"


@asynccontextmanager
async def reading(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for reads only. On SQLite its transaction is a deferred ``BEGIN``:
    a snapshot beside the writer (WAL) that neither takes the write lock nor waits
    for it. Elsewhere an ordinary connection."""
    async with engine.connect() as conn:
        yield await conn.execution_options(**{READ_ONLY: True})


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
        # A writer takes the lock up front; a reader must not (see ``reading``).
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


#: The engine's Alembic version table; a participant's history keeps its own.
ENGINE_VERSION_TABLE = "alembic_version"


def migrations_dir() -> Path:
    """The engine's Alembic scripts, found by path and never imported: a project's own
    ``migrations`` package must not stand in for them.

    An installed wheel carries them inside the package (``engine/_migrations``, copied
    there from the repository's ``migrations/`` at build time); in a checkout they are
    ``migrations/`` beside ``engine/``.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise ConfigError(
        f"the engine's migrations are missing beside {package}: reinstall saga-engine"
    )


def _alembic_config(location: str | Path, connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revisions(location: Path | None = None) -> set[str]:
    """The heads of the engine's own history (what :func:`check_schema` expects), or
    of the Alembic scripts at ``location``.

    Read from each version script's ``revision`` and ``down_revision`` assignments
    without importing Alembic, so ``sagactl`` starts fast (Alembic alone takes longer
    to import than a command's whole budget); a test checks the answer against
    Alembic's own reading of the scripts.
    """
    versions = (location or migrations_dir()) / "versions"
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted(versions.glob("*.py")):
        values = _revision_assignments(path)
        revision = values.get("revision")
        if not isinstance(revision, str):
            continue  # not a version script (an __init__.py)
        revisions.add(revision)
        down = values.get("down_revision")
        parents.update([down] if isinstance(down, str) else down or ())
    return revisions - parents


def _revision_assignments(path: Path) -> dict[str, Any]:
    """The literal values a script assigns to ``revision`` and ``down_revision``."""
    import ast

    values: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            values[target.id] = ast.literal_eval(value)
    return values


async def upgrade(
    engine: AsyncEngine, revision: str = "heads", *, scripts: Iterable[str | Path] = ()
) -> None:
    """Apply the engine's migrations up to ``revision`` on ``engine``'s database, then
    each participant history in ``scripts`` to its heads, each in its own transaction.

    A history in ``scripts`` is an Alembic scripts directory (a path, or
    ``package:directory``) whose ``env.py`` calls :func:`run_env` with a version table
    of its own, so it and the engine's never mix.
    """
    histories = [(migrations_dir(), revision), *((location, "heads") for location in scripts)]
    for location, target in histories:
        await _upgrade_one(engine, location, target)


async def _upgrade_one(engine: AsyncEngine, location: str | Path, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    where = _scripts_directory(location)

    def run(connection: Connection) -> None:
        command.upgrade(_alembic_config(location, connection), revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    except (DBAPIError, OSError) as exc:
        raise _unusable(engine, exc, "cannot migrate") from None
    except (CommandError, ImportError) as exc:  # no env.py, a revision it does not have
        raise ConfigError(f"cannot migrate with the Alembic scripts {where!r}: {exc}") from None


def _scripts_directory(location: str | Path) -> str:
    """``location`` as text, checked when it is a path (``package:dir`` is Alembic's)."""
    where = str(location)
    if ":" not in where and not Path(where).is_dir():
        raise ConfigError(f"no Alembic scripts directory {where!r}")
    return where


def run_env(*, version_table: str, target_metadata: Any = None) -> None:
    """The body of an Alembic ``env.py``, the engine's and a participant's alike.

    Migrates the connection that :func:`upgrade` (``sagactl db upgrade``) hands in, or,
    under the ``alembic`` command itself, the ini file's ``sqlalchemy.url`` or else
    ``SAGA_DATABASE_URL``. ``version_table`` keeps the histories apart: the engine's is
    ``alembic_version``; each participant (or application) names its own. With
    ``target_metadata``, ``alembic revision --autogenerate`` compares only its tables:
    the engine's tables, or another history's, are not this one's to drop.
    """
    import asyncio

    from alembic import context

    location = Path(context.script.dir).resolve()
    if version_table == ENGINE_VERSION_TABLE and location != migrations_dir().resolve():
        raise ConfigError(
            f"the Alembic scripts at {str(location)!r} use the engine's version table "
            f"{ENGINE_VERSION_TABLE!r}: give run_env a version_table of their own"
        )
    tables = {t.name for m in _metadatas(target_metadata) for t in m.sorted_tables}

    def include(_obj: Any, name: str | None, type_: str, reflected: bool, _other: Any) -> bool:
        return type_ != "table" or not reflected or name in tables

    def run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table=version_table,
            include_object=include,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()

    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    asyncio.run(_run_from_url(context.config.get_main_option("sqlalchemy.url"), run))


async def _run_from_url(url: str | None, run: Callable[[Connection], None]) -> None:
    from engine.settings import Settings

    engine = create_engine(url or Settings().database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


def _metadatas(target: Any) -> list[Any]:
    if target is None:
        return []
    return list(target) if isinstance(target, list | tuple) else [target]


async def current_revisions(engine: AsyncEngine) -> set[str]:
    """The revisions the database's engine history is at (none: not migrated).

    Read from Alembic's version table with a plain query, as Alembic reads it."""

    def read(connection: Connection) -> set[str]:
        if not inspect(connection).has_table(ENGINE_VERSION_TABLE):
            return set()
        rows = connection.execute(text(f"SELECT version_num FROM {ENGINE_VERSION_TABLE}"))
        return {row[0] for row in rows}

    try:
        async with engine.connect() as conn:
            return await conn.run_sync(read)
    except (DBAPIError, OSError) as exc:
        raise _unusable(engine, exc, "cannot reach") from None


async def check_schema(engine: AsyncEngine) -> None:
    """Fail clearly if the database is not migrated to this code's schema."""
    current = await current_revisions(engine)
    if current != head_revisions():
        state = "has no saga tables" if not current else f"is at revision {sorted(current)}"
        raise DatabaseError(
            f"database {shown(engine.url)} {state}; run 'sagactl db upgrade' to migrate it"
        )


def _unusable(engine: AsyncEngine, exc: BaseException, doing: str) -> DatabaseError:
    """One line: the database refused this process, or could not be reached."""
    refusal = connection_refusal(exc)
    if refusal is not None:
        return DatabaseError(f"database {shown(engine.url)}: {refusal}")
    return DatabaseError(f"{doing} database {shown(engine.url)}: {reason(exc)}")
