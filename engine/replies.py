"""What became of a reply the engine consumed, and what applying replies changed."""

from __future__ import annotations

import enum
from typing import NamedTuple

from engine.model import HistoryEntry, OutboxMessage, SagaState


class ReplyOutcome(enum.Enum):
    APPLIED = "applied"
    #: Its message id was processed before: acknowledged, nothing changes.
    DUPLICATE = "duplicate"
    #: No saga row (yet): another engine's start may not have committed.
    NOT_VISIBLE = "not visible"
    #: The saga exists but this engine does not serve it (no definition of its
    #: version, or one of another fingerprint), or it is held: the reply is kept in
    #: the store for an engine that serves it (engine/held.py), never dead-lettered.
    HELD = "held"
    #: Not visible, and set aside in the store for the deferred-reply scan.
    DEFERRED = "deferred"


class ReplyResult(NamedTuple):
    outcome: ReplyOutcome
    #: Why, for HELD: why this engine does not apply it.
    reason: str | None = None


#: A saga changed by applied replies: its new image, the messages and history it adds.
Change = tuple[SagaState, list[OutboxMessage], list[HistoryEntry]]
