"""Engine and workers as separate OS processes on real PostgreSQL and brokers.

Each test gets a fresh PostgreSQL database and a fresh topic/queue prefix, so runs
never see each other's data or messages. Both are dropped when the test ends (the
topics / queues by ``tests/brokers.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from engine.database import connect_postgres, create_engine, parse_url, upgrade
from engine.settings import Settings
from engine.transport.kafka_options import KafkaOptions
from tests.brokers import BrokerObjects, drop_after_test, saga_participants, topology_objects
from tests.pg import drop_database
from workers import ledger
from workers.demo import WORKERS


def service_url(variable: str) -> str:
    """The URL of a real service, started by ``scripts/services up``.

    Missing outside CI: the test is skipped with instructions. Missing in CI: the test
    fails, because CI must never pass without the real services.
    """
    value = os.environ.get(variable)
    if value:
        return value
    message = f"{variable} is not set: run `scripts/services up` and `eval $(scripts/services env)`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def kafka_options(env: Mapping[str, str]) -> KafkaOptions:
    """The ``SAGA_KAFKA_*`` settings of a process started with ``env`` added to ours."""
    given = {
        name.removeprefix("SAGA_").lower(): value
        for name, value in env.items()
        if name.startswith("SAGA_KAFKA_") and not name.endswith("_FILE")
    }
    return Settings(**given).kafka


def kafka_sasl_ssl(mechanism: str = "SCRAM-SHA-512") -> tuple[str, dict[str, str]]:
    """The secured Kafka listener (``scripts/services``: SASL_SSL, SCRAM, a test CA):
    its URL, and the settings that log in to it."""
    return f"kafka://{service_url('SAGA_TEST_KAFKA_SASL_SERVERS')}", {
        "SAGA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SAGA_KAFKA_SASL_MECHANISM": mechanism,
        "SAGA_KAFKA_SASL_USERNAME": service_url("SAGA_TEST_KAFKA_SASL_USER"),
        "SAGA_KAFKA_SASL_PASSWORD": service_url("SAGA_TEST_KAFKA_SASL_PASSWORD"),
        "SAGA_KAFKA_SSL_CAFILE": service_url("SAGA_TEST_TLS_CA"),
    }


@asynccontextmanager
async def fresh_database(base_url: str, *, migrate: bool = True) -> AsyncIterator[str]:
    """A new PostgreSQL database, migrated unless told otherwise (the engine's and the
    example's histories); dropped afterwards.

    Connected to as the engine connects (``sslmode`` and all)."""
    url = parse_url(base_url)
    name = f"saga_test_{uuid.uuid4().hex[:12]}"
    admin = await connect_postgres(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        db_url = url.set(database=name).render_as_string(hide_password=False)
        if migrate:
            engine = create_engine(db_url)
            await upgrade(engine, scripts=[ledger.MIGRATIONS])
            await engine.dispose()
        yield db_url
    finally:
        try:
            await drop_database(admin, name)
        finally:
            await admin.close()


@dataclass
class Daemon:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    #: The ``sagactl`` arguments it was started with (a restart repeats them).
    args: tuple[str, ...] = ()

    def tail(self, lines: int = 40) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """Starts ``sagactl engine`` and ``sagactl worker`` processes and stops them.

    When the test ends, whatever daemon still runs is killed and the prefix's topics /
    queues are dropped from the broker (``tests/brokers.py``).
    """

    database_url: str
    broker_url: str
    log_dir: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    daemons: list[Daemon] = field(default_factory=list)
    #: More environment for every process (e.g. OTEL_* exporter settings).
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Daemons replaced by :meth:`restart` (stopped; their logs kept).
    retired: list[Daemon] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SAGA_DATABASE_URL": self.database_url,
            "SAGA_BROKER_URL": self.broker_url,
            "SAGA_TOPIC_PREFIX": self.prefix,
            "SAGA_SAGAS": "sagas.order",
            "SAGA_WORKERS": ",".join(WORKERS),  # ``sagactl worker inventory`` and the others
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    def __post_init__(self) -> None:
        drop_after_test(self.leftovers)

    def broker_objects(self) -> BrokerObjects:
        """The topics / queues of this cluster's prefix, for the sagas it serves."""
        modules = self.env.get("SAGA_SAGAS", "").split(",")
        return topology_objects(
            self.broker_url,
            self.prefix,
            saga_participants(modules),
            kafka=kafka_options(self.extra_env),
        )

    def leftovers(self) -> BrokerObjects:
        """At the end of the test: no daemon outlives it (a live consumer would re-create
        a dropped topic), and what is left on the broker goes."""
        for d in self.daemons:
            if d.process.poll() is None:
                d.process.kill()
                d.process.wait()
        return self.broker_objects()

    def spawn(self, name: str, *args: str) -> Daemon:
        log_path = self.log_dir / f"{name}-{len(self.daemons) + len(self.retired)}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        daemon = Daemon(name, process, log_path, log_file, args)
        self.daemons.append(daemon)
        return daemon

    def start_engine(self) -> Daemon:
        return self.spawn("engine", "engine", "--grace", "20")

    def start_worker(self, name: str) -> Daemon:
        return self.spawn(name, "worker", name, "--grace", "20")

    def start_all(self, workers: Iterable[str] = ("inventory", "payment", "shipment")) -> None:
        for name in workers:
            self.start_worker(name)
        self.start_engine()

    def assert_running(self) -> None:
        for d in self.daemons:
            if d.process.poll() is not None:
                raise AssertionError(f"{d.name} exited with {d.process.returncode}:\n{d.tail()}")

    def stop(self, daemon: Daemon, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if daemon.process.poll() is None:
            daemon.process.send_signal(sig)
        try:
            return daemon.process.wait(timeout)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            raise AssertionError(
                f"{daemon.name} ignored {sig} for {timeout}s:\n{daemon.tail()}"
            ) from None
        finally:
            daemon.log_file.close()

    def restart(self, daemon: Daemon) -> Daemon:
        """Stop ``daemon`` (SIGTERM: it drains; it must exit with 0) and start it
        again with the same arguments under the cluster's environment as it is now."""
        exit_status = self.stop(daemon)
        assert exit_status == 0, f"{daemon.name} exited with {exit_status}:\n{daemon.tail()}"
        index = self.daemons.index(daemon)
        self.retired.append(self.daemons.pop(index))
        again = self.spawn(daemon.name, *daemon.args)
        self.daemons.remove(again)
        self.daemons.insert(index, again)
        return again

    def ready(self, daemon: Daemon) -> bool:
        """Whether ``daemon`` logged that it is up (``... consuming <destination>``)."""
        return " consuming " in daemon.log_path.read_text(errors="replace")

    def stop_all(self) -> dict[str, int]:
        return {f"{d.name}-{i}": self.stop(d) for i, d in enumerate(self.daemons)}

    def logs(self) -> str:
        return "\n\n".join(f"--- {d.name} ---\n{d.tail()}" for d in self.daemons)


def sagactl(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def wait_until(predicate: object, *, timeout: float, interval: float = 0.2) -> bool:
    """Poll an async predicate until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(interval)
    return False
