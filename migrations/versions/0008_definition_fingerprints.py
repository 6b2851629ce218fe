"""definition fingerprints: held sagas, their kept replies, and what engines serve

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.limits import NAME_LENGTH
from engine.store.schema import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing sagas keep NULL: trusted by any definition of their name and version.
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(64)))
        batch.add_column(sa.Column("held", sa.Text))
        batch.add_column(sa.Column("held_at", UTCDateTime))
    op.create_index("ix_saga_instances_held_at", "saga_instances", ["held_at"])
    op.create_table(
        "saga_held_replies",
        sa.Column("message_id", sa.String(36), primary_key=True),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("held_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_saga_held_replies_saga", "saga_held_replies", ["saga_id", "held_at"])
    op.create_table(
        "saga_served_definitions",
        sa.Column("engine_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )
    op.create_index(
        "ix_saga_served_definitions_name", "saga_served_definitions", ["name", "version"]
    )


def downgrade() -> None:
    op.drop_index("ix_saga_served_definitions_name", table_name="saga_served_definitions")
    op.drop_table("saga_served_definitions")
    op.drop_index("ix_saga_held_replies_saga", table_name="saga_held_replies")
    op.drop_table("saga_held_replies")
    op.drop_index("ix_saga_instances_held_at", table_name="saga_instances")
    # In place: on SQLite a batch copies the table and drops the old one, which the
    # ON DELETE CASCADE of saga_steps would follow, deleting every saga's steps.
    for column in ("held_at", "held", "fingerprint"):
        op.execute(f"ALTER TABLE saga_instances DROP COLUMN {column}")
