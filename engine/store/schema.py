"""SQLAlchemy table definitions of the engine and of the participant barrier.

The schema is created only by the Alembic migrations in ``migrations/``; these objects
mirror them for queries, and a test compares the two so they cannot drift.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect

from engine.limits import ID_LENGTH, KEY_VALUE_LENGTH, LANE_LENGTH, NAME_LENGTH

metadata = MetaData()

#: SQLite has no 64-bit autoincrement type of its own; INTEGER PRIMARY KEY is it.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every dialect (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


sagas = Table(
    "saga_instances",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("input", JSON, nullable=False),
    Column("error", Text),
    Column("trace_id", String(32)),
    Column("trace_context", JSON),
    Column("row_version", Integer, nullable=False),
    #: A child saga's parent: its id, name, version, step, and the message answered.
    Column("parent", JSON),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    #: The definition's fingerprint at start (NULL before 0008: trusted).
    Column("fingerprint", String(64)),
    #: Why no engine advances it now (engine/held.py), and since when; NULL: not held.
    Column("held", Text),
    Column("held_at", UTCDateTime),
    Index("ix_saga_instances_status_created", "status", "created_at"),
    Index("ix_saga_instances_name_created", "name", "created_at"),
    #: With the id: the order of every list, and its cursor's range (0010).
    Index("ix_saga_instances_created", "created_at", "id"),
    Index("ix_saga_instances_status_updated", "status", "updated_at"),
    Index("ix_saga_instances_held_at", "held_at"),
)

steps = Table(
    "saga_steps",
    metadata,
    Column(
        "saga_id",
        String(ID_LENGTH),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("name", String(NAME_LENGTH), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("compensation_attempt", Integer, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("reply", JSON),
    Column("error", Text),
    #: Attempts made before the current retry budget (an operator retry resets it).
    Column("attempt_base", Integer, nullable=False, server_default="0"),
    Column("compensation_attempt_base", Integer, nullable=False, server_default="0"),
    #: The kind of reply the step waits for (its attempt is the current one).
    Column("awaiting_kind", String(20)),
    #: Completion order within the saga: compensation runs in reverse of it.
    Column("completed", Integer),
    #: ``group[branch]`` of a step in a parallel group.
    Column("lane", String(LANE_LENGTH)),
)

#: Each saga's business keys (``Saga(keys=...)``), written with its row at start:
#: ``sagactl list --key order_id=4711`` is one index range scan on (name, value).
saga_keys = Table(
    "saga_keys",
    metadata,
    Column(
        "saga_id",
        String(ID_LENGTH),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("name", String(NAME_LENGTH), primary_key=True),
    Column("value", String(KEY_VALUE_LENGTH), nullable=False),
    Index("ix_saga_keys_name_value", "name", "value", "saga_id"),
)

timers = Table(
    "saga_timers",
    metadata,
    Column(
        "saga_id",
        String(ID_LENGTH),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("kind", String(30), nullable=False),
    #: One timer per step at most; a saga has one per branch in flight.
    Column("step", String(NAME_LENGTH), primary_key=True),
    Column("attempt", Integer, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Index("ix_saga_timers_due_at", "due_at"),
)

history = Table(
    "saga_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "saga_id",
        String(ID_LENGTH),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("at", UTCDateTime, nullable=False),
    Column("event", String(50), nullable=False),
    Column("step", String(NAME_LENGTH)),
    Column("detail", Text),
    Column("actor", String(NAME_LENGTH), nullable=False),
    Index("ix_saga_history_saga_id", "saga_id", "id"),
)

outbox = Table(
    "saga_outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("message_id", String(ID_LENGTH), nullable=False, unique=True),
    Column("destination", String(255), nullable=False),
    Column("key", String(255), nullable=False),
    Column("body", Text, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    #: The step whose message it is (a step timeout judges its own message's delay);
    #: NULL for a replayed dead letter and rows from before migration 0009.
    Column("step", String(NAME_LENGTH)),
    Index("ix_saga_outbox_unsent", "sent_at", "id"),
    Index("ix_saga_outbox_key", "key"),
)

inbox = Table(
    "saga_inbox",
    metadata,
    Column("message_id", String(ID_LENGTH), primary_key=True),
    Column("consumer", String(100), nullable=False),
    Column("processed_at", UTCDateTime, nullable=False),
    #: The saga the reply was for, so ``sagactl prune`` removes a saga's inbox rows
    #: with it (NULL on rows from before migration 0006).
    Column("saga_id", String(ID_LENGTH)),
    Index("ix_saga_inbox_processed_at", "processed_at"),
    Index("ix_saga_inbox_saga_id", "saga_id"),
)

#: Every message that reached the dead-letter destination, kept for ``sagactl dlq``.
dead_letters = Table(
    "saga_dead_letters",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    #: The transport's id of this dead-lettering (x-dead-letter-id), so a redelivered
    #: dead letter is archived once.
    Column("letter_id", String(64), nullable=False, unique=True),
    #: The destination the message was consumed from, where a replay sends it back.
    Column("source", String(255), nullable=False),
    Column("reason", Text, nullable=False),
    Column("key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    #: The saga the body names, if it decodes to an envelope.
    Column("saga_id", String(255)),
    Column("received_at", UTCDateTime, nullable=False),
    Column("replayed_at", UTCDateTime),
    Column("replayed_by", String(NAME_LENGTH)),
    Index("ix_saga_dead_letters_received_at", "received_at"),
    Index("ix_saga_dead_letters_saga_id", "saga_id"),
)

#: Replies whose saga was not (yet) visible when they arrived: kept here, acknowledged
#: to the broker, and retried by the engine's deferred-reply scan until their saga
#: appears or the patience runs out (then they become dead letters).
deferred_replies = Table(
    "saga_deferred_replies",
    metadata,
    Column("message_id", String(36), primary_key=True),
    Column("saga_id", String(36), nullable=False),
    #: The delivery as it came: broker key, body and headers (kept for the archive).
    Column("key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", JSON, nullable=False),
    Column("first_seen_at", UTCDateTime, nullable=False),
    #: Times it was tried again and its saga was still not visible.
    Column("attempts", Integer, nullable=False),
    #: Times applying it failed with an error that was not transient.
    Column("failures", Integer, nullable=False),
    Column("last_error", Text),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Index("ix_saga_deferred_replies_next_attempt", "next_attempt_at"),
)

#: Replies of sagas this engine could not advance (no definition of their version, or
#: one of another fingerprint): kept, acknowledged, and applied by an engine that
#: serves the saga when one runs (engine/held.py). Never dead-lettered.
held_replies = Table(
    "saga_held_replies",
    metadata,
    Column("message_id", String(36), primary_key=True),
    Column("saga_id", String(36), nullable=False),
    #: The reply's envelope, encoded (its trace context is inside).
    Column("body", LargeBinary, nullable=False),
    Column("held_at", UTCDateTime, nullable=False),
    Index("ix_saga_held_replies_saga", "saga_id", "held_at"),
)

#: What each running engine serves: one row per definition it loads, refreshed by
#: its heartbeat; a row past ``expires_at`` is an engine that stopped or died.
served = Table(
    "saga_served_definitions",
    metadata,
    Column("engine_id", String(255), primary_key=True),
    Column("name", String(NAME_LENGTH), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Index("ix_saga_served_definitions_name", "name", "version"),
)

barrier = Table(
    "participant_barrier",
    metadata,
    Column("participant", String(100), primary_key=True),
    Column("saga_id", String(ID_LENGTH), primary_key=True),
    Column("step", String(NAME_LENGTH), primary_key=True),
    #: "action" or "compensation": which half of the step this row guards.
    Column("op", String(20), primary_key=True),
    #: Who wrote the row: an action row written by a compensation marks a null
    #: compensation and blocks the hanging action that may still arrive.
    Column("origin", String(20), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("reply", JSON),
    Column("error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_participant_barrier_created", "participant", "created_at"),
)
