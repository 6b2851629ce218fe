"""How saga-engine talks to a Kafka cluster: security, topic creation, request size.

The Kafka ecosystem configures a client with properties (``security.protocol``,
``sasl.mechanism``, ``ssl.truststore...``), not with a URL: here they are the
``SAGA_KAFKA_*`` settings, gathered in one :class:`KafkaOptions` from
:class:`engine.settings.Settings`, checked as a whole before anything connects, and
handed to every client the Kafka transport makes. ``kafka://`` names only the
bootstrap servers.

Kept free of aiokafka, so settings and the daemons build it without the client.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import SecretStr

from engine.errors import ConfigError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
#: OAUTHBEARER is left out: aiokafka needs a token provider object written in Python
#: for it, which no setting can supply.
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

#: The broker's default partition count is often 1, which would leave one consumer
#: per group busy; four lets a few engines or workers share a topic.
DEFAULT_PARTITIONS = 4
#: aiokafka's own producer limit.
DEFAULT_MAX_REQUEST_SIZE = 1_048_576

_SASL = ("SASL_PLAINTEXT", "SASL_SSL")
_TLS = ("SSL", "SASL_SSL")
_MECHANISMS = "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
_SASL_FIELDS = ("sasl_mechanism", "sasl_username", "sasl_password")
_TLS_FIELDS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password")


def setting(field: str) -> str:
    """The environment variable of a :class:`KafkaOptions` field."""
    return f"SAGA_KAFKA_{field.upper()}"


@dataclass(frozen=True)
class KafkaOptions:
    """Every ``SAGA_KAFKA_*`` setting; the defaults are a plain local broker."""

    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    #: PEM file of the CA(s) to trust instead of the system's.
    ssl_cafile: str | None = None
    #: PEM client certificate (may hold its key too) and key, for mutual TLS.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    #: Topics saga-engine creates get these; existing topics are left as they are.
    partitions: int = DEFAULT_PARTITIONS
    #: None: the broker's ``default.replication.factor`` (Kafka 2.4 and later).
    replication_factor: int | None = None
    #: None: the broker's ``min.insync.replicas``.
    min_insync_replicas: int | None = None
    #: False: create nothing; check at start that every topic needed exists.
    create_topics: bool = True

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in _SASL

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in _TLS

    def check(self) -> None:
        """Raise one ConfigError line for settings that cannot work together."""
        protocol = f"{setting('security_protocol')} is {self.security_protocol}"
        sasl = [f for f in _SASL_FIELDS if self._set(f)]
        if self.uses_sasl:
            missing = [setting(f) for f in _SASL_FIELDS if f not in sasl]
            if missing:
                hint = "" if "sasl_mechanism" in sasl else f" ({_MECHANISMS})"
                raise ConfigError(f"{protocol}, which needs {' and '.join(missing)}{hint}")
        elif sasl:
            raise ConfigError(
                f"{setting(sasl[0])} is set but {protocol}, which does not authenticate: "
                "use SASL_SSL"
            )
        tls = [f for f in _TLS_FIELDS if self._set(f)]
        if not self.ssl_check_hostname:
            tls.append("ssl_check_hostname")
        if tls and not self.uses_tls:
            raise ConfigError(
                f"{setting(tls[0])} is set but {protocol}, which does not use TLS: "
                "use SSL or SASL_SSL"
            )
        for needs_cert in ("ssl_keyfile", "ssl_key_password"):
            if self._set(needs_cert) and not self._set("ssl_certfile"):
                raise ConfigError(f"{setting(needs_cert)} is set without {setting('ssl_certfile')}")
        if self.partitions < 1:
            raise ConfigError(f"{setting('partitions')} must be at least 1")
        for count in ("replication_factor", "min_insync_replicas"):
            value = getattr(self, count)
            if value is not None and value < 1:
                raise ConfigError(f"{setting(count)} must be at least 1 (unset: the broker's)")
        rf, isr = self.replication_factor, self.min_insync_replicas
        if rf is not None and isr is not None and isr > rf:
            raise ConfigError(
                f"{setting('min_insync_replicas')}={isr} is above "
                f"{setting('replication_factor')}={rf}: no write could ever be acknowledged"
            )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every connection (None without TLS): the broker's
        certificate must chain to ``ssl_cafile`` (else the system's CAs) and, unless
        turned off, name the host connected to. Unreadable or non-PEM files raise
        ConfigError."""
        if not self.uses_tls:
            return None
        for field in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            self._readable(field)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile)
        except ssl.SSLError:
            raise self._unusable("ssl_cafile", "holds no PEM certificate") from None
        if self.ssl_certfile:
            try:
                context.load_cert_chain(
                    self.ssl_certfile, self.ssl_keyfile or None, self._key_password()
                )
            except ssl.SSLError as exc:
                raise self._unusable(
                    "ssl_keyfile" if self.ssl_keyfile else "ssl_certfile",
                    "does not match the certificate"
                    if exc.reason == "KEY_VALUES_MISMATCH"
                    else "is not a PEM certificate and key, or "
                    f"{setting('ssl_key_password')} is wrong or missing",
                ) from None
        context.check_hostname = self.ssl_check_hostname  # CERT_REQUIRED either way
        return context

    def _key_password(self) -> Callable[[], str]:
        # Always a callable: without one, OpenSSL asks for an encrypted key's password
        # on the terminal, and a daemon would hang there.
        secret = self.ssl_key_password.get_secret_value() if self.ssl_key_password else ""
        return lambda: secret

    def _readable(self, field: str) -> None:
        path = getattr(self, field)
        if not path:
            return
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"{setting(field)}: cannot read {path!r}: {reason}") from None

    def _unusable(self, field: str, why: str) -> ConfigError:
        return ConfigError(f"{setting(field)}: {getattr(self, field)!r} {why}")

    def _set(self, field: str) -> bool:
        value = getattr(self, field)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value is not None and value != ""
