"""operator repair: retry budgets of steps, dead-letter archive

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.store.schema import BigId, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_steps") as batch:
        batch.add_column(sa.Column("attempt_base", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("compensation_attempt_base", sa.Integer, nullable=False, server_default="0")
        )

    op.create_table(
        "saga_dead_letters",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("letter_id", sa.String(64), nullable=False, unique=True),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.JSON, nullable=False),
        sa.Column("saga_id", sa.String(255)),
        sa.Column("received_at", UTCDateTime, nullable=False),
        sa.Column("replayed_at", UTCDateTime),
        sa.Column("replayed_by", sa.String(200)),
    )
    op.create_index("ix_saga_dead_letters_received_at", "saga_dead_letters", ["received_at"])
    op.create_index("ix_saga_dead_letters_saga_id", "saga_dead_letters", ["saga_id"])


def downgrade() -> None:
    op.drop_table("saga_dead_letters")
    with op.batch_alter_table("saga_steps") as batch:
        batch.drop_column("compensation_attempt_base")
        batch.drop_column("attempt_base")
