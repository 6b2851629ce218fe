"""Participants of the benchmark saga with trivial business work.

Each handler still runs inside the worker runtime's database transaction behind the
participant barrier (that cost is the engine's, and is measured); it only skips the
example's ledger queries. Run with ``sagactl worker bench.workers:inventory``.
"""

from __future__ import annotations

from pydantic import BaseModel

from bench.order import Charge, Reserve, Ship, Undo
from engine import BusinessFailure, HandlerContext, Worker


class Done(BaseModel):
    order_id: str


inventory = Worker("inventory")
payment = Worker("payment")
shipment = Worker("shipment")


@inventory.command("reserve_inventory")
async def reserve(cmd: Reserve, ctx: HandlerContext) -> Done:
    return Done(order_id=cmd.order_id)


@inventory.compensation("release_inventory")
async def release(cmd: Undo, ctx: HandlerContext) -> None:
    return None


@payment.command("charge_payment")
async def charge(cmd: Charge, ctx: HandlerContext) -> Done:
    return Done(order_id=cmd.order_id)


@payment.compensation("refund_payment")
async def refund(cmd: Undo, ctx: HandlerContext) -> None:
    return None


@shipment.command("create_shipment")
async def ship(cmd: Ship, ctx: HandlerContext) -> Done:
    if cmd.fail:
        raise BusinessFailure("undeliverable address (benchmark failure)")
    return Done(order_id=cmd.order_id)


@shipment.compensation("cancel_shipment")
async def cancel(cmd: Undo, ctx: HandlerContext) -> None:
    return None
