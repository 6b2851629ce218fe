"""The secured listeners ``scripts/services up`` starts: the services' own contract.

Checked with the raw client libraries (ssl, asyncpg, aiokafka, aio-pika), not through
saga-engine, so a failure here points at the services, not at the code under test: each
listener accepts the right credentials verified by the test CA, and refuses a wrong
password, an untrusted CA and a wrong host name (the server certificate names only
``localhost``, so connecting to 127.0.0.1 must fail hostname verification).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from aiokafka.protocol.metadata import MetadataRequest
from aiormq.exceptions import AMQPConnectionError

from tests.services import service_url

pytestmark = pytest.mark.integration

T = TypeVar("T")

#: Every connection attempt here must finish (succeed or fail) well within this.
ATTEMPT_TIMEOUT = 20.0
WRONG_HOST = "127.0.0.1"
#: How OpenSSL words a chain that ends in a CA the client does not trust (depending on
#: whether the server sends its CA along).
UNTRUSTED = "unable to get local issuer certificate|self-signed certificate in certificate chain"


def context(cafile: str, client_cert: bool = False) -> ssl.SSLContext:
    """A verifying client context trusting ``cafile``, optionally with the client cert."""
    ctx = ssl.create_default_context(cafile=cafile)
    if client_cert:
        ctx.load_cert_chain(
            service_url("SAGA_TEST_TLS_CLIENT_CERT"), service_url("SAGA_TEST_TLS_CLIENT_KEY")
        )
    return ctx


def ca() -> str:
    return service_url("SAGA_TEST_TLS_CA")


def other_ca() -> str:
    return service_url("SAGA_TEST_TLS_OTHER_CA")


async def bounded(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, ATTEMPT_TIMEOUT)


# --- PostgreSQL ----------------------------------------------------------------


async def pg_connect(
    host: str | None = None, password: str | None = None, *, ctx: ssl.SSLContext
) -> asyncpg.Connection:
    url = urlsplit(service_url("SAGA_TEST_POSTGRES_TLS_URL"))
    return await bounded(
        asyncpg.connect(
            host=host or url.hostname,
            port=url.port or 5432,
            user=url.username,
            password=url.password if password is None else password,
            database=url.path.lstrip("/"),
            ssl=ctx,
        )
    )


async def test_postgres_accepts_a_verified_tls_password_login() -> None:
    for ctx in (context(ca()), context(ca(), client_cert=True)):
        conn = await pg_connect(ctx=ctx)
        try:
            query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            assert await conn.fetchval(query) is True
        finally:
            await conn.close()


async def test_postgres_refuses_wrong_password_untrusted_ca_and_wrong_host() -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await pg_connect(password="not-the-password", ctx=context(ca()))
    with pytest.raises(ssl.SSLCertVerificationError, match=UNTRUSTED):
        await pg_connect(ctx=context(other_ca()))
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await pg_connect(host=WRONG_HOST, ctx=context(ca()))


# --- Kafka ---------------------------------------------------------------------


def kafka_endpoint(variable: str) -> tuple[str, int]:
    host, _, port = service_url(variable).split(",")[0].rpartition(":")
    return host, int(port)


@asynccontextmanager
async def kafka_conn(
    variable: str = "SAGA_TEST_KAFKA_SASL_SERVERS",
    *,
    ctx: ssl.SSLContext,
    host: str | None = None,
    mechanism: str = "SCRAM-SHA-256",
    password: str | None = None,
) -> AsyncIterator[AIOKafkaConnection]:
    """A connection that completed TLS (and SASL on the SASL_SSL listener)."""
    default_host, port = kafka_endpoint(variable)
    sasl = variable == "SAGA_TEST_KAFKA_SASL_SERVERS"
    conn = await bounded(
        create_conn(
            host or default_host,
            port,
            ssl_context=ctx,
            security_protocol="SASL_SSL" if sasl else "SSL",
            sasl_mechanism=mechanism,
            sasl_plain_username=service_url("SAGA_TEST_KAFKA_SASL_USER") if sasl else None,
            sasl_plain_password=(
                service_url("SAGA_TEST_KAFKA_SASL_PASSWORD") if password is None else password
            )
            if sasl
            else None,
        )
    )
    try:
        yield conn
    finally:
        conn.close()


async def advertised(conn: AIOKafkaConnection) -> set[tuple[str, int]]:
    """The brokers a metadata round trip names (a request the broker had to authorise)."""
    response = await bounded(conn.send(MetadataRequest([])))
    return {(broker[1], broker[2]) for broker in response.brokers}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_kafka_sasl_ssl_accepts_the_scram_user(mechanism: str) -> None:
    async with kafka_conn(ctx=context(ca()), mechanism=mechanism) as conn:
        # Advertised by name, so clients verify the host on every broker connection.
        assert await advertised(conn) == {kafka_endpoint("SAGA_TEST_KAFKA_SASL_SERVERS")}


async def test_kafka_sasl_ssl_refuses_wrong_password_untrusted_ca_and_wrong_host() -> None:
    with pytest.raises(SaslAuthenticationFailed):
        async with kafka_conn(ctx=context(ca()), password="not-the-password"):
            pass
    with pytest.raises(ssl.SSLCertVerificationError, match=UNTRUSTED):
        async with kafka_conn(ctx=context(other_ca())):
            pass
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        async with kafka_conn(ctx=context(ca()), host=WRONG_HOST):
            pass


async def test_kafka_ssl_listener_requires_a_client_certificate() -> None:
    async with kafka_conn("SAGA_TEST_KAFKA_SSL_SERVERS", ctx=context(ca(), True)) as conn:
        assert await advertised(conn)
    # With TLS 1.3 the server checks the client certificate after the client's side
    # of the handshake, so the refusal shows on the first request.
    with pytest.raises(KafkaConnectionError):
        async with kafka_conn("SAGA_TEST_KAFKA_SSL_SERVERS", ctx=context(ca())) as conn:
            await advertised(conn)


# --- RabbitMQ ------------------------------------------------------------------


async def amqps_connect(
    *,
    ctx: ssl.SSLContext,
    host: str | None = None,
    password: str | None = None,
    external: bool = False,
) -> aio_pika.abc.AbstractConnection:
    url = urlsplit(service_url("SAGA_TEST_AMQPS_URL"))
    assert url.scheme == "amqps"
    netloc = f"{host or url.hostname}:{url.port or 5671}"
    if not external:
        secret = url.password if password is None else password
        netloc = f"{url.username}:{secret}@{netloc}"
    query = "?auth=external" if external else ""
    return await bounded(aio_pika.connect(f"amqps://{netloc}{url.path}{query}", ssl_context=ctx))


async def test_amqps_accepts_password_and_client_certificate_logins() -> None:
    for connection in (
        await amqps_connect(ctx=context(ca())),
        await amqps_connect(ctx=context(ca(), client_cert=True), external=True),
    ):
        async with connection:
            channel = await connection.channel()
            await channel.close()


async def test_amqps_refuses_wrong_password_untrusted_ca_wrong_host_and_bare_external() -> None:
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await amqps_connect(ctx=context(ca()), password="not-the-password")
    with pytest.raises(AMQPConnectionError, match=f"CERTIFICATE_VERIFY_FAILED.*({UNTRUSTED})"):
        await amqps_connect(ctx=context(other_ca()))
    with pytest.raises(AMQPConnectionError, match=r"CERTIFICATE_VERIFY_FAILED.*mismatch"):
        await amqps_connect(ctx=context(ca()), host=WRONG_HOST)
    # EXTERNAL without a client certificate is not offered.
    with pytest.raises(AMQPConnectionError):
        await amqps_connect(ctx=context(ca()), external=True)
