"""engine tables: sagas, steps, timers, history, outbox, inbox

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.store.schema import BigId, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_instances",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("trace_id", sa.String(32)),
        sa.Column("awaiting_step", sa.String(200)),
        sa.Column("awaiting_kind", sa.String(20)),
        sa.Column("awaiting_attempt", sa.Integer),
        sa.Column("row_version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_saga_instances_status_created", "saga_instances", ["status", "created_at"])
    op.create_index("ix_saga_instances_name_created", "saga_instances", ["name", "created_at"])
    op.create_index("ix_saga_instances_created", "saga_instances", ["created_at"])

    op.create_table(
        "saga_steps",
        sa.Column(
            "saga_id",
            sa.String(36),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("compensation_attempt", sa.Integer, nullable=False),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("reply", sa.JSON),
        sa.Column("error", sa.Text),
    )

    op.create_table(
        "saga_timers",
        sa.Column(
            "saga_id",
            sa.String(36),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_saga_timers_due_at", "saga_timers", ["due_at"])

    op.create_table(
        "saga_history",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column(
            "saga_id",
            sa.String(36),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("event", sa.String(50), nullable=False),
        sa.Column("step", sa.String(200)),
        sa.Column("detail", sa.Text),
        sa.Column("actor", sa.String(200), nullable=False),
    )
    op.create_index("ix_saga_history_saga_id", "saga_history", ["saga_id", "id"])

    op.create_table(
        "saga_outbox",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(36), nullable=False, unique=True),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("sent_at", UTCDateTime),
    )
    op.create_index("ix_saga_outbox_unsent", "saga_outbox", ["sent_at", "id"])

    op.create_table(
        "saga_inbox",
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("consumer", sa.String(100), nullable=False),
        sa.Column("processed_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_saga_inbox_processed_at", "saga_inbox", ["processed_at"])


def downgrade() -> None:
    for table in (
        "saga_inbox",
        "saga_outbox",
        "saga_history",
        "saga_timers",
        "saga_steps",
        "saga_instances",
    ):
        op.drop_table(table)
