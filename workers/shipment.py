"""Shipment participant: one shipment per order, refused for undeliverable addresses."""

from __future__ import annotations

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, update

from engine import BusinessFailure, HandlerContext, Worker
from sagas.order import CancelShipment, CreateShipment

metadata = MetaData()

shipments = Table(
    "shipments",
    metadata,
    Column("order_id", String(36), primary_key=True),
    Column("address", String(500), nullable=False),
    Column("sku", String(100), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("status", String(20), nullable=False),  # created | cancelled
)

#: The carrier does not deliver where the address says so (the demo's failure case).
UNDELIVERABLE_MARKERS = ("po box", "nowhere", "undeliverable")


class ShipmentCreated(BaseModel):
    order_id: str
    carrier: str


worker = Worker("shipment")


@worker.command("create_shipment")
async def create(cmd: CreateShipment, ctx: HandlerContext) -> ShipmentCreated:
    lowered = cmd.address.lower()
    if any(marker in lowered for marker in UNDELIVERABLE_MARKERS):
        raise BusinessFailure(f"undeliverable address: {cmd.address!r}")
    await ctx.session.execute(
        shipments.insert().values(
            order_id=cmd.order_id,
            address=cmd.address,
            sku=cmd.sku,
            quantity=cmd.quantity,
            status="created",
        )
    )
    return ShipmentCreated(order_id=cmd.order_id, carrier="saga-post")


@worker.compensation("cancel_shipment")
async def cancel(cmd: CancelShipment, ctx: HandlerContext) -> None:
    await ctx.session.execute(
        update(shipments)
        .where(shipments.c.order_id == cmd.order_id, shipments.c.status == "created")
        .values(status="cancelled")
    )
