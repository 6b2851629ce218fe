"""RabbitMQ over TLS: ``amqps://`` with the broker verified by default, a CA file, a
client certificate, the EXTERNAL login; one clear line for what cannot work."""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid

import pytest

from engine.errors import ConfigError, TransportError
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from engine.transport.rabbitmq import RabbitTransport, tls_context
from tests.brokers import drop_after_test, topology_objects
from tests.services import closed_port
from tests.tls import KeyPair, Secured, self_signed


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_amqps_verifies_the_broker_by_default() -> None:
    context = tls_context("amqps://u:p@rabbit.example/")
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert tls_context("amqp://u:p@rabbit.example/") is None


def test_ca_file_and_client_certificate_are_loaded(pair: KeyPair) -> None:
    url = f"amqps://rabbit.example/?cafile={pair.cert}&certfile={pair.cert}&keyfile={pair.key}"
    context = tls_context(url + "&auth=external")
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "test"),),)]
    transport = transport_from_url(url, Topology("shop"))
    assert isinstance(transport, RabbitTransport)
    assert transport.ssl_context is not None


async def test_turning_verification_off_is_explicit_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = RabbitTransport(f"amqps://u:p@127.0.0.1:{closed_port()}/?no_verify_ssl=1")
    assert transport.ssl_context is not None
    assert transport.ssl_context.verify_mode == ssl.CERT_NONE
    assert not transport.ssl_context.check_hostname
    with caplog.at_level(logging.WARNING, "saga.transport.rabbitmq"), pytest.raises(TransportError):
        await transport.connect()
    assert "no_verify_ssl=1: the TLS certificate of RabbitMQ at 127.0.0.1" in caplog.text
    assert "not verified" in caplog.text


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("cacertfile=/ca.pem", r"unsupported parameter 'cacertfile' \(here: cafile\)"),
        ("verify=verify_none", r"unsupported parameter 'verify' \(here: no_verify_ssl\)"),
        ("fail_fast=0", r"unsupported parameter 'fail_fast' .*accepted: cafile, certfile"),
        ("cafile=/no/ca.pem", r"cafile file '/no/ca.pem' .*does not exist or cannot be read"),
        ("no_verify_ssl=true", r"no_verify_ssl='true' .*use 0 or 1"),
        ("auth=kerberos", r"auth='kerberos' .*use plain or external"),
        ("auth=external", r"auth=external .*logs in with a client certificate: add certfile"),
        ("cafile={cert}&cafile={cert}", r"parameter 'cafile' given more than once"),
        ("keyfile={key}", r"keyfile .*needs certfile"),
        ("certfile={key}", r"unusable certificate or key"),
        ("certfile={cert}&keyfile={key}&auth=external", r"never a password: remove it"),
    ],
)
def test_unusable_tls_parameters_are_one_config_error_without_the_password(
    query: str, says: str, pair: KeyPair
) -> None:
    url = "amqps://saga:Secr3tPW@rabbit.example:5671/?" + query.format(cert=pair.cert, key=pair.key)
    with pytest.raises(ConfigError, match=says) as raised:
        transport_from_url(url, Topology("shop"))
    assert "Secr3tPW" not in str(raised.value) and "\n" not in str(raised.value)


def test_tls_parameters_need_amqps(pair: KeyPair) -> None:
    with pytest.raises(ConfigError, match=r"cafile in broker URL .* needs amqps://"):
        transport_from_url(f"amqp://u:p@rabbit.example/?cafile={pair.cert}", Topology("shop"))


# -- on the real broker (scripts/services: AMQPS on localhost:5671) ---------------------


async def _publish_and_receive(url: str) -> None:
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    drop_after_test(topology_objects(url, topology.prefix, ["tls"]))
    transport = transport_from_url(url, topology)
    await transport.connect()
    try:
        destination = topology.commands("tls")
        subscription = await transport.subscribe(destination, group="tls")
        await transport.publish([Message(destination, "k", b"over tls")])
        async with asyncio.timeout(30):
            async for delivery in subscription:
                assert delivery.message.body == b"over tls"
                await delivery.ack()
                break
    finally:
        await transport.close()


@pytest.mark.integration
async def test_external_login_with_the_client_certificate() -> None:
    secured = Secured.from_env()
    url = secured.amqps_external()
    assert "@" not in url  # no user, no password: the certificate is the login
    await _publish_and_receive(url)


@pytest.mark.integration
async def test_reconnects_keep_the_tls_settings() -> None:
    """The robust connection reconnects with the context it was given: after the
    connection drops, it comes back over TLS, verified against the same CA."""
    secured = Secured.from_env()
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    url = secured.amqps()
    drop_after_test(topology_objects(url, topology.prefix, []))
    transport = transport_from_url(url, topology)
    assert isinstance(transport, RabbitTransport)
    await transport.connect()
    try:
        connection = transport._connection
        assert connection is not None and connection.transport is not None
        first = connection.transport.connection
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *_: reconnected.set())
        await first.close(ConnectionResetError("dropped by the test"))
        async with asyncio.timeout(30):
            await reconnected.wait()
        again = connection.transport.connection
        assert again is not first
        assert again.ssl_context is transport.ssl_context  # same CA, same verification
        assert again.url.scheme == "amqps"
        destination = topology.dead_letters
        await transport.publish([Message(destination, "k", b"after the reconnect")])
    finally:
        await transport.close()
