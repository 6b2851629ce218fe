"""Process settings, from flags or ``SAGA_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///saga.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGA_", extra="ignore")

    #: ``sqlite:///file.db`` (embedded default) or ``postgresql://user:pass@host/db``.
    database_url: str = DEFAULT_DATABASE_URL
    #: ``memory://`` (in-process), ``kafka://host:9092`` or ``amqp://user:pass@host/vhost``.
    broker_url: str = "memory://"
    #: Comma-separated module paths holding saga definitions.
    sagas: str = "sagas.order"
    #: Prefix of every topic / queue name.
    topic_prefix: str = Field(default="saga", pattern=r"^[A-Za-z0-9._-]+$")
    #: Port of the daemons' /healthz, /readyz and /metrics endpoint; off when unset.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address that endpoint listens on (0.0.0.0 in a container).
    metrics_host: str = "127.0.0.1"
    #: ``text`` or ``json`` (one object per line) on stderr.
    log_format: Literal["text", "json"] = "text"

    @field_validator("sagas")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(p.strip() for p in value.split(",") if p.strip())

    @property
    def saga_modules(self) -> list[str]:
        return [p for p in self.sagas.split(",") if p]
