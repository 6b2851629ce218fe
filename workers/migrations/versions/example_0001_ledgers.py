"""the example participants' tables: stock, accounts, payment ledger, shipments

Databases migrated before the example had its own history already have these tables
(the engine's revision 0003 made them): each is created only where it is missing, so
such a database joins this history with its rows as they are.

Revision ID: example_0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "example_0001"
down_revision = None
branch_labels = None
depends_on = None


def _missing(table: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(table)


def upgrade() -> None:
    if _missing("inventory_stock"):
        op.create_table(
            "inventory_stock",
            sa.Column("sku", sa.String(100), primary_key=True),
            sa.Column("available", sa.Integer, nullable=False),
            sa.Column("received", sa.Integer, nullable=False),
        )
    if _missing("inventory_reservations"):
        op.create_table(
            "inventory_reservations",
            sa.Column("order_id", sa.String(36), primary_key=True),
            sa.Column("sku", sa.String(100), nullable=False),
            sa.Column("quantity", sa.Integer, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
        )
    if _missing("payment_accounts"):
        op.create_table(
            "payment_accounts",
            sa.Column("customer_id", sa.String(100), primary_key=True),
            sa.Column("balance_cents", sa.Integer, nullable=False),
            sa.Column("deposited_cents", sa.Integer, nullable=False),
        )
    if _missing("payment_ledger"):
        op.create_table(
            "payment_ledger",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("order_id", sa.String(36), nullable=False),
            sa.Column("customer_id", sa.String(100), nullable=False),
            sa.Column("kind", sa.String(10), nullable=False),
            sa.Column("amount_cents", sa.Integer, nullable=False),
        )
        op.create_index("ix_payment_ledger_order_id", "payment_ledger", ["order_id"])
    if _missing("shipments"):
        op.create_table(
            "shipments",
            sa.Column("order_id", sa.String(36), primary_key=True),
            sa.Column("address", sa.String(500), nullable=False),
            sa.Column("sku", sa.String(100), nullable=False),
            sa.Column("quantity", sa.Integer, nullable=False),
            sa.Column("status", sa.String(20), nullable=False),
        )


def downgrade() -> None:
    for table in (
        "shipments",
        "payment_ledger",
        "payment_accounts",
        "inventory_reservations",
        "inventory_stock",
    ):
        op.drop_table(table)
