"""example participants' business tables: stock, accounts, payment ledger, shipments

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inventory_stock",
        sa.Column("sku", sa.String(100), primary_key=True),
        sa.Column("available", sa.Integer, nullable=False),
        sa.Column("received", sa.Integer, nullable=False),
    )
    op.create_table(
        "inventory_reservations",
        sa.Column("order_id", sa.String(36), primary_key=True),
        sa.Column("sku", sa.String(100), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
    )
    op.create_table(
        "payment_accounts",
        sa.Column("customer_id", sa.String(100), primary_key=True),
        sa.Column("balance_cents", sa.Integer, nullable=False),
        sa.Column("deposited_cents", sa.Integer, nullable=False),
    )
    op.create_table(
        "payment_ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(36), nullable=False),
        sa.Column("customer_id", sa.String(100), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
    )
    op.create_index("ix_payment_ledger_order_id", "payment_ledger", ["order_id"])
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
