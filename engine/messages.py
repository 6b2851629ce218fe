"""The wire envelope every command, compensation and reply travels in.

The envelope is self-describing (saga name and version, step, attempt) so a reply can
be matched to the exact dispatch the saga waits for, and a participant needs no state
of the engine's to answer.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.clock import utc_now
from engine.errors import DecodeError


class MessageKind(StrEnum):
    COMMAND = "command"
    COMPENSATION = "compensation"
    REPLY = "reply"


class Outcome(StrEnum):
    """What a participant says about one attempt."""

    SUCCESS = "success"
    #: Business failure: not retried, the saga compensates.
    FAILURE = "failure"
    #: Transient error (the handler raised): retried per the step's policy.
    ERROR = "error"


#: On commands and compensations: the attempt after which the engine stops retrying
#: (the step's retry policy, within its current budget). A worker whose handler raises
#: on that attempt dead-letters the message as well as replying, for a human to see.
LAST_ATTEMPT_HEADER = "saga-last-attempt"


def new_message_id() -> str:
    return str(uuid.uuid4())


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: str = Field(default_factory=new_message_id)
    saga_id: str
    saga_name: str
    saga_version: int
    step: str
    kind: MessageKind
    #: The command or compensation name a participant dispatches on; a reply repeats
    #: the name of the message it answers.
    name: str
    attempt: int = Field(ge=1)
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utc_now)
    #: Propagation headers (W3C trace context); copied to broker headers by transports.
    headers: dict[str, str] = Field(default_factory=dict)
    # Replies only.
    in_reply_to: MessageKind | None = None
    causation_id: str | None = None
    outcome: Outcome | None = None
    error: str | None = None

    def reply(
        self,
        outcome: Outcome,
        payload: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Envelope:
        """Build the reply to this command or compensation, carrying its attempt token."""
        return Envelope(
            saga_id=self.saga_id,
            saga_name=self.saga_name,
            saga_version=self.saga_version,
            step=self.step,
            kind=MessageKind.REPLY,
            name=self.name,
            attempt=self.attempt,
            payload=payload or {},
            headers=dict(self.headers),
            in_reply_to=self.kind,
            causation_id=self.message_id,
            outcome=outcome,
            error=error,
        )


def last_attempt(envelope: Envelope) -> int | None:
    """The attempt the engine gives up after (None: not said, as from older engines)."""
    value = envelope.headers.get(LAST_ATTEMPT_HEADER, "")
    return int(value) if value.isdigit() else None


def encode(envelope: Envelope) -> bytes:
    return envelope.model_dump_json().encode()


def decode(body: bytes) -> Envelope:
    """Parse a message body; anything else than a valid envelope is a DecodeError."""
    try:
        envelope = Envelope.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise DecodeError(f"not a saga envelope: {where}: {first['msg']}") from None
    if envelope.kind is MessageKind.REPLY and (
        envelope.outcome is None or envelope.in_reply_to is None
    ):
        raise DecodeError("not a saga envelope: a reply needs outcome and in_reply_to")
    return envelope
