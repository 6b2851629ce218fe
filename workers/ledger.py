"""Seeding and auditing the example participants' books.

The audit is what tests and the demo judge a run by: stock and money conserved, and
each order's net effect matching how its saga ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from workers.inventory import reservations, stock
from workers.payment import accounts, ledger
from workers.shipment import shipments

#: The example's own Alembic history (version table ``saga_example_version``):
#: ``sagactl db upgrade --scripts workers/migrations``.
MIGRATIONS = str(Path(__file__).resolve().parent / "migrations")


class LedgerTotals(BaseModel):
    stock_received: int
    stock_available: int
    stock_reserved: int
    deposited_cents: int
    balance_cents: int
    charged_cents: int
    refunded_cents: int
    shipments_created: int
    shipments_cancelled: int

    @property
    def stock_conserved(self) -> bool:
        return self.stock_available + self.stock_reserved == self.stock_received

    @property
    def money_conserved(self) -> bool:
        return self.balance_cents + self.charged_cents - self.refunded_cents == self.deposited_cents


class OrderEffect(BaseModel):
    """The net business effect of one order across the three participants."""

    reserved: int = 0
    net_charged_cents: int = 0
    charges: int = 0
    refunds: int = 0
    shipped: bool = False


async def seed(
    engine: AsyncEngine, *, stock_by_sku: Mapping[str, int], balances: Mapping[str, int]
) -> None:
    """Replace the shelves and accounts with these amounts (the demo starts clean)."""
    async with engine.begin() as conn:
        for table in (reservations, ledger, shipments, stock, accounts):
            await conn.execute(delete(table))
        if stock_by_sku:
            await conn.execute(
                insert(stock),
                [{"sku": s, "available": n, "received": n} for s, n in stock_by_sku.items()],
            )
        if balances:
            await conn.execute(
                insert(accounts),
                [
                    {"customer_id": c, "balance_cents": n, "deposited_cents": n}
                    for c, n in balances.items()
                ],
            )


async def totals(engine: AsyncEngine) -> LedgerTotals:
    async with engine.connect() as conn:

        async def one(query: object) -> int:
            return int((await conn.execute(query)).scalar() or 0)  # type: ignore[call-overload]

        return LedgerTotals(
            stock_received=await one(select(func.sum(stock.c.received))),
            stock_available=await one(select(func.sum(stock.c.available))),
            stock_reserved=await one(
                select(func.sum(reservations.c.quantity)).where(reservations.c.status == "reserved")
            ),
            deposited_cents=await one(select(func.sum(accounts.c.deposited_cents))),
            balance_cents=await one(select(func.sum(accounts.c.balance_cents))),
            charged_cents=await one(
                select(func.sum(ledger.c.amount_cents)).where(ledger.c.kind == "charge")
            ),
            refunded_cents=await one(
                select(func.sum(ledger.c.amount_cents)).where(ledger.c.kind == "refund")
            ),
            shipments_created=await one(
                select(func.count()).select_from(shipments).where(shipments.c.status == "created")
            ),
            shipments_cancelled=await one(
                select(func.count()).select_from(shipments).where(shipments.c.status == "cancelled")
            ),
        )


async def effects(engine: AsyncEngine) -> dict[str, OrderEffect]:
    """Per order id, what the participants' books say happened."""
    out: dict[str, OrderEffect] = {}
    async with engine.connect() as conn:
        for r in await conn.execute(select(reservations)):
            if r.status == "reserved":
                out.setdefault(r.order_id, OrderEffect()).reserved += r.quantity
        for r in await conn.execute(select(ledger)):
            e = out.setdefault(r.order_id, OrderEffect())
            if r.kind == "charge":
                e.charges += 1
                e.net_charged_cents += r.amount_cents
            else:
                e.refunds += 1
                e.net_charged_cents -= r.amount_cents
        for r in await conn.execute(select(shipments)):
            if r.status == "created":
                out.setdefault(r.order_id, OrderEffect()).shipped = True
    return out


async def restock(
    engine: AsyncEngine, *, stock_by_sku: Mapping[str, int], balances: Mapping[str, int]
) -> None:
    """Bring shelves and accounts up to at least these levels, as receipts and deposits.

    Unlike :func:`seed` this keeps earlier history, and with it the conservation
    invariants: what is added is counted as received or deposited.
    """
    async with engine.begin() as conn:
        for sku, target in stock_by_sku.items():
            row = (await conn.execute(select(stock).where(stock.c.sku == sku))).first()
            if row is None:
                await conn.execute(insert(stock).values(sku=sku, available=target, received=target))
            elif row.available < target:
                delta = target - row.available
                await conn.execute(
                    update(stock)
                    .where(stock.c.sku == sku)
                    .values(available=stock.c.available + delta, received=stock.c.received + delta)
                )
        for customer, target in balances.items():
            row = (
                await conn.execute(select(accounts).where(accounts.c.customer_id == customer))
            ).first()
            if row is None:
                await conn.execute(
                    insert(accounts).values(
                        customer_id=customer, balance_cents=target, deposited_cents=target
                    )
                )
            elif row.balance_cents < target:
                delta = target - row.balance_cents
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.customer_id == customer)
                    .values(
                        balance_cents=accounts.c.balance_cents + delta,
                        deposited_cents=accounts.c.deposited_cents + delta,
                    )
                )
