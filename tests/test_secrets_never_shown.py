"""A known password fed through every URL and connection error path never shows.

Bad scheme, bad port, missing host, unreachable host, refused credentials; for
``SAGA_DATABASE_URL`` and ``SAGA_BROKER_URL``; for ``sagactl`` commands and for the
daemons, whose start fails within seconds with one line. Then daemons that lose the
broker's credentials and the database while they run: their logs (text and JSON) and
``/readyz`` while they retry. The password must appear nowhere.

The start-up cases are one table (:data:`CASES`): a new way to fail is one more row.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from engine.database import create_engine, upgrade
from tests.e2e import Cluster, Daemon, fresh_database, wait_until
from tests.services import SETUP, closed_port, in_ci, rabbitmqctl, run, service_url
from tests.test_e2e_telemetry import free_port, http_get

pytestmark = pytest.mark.integration

#: The password every case carries; it must never be shown.
SECRET = "Hunter2secretPW"

DB, BROKER = "SAGA_DATABASE_URL", "SAGA_BROKER_URL"
LIST = ("list",)
UPGRADE = ("db", "upgrade")
ENGINE = ("engine", "--metrics-port", "0")
WORKER = ("worker", "payment", "--metrics-port", "0")
JSON = ("--log-format", "json")


@dataclass(frozen=True)
class Case:
    """``sagactl *command`` with ``env`` (placeholders: ``{secret}``, ``{pg}`` and
    ``{amqp}`` host:port of the real services, ``{amqps}`` and ``{kafka_sasl}`` those
    of the secured listeners, ``{closed}`` a port nothing listens on, ``{sqlite}`` a
    migrated SQLite database, ``{ca}`` the test CA)."""

    id: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    #: Environment variables the case needs (e.g. the secured services').
    needs: tuple[str, ...] = field(default=())


CASES = [
    # -- the database URL ---------------------------------------------------------------
    Case("pg-wrong-password", LIST, {DB: "postgresql://saga:{secret}@{pg}/saga"}),
    Case(
        "pg-wrong-password-engine-json",
        ENGINE + JSON,
        {DB: "postgresql+asyncpg://saga:{secret}@{pg}/saga"},
    ),
    Case("postgres-alias", WORKER, {DB: "postgres://saga:{secret}@{pg}/saga"}),
    Case("pg-bad-port", LIST, {DB: "postgresql://saga:{secret}@127.0.0.1:notaport/saga"}),
    Case("pg-no-host", UPGRADE, {DB: "postgresql://saga:{secret}@/saga"}),
    Case("pg-unreachable", ENGINE, {DB: "postgresql://saga:{secret}@127.0.0.1:{closed}/saga"}),
    Case("db-bad-scheme", LIST, {DB: "mysql://saga:{secret}@{pg}/saga"}),
    Case("sqlite-with-password", LIST, {DB: "sqlite://saga:{secret}@/no/such/file.db"}),
    # -- the broker URL -----------------------------------------------------------------
    Case("amqp-wrong-password", ENGINE, {DB: "{sqlite}", BROKER: "amqp://saga:{secret}@{amqp}/"}),
    Case(
        "amqp-wrong-password-worker-json",
        WORKER + JSON,
        {DB: "{sqlite}", BROKER: "amqp://saga:{secret}@{amqp}/"},
    ),
    Case(
        "amqps-on-a-plain-port", ENGINE, {DB: "{sqlite}", BROKER: "amqps://saga:{secret}@{amqp}/"}
    ),
    Case(
        "amqps-wrong-password",
        ENGINE + JSON,
        {DB: "{sqlite}", BROKER: "amqps://saga:{secret}@{amqps}/?cafile={ca}"},
        needs=("SAGA_TEST_AMQPS_URL", "SAGA_TEST_TLS_CA"),
    ),
    Case(
        "amqp-unreachable",
        WORKER,
        {DB: "{sqlite}", BROKER: "amqp://saga:{secret}@127.0.0.1:{closed}/"},
    ),
    Case("amqp-bad-port", ENGINE, {DB: "{sqlite}", BROKER: "amqp://saga:{secret}@127.0.0.1:x/"}),
    Case("amqp-no-host", ENGINE, {DB: "{sqlite}", BROKER: "amqp://saga:{secret}@/"}),
    Case(
        "kafka-credentials-unreachable",
        ENGINE + JSON,
        {DB: "{sqlite}", BROKER: "kafka://saga:{secret}@127.0.0.1:{closed}"},
    ),
    Case(
        "kafka-sasl-wrong-password",
        ENGINE + JSON,
        {
            DB: "{sqlite}",
            BROKER: "kafka://{kafka_sasl}",
            "SAGA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SAGA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "SAGA_KAFKA_SASL_USERNAME": "saga",
            "SAGA_KAFKA_SASL_PASSWORD": "{secret}",
            "SAGA_KAFKA_SSL_CAFILE": "{ca}",
        },
        needs=("SAGA_TEST_KAFKA_SASL_SERVERS", "SAGA_TEST_TLS_CA"),
    ),
    Case("broker-bad-scheme", WORKER, {DB: "{sqlite}", BROKER: "redis://saga:{secret}@h/"}),
]


@pytest.fixture
async def placeholders(tmp_path: Path) -> dict[str, str]:
    pg = make_url(service_url("SAGA_TEST_POSTGRES_URL"))
    amqp = make_url(service_url("SAGA_TEST_AMQP_URL").replace("amqp://", "postgresql://"))
    sqlite = f"sqlite:///{tmp_path / 'saga.db'}"
    database = create_engine(sqlite)
    await upgrade(database)
    await database.dispose()
    values = {
        "secret": SECRET,
        "pg": f"{pg.host}:{pg.port or 5432}",
        "amqp": f"{amqp.host}:{amqp.port or 5672}",
        "closed": str(closed_port()),
        "sqlite": sqlite,
        "ca": os.environ.get("SAGA_TEST_TLS_CA", ""),
        "amqps": "",
        "kafka_sasl": os.environ.get("SAGA_TEST_KAFKA_SASL_SERVERS", ""),
    }
    if os.environ.get("SAGA_TEST_AMQPS_URL"):
        amqps = make_url(os.environ["SAGA_TEST_AMQPS_URL"].replace("amqps://", "postgresql://"))
        values["amqps"] = f"{amqps.host}:{amqps.port or 5671}"
    return values


async def _sagactl(command: tuple[str, ...], env: Mapping[str, str]) -> tuple[int | None, str]:
    """Run ``sagactl``; its exit status (None: still running after 60s) and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli",
        *command,
        env={**os.environ, "SAGA_BROKER_URL": "memory://", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        return None, out.decode(errors="replace")
    return process.returncode, out.decode(errors="replace")


async def test_no_url_or_connection_error_shows_the_password(
    placeholders: dict[str, str],
) -> None:
    """Every case ends (a daemon does not start without its database and broker) with
    a failure status and an error line, not a traceback, and nothing it printed holds
    the password."""
    limit = asyncio.Semaphore(4)  # two cores, shared

    async def check(case: Case) -> str | None:
        missing = [v for v in case.needs if not os.environ.get(v)]
        if missing:  # the secured services: required in CI, optional on a laptop
            return f"{case.id}: {', '.join(missing)} not set: {SETUP}" if in_ci() else None
        env = {k: v.format(**placeholders) for k, v in case.env.items()}
        async with limit:
            status, output = await _sagactl(case.command, env)
        if SECRET in output:
            return f"{case.id}: shows the password:\n{output}"
        if status is None or status == 0:
            return f"{case.id}: did not fail within 60s (status {status}):\n{output}"
        if "Traceback" in output:
            return f"{case.id}: a traceback, not one error line:\n{output}"
        return None

    problems = [p for p in await asyncio.gather(*(check(c) for c in CASES)) if p]
    assert not problems, "\n\n".join(problems)


# -- daemons that lose their broker credentials and database while they run -----------


class Proxy:
    """A TCP relay to ``target`` that the test can cut: the service is then unreachable
    (connections closed, new ones refused) without touching the shared service."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()


class RabbitUser:
    """A RabbitMQ user of its own with a password; deleting it also closes its
    connections, the way the test takes the broker's credentials away."""

    def __init__(self, password: str) -> None:
        self.name = f"saga-redact-{uuid.uuid4().hex[:8]}"
        self.password = password
        self.exists = False

    async def create(self) -> None:
        await run([*rabbitmqctl(), "add_user", self.name, self.password])
        self.exists = True
        await run([*rabbitmqctl(), "set_permissions", self.name, ".*", ".*", ".*"])

    async def delete(self) -> None:
        if self.exists:
            self.exists = False
            await run([*rabbitmqctl(), "delete_user", self.name])


@asynccontextmanager
async def rabbitmq_user(password: str) -> AsyncIterator[RabbitUser]:
    user = RabbitUser(password)
    try:
        await user.create()
        yield user
    finally:
        await user.delete()


def readiness(port: int) -> dict[str, dict[str, object]]:
    status, body = http_get(f"http://127.0.0.1:{port}/readyz")
    return dict(json.loads(body)["checks"]) if status else {}


async def test_daemons_retrying_without_credentials_or_database_never_show_the_password(
    tmp_path: Path,
) -> None:
    """Engine (text log) and worker (JSON log) run on a RabbitMQ user whose password is
    the secret, their database behind a relay. The user is deleted (its connections
    closed, every reconnect refused) and the relay cut: while the daemons retry,
    ``/readyz`` reports the database check failing and the logs the refused logins,
    and none of it shows the secret.
    """
    pg = make_url(service_url("SAGA_TEST_POSTGRES_URL"))
    amqp = make_url(service_url("SAGA_TEST_AMQP_URL").replace("amqp://", "postgresql://"))
    async with (
        fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as db_url,
        rabbitmq_user(SECRET) as user,
    ):
        proxy = Proxy(pg.host or "127.0.0.1", pg.port or 5432)
        relayed = make_url(db_url).set(host="127.0.0.1", port=await proxy.start())
        broker = f"amqp://{user.name}:{SECRET}@{amqp.host}:{amqp.port or 5672}/"
        cluster = Cluster(relayed.render_as_string(hide_password=False), broker, tmp_path)
        ports = {"engine": free_port(), "payment": free_port()}
        daemons: dict[str, Daemon] = {
            "engine": cluster.spawn(
                "engine", "engine", "--metrics-port", str(ports["engine"]), "--grace", "1"
            ),
            "payment": cluster.spawn(
                "payment",
                "worker",
                "payment",
                "--metrics-port",
                str(ports["payment"]),
                "--log-format",
                "json",
                "--grace",
                "1",
            ),
        }
        try:

            async def all_ready() -> bool:
                cluster.assert_running()
                return all(
                    checks and all(c["ok"] for c in checks.values())
                    for checks in (readiness(p) for p in ports.values())
                )

            assert await wait_until(all_ready, timeout=60), cluster.logs()
            await asyncio.gather(proxy.cut(), user.delete())

            async def failing() -> bool:
                """Both retry: /readyz reports the database, the logs the refused login."""
                cluster.assert_running()
                return all(
                    readiness(ports[name]).get("database", {}).get("ok") is False
                    and "ACCESS_REFUSED" in daemon.log_path.read_text(errors="replace")
                    for name, daemon in daemons.items()
                )

            assert await wait_until(failing, timeout=60), cluster.logs()
            bodies = {
                name: http_get(f"http://127.0.0.1:{p}/readyz")[1] for name, p in ports.items()
            }
        finally:
            for daemon in daemons.values():
                if daemon.process.poll() is None:
                    daemon.process.kill()
                    daemon.process.wait()
                daemon.log_file.close()
            await proxy.cut()
            # The queues go with an account that still exists (tests/brokers.py).
            cluster.broker_url = service_url("SAGA_TEST_AMQP_URL")
        logs = {name: d.log_path.read_text(errors="replace") for name, d in daemons.items()}
    for name, text in {**bodies, **logs}.items():
        assert SECRET not in text, f"{name} shows the password:\n{text}"
    assert all(line.startswith("{") for line in logs["payment"].splitlines()), logs["payment"]
    assert "database check failed" in logs["engine"], logs["engine"]
