"""graph state: a reply token and a timer per step, completion order, lanes, parents,
the step of each outbox row

Revision ID: 0009
Revises: 0008

A saga waits on as many replies and timers as it has branches in flight, so the one
awaited token of saga_instances moves to its step's row, and saga_timers is keyed by
(saga, step). Running sagas keep what they wait for.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from engine.limits import ID_LENGTH, LANE_LENGTH, NAME_LENGTH
from engine.store.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("saga_steps") as batch:
        batch.add_column(sa.Column("awaiting_kind", sa.String(20)))
        batch.add_column(sa.Column("completed", sa.Integer))
        batch.add_column(sa.Column("lane", sa.String(LANE_LENGTH)))
    op.execute(
        "UPDATE saga_steps SET awaiting_kind = (SELECT i.awaiting_kind FROM saga_instances i "
        "WHERE i.id = saga_steps.saga_id AND i.awaiting_step = saga_steps.name "
        "AND i.awaiting_attempt = CASE WHEN i.awaiting_kind = 'command' "
        "THEN saga_steps.attempt ELSE saga_steps.compensation_attempt END)"
    )
    # Not a batch: on SQLite a batch copies the table and drops the old one, which
    # would cascade to every saga's steps. DROP COLUMN alters it in place.
    for column in ("awaiting_step", "awaiting_kind", "awaiting_attempt"):
        op.execute(f"ALTER TABLE saga_instances DROP COLUMN {column}")
    with op.batch_alter_table("saga_instances") as batch:  # adding alters in place
        batch.add_column(sa.Column("parent", sa.JSON))
    with op.batch_alter_table("saga_outbox") as batch:
        batch.add_column(sa.Column("step", sa.String(NAME_LENGTH)))
    _timers("saga_timers_graph", ("saga_id", "step"))
    op.execute(
        "INSERT INTO saga_timers_graph (saga_id, kind, step, attempt, due_at) "
        "SELECT saga_id, kind, step, attempt, due_at FROM saga_timers"
    )
    op.drop_table("saga_timers")
    op.rename_table("saga_timers_graph", "saga_timers")
    op.create_index("ix_saga_timers_due_at", "saga_timers", ["due_at"])


def _timers(name: str, key: tuple[str, ...]) -> None:
    op.create_table(
        name,
        sa.Column(
            "saga_id",
            sa.String(ID_LENGTH),
            sa.ForeignKey("saga_instances.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("step", sa.String(NAME_LENGTH), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint(*key, name=f"pk_{name}"),
    )


def downgrade() -> None:
    op.execute("ALTER TABLE saga_outbox DROP COLUMN step")
    op.execute("ALTER TABLE saga_instances DROP COLUMN parent")
    with op.batch_alter_table("saga_instances") as batch:
        batch.add_column(sa.Column("awaiting_step", sa.String(NAME_LENGTH)))
        batch.add_column(sa.Column("awaiting_kind", sa.String(20)))
        batch.add_column(sa.Column("awaiting_attempt", sa.Integer))
    op.execute(
        "UPDATE saga_instances SET awaiting_step = s.name, awaiting_kind = s.awaiting_kind, "
        "awaiting_attempt = CASE WHEN s.awaiting_kind = 'command' THEN s.attempt "
        "ELSE s.compensation_attempt END FROM saga_steps s "
        "WHERE s.saga_id = saga_instances.id AND s.awaiting_kind IS NOT NULL"
    )
    _timers("saga_timers_line", ("saga_id",))
    # A straight-line saga has one timer at most; a graph one keeps its earliest.
    op.execute(
        "INSERT INTO saga_timers_line (saga_id, kind, step, attempt, due_at) "
        "SELECT t.saga_id, t.kind, t.step, t.attempt, t.due_at FROM saga_timers t "
        "WHERE NOT EXISTS (SELECT 1 FROM saga_timers o WHERE o.saga_id = t.saga_id "
        "AND (o.due_at < t.due_at OR (o.due_at = t.due_at AND o.step < t.step)))"
    )
    op.drop_table("saga_timers")
    op.rename_table("saga_timers_line", "saga_timers")
    op.create_index("ix_saga_timers_due_at", "saga_timers", ["due_at"])
    for column in ("lane", "completed", "awaiting_kind"):
        op.execute(f"ALTER TABLE saga_steps DROP COLUMN {column}")
