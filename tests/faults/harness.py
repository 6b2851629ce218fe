"""The shared harness of the fault-injection suite (``pytest -m faults``).

Every scenario runs ``sagactl engine`` and ``sagactl worker NAME`` as separate OS
processes on a fresh PostgreSQL database and a unique topic/queue prefix (both dropped
when the test ends, the topics / queues by ``tests/brokers.py``), over Kafka or
RabbitMQ; kills them for real (SIGKILL, either from the test or at a deterministic
crash point named in ``SAGA_CRASH``, see ``engine/faults.py``); and judges the outcome
by the participants' ledgers:

* stock and money are conserved;
* no order is charged twice, and a compensated order's refunds equal its charges;
* each order's net effect matches its saga's final state (completed: reserved,
  charged once, shipped; compensated: nothing reserved, nothing charged, nothing
  shipped);
* every saga ends COMPLETED or COMPENSATED (or PARKED where the scenario says so),
  and no step was advanced twice.

On top of that no daemon may have logged a traceback through saga-engine or a
database deadlock: a retry can keep the books right while hiding a bug.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from engine import faults
from engine.client import SagaClient
from engine.database import create_engine
from engine.model import OutboxMessage
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus, StepStatus
from engine.store.base import write_transition
from engine.topology import Topology
from engine.transport.base import Message, Transport
from engine.transport.factory import transport_from_url
from engine.views import SagaDetail
from tests.e2e import Cluster, Daemon, fresh_database
from tests.faults.workers import SWITCHES
from tests.services import BROKERS, rabbitmqctl, run, service_url, unavailable
from workers import ledger

ROOT = Path(__file__).resolve().parents[2]
SAGA_MODULES = ("sagas.order", "tests.faults.sagas")
STOCK = {"widget": 1_000_000}
BALANCES = {"alice": 10**9}
ADDRESS = "1 Main Street, Springfield"
#: The example shipment worker refuses this address: the saga compensates.
UNDELIVERABLE = "PO Box 7, Nowhere"
#: Step events that may happen at most once per step in a saga that was advanced
#: exactly once per reply or timer.
ONCE_EVENTS = ("step_succeeded", "step_failed", "step_timed_out", "step_compensated")
SETTLED = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


@dataclass(frozen=True)
class Broker:
    name: str
    url: str


def broker_param(name: str) -> Broker:
    return Broker(name, service_url(BROKERS[name]))


@dataclass
class FaultCluster(Cluster):
    """A :class:`Cluster` whose daemons may be given crash points and be killed."""

    #: pids of daemons that are allowed to have exited (killed, or given a crash point).
    mortal: set[int] = field(default_factory=set)

    @property
    def switches(self) -> Path:
        return self.log_dir / "switches"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.pop(faults.ENV, None)
        env["SAGA_SAGAS"] = ",".join(SAGA_MODULES)
        env[SWITCHES] = str(self.switches)
        return env

    def spawn(self, name: str, *args: str, crash: str | None = None) -> Daemon:
        log_path = self.log_dir / f"{name}-{len(self.daemons)}.log"
        log_file = log_path.open("wb")
        env = self.env
        if crash:
            env[faults.ENV] = crash
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", *args],
            env=env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        daemon = Daemon(name, process, log_path, log_file)
        self.daemons.append(daemon)
        if crash:
            self.mortal.add(process.pid)
        return daemon

    def start_engine(self, *, crash: str | None = None) -> Daemon:  # type: ignore[override]
        return self.spawn("engine", "engine", "--grace", "20", crash=crash)

    def start_worker(  # type: ignore[override]
        self, name: str, *, spec: str | None = None, crash: str | None = None
    ) -> Daemon:
        return self.spawn(name, "worker", spec or name, "--grace", "20", crash=crash)

    def assert_running(self) -> None:
        for d in self.daemons:
            if d.process.pid not in self.mortal and d.process.poll() is not None:
                raise AssertionError(f"{d.name} exited with {d.process.returncode}:\n{d.tail()}")

    def stop(self, daemon: Daemon, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        self.mortal.add(daemon.process.pid)
        return super().stop(daemon, sig, timeout)

    def kill(self, daemon: Daemon) -> None:
        """SIGKILL, as a crash would: no drain, no commit, no goodbye to the broker."""
        self.mortal.add(daemon.process.pid)
        if daemon.process.poll() is None:
            daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
        daemon.log_file.close()

    async def crashed(self, daemon: Daemon, point: str, timeout: float = 60) -> None:
        """Wait for ``daemon`` to kill itself at crash point ``point``."""
        deadline = time.monotonic() + timeout
        while daemon.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{daemon.name} did not reach {point}:\n{self.logs()}")
            self.assert_running()
            await asyncio.sleep(0.05)
        assert daemon.process.returncode == -signal.SIGKILL, daemon.tail()
        assert f"{faults.ENV}: {point} reached" in daemon.tail(400), daemon.tail()
        daemon.log_file.close()

    async def ready(self, *daemons: Daemon, timeout: float = 60) -> None:
        """Wait until each daemon says it consumes (its handlers are installed)."""
        deadline = time.monotonic() + timeout
        for daemon in daemons:
            while " consuming " not in daemon.log_path.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{daemon.name} is not ready:\n{daemon.tail()}")
                self.assert_running()
                await asyncio.sleep(0.05)

    def hidden_errors(self) -> list[str]:
        """Tracebacks and deadlocks in the daemons' logs: failures that a retry papered
        over (the books may balance while a daemon keeps hitting a bug)."""
        found = []
        for d in self.daemons:
            lines = d.log_path.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                frames = lines[i : i + 40]
                # A client library's own traceback on a dropped connection is expected
                # when a scenario stops the broker; one through saga-engine is not.
                ours = line.startswith("Traceback") and any(
                    f"{ROOT}/engine/" in frame for frame in frames
                )
                if ours or "deadlock detected" in line:
                    found.append(f"{d.name} ({d.log_path.name}):\n" + "\n".join(frames))
        return found

    def kill_all(self) -> None:
        for d in self.daemons:
            if d.process.poll() is None:
                d.process.kill()
                d.process.wait(10)
            d.log_file.close()

    def logs(self, lines: int = 40) -> str:
        def tail(d: Daemon) -> str:
            text = d.log_path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])

        return "\n\n".join(
            f"--- {d.name} (pid {d.process.pid}, exit {d.process.poll()}) ---\n{tail(d)}"
            for d in self.daemons
        )


@dataclass
class Run:
    """One scenario: its cluster, a client on its database, and the orders placed."""

    broker: Broker
    cluster: FaultCluster
    client: SagaClient
    database: AsyncEngine
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The final state each saga must reach, where the scenario knows it.
    expected: dict[str, SagaStatus] = field(default_factory=dict)

    @property
    def topology(self) -> Topology:
        return Topology(self.cluster.prefix)

    # -- orders ------------------------------------------------------------------------

    def order(self, *, fail: bool = False, address: str | None = None) -> dict[str, Any]:
        i = len(self.orders)
        return {
            "customer_id": "alice",
            "sku": "widget",
            "quantity": 1 + i % 3,
            "amount_cents": 500 + i,
            "address": address or (UNDELIVERABLE if fail else ADDRESS),
        }

    async def start(
        self,
        saga: str = "place_order",
        *,
        fail: bool = False,
        address: str | None = None,
        expect: SagaStatus | None = None,
    ) -> str:
        """Start one order; ``fail`` makes the shipment refuse it (it compensates)."""
        order = self.order(fail=fail, address=address)
        saga_id = await self.client.start(saga, order)
        self.orders[saga_id] = order
        self.expected[saga_id] = expect or (
            SagaStatus.COMPENSATED if fail else SagaStatus.COMPLETED
        )
        return saga_id

    async def warm_up(self) -> str:
        """One order through the whole pipeline: every daemon is consuming (and, on
        Kafka, owns its partitions) once it completed. Short-timeout scenarios start
        their clocks only after this."""
        saga_id = await self.start()
        await self.wait_status(saga_id, SagaStatus.COMPLETED, timeout=60)
        return saga_id

    async def start_lost(
        self, saga: str = "place_order", *, expect: SagaStatus = SagaStatus.COMPENSATED
    ) -> tuple[str, OutboxMessage]:
        """Start one order whose first command is lost on its way: its outbox row is
        committed as sent, and the broker never saw it. Returns the saga id and that
        command, for the test to deliver late (or mangled) itself."""
        definition = self.client.registry.get(saga)
        saga_id = str(uuid.uuid4())
        order = self.order()
        now = self.client.clock()
        state = new_saga(definition, saga_id, order, now)
        transition = Transition(definition, state, now=now, topology=self.topology)
        transition.start()
        (command,) = transition.messages
        async with self.client.store.transaction() as tx:
            await write_transition(tx, state, transition.messages, transition.history, new=True)
            await tx.conn.execute(  # type: ignore[attr-defined]
                text("UPDATE saga_outbox SET sent_at = now() WHERE message_id = :id"),
                {"id": command.envelope.message_id},
            )
        self.orders[saga_id] = order
        self.expected[saga_id] = expect
        return saga_id, command

    async def start_many(
        self, count: int, saga: str = "place_order", *, fail_every: int = 4
    ) -> list[str]:
        """``count`` orders, every ``fail_every``-th one undeliverable."""
        return [
            await self.start(saga, fail=fail_every > 0 and i % fail_every == fail_every - 1)
            for i in range(count)
        ]

    async def feed_until(
        self,
        daemon: Daemon,
        saga: str = "place_order",
        *,
        batch: int = 4,
        limit: int = 80,
        patience: float = 90,
    ) -> list[str]:
        """Keep starting orders until ``daemon`` has exited (e.g. at its crash point):
        which replica gets which reply depends on the broker's assignment, so a fixed
        load may never reach the replica that is to crash. Each batch goes out once the
        one before it settled (or the daemon exited), so the pace follows the daemons,
        not a clock: on a busy machine, joining the groups alone can take longer than
        a timed feed would last."""
        ids: list[str] = []
        while daemon.process.poll() is None:
            assert len(ids) < limit, f"{daemon.name} still runs after {limit} orders"
            started = await self.start_many(batch, saga)
            ids += started

            async def moved_on(started: list[str] = started) -> bool:
                if daemon.process.poll() is not None:
                    return True
                statuses = await self.client.statuses(started)
                return all(statuses.get(saga_id) in SETTLED for saga_id in started)

            await self.wait_for(
                f"a batch of orders to settle or {daemon.name} to exit", moved_on, patience
            )
        return ids

    # -- waiting -----------------------------------------------------------------------

    async def wait_for(self, what: str, predicate: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.cluster.logs()}")
            self.cluster.assert_running()
            await asyncio.sleep(0.1)

    async def settle(
        self,
        ids: Sequence[str] | None = None,
        *,
        timeout: float = 60,
        accept: Iterable[SagaStatus] = SETTLED,
    ) -> dict[str, SagaDetail]:
        """Wait until every saga (default: every one started) is in ``accept``."""
        wanted = list(self.orders if ids is None else ids)
        accepted = set(accept)
        last: Counter[str] = Counter()

        async def settled() -> bool:
            statuses = await self.client.statuses(wanted)
            last.clear()
            last.update(s.value for s in statuses.values())
            return len(statuses) == len(wanted) and all(s in accepted for s in statuses.values())

        try:
            await self.wait_for("the sagas to settle", settled, timeout)
        except AssertionError as exc:
            raise AssertionError(f"sagas by state: {dict(last)}; {exc}") from None
        return {saga_id: await self.client.get(saga_id) for saga_id in wanted}

    async def wait_status(self, saga_id: str, status: SagaStatus, timeout: float = 30) -> None:
        async def reached() -> bool:
            return (await self.client.statuses([saga_id])).get(saga_id) is status

        await self.wait_for(f"saga {saga_id} to be {status}", reached, timeout)

    async def wait_step(self, saga_id: str, event: str, step: str, timeout: float = 30) -> None:
        """Wait until the saga's history records ``event`` for ``step``."""

        async def recorded() -> bool:
            detail = await self.client.get(saga_id)
            return any(h.event == event and h.step == step for h in detail.history)

        await self.wait_for(f"{event} of {step} in saga {saga_id}", recorded, timeout)

    async def wait_dispatched(self, saga_id: str, step: str, timeout: float = 30) -> None:
        """Wait until ``step``'s command is out (and its reply not yet in).

        Out means on the broker, not only dispatched: the step turns DISPATCHED in the
        transaction that writes its command to the outbox, and the relay publishes it
        after that commit. An engine killed in between takes the command with it until
        an engine runs again, so a scenario that kills the engine must wait for this.
        """

        async def out() -> bool:
            detail = await self.client.get(saga_id)
            dispatched = any(
                s.name == step and s.status is StepStatus.DISPATCHED for s in detail.steps
            )
            return dispatched and not await self.scalar(
                "SELECT count(*) FROM saga_outbox WHERE key = :id AND sent_at IS NULL", id=saga_id
            )

        await self.wait_for(f"the command of {step} of saga {saga_id} to be sent", out, timeout)

    # -- the books -----------------------------------------------------------------------

    async def audit(
        self,
        details: Mapping[str, SagaDetail],
        *,
        parked: Iterable[str] = (),
        once: bool = True,
        clean_logs: bool = True,
    ) -> ledger.LedgerTotals:
        """Judge the run by the ledgers; ``parked`` sagas must be PARKED (and are only
        checked for double charges). ``clean_logs``: no daemon logged a traceback
        through saga-engine, nor a deadlock."""
        if clean_logs:
            hidden = self.cluster.hidden_errors()
            assert not hidden, "\n\n".join(hidden[:3])
        parked = set(parked)
        assert set(details) <= set(self.orders), "sagas this run did not start"
        totals = await ledger.totals(self.database)
        assert totals.stock_conserved, totals
        assert totals.money_conserved, totals
        books = await ledger.effects(self.database)
        assert set(books) <= set(self.orders), f"effects of unknown orders: {set(books)}"
        problems: list[str] = []
        for saga_id, detail in details.items():
            order = self.orders[saga_id]
            effect = books.get(saga_id, ledger.OrderEffect())
            expected = SagaStatus.PARKED if saga_id in parked else self.expected[saga_id]
            checks = {f"ends {expected.value}": detail.status is expected}
            if detail.status is SagaStatus.COMPLETED:
                checks |= {
                    "reserved its quantity": effect.reserved == order["quantity"],
                    "charged once, never refunded": (effect.charges, effect.refunds) == (1, 0),
                    "charged its amount": effect.net_charged_cents == order["amount_cents"],
                    "shipped": effect.shipped,
                }
            elif detail.status is SagaStatus.COMPENSATED:
                checks |= {
                    "reserves nothing": effect.reserved == 0,
                    "charged at most once": effect.charges <= 1,
                    "refunds equal charges": effect.refunds == effect.charges,
                    "nets to zero": effect.net_charged_cents == 0,
                    "shipped nothing": not effect.shipped,
                }
            else:  # parked: undone halfway at most, never charged twice
                checks |= {"charged at most once": effect.charges <= 1}
            if once:
                advanced = Counter(
                    (h.event, h.step) for h in detail.history if h.event in ONCE_EVENTS
                )
                checks["no step advanced twice"] = max(advanced.values(), default=0) <= 1
            failed = [what for what, ok in checks.items() if not ok]
            if failed:
                history = [(h.event, h.step, h.detail) for h in detail.history]
                problems.append(
                    f"saga {saga_id} ({detail.name}, {detail.status.value}) fails: "
                    f"{', '.join(failed)}; books {effect}; history {history}"
                )
        assert not problems, "\n".join(problems)
        return totals

    # -- the database ---------------------------------------------------------------------

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.database.connect() as conn:
            return list(await conn.execute(text(sql), params))

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.database.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()

    async def unsent(self) -> int:
        return int(await self.scalar("SELECT count(*) FROM saga_outbox WHERE sent_at IS NULL"))

    # -- the broker ------------------------------------------------------------------------

    @asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        """A transport of the test's own, on the scenario's topics."""
        transport = transport_from_url(self.broker.url, self.topology)
        await transport.connect()
        try:
            yield transport
        finally:
            await transport.close()

    async def publish(self, destination: str, key: str, body: bytes) -> None:
        async with self.transport() as transport:
            await transport.publish([Message(destination, key, body)])


