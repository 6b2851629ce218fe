"""Kafka secured as managed clusters are, on the real broker's SASL_SSL and mutual-TLS
listeners (``scripts/services``): refused logins and certificates end the daemons in
one line, topics get the configured replication, and the no-create mode checks.

The order run over SASL_SSL is in tests/test_e2e_brokers.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from engine.errors import TransportError
from engine.transport.kafka import KafkaTransport, security_arguments
from engine.transport.kafka_options import KafkaOptions
from tests.brokers import BrokerObjects, drop_after_test
from tests.e2e import kafka_options, kafka_sasl_ssl, sagactl, service_url
from tests.test_daemon import env_for, fails_in_one_line

pytestmark = pytest.mark.integration

#: A refusal is known at the first connection: the daemon ends well before the 10s
#: connect bound would (plus its own start, slow on a busy machine), never retries.
FEW_SECONDS = 10.0
#: Where a topic's config value came from (DescribeConfigs): set on the topic itself.
TOPIC_CONFIG = 1


def secured(mechanism: str = "SCRAM-SHA-512") -> tuple[str, dict[str, str]]:
    return kafka_sasl_ssl(mechanism)


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    db = tmp_path / "d.db"
    assert sagactl(env_for(db), "db", "upgrade").returncode == 0
    return db


def refused(case: str) -> tuple[str, dict[str, str], str]:
    """A secured broker's URL and settings that it refuses, and the line expected."""
    url, settings = secured()
    host = url.removeprefix("kafka://")
    if case == "wrong password":
        return (
            url,
            {**settings, "SAGA_KAFKA_SASL_PASSWORD": "Wr0ngHunter2secret"},
            f"Kafka at {host} refused the SCRAM-SHA-512 login of 'saga': [Error 58] "
            "SaslAuthenticationFailed: Authentication failed",
        )
    if case == "untrusted CA":
        return (
            url,
            {**settings, "SAGA_KAFKA_SSL_CAFILE": service_url("SAGA_TEST_TLS_OTHER_CA")},
            f"Kafka at {host}: its TLS certificate is not trusted by the CA in "
            "SAGA_KAFKA_SSL_CAFILE: unable to get local issuer certificate",
        )
    if case == "no client certificate":  # the mutual-TLS listener
        servers = service_url("SAGA_TEST_KAFKA_SSL_SERVERS")
        return (
            f"kafka://{servers}",
            {
                "SAGA_KAFKA_SECURITY_PROTOCOL": "SSL",
                "SAGA_KAFKA_SSL_CAFILE": settings["SAGA_KAFKA_SSL_CAFILE"],
            },
            f"Kafka at {servers}: TLS handshake failed: SSLV3_ALERT_BAD_CERTIFICATE (the "
            "broker wants a client certificate it trusts: SAGA_KAFKA_SSL_CERTFILE, "
            "SAGA_KAFKA_SSL_KEYFILE)",
        )
    # The certificate names localhost only.
    port = host.rpartition(":")[2]
    return (
        f"kafka://127.0.0.1:{port}",
        settings,
        f"Kafka at 127.0.0.1:{port}: its TLS certificate is not valid for '127.0.0.1': "
        "connect by a name the certificate holds",
    )


@pytest.mark.parametrize(
    "case", ["wrong password", "untrusted CA", "wrong hostname", "no client certificate"]
)
def test_a_refused_login_or_certificate_ends_the_daemons_in_one_line(
    case: str, migrated: Path
) -> None:
    url, settings, expected = refused(case)
    right = service_url("SAGA_TEST_KAFKA_SASL_PASSWORD")
    env = {**env_for(migrated, **settings), "SAGA_BROKER_URL": url}
    for args in (["engine"], ["worker", "payment"]):
        began = time.monotonic()
        line = fails_in_one_line(env, *args)  # exit status 1, one line on stderr
        took = time.monotonic() - began
        assert expected in line, line
        assert took < FEW_SECONDS, f"{args}: {took:.1f}s"
        for secret in (settings.get("SAGA_KAFKA_SASL_PASSWORD"), right):
            assert secret is None or secret not in line


