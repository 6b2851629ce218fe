"""Process settings, from flags, ``SAGA_*`` environment variables or files they name."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from engine.errors import ConfigError
from engine.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    MIN_MESSAGE_BYTES,
    Limits,
)
from engine.redact import redact, remember, remember_secrets_of
from engine.retention import parse_age
from engine.signing import Signing, SigningMode, parse_keys, resolve_mode
from engine.transport.kafka_options import (
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_PARTITIONS,
    KafkaOptions,
    SaslMechanism,
    SecurityProtocol,
)

DEFAULT_DATABASE_URL = "sqlite:///saga.db"


ENV_PREFIX = "SAGA_"


class FileSettings(PydanticBaseSettingsSource):
    """``SAGA_<NAME>_FILE=/path``: the setting's value is that file's content.

    The way Docker and Kubernetes hand out secrets (a URL with a password, a key) so
    they never sit in the environment or a command line. Any setting may come from a
    file; giving both ``SAGA_X`` and ``SAGA_X_FILE`` is an error, not a silent choice.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{ENV_PREFIX}{field_name.upper()}_FILE"
        path = os.environ.get(variable)
        if path is None:
            return None, field_name, False
        if os.environ.get(variable.removesuffix("_FILE")) is not None:
            raise ConfigError(f"set {variable.removesuffix('_FILE')} or {variable}, not both")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"{variable}: cannot read {path!r}: {_why(exc)}") from None
        # Files written by editors and `echo` end in a newline that is no part of a secret.
        return text.removesuffix("\n").removesuffix("\r"), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or type(exc).__name__


