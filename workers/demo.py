"""The example's demo scenario, which ``sagactl demo`` loads by name
(``workers.demo:scenario``): its sagas, workers and migrations, the order mix it
places (large orders among them, approved or rejected by a signal), and how the
participants' books judge the run."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncEngine

from engine import SagaDetail, SagaStatus
from engine.cli.demo import Audit, Order
from workers import ledger

#: Shelf and account levels at the start of every demo run (topped up, never reset).
STOCK = {"widget": 1_000_000, "gadget": 3}
BALANCES = {"alice": 10**9, "bob": 10**9, "carol": 10**9, "mallory": 1_000}
UNDELIVERABLE = "PO Box 7, Nowhere"

#: The example's modules, as an application names its own in SAGA_SAGAS / SAGA_WORKERS.
SAGAS = ("sagas.order", "sagas.large_order")
WORKERS = ("workers.inventory:worker", "workers.payment:worker", "workers.shipment:worker")


def plan_large_orders(count: int, seed: int) -> list[Order]:
    """Large orders (the large_order saga) and the manager's decision on each: one
    in four rejected, the rest approved."""
    rng = random.Random(seed)
    orders = []
    for i in range(count):
        order = {
            "customer_id": rng.choice(["alice", "bob", "carol"]),
            "sku": "widget",
            "quantity": rng.randint(20, 50),
            "amount_cents": rng.randint(50_000, 200_000),
            "address": f"{rng.randint(1, 99)} Harbour Road, Springfield",
        }
        if i % 4 == 1:
            decision: dict[str, Any] = {"approved": False, "by": "dana", "reason": "over budget"}
        else:
            decision = {"approved": True, "by": "dana"}
        orders.append(Order("large_order", order, [("manager_approval", decision)]))
    return orders


def plan_orders(count: int, seed: int) -> list[dict[str, Any]]:
    """A fixed mix: most succeed, about one in ten fails at each step."""
    rng = random.Random(seed)
    orders = []
    for _ in range(count):
        order: dict[str, Any] = {
            "customer_id": rng.choice(["alice", "bob", "carol"]),
            "sku": "widget",
            "quantity": rng.randint(1, 3),
            "amount_cents": rng.randint(500, 5_000),
            "address": f"{rng.randint(1, 99)} Main Street, Springfield",
        }
        roll = rng.random()
        if roll < 0.1:
            order["sku"] = "gadget"  # only 3 on the shelf: the rest are out of stock
            order["quantity"] = 1
        elif roll < 0.2:
            order["customer_id"] = "mallory"  # 10 dollars to her name
            order["amount_cents"] = 2_500
        elif roll < 0.3:
            order["address"] = UNDELIVERABLE
        orders.append(order)
    return orders


class OrderScenario:
    """The order saga and the large order with the inventory, payment and shipment
    workers."""

    saga = "place_order"
    sagas = SAGAS
    workers = WORKERS
    migrations = ledger.MIGRATIONS
    ledger_labels: ClassVar[dict[str, str]] = {
        "stock_received": "stock received",
        "stock_available": "stock available",
        "stock_reserved": "stock reserved by orders",
        "deposited_cents": "money deposited (cents)",
        "balance_cents": "customer balances (cents)",
        "charged_cents": "charged (cents)",
        "refunded_cents": "refunded (cents)",
        "shipments_created": "shipments created",
        "shipments_cancelled": "shipments cancelled",
    }

    async def prepare(self, database: AsyncEngine) -> None:
        """Top the shelves and accounts up (earlier runs' history is kept)."""
        await ledger.restock(database, stock_by_sku=STOCK, balances=BALANCES)

    def orders(self, count: int, seed: int) -> list[Order]:
        """One in ten a large order (placed first, approved or rejected by signal),
        the rest the order saga's mix."""
        large = count // 10
        return plan_large_orders(large, seed) + [
            Order("place_order", o) for o in plan_orders(count - large, seed)
        ]

    async def audit(self, database: AsyncEngine, details: Sequence[SagaDetail]) -> Audit:
        """Stock and money conserved, and each order's books matching its saga's end."""
        totals = await ledger.totals(database)
        books = await ledger.effects(database)
        inconsistent = 0
        for d in details:
            effect = books.get(d.id, ledger.OrderEffect())
            if d.status is SagaStatus.COMPLETED:
                ok = effect.reserved > 0 and effect.net_charged_cents > 0 and effect.shipped
            else:
                ok = effect.reserved == 0 and effect.net_charged_cents == 0 and not effect.shipped
            inconsistent += not ok
        return Audit(
            ledger=totals.model_dump(),
            stock_conserved=totals.stock_conserved,
            money_conserved=totals.money_conserved,
            inconsistent_orders=inconsistent,
        )


scenario = OrderScenario()
