"""business keys: saga_keys, what each saga is about, searchable by name and value

Revision ID: 0010
Revises: 0009

A new table, and the creation-time index of saga_instances extended by the id (the
order of every list, and the range a page cursor starts from). saga_instances itself
is not altered (on SQLite a batch copy of it would cascade to every saga's steps).
Sagas started before have no keys.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.limits import ID_LENGTH, KEY_VALUE_LENGTH, NAME_LENGTH

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "saga_keys",
        sa.Column(
            "saga_id",
            sa.String(ID_LENGTH),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(NAME_LENGTH), primary_key=True),
        sa.Column("value", sa.String(KEY_VALUE_LENGTH), nullable=False),
    )
    op.create_index("ix_saga_keys_name_value", "saga_keys", ["name", "value", "saga_id"])
    op.drop_index("ix_saga_instances_created", table_name="saga_instances")
    op.create_index("ix_saga_instances_created", "saga_instances", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_saga_instances_created", table_name="saga_instances")
    op.create_index("ix_saga_instances_created", "saga_instances", ["created_at"])
    op.drop_index("ix_saga_keys_name_value", table_name="saga_keys")
    op.drop_table("saga_keys")