class Settings(BaseSettings):
    """Every ``SAGA_*`` setting; each may also come from a file (``SAGA_<NAME>_FILE``).

    Read once per process and handed to :class:`~engine.wiring.Wiring`, which builds
    every part from it; :func:`load_settings` gives clear errors::

        settings = load_settings(topic_prefix="acme")  # over SAGA_* and their _FILEs
        async with Wiring(settings) as wiring: ...
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags first, then the environment, then ``SAGA_<NAME>_FILE`` files."""
        return (init_settings, env_settings, FileSettings(settings_cls), dotenv_settings)

    #: ``sqlite:///file.db`` (embedded default) or ``postgresql://user:pass@host/db``.
    database_url: str = DEFAULT_DATABASE_URL
    #: ``memory://`` (in-process), ``kafka://host:9092`` or ``amqp://user:pass@host/vhost``.
    broker_url: str = "memory://"
    #: Comma-separated module paths holding saga definitions (none by default).
    sagas: str = ""
    #: Which version a client starts, per saga, as ``name=version`` pairs separated by
    #: commas (``book_trip=1``); a saga not named starts at the newest version some
    #: running engine serves.
    start_versions: str = ""
    #: Comma-separated ``module:object`` paths of workers, which ``sagactl worker NAME``
    #: then finds by their participant name (none by default).
    workers: str = ""
    #: Prefix of every topic / queue name.
    topic_prefix: str = Field(default="saga", pattern=r"^[A-Za-z0-9._-]+$")
    #: Port of the daemons' /healthz, /readyz and /metrics endpoint; off when unset.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address that endpoint listens on (0.0.0.0 in a container).
    metrics_host: str = "127.0.0.1"
    #: Kafka: the producer refuses messages larger than this itself. Raise it with the
    #: topics' ``max.message.bytes`` (the broker refuses what is over that one).
    kafka_max_request_size: int = Field(default=DEFAULT_MAX_REQUEST_SIZE, ge=1024)
    # Kafka security and topics (engine/transport/kafka_options.py): checked together
    # when a kafka:// transport is built, so other brokers ignore them.
    #: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    #: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` (with a SASL_* protocol).
    kafka_sasl_mechanism: SaslMechanism | None = None
    #: The SASL user.
    kafka_sasl_username: str | None = None
    #: Its password (``SAGA_KAFKA_SASL_PASSWORD_FILE`` for a mounted secret).
    kafka_sasl_password: SecretStr | None = None
    #: PEM file of the CA(s) that signed the brokers' certificates (else the system's).
    kafka_ssl_cafile: str | None = None
    #: PEM client certificate, where the brokers ask for one (mutual TLS).
    kafka_ssl_certfile: str | None = None
    #: PEM key of that certificate (unless the certificate file holds it).
    kafka_ssl_keyfile: str | None = None
    #: Password of an encrypted key.
    kafka_ssl_key_password: SecretStr | None = None
    #: The broker's certificate must name the host connected to.
    kafka_ssl_check_hostname: bool = True
    #: Partitions of the topics saga-engine creates.
    kafka_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1)
    #: Replication factor of the topics it creates; unset: the broker's
    #: ``default.replication.factor``.
    kafka_replication_factor: int | None = Field(default=None, ge=1)
    #: ``min.insync.replicas`` of the topics it creates; unset: the broker's.
    kafka_min_insync_replicas: int | None = Field(default=None, ge=1)
    #: false: create no topics (no admin rights); check at start that they exist.
    kafka_create_topics: bool = True
    #: ``text`` or ``json`` (one object per line) on stderr.
    log_format: Literal["text", "json"] = "text"
    #: Largest message body sent or accepted (engine/limits.py); below the broker's
    #: limit (Kafka: 1 MiB by default). Every process of a deployment should agree.
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES, ge=MIN_MESSAGE_BYTES, le=MAX_MESSAGE_BYTES
    )

    # Message signing (engine/signing.py, README Security). Give the engine and every
    # worker the same keys; ``sagactl`` needs none (the engine's relay signs for it).
    #: ``id:secret,id:secret``: HMAC-SHA256 keys, secrets of 32 bytes or more. The
    #: first one signs, all verify (rotation); ids are 1-64 of A-Z a-z 0-9 . _ -.
    signing_keys: SecretStr | None = None
    #: ``off``, ``accept-unsigned`` (sign, accept unsigned: the rollout step) or
    #: ``require``. Unset: ``require`` with signing keys, else ``off``.
    signing: SigningMode | None = Field(default=None, validate_default=True)

    # Retention (``30d``, ``12h``, ``90m``, ``3600s`` or seconds; 0 keeps rows forever).
    # Why each is safe, and how long it must be: engine/retention.py and
    # engine/worker/barrier.py.
    #: Engine: sent outbox rows go this long after the broker confirmed them.
    outbox_retention: timedelta = timedelta(hours=1)
    #: Engine: ids of applied replies. Far longer than any redelivery can come late.
    inbox_retention: timedelta = timedelta(days=7)
    #: Worker: participant barrier rows. Longer than the broker keeps a command (Kafka:
    #: 7 days by default), or a late duplicate runs its effect twice.
    barrier_retention: timedelta = timedelta(days=30)
    #: How often the daemons prune; 0 turns scheduled pruning off.
    prune_interval: timedelta = timedelta(seconds=60)
    #: Rows per delete statement (each its own short transaction).
    prune_batch: int = Field(default=5000, ge=1, le=100_000)

    # Engine: the reply watermark (see README, Guarantees). A step timeout fires once
    # every reply that was waiting in the broker when it fell due is applied, or
    # once it is ``timeout_hold`` overdue, whatever the reply consumer's lag.
    timeout_hold: timedelta = timedelta(seconds=120)
    #: After the engine starts, replies count as caught up only this long after:
    #: workers republish replies within their 5s backoff cap. After the broker was
    #: unreachable, only as long after as the outage lasted, and at least this.
    reply_settle: timedelta = timedelta(seconds=6)
    #: How often the engine checks how far its reply consumer has caught up.
    watermark_interval: timedelta = timedelta(milliseconds=500)

    # Engine: the timer scanner (engine/timers.py), which fires step timeouts and
    # retry backoffs, and the outbox relay (engine/relay.py).
    #: Pause between timer scans when the last one fired less than a full batch: how
    #: late a timeout may fire at most, besides the watermark's hold.
    timer_interval: timedelta = timedelta(milliseconds=100)
    #: Most timers fired in one transaction.
    timer_batch: int = Field(default=100, ge=1, le=100_000)
    #: Most outbox rows published in one transaction.
    relay_batch: int = Field(default=200, ge=1, le=100_000)
    #: Pause between polls of an empty outbox; the engine's own commits and, on
    #: PostgreSQL, the clients' (NOTIFY) wake the relay at once.
    relay_poll_interval: timedelta = timedelta(milliseconds=50)
    #: First pause before rows to a destination no queue receives go again; it
    #: doubles up to ``relay_max_unroutable_pause``.
    relay_unroutable_pause: timedelta = timedelta(seconds=1)
    relay_max_unroutable_pause: timedelta = timedelta(seconds=30)
    #: How long rows to a destination no queue receives stay pending before they are
    #: refused (their step fails, naming the participant no worker serves); well
    #: under a step's default timeout (30s), which waits while they are pending.
    relay_unroutable_timeout: timedelta = timedelta(seconds=10)
    #: How long after a publish to a destination the relay asks whether anyone reads
    #: it (Kafka: a consumer group; RabbitMQ: a consumer on its queue), longer than
    #: workers take to join; it warns if nobody does, and a step that times out says so.
    relay_reader_check_delay: timedelta = timedelta(seconds=10)

    def model_post_init(self, context: Any, /) -> None:
        """Make every secret setting known to :mod:`engine.redact` before anything can
        print it: each ``SecretStr`` value and each URL password (no list to keep)."""
        super().model_post_init(context)
        remember_secrets_of(self)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """``repr`` and ``str`` show URLs with their passwords hidden."""
        for name, value in super().__repr_args__():
            yield name, redact(value) if isinstance(value, str) else value

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` (flags over the environment), its secrets known too."""
        copy = super().model_copy(update=update, deep=deep)
        remember_secrets_of(copy)
        return copy

    @field_validator(
        "outbox_retention",
        "inbox_retention",
        "barrier_retention",
        "prune_interval",
        "timeout_hold",
        "reply_settle",
        "watermark_interval",
        "timer_interval",
        "relay_poll_interval",
        "relay_unroutable_pause",
        "relay_max_unroutable_pause",
        "relay_unroutable_timeout",
        "relay_reader_check_delay",
        mode="before",
    )
    @classmethod
    def _age(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = parse_age(value, bare_seconds=True)
        if isinstance(value, timedelta | int | float) and _seconds(value) < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("signing_keys")
    @classmethod
    def _keys(cls, value: SecretStr | None) -> SecretStr | None:
        # A ConfigError, not a ValueError: pydantic would quote the input, the secrets.
        try:
            keys = parse_keys(value.get_secret_value() if value is not None else "")
        except ValueError as exc:
            raise ConfigError(f"bad setting SAGA_SIGNING_KEYS: {exc}") from None
        for secret in keys.values():  # each one, not only the whole id:secret list
            remember(secret.decode("utf-8"))
        return value

    @field_validator("signing")
    @classmethod
    def _mode(cls, value: SigningMode | None, info: ValidationInfo) -> SigningMode | None:
        if "signing_keys" not in info.data:  # the keys were refused: said there
            return value
        keys = info.data["signing_keys"]
        return resolve_mode(
            value, has_keys=keys is not None and bool(parse_keys(keys.get_secret_value()))
        )

    @field_validator(
        "watermark_interval",
        "timer_interval",
        "relay_poll_interval",
        "relay_unroutable_pause",
        "relay_max_unroutable_pause",
        "relay_unroutable_timeout",
    )
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be positive")
        return value

    @field_validator("relay_max_unroutable_pause")
    @classmethod
    def _cap(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        first = info.data.get("relay_unroutable_pause")
        if first is not None and value < first:
            raise ValueError("must not be shorter than SAGA_RELAY_UNROUTABLE_PAUSE")
        return value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        """As Kafka writes them, whatever the case; an empty mechanism is none."""
        return (value.strip().upper() or None) if isinstance(value, str) else value

    @field_validator("sagas", "workers")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(p.strip() for p in value.split(",") if p.strip())

    @field_validator("start_versions")
    @classmethod
    def _versions(cls, value: str) -> str:
        parse_start_versions(value)
        return value

    @property
    def start_version_map(self) -> dict[str, int]:
        """``SAGA_START_VERSIONS`` as saga name -> version."""
        return parse_start_versions(self.start_versions)

    @property
    def saga_modules(self) -> list[str]:
        """``SAGA_SAGAS`` as a list of module names."""
        return [p for p in self.sagas.split(",") if p]

    @property
    def worker_paths(self) -> list[str]:
        """``SAGA_WORKERS`` as a list of ``module:object`` paths."""
        return [p for p in self.workers.split(",") if p]

    @property
    def message_signing(self) -> Signing:
        """This process's signing: its mode and keys (``SAGA_SIGNING*``)."""
        keys = self.signing_keys.get_secret_value() if self.signing_keys is not None else ""
        return Signing(self.signing or SigningMode.OFF, parse_keys(keys))

    @property
    def limits(self) -> Limits:
        """The sizes every message and name is held to (``SAGA_MAX_MESSAGE_BYTES``)."""
        return Limits(max_message_bytes=self.max_message_bytes)

    @property
    def kafka(self) -> KafkaOptions:
        """The ``SAGA_KAFKA_*`` settings, for a kafka:// transport (which checks them)."""
        return KafkaOptions(
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username or None,
            sasl_password=self.kafka_sasl_password,
            ssl_cafile=self.kafka_ssl_cafile or None,
            ssl_certfile=self.kafka_ssl_certfile or None,
            ssl_keyfile=self.kafka_ssl_keyfile or None,
            ssl_key_password=self.kafka_ssl_key_password,
            ssl_check_hostname=self.kafka_ssl_check_hostname,
            max_request_size=self.kafka_max_request_size,
            partitions=self.kafka_partitions,
            replication_factor=self.kafka_replication_factor,
            min_insync_replicas=self.kafka_min_insync_replicas,
            create_topics=self.kafka_create_topics,
        )


def load_settings(**overrides: Any) -> Settings:
    """This process's settings: ``overrides`` (flags, explicit arguments) over the
    ``SAGA_*`` environment and ``SAGA_<NAME>_FILE`` files.

    A bad value is a :class:`~engine.errors.ConfigError` of one line naming each
    variable and why, never the value (it may be a secret).
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(bad_settings(exc)) from None


def bad_settings(exc: ValidationError) -> str:
    """One line naming each bad variable and why; never the value."""
    problems = []
    for error in exc.errors():
        name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
        problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "bad setting " + "; ".join(problems)


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def parse_start_versions(text: str) -> dict[str, int]:
    """``book_trip=1,other=2`` as a mapping; a ValueError if it is not that."""
    versions: dict[str, int] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        name, sep, version = pair.partition("=")
        if not sep or not name.strip() or not version.strip().isdigit() or int(version) < 1:
            raise ValueError("expected name=version pairs, comma-separated (versions from 1)")
        versions[name.strip()] = int(version)
    return versions