@pytest.mark.parametrize("listener", ["SASL_SSL SCRAM-SHA-256", "SSL with a client certificate"])
async def test_created_topics_get_the_configured_replication_and_min_insync(
    listener: str,
) -> None:
    """Over both secured listeners (SASL and mutual TLS): the admin client logs in too."""
    if listener.startswith("SASL_SSL"):
        url, settings = secured("SCRAM-SHA-256")
        base = kafka_options(settings)
    else:
        url = f"kafka://{service_url('SAGA_TEST_KAFKA_SSL_SERVERS')}"
        base = KafkaOptions(
            security_protocol="SSL",
            ssl_cafile=service_url("SAGA_TEST_TLS_CA"),
            ssl_certfile=service_url("SAGA_TEST_TLS_CLIENT_CERT"),
            ssl_keyfile=service_url("SAGA_TEST_TLS_CLIENT_KEY"),
        )
    servers = url.removeprefix("kafka://")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    drop_after_test(BrokerObjects(url, prefix, kafka=base))
    configured = KafkaOptions(
        **{**vars(base), "partitions": 2, "replication_factor": 1, "min_insync_replicas": 1}
    )
    chosen, default = f"{prefix}.chosen", f"{prefix}.default"
    for options, topic in ((configured, chosen), (base, default)):
        transport = KafkaTransport(servers, options=options, required_topics=[topic])
        await transport.connect()  # creates the topic
        await transport.close()

    admin = AIOKafkaAdminClient(bootstrap_servers=servers, **security_arguments(base))
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([chosen, default])}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in (chosen, default)]
        )
    finally:
        await admin.close()
    assert len(described[chosen]["partitions"]) == 2
    assert len(described[default]["partitions"]) == 4
    for topic in (chosen, default):
        assert all(len(p["replicas"]) == 1 for p in described[topic]["partitions"])
    entries = {
        resource["resource_name"]: {
            entry["config_names"]: (entry["config_value"], entry["config_source"])
            for entry in resource["config_entries"]
        }
        for response in configs
        for resource in response.to_object()["resources"]
    }
    assert entries[chosen]["min.insync.replicas"] == ("1", TOPIC_CONFIG)
    assert entries[default]["min.insync.replicas"][1] != TOPIC_CONFIG  # the broker's


async def test_the_no_create_mode_checks_the_topics_exist(migrated: Path) -> None:
    url, settings = secured()
    servers = url.removeprefix("kafka://")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    options = kafka_options(settings)
    drop_after_test(BrokerObjects(url, prefix, kafka=options))

    env = {
        **env_for(migrated, **settings),
        "SAGA_BROKER_URL": url,
        "SAGA_TOPIC_PREFIX": prefix,
        "SAGA_KAFKA_CREATE_TOPICS": "false",
    }
    line = await asyncio.to_thread(fails_in_one_line, env, "worker", "payment")
    assert line == (
        f"sagactl: error: {prefix}.commands.payment, {prefix}.dead-letters, {prefix}.replies: "
        f"no such topic on Kafka at {servers}, and SAGA_KAFKA_CREATE_TOPICS is false: "
        "create them (or let this user describe them)"
    )

    existing = f"{prefix}.replies"
    maker = KafkaTransport(servers, options=options, required_topics=[existing])
    await maker.connect()
    await maker.close()
    no_create = KafkaOptions(**{**vars(options), "create_topics": False})
    checked = KafkaTransport(servers, options=no_create, required_topics=[existing])
    await checked.connect()  # the topic is there: nothing to do
    try:
        with pytest.raises(TransportError, match=rf"^{prefix}\.other: no such topic on"):
            await checked.ensure_topics([existing, f"{prefix}.other"])
    finally:
        await checked.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, **security_arguments(options))
    await admin.start()
    try:
        assert f"{prefix}.other" not in await admin.list_topics()  # not auto-created
    finally:
        await admin.close()
