"""formerly the example participants' tables; now nothing

This revision used to create the example's business tables
(inventory_stock, inventory_reservations, payment_accounts, payment_ledger, shipments)
in every database. They belong to the example, which has its own history now
(workers/migrations, version table saga_example_version): this revision stays, so
databases past it keep their place in the engine's history, and does nothing. A
database that ran it keeps those tables: the example's first revision adopts them as
they are, and a database that does not run the example may drop them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: the example's tables are the example's history's."""


def downgrade() -> None:
    """Nothing: the tables this revision once made are left to the example's history."""
