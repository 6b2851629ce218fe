"""Build a transport from a broker URL (``SAGA_BROKER_URL`` / ``--broker``).

The Kafka and RabbitMQ adapters are imported here, lazily, so the engine core runs
without aiokafka or aio-pika installed and names the extra to install when one is
asked for.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from urllib.parse import urlsplit

from engine.errors import ConfigError
from engine.redact import redact
from engine.topology import Topology
from engine.transport.base import Transport
from engine.transport.kafka_options import KafkaOptions
from engine.transport.memory import MemoryBroker, MemoryTransport

ACCEPTED = (
    "memory://, kafka://host:port[,host:port...], "
    "amqp://user:password@host:port/vhost or amqps://..."
)

#: Where a Kafka login and TLS are configured instead of the URL.
KAFKA_SECURITY_SETTINGS = (
    "SAGA_KAFKA_SECURITY_PROTOCOL, SAGA_KAFKA_SASL_MECHANISM, SAGA_KAFKA_SASL_USERNAME, "
    "SAGA_KAFKA_SASL_PASSWORD, SAGA_KAFKA_SSL_CAFILE, ..."
)

#: One in-process broker per event loop and dead-letter name, so every transport
#: built from ``memory://`` in one process (engine and workers) talks to the same one.
_loop_brokers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, MemoryBroker]]
_loop_brokers = weakref.WeakKeyDictionary()
_loopless_brokers: dict[str, MemoryBroker] = {}


def memory_broker(dead_letters: str) -> MemoryBroker:
    """The process-wide in-process broker (per running event loop)."""
    try:
        brokers = _loop_brokers.setdefault(asyncio.get_running_loop(), {})
    except RuntimeError:
        brokers = _loopless_brokers
    broker = brokers.get(dead_letters)
    if broker is None:
        broker = brokers[dead_letters] = MemoryBroker(dead_letters=dead_letters)
    return broker


def _missing(exc: ImportError, module: str, extra: str, what: str) -> ConfigError | None:
    if exc.name is not None and exc.name.split(".")[0] == module:
        return ConfigError(f"{what} needs {module}: install saga-engine[{extra}]")
    return None


def _kafka_servers(url: str) -> list[str]:
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    if "?" in netloc or "@" in netloc or "?" in path:
        # Kafka clients take credentials and TLS files as properties, not in a bootstrap
        # list: one place for them, the settings (each of which can come from a file).
        # Not even the redacted URL: a query may hold a secret by any name.
        shown = redact(url.split("?", 1)[0]) + ("?..." if "?" in url else "")
        raise ConfigError(
            f"unsupported broker URL {shown!r}: kafka:// takes no credentials or options; "
            f"set {KAFKA_SECURITY_SETTINGS}"
        )
    if path.strip("/"):
        raise ConfigError(
            f"unsupported broker URL {redact(url)!r}: use kafka://host:port[,host:port]"
        )
    servers = []
    for server in netloc.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep:
            host, port = port, "9092"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad Kafka server {server!r} in {redact(url)!r}: use host:port")
        servers.append(f"{host}:{port}")
    return servers


def messaging_system(url: str) -> str:
    """The ``messaging.system`` trace attribute for a broker URL."""
    scheme = url.split(":", 1)[0].lower()
    return {"kafka": "kafka", "amqp": "rabbitmq", "amqps": "rabbitmq"}.get(scheme, scheme)


def transport_from_url(
    url: str,
    topology: Topology,
    *,
    kafka: KafkaOptions | None = None,
    destinations: Iterable[str] = (),
) -> Transport:
    """``memory://``, ``kafka://…`` or ``amqp(s)://…``; anything else is a ConfigError.

    ``kafka``: the ``SAGA_KAFKA_*`` settings (``Settings.kafka``; a plain local broker
    when None), checked here. ``destinations``: every topic this process consumes or
    publishes to; Kafka creates them (or, with ``SAGA_KAFKA_CREATE_TOPICS=false``,
    checks that they exist) when it connects.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        if url.rstrip("/") != "memory:":
            raise ConfigError(f"unsupported broker URL {redact(url)!r}: memory:// takes no address")
        return MemoryTransport(memory_broker(topology.dead_letters))
    if scheme == "kafka":
        servers = _kafka_servers(url)
        try:
            from engine.transport.kafka import KafkaTransport
        except ImportError as exc:
            raise _missing(exc, "aiokafka", "kafka", "kafka://") or exc from None
        return KafkaTransport(
            servers,
            options=kafka,
            required_topics=destinations,
            dead_letter_topic=topology.dead_letters,
        )
    if scheme in ("amqp", "amqps"):
        try:
            parts = urlsplit(url)
            host, _port = parts.hostname, parts.port  # .port raises on a bad port
        except ValueError as exc:
            raise ConfigError(f"bad broker URL {redact(url)!r}: {exc}") from None
        if not host:
            raise ConfigError(f"broker URL {redact(url)!r} names no host; accepted: {ACCEPTED}")
        try:
            from engine.transport.rabbitmq import RabbitTransport
        except ImportError as exc:
            raise _missing(exc, "aio_pika", "rabbitmq", f"{scheme}://") or exc from None
        return RabbitTransport(
            url,
            exchange=topology.prefix,
            dead_letter_queue=topology.dead_letters,
            declares=topology.prefix,
        )
    raise ConfigError(f"unsupported broker URL {redact(url)!r}; accepted: {ACCEPTED}")
