"""``sagactl demo``: the example order saga end to end on SQLite and the in-process broker.

The example is no part of the library (a wheel does not install it): the demo names its
scenario by module path and imports it at run time, and its sagas and workers through
the same loaders as an application's, so it runs from a checkout of the repository.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.embedded import EmbeddedSystem
from engine.errors import ConfigError, OperationRefused
from engine.loader import import_object
from engine.settings import Settings
from engine.states import SagaStatus
from engine.views import SagaDetail

#: The example's scenario (workers/demo.py in a checkout), imported by name.
EXAMPLE = "workers.demo:scenario"


class Audit(BaseModel):
    """What a scenario's books say after a run."""

    #: Totals by key (labelled by the scenario's ``ledger_labels``), for all runs so far.
    ledger: dict[str, int]
    stock_conserved: bool
    money_conserved: bool
    #: Orders whose business effect does not match how their saga ended.
    inconsistent_orders: int


@dataclass(frozen=True)
class Order:
    """One saga the demo starts: which saga, its input, and the events it then sends
    it with :meth:`~engine.client.SagaClient.signal` (a manager's decision), in order."""

    saga: str
    input: Mapping[str, Any]
    signals: Sequence[tuple[str, Mapping[str, Any]]] = ()


class Scenario(Protocol):
    """What the demo runs: sagas, workers and migrations by name, an order mix, an audit.

    ``saga`` is its main saga: the outcomes of the others are labelled with their name."""

    saga: str
    sagas: Sequence[str]
    workers: Sequence[str]
    migrations: str
    ledger_labels: Mapping[str, str]

    async def prepare(self, database: AsyncEngine) -> None: ...

    def orders(self, count: int, seed: int) -> list[Order]: ...

    async def audit(self, database: AsyncEngine, details: Sequence[SagaDetail]) -> Audit: ...


def load_scenario(path: str = EXAMPLE) -> Scenario:
    """The scenario at ``path``; a clear error where the example is not at hand."""
    try:
        return cast(Scenario, import_object(path, "demo scenario"))
    except ConfigError as exc:
        raise ConfigError(
            f"sagactl demo runs the example order saga of a checkout of the saga-engine "
            f"repository (sagas/, workers/; a wheel does not install them): {exc}"
        ) from None


class DemoResult(BaseModel):
    orders: int
    seconds: float
    sagas_per_second: float
    outcomes: dict[str, int]
    unfinished: int
    #: Events sent to sagas (:meth:`~engine.client.SagaClient.signal`) and refused ones
    #: (the saga had ended before, say compensated when its stock ran out).
    signals: int = 0
    signals_refused: int = 0
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


def example_system(settings: Settings, scenario: Scenario) -> EmbeddedSystem:
    """The example's sagas and workers on the embedded runner, on ``settings``'
    database, its participants' tables migrated with the engine's: what the demo runs."""
    return EmbeddedSystem(
        sagas=scenario.sagas,
        workers=scenario.workers,
        settings=settings,
        migrations=[scenario.migrations],
        poll_interval=0.01,
    )


async def run_demo(
    settings: Settings,
    *,
    orders: int,
    seed: int,
    timeout: float,
    console: Console,
    quiet: bool = False,
    scenario: Scenario | None = None,
) -> DemoResult:
    """Migrate, prepare, place ``orders`` and wait for them; judge the run by the books.

    On the embedded runner, with ``settings``' database, limits and signing, traced as
    the daemons are (service ``saga-demo``)."""
    scenario = scenario or load_scenario()
    system = example_system(settings, scenario)
    # Traced as the daemons are: every saga records its trace id (for `sagactl show`
    # and the console's trace link), exported only where OTEL_* says.
    with system.wiring.traced("saga-demo"):
        async with system:
            await scenario.prepare(system.database)
            placed = await _place_and_wait(
                system, scenario.orders(orders, seed), timeout, console, quiet
            )
            details = [await system.client.get(i) for i in placed.ids]
            audit = await scenario.audit(system.database, details)

    outcomes: Counter[str] = Counter()
    for d in details:
        failed = next(
            (h.step for h in d.history if h.event in ("step_failed", "step_timed_out")), None
        )
        label = "" if d.name == scenario.saga else f"{d.name}: "
        outcomes[f"{label}{d.status.value}" + (f" (failed at {failed})" if failed else "")] += 1
    unfinished = sum(1 for d in details if not d.status.is_terminal)
    ids, seconds = placed.ids, placed.seconds
    result = DemoResult(
        orders=len(ids),
        seconds=round(seconds, 3),
        sagas_per_second=round(len(ids) / seconds, 1) if seconds else 0.0,
        outcomes=dict(sorted(outcomes.items())),
        unfinished=unfinished,
        signals=placed.signals,
        signals_refused=placed.refused,
        ledger=audit.ledger,
        stock_conserved=audit.stock_conserved,
        money_conserved=audit.money_conserved,
        inconsistent_orders=audit.inconsistent_orders,
    )
    if not quiet:
        _report(console, result, scenario.ledger_labels)
    return result


class _Placed(BaseModel):
    """What placing the orders did: the sagas started, the time until they settled,
    the signals sent and how many of those were refused."""

    ids: list[str]
    seconds: float
    signals: int
    refused: int


async def _place_and_wait(
    system: EmbeddedSystem,
    orders: list[Order],
    timeout: float,
    console: Console,
    quiet: bool,
) -> _Placed:
    """Start every order, then send each its signals (as a manager going through the
    approvals once the orders are in: a saga not at its wait yet keeps the event for
    it), then wait for every saga to settle."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    began = time.perf_counter()
    ids: list[str] = []
    sent = refused = 0
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        placing = progress.add_task("placing orders", total=len(orders), detail="")
        for order in orders:
            ids.append(await system.client.start(order.saga, dict(order.input)))
            progress.advance(placing)
        to_signal = [(i, s) for i, o in zip(ids, orders, strict=True) for s in o.signals]
        if to_signal:
            signalling = progress.add_task("signals sent", total=len(to_signal), detail="")
            for saga_id, (event, payload) in to_signal:
                try:
                    await system.client.signal(saga_id, event, payload, actor="demo")
                except OperationRefused:  # the saga ended before (failed at a step)
                    refused += 1
                sent += 1
                progress.update(
                    signalling, advance=1, detail=f"refused {refused}" if refused else ""
                )
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
    return _Placed(ids=ids, seconds=time.perf_counter() - began, signals=sent, refused=refused)


def _report(console: Console, result: DemoResult, labels: Mapping[str, str]) -> None:
    table = Table(title="outcomes", title_justify="left")
    table.add_column("saga outcome")
    table.add_column("orders", justify="right")
    for outcome, count in result.outcomes.items():
        table.add_row(outcome, str(count))
    console.print(table)

    books = Table(title="ledger totals (all runs on this database)", title_justify="left")
    books.add_column("account")
    books.add_column("amount", justify="right")
    for key, label in labels.items():
        books.add_row(label, f"{result.ledger[key]:,}")
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
    if result.signals:
        console.print(
            f"{result.signals} signal(s) sent to sagas waiting for them"
            + (f", {result.signals_refused} refused" if result.signals_refused else "")
        )
    console.print(
        f"{result.orders} sagas in {result.seconds:.2f}s: "
        f"[bold]{result.sagas_per_second} sagas/s[/]"
        + (f"   [bold red]{result.unfinished} unfinished[/]" if result.unfinished else "")
    )
