"""deferred replies: replies whose saga was not visible yet, set aside instead of held

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.store.schema import UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_deferred_replies",
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("next_attempt_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_saga_deferred_replies_next_attempt", "saga_deferred_replies", ["next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_saga_deferred_replies_next_attempt", table_name="saga_deferred_replies")
    op.drop_table("saga_deferred_replies")
