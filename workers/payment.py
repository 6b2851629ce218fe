"""Payment participant: customer balances and an append-only ledger of charges/refunds."""

from __future__ import annotations

from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import Column, CursorResult, Integer, MetaData, String, Table, func, select, update

from engine import BusinessFailure, HandlerContext, Worker
from sagas.order import ChargePayment, RefundPayment

metadata = MetaData()

accounts = Table(
    "payment_accounts",
    metadata,
    Column("customer_id", String(100), primary_key=True),
    Column("balance_cents", Integer, nullable=False),
    #: Everything ever deposited: balance + charges - refunds must always equal it.
    Column("deposited_cents", Integer, nullable=False),
)

ledger = Table(
    "payment_ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_id", String(36), nullable=False, index=True),
    Column("customer_id", String(100), nullable=False),
    Column("kind", String(10), nullable=False),  # charge | refund
    Column("amount_cents", Integer, nullable=False),
)


class Charged(BaseModel):
    charge_id: int
    amount_cents: int


worker = Worker("payment")


@worker.command("charge_payment")
async def charge(cmd: ChargePayment, ctx: HandlerContext) -> Charged:
    row = (
        await ctx.session.execute(
            select(accounts.c.balance_cents).where(accounts.c.customer_id == cmd.customer_id)
        )
    ).first()
    if row is None:
        raise BusinessFailure(f"unknown customer {cmd.customer_id!r}")
    if row.balance_cents < cmd.amount_cents:
        raise BusinessFailure(
            f"insufficient funds: {cmd.customer_id} has {row.balance_cents} cents, "
            f"order costs {cmd.amount_cents}"
        )
    await ctx.session.execute(
        update(accounts)
        .where(accounts.c.customer_id == cmd.customer_id)
        .values(balance_cents=accounts.c.balance_cents - cmd.amount_cents)
    )
    # An INSERT's result is a CursorResult (SQLAlchemy 2.1 types execute() as Result).
    result = cast(
        CursorResult[Any],
        await ctx.session.execute(
            ledger.insert().values(
                order_id=cmd.order_id,
                customer_id=cmd.customer_id,
                kind="charge",
                amount_cents=cmd.amount_cents,
            )
        ),
    )
    (charge_id,) = result.inserted_primary_key or (0,)
    return Charged(charge_id=int(charge_id), amount_cents=cmd.amount_cents)


@worker.compensation("refund_payment")
async def refund(cmd: RefundPayment, ctx: HandlerContext) -> None:
    rows = (
        await ctx.session.execute(
            select(ledger.c.customer_id, ledger.c.kind, func.sum(ledger.c.amount_cents))
            .where(ledger.c.order_id == cmd.order_id)
            .group_by(ledger.c.customer_id, ledger.c.kind)
        )
    ).all()
    owed: dict[str, int] = {}
    for customer_id, kind, total in rows:
        owed[customer_id] = owed.get(customer_id, 0) + (total if kind == "charge" else -total)
    for customer_id, amount in owed.items():
        if amount <= 0:
            continue
        await ctx.session.execute(
            update(accounts)
            .where(accounts.c.customer_id == customer_id)
            .values(balance_cents=accounts.c.balance_cents + amount)
        )
        await ctx.session.execute(
            ledger.insert().values(
                order_id=cmd.order_id, customer_id=customer_id, kind="refund", amount_cents=amount
            )
        )
