"""participant barrier of the worker runtime

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.store.schema import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "participant_barrier",
        sa.Column("participant", sa.String(100), primary_key=True),
        sa.Column("saga_id", sa.String(36), primary_key=True),
        sa.Column("step", sa.String(200), primary_key=True),
        sa.Column("op", sa.String(20), primary_key=True),
        sa.Column("origin", sa.String(20), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("reply", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("participant_barrier")
