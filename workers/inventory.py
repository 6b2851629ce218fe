"""Inventory participant: stock per SKU and one reservation per order."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, select, update

from engine import BusinessFailure, HandlerContext, Worker
from sagas.order import ReleaseInventory, ReserveInventory

metadata = MetaData()

stock = Table(
    "inventory_stock",
    metadata,
    Column("sku", String(100), primary_key=True),
    Column("available", Integer, nullable=False),
    #: Everything ever put on the shelf: available + reserved must always equal it.
    Column("received", Integer, nullable=False),
)

reservations = Table(
    "inventory_reservations",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("sku", String(100), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # reserved | released
)


class Reserved(BaseModel):
    sku: str
    quantity: int
    left: int


worker = Worker("inventory")


@worker.command("reserve_inventory")
async def reserve(cmd: ReserveInventory, ctx: HandlerContext) -> Reserved:
    row = (
        await ctx.session.execute(select(stock.c.available).where(stock.c.sku == cmd.sku))
    ).first()
    if row is None:
        raise BusinessFailure(f"unknown sku {cmd.sku!r}")
    if row.available < cmd.quantity:
        raise BusinessFailure(
            f"out of stock: {cmd.sku} has {row.available}, order wants {cmd.quantity}"
        )
    await ctx.session.execute(
        update(stock)
        .where(stock.c.sku == cmd.sku)
        .values(available=stock.c.available - cmd.quantity)
    )
    await ctx.session.execute(
        reservations.insert().values(
            order_id=cmd.order_id, sku=cmd.sku, quantity=cmd.quantity, status="reserved"
        )
    )
    return Reserved(sku=cmd.sku, quantity=cmd.quantity, left=row.available - cmd.quantity)


@worker.compensation("release_inventory")
async def release(cmd: ReleaseInventory, ctx: HandlerContext) -> None:
    row = (
        await ctx.session.execute(
            select(reservations).where(
                reservations.c.order_id == cmd.order_id, reservations.c.status == "reserved"
            )
        )
    ).first()
    if row is None:
        return
    await ctx.session.execute(
        update(stock)
        .where(stock.c.sku == row.sku)
        .values(available=stock.c.available + row.quantity)
    )
    await ctx.session.execute(
        update(reservations)
        .where(reservations.c.order_id == cmd.order_id)
        .values(status="released")
    )
