"""The wire envelope every command, compensation and reply travels in.

The envelope is self-describing (saga name and version, step, attempt) so a reply can
be matched to the exact dispatch the saga waits for, and a participant needs no state
of the engine's to answer.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from engine.clock import utc_now
from engine.errors import DecodeError, LimitError
from engine.limits import (
    DEFAULT_LIMITS,
    ERROR_LENGTH,
    HEADER_NAME_LENGTH,
    HEADER_VALUE_LENGTH,
    ID_LENGTH,
    MAX_HEADERS,
    NAME_LENGTH,
    Limits,
    MessageTooLarge,
    clip,
    has_nul,
    nul_in_body,
)


class MessageKind(StrEnum):
    """What a message asks of its receiver: run a step, undo one, or report back."""

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
#: (the step's retry policy, within its current budget). A worker replies to that attempt
#: like to any other (an error fails the step); the header tells the participant so.
LAST_ATTEMPT_HEADER = "saga-last-attempt"


def new_message_id() -> str:
    return str(uuid.uuid4())


# Field types sized like the columns they end up in (engine/limits.py); checked by
# pydantic's core, so a bound costs decode next to nothing.
Id = Annotated[str, StringConstraints(min_length=1, max_length=ID_LENGTH)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_LENGTH)]
ErrorText = Annotated[str, StringConstraints(max_length=ERROR_LENGTH)]
HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=HEADER_NAME_LENGTH)]
HeaderValue = Annotated[str, StringConstraints(max_length=HEADER_VALUE_LENGTH)]
#: A PostgreSQL ``integer``.
Int32 = Annotated[int, Field(ge=1, le=2**31 - 1)]


class Envelope(BaseModel):
    """One message on the wire: a command, compensation or reply with its saga, step,
    attempt and payload. Validated and bounded when decoded (engine/limits.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: Id = Field(default_factory=new_message_id)
    saga_id: Id
    saga_name: Name
    saga_version: Int32
    step: Name
    kind: MessageKind
    #: The command or compensation name a participant dispatches on; a reply repeats
    #: the name of the message it answers.
    name: Name
    attempt: Int32
    payload: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utc_now)
    #: Propagation headers (W3C trace context); copied to broker headers by transports.
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=MAX_HEADERS)
    # Replies only.
    in_reply_to: MessageKind | None = None
    causation_id: Id | None = None
    outcome: Outcome | None = None
    error: ErrorText | None = None

    def reply(
        self,
        outcome: Outcome,
        payload: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Envelope:
        """Build the reply to this command or compensation, carrying its attempt token.

        ``error`` (often an exception's text) is cut to its limit and cleared of NUL.
        """
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
            error=clip(error, ERROR_LENGTH) if error is not None else None,
        )


def encode(envelope: Envelope) -> bytes:
    return envelope.model_dump_json().encode()


def sized(envelope: Envelope, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The encoded envelope, if the wire edge would take it: raises
    :class:`MessageTooLarge` over the size limit, :class:`LimitError` for a NUL."""
    body = encode(envelope)
    if len(body) > limits.max_message_bytes:
        raise MessageTooLarge(len(body), limits.max_message_bytes)
    if has_nul(body):
        raise LimitError(
            f"{nul_in_body(body)} holds a NUL character, which PostgreSQL text cannot store"
        )
    return body


def decode(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Parse a message body; anything else than a valid envelope within the limits
    (size, field lengths, no NUL anywhere) is a DecodeError naming the field."""
    if len(body) > limits.max_message_bytes:
        raise DecodeError(
            f"not a saga envelope: body: {MessageTooLarge(len(body), limits.max_message_bytes)}"
        )
    if has_nul(body):
        raise DecodeError(
            f"not a saga envelope: {nul_in_body(body)}: holds a NUL character, which "
            "PostgreSQL text cannot store"
        )
    try:
        envelope = Envelope.model_validate_json(body)
    except ValidationError as exc:
        if b"\x00" in body:  # not JSON; said plainly, as for an escaped one
            raise DecodeError(
                "not a saga envelope: body: holds a NUL character, which PostgreSQL text "
                "cannot store"
            ) from None
        first = exc.errors()[0]
        # Clipped: a field name on the wire can be anything, and the reason travels
        # in a header and a column.
        where = ".".join(clip(str(p), 40) for p in first["loc"]) or "body"
        raise DecodeError(f"not a saga envelope: {where}: {first['msg']}") from None
    if envelope.kind is MessageKind.REPLY and (
        envelope.outcome is None or envelope.in_reply_to is None
    ):
        raise DecodeError("not a saga envelope: a reply needs outcome and in_reply_to")
    return envelope
