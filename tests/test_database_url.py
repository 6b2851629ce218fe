"""PostgreSQL URLs as libpq users write them: ``postgres://``, ``sslmode`` and the
certificate files, ``connect_timeout``; mapped for asyncpg in one place."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from asyncpg import connect_utils
from sqlalchemy import text

from engine.database import (
    SSLMODES,
    connect_postgres,
    connection_refusal,
    create_engine,
    is_transient,
    parse_url,
    postgres_connect_args,
    shown,
)
from engine.errors import ConfigError
from engine.store.postgres import PgOutboxSignal
from tests.tls import KeyPair, Secured, self_signed, with_host, with_query

BASE = "postgresql://saga:secretpw@db.example:5433/shop"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def _no_libpq_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ``~/.postgresql/root.crt`` nor ``PGSSL*`` variables decide a test."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGSSLMODE"):
        monkeypatch.delenv(name, raising=False)


def asyncpg_reading(args: dict[str, Any]) -> Any:
    """How asyncpg itself reads these connect arguments: its parameters (ssl, sslmode).

    Its own parser (private, but the code ``asyncpg.connect`` runs), so the test shows
    the TLS that the connection gets, not only the arguments handed over.
    """
    _, params = connect_utils._parse_connect_dsn_and_args(
        dsn=args.get("dsn"),
        host=args.get("host"),
        port=args.get("port"),
        user=args.get("user"),
        password=args.get("password"),
        passfile=None,
        database=args.get("database"),
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )
    return params


def test_postgres_scheme_is_an_alias_of_postgresql() -> None:
    assert parse_url("postgres://u:p@h/db").drivername == "postgresql+asyncpg"
    assert parse_url("postgresql://u:p@h/db").drivername == "postgresql+asyncpg"
    assert parse_url("postgresql+asyncpg://u:p@h/db").drivername == "postgresql+asyncpg"


def test_a_plain_url_maps_to_asyncpg_keywords_and_libpqs_default_prefer() -> None:
    args = postgres_connect_args(parse_url(BASE))
    assert args == {
        "host": "db.example",
        "port": 5433,
        "user": "saga",
        "password": "secretpw",
        "database": "shop",
    }
    params = asyncpg_reading(args)
    assert params.sslmode == connect_utils.SSLMode.prefer  # libpq's default too
    assert params.ssl.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("mode", SSLMODES)
def test_each_sslmode_gets_libpqs_verification(mode: str, pair: KeyPair) -> None:
    """disable: no TLS; allow / prefer: TLS if the server has it, unverified; require:
    encrypted, unverified; verify-ca: the chain; verify-full: the chain and the name."""
    args = postgres_connect_args(parse_url(f"{BASE}?sslmode={mode}&sslrootcert={pair.cert}"))
    params = asyncpg_reading(args)
    assert params.sslmode == connect_utils.SSLMode.parse(mode)
    if mode == "disable":
        assert params.ssl is False
        return
    context: ssl.SSLContext = params.ssl
    verifies = mode in ("require", "verify-ca", "verify-full")  # require: see below
    assert context.verify_mode == (ssl.CERT_REQUIRED if verifies else ssl.CERT_NONE)
    assert context.check_hostname is (mode == "verify-full")


def test_require_verifies_the_ca_only_when_a_root_certificate_is_given(pair: KeyPair) -> None:
    """libpq's rule: sslmode=require with sslrootcert behaves as verify-ca."""
    without = asyncpg_reading(postgres_connect_args(parse_url(f"{BASE}?sslmode=require")))
    assert without.ssl.verify_mode == ssl.CERT_NONE
    assert not without.ssl.check_hostname
    given = f"{BASE}?sslmode=require&sslrootcert={pair.cert}"
    verified = asyncpg_reading(postgres_connect_args(parse_url(given)))
    assert verified.ssl.verify_mode == ssl.CERT_REQUIRED
    assert not verified.ssl.check_hostname


def test_client_certificate_and_timeout_are_handed_over(pair: KeyPair) -> None:
    url = (
        f"postgres://saga@db.example/shop?sslmode=verify-full&sslrootcert={pair.cert}"
        f"&sslcert={pair.cert}&sslkey={pair.key}&connect_timeout=5&application_name=engine"
    )
    args = postgres_connect_args(parse_url(url))
    assert args["timeout"] == 5.0
    assert "connect_timeout" not in args["dsn"]
    params = asyncpg_reading(args)
    assert params.server_settings == {"application_name": "engine"}
    assert params.ssl.verify_mode == ssl.CERT_REQUIRED and params.ssl.check_hostname


