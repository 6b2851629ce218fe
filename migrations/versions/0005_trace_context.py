"""trace context of a saga's latest step, so timers and operators continue its trace

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("trace_context", sa.JSON))


def downgrade() -> None:
    # In place: on SQLite a batch copies the table and drops the old one, which the
    # ON DELETE CASCADE of saga_steps would follow, deleting every saga's steps.
    op.execute("ALTER TABLE saga_instances DROP COLUMN trace_context")
