"""retention: indexes the pruning queries need, and the saga of each inbox row

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # sagactl prune: finished sagas by last change.
    op.create_index("ix_saga_instances_status_updated", "saga_instances", ["status", "updated_at"])
    # sagactl prune: a pruned saga's outbox rows (the key of every row is its saga id).
    op.create_index("ix_saga_outbox_key", "saga_outbox", ["key"])
    # sagactl prune: a pruned saga's inbox rows. Rows written before this revision
    # have no saga id; the scheduled pruning removes them by age.
    with op.batch_alter_table("saga_inbox") as batch:
        batch.add_column(sa.Column("saga_id", sa.String(36)))
    op.create_index("ix_saga_inbox_saga_id", "saga_inbox", ["saga_id"])
    # The worker's scheduled pruning: a participant's barrier rows by age.
    op.create_index(
        "ix_participant_barrier_created", "participant_barrier", ["participant", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_participant_barrier_created", table_name="participant_barrier")
    op.drop_index("ix_saga_inbox_saga_id", table_name="saga_inbox")
    with op.batch_alter_table("saga_inbox") as batch:
        batch.drop_column("saga_id")
    op.drop_index("ix_saga_outbox_key", table_name="saga_outbox")
    op.drop_index("ix_saga_instances_status_updated", table_name="saga_instances")
