"""Leave the shared brokers as the tests found them.

Every broker test works under a unique prefix (``engine/topology.py``), and Kafka
topics and RabbitMQ queues are durable: left behind they pile up. Thousands of
leftover partitions slow a Kafka restart down past the fault scenarios' step timeouts;
a thousand leftover queues exhausted RabbitMQ's file handles. So whatever a test
creates under its prefix is dropped when the test ends:

* :func:`drop_after_test` queues a drop; the autouse fixture in ``tests/conftest.py``
  runs it after every other fixture of the test was torn down, so no consumer or
  daemon is left that would re-create a topic (the local Kafka auto-creates topics);
  :class:`tests.e2e.Cluster` (and so the fault harness) and the transport contract
  queue theirs;
* :func:`drop` drops at once (the benchmark, after each run).

Dropping never fails a test, nor hides its failure: a broker that cannot be reached
(or refuses) is logged and reported as a :class:`BrokerCleanupWarning`, and the
objects stay behind.

Kafka topics are found by listing: every topic named ``prefix`` or ``prefix.*``.
AMQP cannot list queues, so the RabbitMQ queues are deleted by name: the ones
:class:`engine.transport.rabbitmq.RabbitTransport` declares for a topology are the
dead-letter queue, the replies queue and one commands queue per participant, all
bound to one exchange named after the prefix. Consumer groups are not deleted (a
killed member holds a group for its session timeout); they hold no partitions.

Kept free of pytest: the benchmark imports it too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.registry import SagaRegistry
from engine.topology import Topology
from engine.transport.kafka_options import KafkaOptions

log = logging.getLogger("tests.brokers")

#: Kafka error code of a topic that does not exist (deleted already, or never made).
_UNKNOWN_TOPIC = 3
#: Topics per DeleteTopics request.
_BATCH = 100


class BrokerCleanupWarning(UserWarning):
    """A test's topics or queues could not be dropped and were left on the broker."""


@dataclass(frozen=True)
class BrokerObjects:
    """What one test (or benchmark run) created on one broker."""

    #: ``kafka://host:port[,...]`` or ``amqp(s)://...``; anything else has nothing to drop.
    broker_url: str
    #: Kafka: every topic named ``prefix`` or ``prefix.<anything>`` is dropped.
    prefix: str
    #: RabbitMQ: the queues to delete (AMQP cannot list them).
    queues: tuple[str, ...] = ()
    #: RabbitMQ: the exchange to delete; None when it is shared (e.g. the default "saga").
    exchange: str | None = None
    #: Kafka: how to log in (a secured listener); None: plain.
    kafka: KafkaOptions | None = None

    @property
    def kind(self) -> str:
        scheme = self.broker_url.split("://", 1)[0].lower() if "://" in self.broker_url else ""
        return {"kafka": "kafka", "amqp": "rabbitmq", "amqps": "rabbitmq"}.get(scheme, "")

    def __str__(self) -> str:
        return f"the {self.prefix}.* objects on {where(self.broker_url)}"


def where(url: str) -> str:
    """Host and port only, never a password: this lands in warnings."""
    parts = urlsplit(url.split(",")[0])
    return f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else url


def saga_participants(modules: Iterable[str]) -> set[str]:
    """Every participant of the sagas in these modules (e.g. ``SAGA_SAGAS``)."""
    registry = SagaRegistry.from_modules(m for m in modules if m.strip())
    return {step.participant for saga in registry for step in saga.participant_steps}


def topology_objects(
    broker_url: str,
    prefix: str,
    participants: Iterable[str],
    *,
    kafka: KafkaOptions | None = None,
) -> BrokerObjects:
    """The topics / queues and exchange of one deployment prefix (engine and workers)."""
    topology = Topology(prefix)
    queues = [topology.dead_letters, topology.replies]
    queues += [topology.commands(p) for p in sorted(set(participants))]
    return BrokerObjects(broker_url, prefix, tuple(queues), exchange=prefix, kafka=kafka)


