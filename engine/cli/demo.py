"""``sagactl demo``: the order saga end to end on SQLite and the in-process broker."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.database import create_engine, upgrade
from engine.embedded import EmbeddedSystem
from engine.limits import DEFAULT_LIMITS, Limits
from engine.registry import SagaRegistry
from engine.states import SagaStatus

#: Shelf and account levels at the start of every demo run (topped up, never reset).
STOCK = {"widget": 1_000_000, "gadget": 3}
BALANCES = {"alice": 10**9, "bob": 10**9, "carol": 10**9, "mallory": 1_000}
UNDELIVERABLE = "PO Box 7, Nowhere"


class DemoResult(BaseModel):
    orders: int
    seconds: float
    sagas_per_second: float
    outcomes: dict[str, int]
    unfinished: int
    ledger: dict[str, Any]
    stock_conserved: bool
    money_conserved: bool
    inconsistent_orders: int

    @property
    def ok(self) -> bool:
        return (
            self.unfinished == 0
            and self.stock_conserved
            and self.money_conserved
            and self.inconsistent_orders == 0
        )


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


async def run_demo(
    database_url: str,
    *,
    orders: int,
    seed: int,
    timeout: float,
    console: Console,
    quiet: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> DemoResult:
    from sagas.order import place_order
    from workers import inventory, ledger, payment, shipment

    database = create_engine(database_url)
    try:
        await upgrade(database)
        await ledger.restock(database, stock_by_sku=STOCK, balances=BALANCES)
        registry = SagaRegistry([place_order])
        workers = [inventory.worker, payment.worker, shipment.worker]
        async with EmbeddedSystem(
            database, registry, workers, poll_interval=0.01, limits=limits
        ) as system:
            ids, seconds = await _place_and_wait(
                system, plan_orders(orders, seed), timeout, console, quiet
            )
            details = [await system.client.get(i) for i in ids]
        totals = await ledger.totals(database)
        books = await ledger.effects(database)
    finally:
        await database.dispose()

    outcomes: Counter[str] = Counter()
    inconsistent = 0
    for d in details:
        failed = next(
            (h.step for h in d.history if h.event in ("step_failed", "step_timed_out")), None
        )
        outcomes[f"{d.status.value}" + (f" (failed at {failed})" if failed else "")] += 1
        effect = books.get(d.id, ledger.OrderEffect())
        if d.status is SagaStatus.COMPLETED:
            ok = effect.reserved > 0 and effect.net_charged_cents > 0 and effect.shipped
        else:
            ok = effect.reserved == 0 and effect.net_charged_cents == 0 and not effect.shipped
        inconsistent += not ok
    unfinished = sum(1 for d in details if not d.status.is_terminal)
    result = DemoResult(
        orders=len(ids),
        seconds=round(seconds, 3),
        sagas_per_second=round(len(ids) / seconds, 1) if seconds else 0.0,
        outcomes=dict(sorted(outcomes.items())),
        unfinished=unfinished,
        ledger=totals.model_dump(),
        stock_conserved=totals.stock_conserved,
        money_conserved=totals.money_conserved,
        inconsistent_orders=inconsistent,
    )
    if not quiet:
        _report(console, result)
    return result


async def _place_and_wait(
    system: EmbeddedSystem,
    orders: list[dict[str, Any]],
    timeout: float,
    console: Console,
    quiet: bool,
) -> tuple[list[str], float]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    began = time.perf_counter()
    ids: list[str] = []
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        placing = progress.add_task("placing orders", total=len(orders), detail="")
        for order in orders:
            ids.append(await system.client.start("place_order", order))
            progress.advance(placing)
        finishing = progress.add_task("sagas finished", total=len(ids), detail="")
        deadline = began + timeout
        while True:
            counts = Counter((await system.client.statuses(ids)).values())
            done = counts[SagaStatus.COMPLETED] + counts[SagaStatus.COMPENSATED]
            progress.update(
                finishing,
                completed=done,
                detail=(
                    f"completed {counts[SagaStatus.COMPLETED]}  "
                    f"compensated {counts[SagaStatus.COMPENSATED]}  "
                    f"parked {counts[SagaStatus.PARKED]}"
                ),
            )
            if done + counts[SagaStatus.PARKED] >= len(ids) or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.05)
    return ids, time.perf_counter() - began


def _report(console: Console, result: DemoResult) -> None:
    table = Table(title="outcomes", title_justify="left")
    table.add_column("saga outcome")
    table.add_column("orders", justify="right")
    for outcome, count in result.outcomes.items():
        table.add_row(outcome, str(count))
    console.print(table)

    books = Table(title="ledger totals (all runs on this database)", title_justify="left")
    books.add_column("account")
    books.add_column("amount", justify="right")
    lg = result.ledger
    for label, key in (
        ("stock received", "stock_received"),
        ("stock available", "stock_available"),
        ("stock reserved by orders", "stock_reserved"),
        ("money deposited (cents)", "deposited_cents"),
        ("customer balances (cents)", "balance_cents"),
        ("charged (cents)", "charged_cents"),
        ("refunded (cents)", "refunded_cents"),
        ("shipments created", "shipments_created"),
        ("shipments cancelled", "shipments_cancelled"),
    ):
        books.add_row(label, f"{lg[key]:,}")
    console.print(books)

    def mark(ok: bool) -> str:
        return "[green]yes[/]" if ok else "[bold red]NO[/]"

    console.print(
        f"stock conserved: {mark(result.stock_conserved)}   "
        f"money conserved: {mark(result.money_conserved)}   "
        f"orders matching their saga: "
        f"{mark(result.inconsistent_orders == 0)} "
        f"({result.orders - result.inconsistent_orders}/{result.orders})"
    )
    console.print(
        f"{result.orders} sagas in {result.seconds:.2f}s: "
        f"[bold]{result.sagas_per_second} sagas/s[/]"
        + (f"   [bold red]{result.unfinished} unfinished[/]" if result.unfinished else "")
    )
