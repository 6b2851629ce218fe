"""TLS material for the tests: a throwaway certificate, and the URLs of the secured
services (``scripts/services`` writes their CA and client certificate).

Kept free of pytest fixtures, so unit tests and integration tests share it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

from tests.services import service_url


@dataclass(frozen=True)
class KeyPair:
    """A certificate (its own CA: self-signed) and its unencrypted key, as PEM files."""

    cert: Path
    key: Path


def self_signed(directory: Path, name: str = "test") -> KeyPair:
    """A self-signed EC certificate for ``CN=name`` (openssl, as the services script)."""
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(pair.key),
            "-out",
            str(pair.cert),
        ],
        check=True,
        capture_output=True,
    )
    return pair


def with_query(url: str, **parameters: str) -> str:
    """``url`` with these query parameters (its own kept)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(parameters)) if q)
    return urlunsplit(parts._replace(query=query))


def with_host(url: str, host: str) -> str:
    """``url`` pointing at ``host`` (same user, password and port)."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    port = hostport.rpartition(":")[2] if ":" in hostport else ""
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit(parts._replace(netloc=f"{netloc}:{port}" if port else netloc))


@dataclass(frozen=True)
class Secured:
    """The secured services' URLs and certificates (``secure-env.sh`` exports them)."""

    amqps_url: str
    postgres_url: str
    ca: str
    other_ca: str
    client_cert: str
    client_key: str

    @classmethod
    def from_env(cls) -> Secured:
        """Skip (developer machine) or fail (CI) when the secured services are unset."""
        return cls(
            amqps_url=service_url("SAGA_TEST_AMQPS_URL"),
            postgres_url=service_url("SAGA_TEST_POSTGRES_TLS_URL"),
            ca=service_url("SAGA_TEST_TLS_CA"),
            other_ca=service_url("SAGA_TEST_TLS_OTHER_CA"),
            client_cert=service_url("SAGA_TEST_TLS_CLIENT_CERT"),
            client_key=service_url("SAGA_TEST_TLS_CLIENT_KEY"),
        )

    def amqps(self, ca: str | None = None, **parameters: str) -> str:
        """The AMQPS URL, verifying the broker against ``ca`` (ours by default)."""
        return with_query(self.amqps_url, cafile=ca or self.ca, **parameters)

    def amqps_external(self) -> str:
        """The AMQPS URL logging in with the client certificate (no password)."""
        parts = urlsplit(self.amqps_url)
        netloc = parts.netloc.rpartition("@")[2]
        return with_query(
            urlunsplit(parts._replace(netloc=netloc)),
            cafile=self.ca,
            certfile=self.client_cert,
            keyfile=self.client_key,
            auth="external",
        )

    def postgres(self, sslmode: str = "verify-full", ca: str | None = None) -> str:
        """The PostgreSQL URL with this sslmode, its root certificate ``ca`` (ours)."""
        return with_query(self.postgres_url, sslmode=sslmode, sslrootcert=ca or self.ca)