async def _drop_kafka(objects: BrokerObjects) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from engine.transport.kafka import security_arguments

    servers = objects.broker_url.split("://", 1)[1].split("/", 1)[0].split(",")
    admin = AIOKafkaAdminClient(
        bootstrap_servers=servers,
        request_timeout_ms=20_000,
        **security_arguments(objects.kafka or KafkaOptions()),
    )
    await admin.start()
    try:
        prefix = objects.prefix
        topics = sorted(
            t for t in await admin.list_topics() if t == prefix or t.startswith(prefix + ".")
        )
        refused: list[str] = []
        for start in range(0, len(topics), _BATCH):
            response = await admin.delete_topics(topics[start : start + _BATCH])
            for result in response.to_object()["topic_error_codes"]:
                if result["error_code"] not in (0, _UNKNOWN_TOPIC):
                    refused.append(f"{result['topic']} (error {result['error_code']})")
        if refused:
            raise RuntimeError(f"the broker refused to delete {', '.join(refused)}")
        log.debug("dropped %d topics of %s", len(topics), prefix)
    finally:
        await admin.close()


async def _drop_rabbitmq(objects: BrokerObjects, timeout: float) -> None:
    import aio_pika

    connection = await aio_pika.connect(objects.broker_url, timeout=timeout)
    try:
        channel = await connection.channel()
        # Deleting a queue or an exchange that is not there is not an error.
        for queue in objects.queues:
            await channel.queue_delete(queue)
        if objects.exchange:
            await channel.exchange_delete(objects.exchange)
    finally:
        await connection.close()


async def _drop(objects: BrokerObjects, timeout: float) -> str | None:
    """Drop the objects; the reason they are left behind, or None."""
    if not objects.prefix:
        return f"refusing to drop everything on {where(objects.broker_url)}: no prefix"
    try:
        async with asyncio.timeout(timeout):
            if objects.kind == "kafka":
                await _drop_kafka(objects)
            elif objects.kind == "rabbitmq":
                await _drop_rabbitmq(objects, timeout)
    except Exception as exc:  # any failure is reported, never raised
        return f"could not drop {objects}, left behind: {type(exc).__name__}: {exc}"
    return None


def _report(problems: Iterable[str]) -> None:
    for problem in problems:
        log.warning("%s", problem)
        warnings.warn(problem, BrokerCleanupWarning, stacklevel=3)


async def drop(objects: BrokerObjects, *, timeout: float = 30.0) -> None:
    """Drop a test's (or run's) broker objects now; a failure is only a warning."""
    _report([p for p in [await _drop(objects, timeout)] if p])


async def drop_topology(
    broker_url: str, prefix: str, participants: Iterable[str] = (), *, timeout: float = 30.0
) -> None:
    """Drop the topics / queues and exchange of one deployment prefix now."""
    await drop(topology_objects(broker_url, prefix, participants), timeout=timeout)


# -- at the end of the running test ---------------------------------------------------

#: What the running test created, each computed when the test ends (so late additions,
#: e.g. a saga module loaded midway, count).
_queued: list[Callable[[], BrokerObjects]] = []


def drop_after_test(objects: BrokerObjects | Callable[[], BrokerObjects]) -> None:
    """Drop these objects when the running test ends (see ``tests/conftest.py``)."""
    _queued.append(objects if callable(objects) else lambda: objects)


def drop_queued(*, timeout: float = 30.0) -> None:
    """Drop everything queued by the test that just ended; warn about what is left.

    Runs on a thread of its own with its own event loop, so it works the same after a
    plain and an async test, and never disturbs pytest-asyncio's loop.
    """
    if not _queued:
        return
    makers = list(_queued)
    _queued.clear()
    problems: list[str] = []
    pending: list[BrokerObjects] = []
    for make in makers:
        try:
            pending.append(make())
        except Exception as exc:  # reported, never raised
            problems.append(f"could not tell what the test left on its broker: {exc!r}")

    async def drop_all() -> None:
        results = await asyncio.gather(*(_drop(o, timeout) for o in pending))
        problems.extend(p for p in results if p)

    def work() -> None:
        try:
            asyncio.run(drop_all())
        except Exception as exc:  # reported, never raised
            problems.append(f"could not drop the test's broker objects: {exc!r}")

    if pending:
        thread = threading.Thread(target=work, name="broker-cleanup", daemon=True)
        thread.start()
        thread.join(timeout + 15)
        if thread.is_alive():
            problems.append(f"dropping {', '.join(map(str, pending))} took over {timeout:g}s")
    _report(problems)