def broker_address(broker: Broker) -> tuple[str, int]:
    url = urlsplit(broker.url.split(",")[0])
    return url.hostname or "127.0.0.1", url.port or (9092 if url.scheme == "kafka" else 5672)


async def reachable(broker: Broker, timeout: float = 60) -> None:
    """Wait for the broker's port: a scenario of a parallel session may be restarting
    it (daemons started meanwhile would exit at once, as they should)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(*broker_address(broker))
        except OSError:
            assert time.monotonic() < deadline, f"{broker.url} is unreachable"
            await asyncio.sleep(0.5)
            continue
        writer.close()
        return


@asynccontextmanager
async def scenario(broker: Broker, tmp_path: Path) -> AsyncIterator[Run]:
    """A fresh database (seeded ledgers), a unique prefix, and no daemons yet."""
    postgres_url = service_url("SAGA_TEST_POSTGRES_URL")
    await reachable(broker)
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = FaultCluster(db_url, broker.url, tmp_path)
        cluster.switches.mkdir()
        client = await SagaClient.connect(db_url, SAGA_MODULES, topology=Topology(cluster.prefix))
        began = time.monotonic()
        try:
            yield Run(broker, cluster, client, database)
        except BaseException:
            print(f"--- daemon logs after {time.monotonic() - began:.1f}s ---")
            print(cluster.logs(80))
            raise
        finally:
            cluster.kill_all()
            await client.close()
            await database.dispose()


class BrokerControl:
    """Stops and starts the real broker of a scenario; always restored afterwards.

    Kafka and the RabbitMQ server are stopped and started with ``scripts/services``
    (RabbitMQ's app alone with ``rabbitmqctl``). ``SAGA_TEST_KAFKA_CTL`` may name a
    command taking ``stop`` or ``start`` for a Kafka broker run some other way.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.stopped = False

    @property
    def service(self) -> str:
        return "rabbitmq" if self.broker.name == "rabbitmq" else "kafka"

    def _command(self, action: str) -> list[str]:
        custom = os.environ.get("SAGA_TEST_KAFKA_CTL", "").strip()
        if custom and self.service == "kafka":
            return [*shlex.split(custom), action]
        verb = "down" if action == "stop" else "up"
        return [str(ROOT / "scripts" / "services"), verb, self.service]

    async def stop(self) -> None:
        """Take the broker away (RabbitMQ: its app, the Erlang node stays up)."""
        self.stopped = True
        if self.service == "rabbitmq":
            await run([*rabbitmqctl(), "stop_app"])
        else:
            await run(self._command("stop"))
        await self._gone()

    async def start(self) -> None:
        if self.service == "rabbitmq":
            await run([*rabbitmqctl(), "start_app"])
            await run([*rabbitmqctl(), "await_startup"])
        else:
            await run(self._command("start"), timeout=180)
        self.stopped = False

    async def restart_process(self) -> None:
        """Stop the broker's server process and start it again."""
        self.stopped = True
        await run(self._command("stop"))
        await self._gone()
        await run(self._command("start"), timeout=180)
        self.stopped = False

    async def _gone(self, timeout: float = 10) -> None:
        """The broker's port refuses connections: it really is down. If it still
        answers, this checkout does not run it (another checkout's broker on the same
        port): the scenario is skipped, or failed in CI."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection(*broker_address(self.broker))
            except OSError:
                return
            writer.close()
            if time.monotonic() > deadline:
                self.stopped = False
                unavailable(
                    f"{self.broker.name} at {self.broker.url} still answers after "
                    f"{shlex.join(self._command('stop'))}: it is not run from here"
                )
            await asyncio.sleep(0.2)

    def restore(self) -> None:
        """Finalizer: whatever happened, leave the broker running for everyone else."""
        if self.stopped and self.service == "rabbitmq":
            subprocess.run([*rabbitmqctl(), "start_app"], cwd="/", capture_output=True, timeout=120)
        subprocess.run(self._command("start"), capture_output=True, timeout=300)
