"""saga-engine as users run it: ``sagactl engine`` and three ``sagactl worker``
processes on a fresh PostgreSQL database and a fresh topic / queue prefix.

Sagas are started with the public :class:`engine.client.SagaClient`; completion is
read from the saga rows, whose ``updated_at`` is the engine's commit of the final
transition, so the poll interval never enters a latency.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import asyncpg
from sqlalchemy.engine import make_url

from bench.order import SAGA_NAME, order_input
from bench.procs import Group, Monitor, fixed, listener
from bench.system import Finish, incident_lines
from engine.client import SagaClient
from engine.database import parse_url, postgres_connect_args
from engine.settings import load_settings
from engine.wiring import Wiring
from tests.brokers import drop_topology
from tests.pg import drop_database

ROOT = Path(__file__).resolve().parent.parent
PARTICIPANTS = ("inventory", "payment", "shipment")
RUNNING = ("running", "compensating")


def pg_connect_args(url: str) -> dict[str, Any]:
    """asyncpg's arguments for a database URL, as the engine connects (sslmode and all)."""
    return postgres_connect_args(parse_url(url))


def broker_port(url: str) -> int:
    """The port of the first broker in a ``kafka://`` or ``amqp://`` URL."""
    netloc = url.split("://", 1)[1].split("/", 1)[0].split(",")[0].rpartition("@")[2]
    host, _, port = netloc.rpartition(":")
    return int(port) if host and port.isdigit() else (9092 if url.startswith("kafka") else 5672)


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def tail(self, lines: int = 30) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class SagaEngineSystem:
    def __init__(
        self,
        *,
        broker: str,
        broker_url: str,
        postgres_url: str,
        log_dir: Path,
        engines: int = 1,
        worker_concurrency: int = 8,
        start_timeout: float = 60,
    ) -> None:
        self.broker = broker
        self.label = f"saga-engine/{broker}" + (f" x{engines} engines" if engines > 1 else "")
        self.broker_url = broker_url
        self.postgres_url = postgres_url
        self.engines = engines
        self.worker_concurrency = worker_concurrency
        self.start_timeout = start_timeout
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.database = f"saga_bench_{uuid.uuid4().hex[:12]}"
        self.log_dir = log_dir
        self.daemons: list[Daemon] = []
        self.monitor = Monitor([])
        self._wiring: Wiring | None = None
        self._client: SagaClient | None = None
        self._pool: asyncpg.Pool | None = None
        self._admin: asyncpg.Connection | None = None
        self._started = 0

    # -- lifecycle ---------------------------------------------------------------

    @property
    def database_url(self) -> str:
        url = make_url(self.postgres_url).set(database=self.database)
        return url.render_as_string(hide_password=False)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SAGA_DATABASE_URL": self.database_url,
            "SAGA_BROKER_URL": self.broker_url,
            "SAGA_TOPIC_PREFIX": self.prefix,
            "SAGA_SAGAS": "bench.order",
            "PYTHONUNBUFFERED": "1",
        }

    def spawn(self, name: str, *args: str) -> Daemon:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.prefix}-{name}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            env=self.env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        daemon = Daemon(name, process, log_path, log_file)
        self.daemons.append(daemon)
        return daemon

    def pids(self, prefix: str) -> list[int]:
        return [d.process.pid for d in self.daemons if d.name.startswith(prefix)]

    async def __aenter__(self) -> SagaEngineSystem:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        self._admin = await asyncpg.connect(**pg_connect_args(self.postgres_url))
        await self._admin.execute(f'CREATE DATABASE "{self.database}"')
        # The daemons' settings (this environment and the variables above), for the
        # migrations and the client this process starts sagas with.
        self._wiring = Wiring(
            load_settings(
                database_url=self.database_url,
                broker_url=self.broker_url,
                topic_prefix=self.prefix,
                sagas="bench.order",
            )
        )
        await self._wiring.migrate()
        for participant in PARTICIPANTS:
            self.spawn(
                participant,
                "worker",
                f"bench.workers:{participant}",
                "--concurrency",
                str(self.worker_concurrency),
            )
        for i in range(self.engines):
            self.spawn(f"engine-{i + 1}", "engine")
        await self._wait_ready()
        self._client = self._wiring.client()
        self._pool = await asyncpg.create_pool(
            **{**pg_connect_args(self.postgres_url), "database": self.database},
            min_size=1,
            max_size=2,
        )
        self.monitor = Monitor(self._groups())

    async def _wait_ready(self) -> None:
        """Every daemon logged that it is consuming (and stayed up)."""
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.daemons)
        while pending:
            self.assert_running()
            pending = [
                d for d in pending if "consuming" not in d.log_path.read_text("utf-8", "replace")
            ]
            if time.monotonic() > deadline:
                raise RuntimeError(f"{[d.name for d in pending]} not ready:\n{self.logs()}")
            await asyncio.sleep(0.1)

    def _groups(self) -> list[Group]:
        async def backends() -> set[int]:
            assert self._pool is not None
            rows = await self._pool.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
            )
            return {r["pid"] for r in rows}

        async def background() -> set[int]:
            assert self._pool is not None
            rows = await self._pool.fetch("SELECT pid FROM pg_stat_activity WHERE datname IS NULL")
            return {r["pid"] for r in rows}

        return [
            Group("engine", fixed(*self.pids("engine")), own=True),
            *(Group(p, fixed(*self.pids(p)), own=True) for p in PARTICIPANTS),
            Group("postgres", backends, memory="pss"),
            Group("postgres bg", background, shared=True, memory="pss"),
            Group(self.broker, listener(broker_port(self.broker_url)), shared=True),
            Group("bench client", fixed(os.getpid())),
        ]

    def assert_running(self) -> None:
        for d in self.daemons:
            if d.process.poll() is not None:
                raise RuntimeError(f"{d.name} exited with {d.process.returncode}:\n{d.tail()}")

    def incidents(self) -> list[str]:
        lines: list[str] = []
        for d in self.daemons:
            d.log_file.flush()
            text = d.log_path.read_text(errors="replace")
            # A consumer group rebalancing as a second engine joins is normal.
            found = incident_lines(text, (" WARNING ", " ERROR "), ignore=("rebalancing",))
            lines += [f"{d.name}: {x}" for x in found]
        return lines

    def logs(self) -> str:
        return "\n\n".join(f"--- {d.name} ({d.log_path}) ---\n{d.tail()}" for d in self.daemons)

    async def _stop(self) -> None:
        for d in self.daemons:
            if d.process.poll() is None:
                d.process.send_signal(signal.SIGTERM)
        for d in self.daemons:
            try:
                await asyncio.to_thread(d.process.wait, 30)
            except subprocess.TimeoutExpired:
                d.process.kill()
                await asyncio.to_thread(d.process.wait)
            d.log_file.close()
        try:
            if self._wiring is not None:
                await self._wiring.close()  # the client's database too
            if self._pool is not None:
                await self._pool.close()
            if self._admin is not None:
                await drop_database(self._admin, self.database)
                await self._admin.close()
        finally:
            # Leave the shared broker as it was: drop this run's topics / queues (a
            # broker that cannot be reached is a warning; they stay behind).
            await drop_topology(self.broker_url, self.prefix, PARTICIPANTS)

    # -- the System protocol ---------------------------------------------------------

    async def start_saga(self, index: int, *, fail_last: bool) -> str:
        assert self._client is not None
        saga_id = await self._client.start(SAGA_NAME, order_input(index, fail_last=fail_last))
        self._started += 1
        return saga_id

    async def wait_one(self, key: str, timeout: float) -> None:
        assert self._pool is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self._pool.fetchval(
                "SELECT status FROM saga_instances WHERE id = $1", key
            )
            if status not in RUNNING:
                return
            await asyncio.sleep(0.003)
        self.assert_running()
        raise TimeoutError(f"saga {key} did not end within {timeout:g}s")

    async def _running(self) -> int:
        assert self._pool is not None
        return int(
            await self._pool.fetchval(
                "SELECT count(*) FROM saga_instances WHERE status = ANY($1::text[])",
                list(RUNNING),
            )
        )

    async def wait_settled(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._running() == 0:
                return True
            self.assert_running()
            await asyncio.sleep(0.05)
        return False

    async def settled_count(self) -> int:
        return self._started - await self._running()

    async def finishes(self, keys: Sequence[str]) -> dict[str, Finish]:
        assert self._pool is not None
        rows = await self._pool.fetch(
            "SELECT id, status, extract(epoch FROM updated_at)::float8 AS end_at "
            "FROM saga_instances WHERE id = ANY($1::text[]) AND NOT status = ANY($2::text[])",
            list(keys),
            list(RUNNING),
        )
        return {r["id"]: Finish(r["end_at"], r["status"]) for r in rows}

    async def database_mib(self) -> float:
        assert self._pool is not None
        size = await self._pool.fetchval("SELECT pg_database_size($1)", self.database)
        return float(size) / (1024 * 1024)