def test_asyncpgs_own_ssl_parameter_still_names_the_mode(pair: KeyPair) -> None:
    args = postgres_connect_args(parse_url(f"{BASE}?ssl=verify-ca&sslrootcert={pair.cert}"))
    assert asyncpg_reading(args).sslmode == connect_utils.SSLMode.verify_ca


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("sslmode=on", r"sslmode='on' .*use one of disable, allow, prefer, require, verify-ca"),
        ("sslmod=require", r"unsupported parameter 'sslmod' .*accepted: sslmode, sslrootcert"),
        ("prepared_statement_cache_size=0", r"unsupported parameter 'prepared_statement_cache"),
        ("sslmode=require&sslmode=disable", r"parameter 'sslmode' given more than once"),
        ("sslmode=require&ssl=require", r"give sslmode or ssl \(the same\), not both"),
        ("sslmode=verify-full", r"sslmode=verify-full .*needs the CA .*add sslrootcert="),
        ("sslmode=verify-ca&sslrootcert=/no/ca.pem", r"sslrootcert file '/no/ca.pem' .*not exist"),
        ("sslcert=/no/client.pem", r"sslcert file '/no/client.pem' .*not exist"),
        ("connect_timeout=soon", r"connect_timeout='soon' .*whole seconds above 0"),
        ("connect_timeout=0", r"connect_timeout='0' .*whole seconds above 0"),
    ],
)
def test_unusable_parameters_are_one_config_error_without_the_password(
    query: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        create_engine(f"postgres://saga:secretpw@db.example/shop?{query}")
    message = str(raised.value)
    assert "secretpw" not in message and "\n" not in message


def test_sslpassword_is_never_shown(pair: KeyPair) -> None:
    url = parse_url(f"{BASE}?sslcert={pair.cert}&sslkey={pair.key}&sslpassword=keysecret")
    assert "keysecret" not in shown(url) and "secretpw" not in shown(url)
    assert "sslpassword=***" in shown(url)
    with pytest.raises(ConfigError) as raised:
        parse_url(f"{BASE}?sslpassword=keysecret&bogus=1")
    assert "keysecret" not in str(raised.value)


def test_refused_logins_and_certificates_are_named_and_dead_letter_nothing() -> None:
    class InvalidPassword(Exception):
        sqlstate = "28P01"

    login = InvalidPassword('password authentication failed for user "saga"')
    assert connection_refusal(login) == (
        'login refused: password authentication failed for user "saga"'
    )
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for '127.0.0.1'."
    assert connection_refusal(mismatch) == (
        "TLS certificate refused: Hostname mismatch, certificate is not valid for '127.0.0.1'."
    )
    assert connection_refusal(ConnectionRefusedError(111, "Connect call failed")) is None
    assert connection_refusal(ssl.SSLEOFError(8, "EOF occurred")) is None  # a drop
    # A refusal is not the message's problem: nothing is dead-lettered over it.
    assert is_transient(login) and is_transient(mismatch)


# -- on the real PostgreSQL (scripts/services: ssl = on, certificate for localhost) ----

#: This backend's TLS, as the server sees it.
SSL_STATE = "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


async def tls_of(url: str) -> tuple[bool, str | None]:
    """Whether a connection made from ``url`` is encrypted, and the client's DN."""
    conn = await connect_postgres(parse_url(url), default_timeout=10)
    try:
        row = await conn.fetchrow(SSL_STATE)
        return bool(row["ssl"]), row["client_dn"]
    finally:
        await conn.close()


@pytest.mark.integration
async def test_sslmodes_on_the_real_server() -> None:
    """libpq's semantics, seen from the server: what is encrypted, what is verified."""
    secured = Secured.from_env()
    by_ip = with_host(secured.postgres_url, "127.0.0.1")  # not the certificate's name
    assert await tls_of(secured.postgres("verify-full")) == (True, None)
    assert await tls_of(with_query(by_ip, sslmode="verify-ca", sslrootcert=secured.ca)) == (
        True,
        None,
    )
    assert await tls_of(with_query(by_ip, sslmode="require")) == (True, None)
    assert await tls_of(with_query(by_ip, sslmode="disable")) == (False, None)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"not valid for '127\.0\.0\.1'"):
        await tls_of(with_query(by_ip, sslmode="verify-full", sslrootcert=secured.ca))
    # require with a root certificate verifies the chain (libpq's rule).
    with pytest.raises(ssl.SSLCertVerificationError):
        await tls_of(secured.postgres("require", ca=secured.other_ca))
    client = with_query(
        secured.postgres("verify-full"),
        sslcert=secured.client_cert,
        sslkey=secured.client_key,
    )
    assert await tls_of(client) == (True, "/CN=saga")


@pytest.fixture
def locked_client_key(tmp_path: Path) -> str:
    """The secured services' client key, encrypted with the password "key-secret"."""
    locked = tmp_path / "client-locked.key"
    command = ["openssl", "pkey", "-in", Secured.from_env().client_key, "-aes256"]
    command += ["-passout", "pass:key-secret", "-out", str(locked)]
    subprocess.run(command, check=True, capture_output=True)
    return str(locked)


@pytest.mark.integration
async def test_an_encrypted_client_key_with_its_sslpassword(locked_client_key: str) -> None:
    secured = Secured.from_env()
    client = with_query(
        secured.postgres("verify-full"),
        sslcert=secured.client_cert,
        sslkey=locked_client_key,
        sslpassword="key-secret",
    )
    assert await tls_of(client) == (True, "/CN=saga")


@pytest.mark.integration
async def test_the_listen_connection_uses_the_same_tls(caplog: pytest.LogCaptureFixture) -> None:
    """The relay's LISTEN connection is made from the engine's URL, sslmode and all."""
    secured = Secured.from_env()
    for url, listens in (
        (secured.postgres("verify-full"), True),
        (with_host(secured.postgres("verify-full"), "127.0.0.1"), False),
    ):
        database = create_engine(url)
        signal = PgOutboxSignal(database, min_backoff=0.1, max_backoff=0.1)
        stop = asyncio.Event()
        caplog.clear()
        with caplog.at_level(logging.WARNING, "saga.store.postgres"):
            task = asyncio.create_task(signal.listen(lambda: None, stop))
            try:
                async with asyncio.timeout(20):
                    while not (signal.listening or "cannot LISTEN" in caplog.text):  # noqa: ASYNC110
                        await asyncio.sleep(0.05)
                assert signal.listening is listens, caplog.text
                if listens:
                    async with database.begin() as conn:  # the pool is on TLS too
                        assert (await conn.execute(text(SSL_STATE))).one().ssl
                else:
                    assert "not valid for '127.0.0.1'" in caplog.text
            finally:
                stop.set()
                await task
                await database.dispose()
