"""Broker URLs to transports: accepted forms, clear errors, lazy optional imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.errors import ConfigError
from engine.settings import Settings
from engine.topology import Topology
from engine.transport.factory import transport_from_url
from engine.transport.kafka import KafkaTransport
from engine.transport.memory import MemoryTransport
from engine.transport.rabbitmq import RabbitTransport

TOPOLOGY = Topology("shop")


async def test_memory_transports_of_one_process_share_one_broker() -> None:
    first = transport_from_url("memory://", TOPOLOGY)
    second = transport_from_url("memory:///", TOPOLOGY)
    assert isinstance(first, MemoryTransport) and isinstance(second, MemoryTransport)
    assert first.broker is second.broker
    assert first.broker.dead_letters == "shop.dead-letters"
    other = transport_from_url("memory://", Topology("other"))
    assert isinstance(other, MemoryTransport)
    assert other.broker is not first.broker


def test_kafka_url_names_the_bootstrap_servers() -> None:
    transport = transport_from_url("kafka://k1:9092,k2:9093", TOPOLOGY)
    assert isinstance(transport, KafkaTransport)
    assert transport.bootstrap_servers == ["k1:9092", "k2:9093"]
    assert transport.dead_letter_topic == "shop.dead-letters"
    single = transport_from_url("kafka://127.0.0.1:9092/", TOPOLOGY)
    assert isinstance(single, KafkaTransport)
    assert single.bootstrap_servers == ["127.0.0.1:9092"]
    default_port = transport_from_url("kafka://broker", TOPOLOGY)
    assert isinstance(default_port, KafkaTransport)
    assert default_port.bootstrap_servers == ["broker:9092"]


def test_the_kafka_producers_message_limit_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().kafka_max_request_size == 1_048_576  # aiokafka's default
    monkeypatch.setenv("SAGA_KAFKA_MAX_REQUEST_SIZE", "8388608")
    transport = transport_from_url("kafka://k1:9092", TOPOLOGY, kafka=Settings().kafka)
    assert isinstance(transport, KafkaTransport)
    assert transport.options.max_request_size == 8_388_608


@pytest.mark.parametrize(
    "url", ["amqp://saga:saga@127.0.0.1:5672/", "amqps://u:p@rabbit.example:5671/prod"]
)
def test_amqp_url_is_handed_to_rabbitmq(url: str) -> None:
    transport = transport_from_url(url, TOPOLOGY)
    assert isinstance(transport, RabbitTransport)
    assert transport.url == url
    assert transport.exchange_name == "shop"
    assert transport.dead_letter_queue == "shop.dead-letters"


def test_rabbitmq_errors_never_show_the_password() -> None:
    transport = transport_from_url("amqp://saga:s3cret@rabbit:5672/prod", TOPOLOGY)
    assert isinstance(transport, RabbitTransport)
    assert transport.where == "RabbitMQ at rabbit:5672 (vhost prod)"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis://localhost:6379",
        "localhost:9092",
        "kafka://",
        "kafka://host:notaport",
        "kafka://host:9092/topic",
        "amqp:///vhost",
        "amqp://host:99999/",
        "memory://somewhere",
    ],
)
def test_other_urls_are_config_errors_naming_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        transport_from_url(url, TOPOLOGY)
    assert repr(url) in str(caught.value) or url == ""


def test_unknown_scheme_lists_every_accepted_form() -> None:
    with pytest.raises(ConfigError, match=r"memory://, kafka://.*amqp://.*amqps://"):
        transport_from_url("nats://localhost:4222", TOPOLOGY)


@pytest.mark.parametrize(
    ("url", "blocked", "extra"),
    [
        ("kafka://localhost:9092", "aiokafka", "kafka"),
        ("amqp://u:p@localhost/", "aio_pika", "rabbitmq"),
    ],
)
def test_a_missing_optional_dependency_names_the_extra(
    url: str, blocked: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] == blocked or name in (
            "engine.transport.kafka",
            "engine.transport.rabbitmq",
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` fail

    with pytest.raises(ConfigError, match=rf"install saga-engine\[{extra}\]"):
        transport_from_url(url, TOPOLOGY)


def test_the_core_never_imports_the_broker_clients() -> None:
    code = (
        "import sys, engine.orchestrator, engine.relay, engine.worker.runner, "
        "engine.transport.factory\n"
        "from engine.topology import Topology\n"
        "from engine.transport.factory import transport_from_url\n"
        "transport_from_url('memory://', Topology())\n"
        "loaded = sorted(m for m in ('aiokafka', 'aio_pika') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
