"""Property test: random outcomes, transient errors, duplicates, reordering and
engine restarts never break the saga invariants or the example ledgers.

Each example runs a fresh system (temp SQLite file, fresh MemoryBroker) in its own
event loop. Business failures are chosen per order (out of stock, insufficient funds,
undeliverable address); chaos comes from flaky handlers (raise after their writes),
a transport that duplicates, delays (so reorders) and refuses publishes, short step
timeouts, and engine stops or crashes mid-run with a new engine taking over.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine.states import SagaStatus, StepStatus
from tests.helpers import (
    DEFAULT_STOCK,
    EXAMPLE_WORKERS,
    ORDER_STEPS,
    PRICE,
    QUANTITY,
    EmbeddedSystem,
    assert_books_balance,
    assert_compensated_in_reverse,
    chaotic_transports,
    fast_order_saga,
    flaky_workers,
    may_have_run,
)


@dataclass(frozen=True)
class Scenario:
    plan: tuple[str | None, ...]  # per order: the step it fails at for a business reason
    error_rate: float  # handlers raise (after their writes) this often
    duplicate: float  # a published message goes out twice this often
    delay: float  # a published message is held back (and so reordered) this often
    refuse: float  # the broker refuses a publish this often
    timeout: float  # every step's timeout, seconds
    restarts: tuple[tuple[float, bool], ...]  # (seconds into the run, crash?) per restart
    restart_worker: str | None
    seed: int


scenarios = st.builds(
    Scenario,
    plan=st.lists(st.sampled_from([None, None, *ORDER_STEPS]), min_size=1, max_size=5).map(tuple),
    error_rate=st.sampled_from([0.0, 0.15, 0.3, 0.5]),
    duplicate=st.sampled_from([0.0, 0.2, 0.5]),
    delay=st.sampled_from([0.0, 0.2, 0.4]),
    refuse=st.sampled_from([0.0, 0.0, 0.1]),
    timeout=st.sampled_from([30.0, 30.0, 0.2]),
    restarts=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.3), st.booleans()), max_size=2
    ).map(tuple),
    restart_worker=st.sampled_from([None, None, *EXAMPLE_WORKERS]),
    seed=st.integers(min_value=0, max_value=2**16),
)


async def run(scenario: Scenario, db_path: Path) -> None:
    rng = random.Random(scenario.seed)

    chaotic = chaotic_transports(
        rng, duplicate=scenario.duplicate, delay=scenario.delay, refuse=scenario.refuse
    )
    workers = flaky_workers(EXAMPLE_WORKERS, rng, scenario.error_rate)
    async with EmbeddedSystem(
        db_path,
        sagas=[fast_order_saga(scenario.timeout)],
        workers=workers,
        transport_factory=chaotic,
        seed=scenario.seed,
    ) as system:
        ids = {}
        for fail_at in scenario.plan:
            ids[await system.start_order(fail_at)] = fail_at
        loop = asyncio.get_running_loop()
        began = loop.time()
        for at, crash in sorted(scenario.restarts):
            await asyncio.sleep(max(0.0, began + at - loop.time()))
            await system.restart_engine(crash=crash)
        if scenario.restart_worker is not None:
            await system.stop_worker(scenario.restart_worker)
            await system.start_worker(scenario.restart_worker)

        await system.wait_all_terminal(40, list(ids))
        # Late duplicates and held-back messages may still be on their way: let them
        # land before judging the books.
        await system.quiesce(20)
        sagas = await system.wait_all_terminal(5, list(ids))
        effect_of = await system.effects()
        totals = await system.totals()

    chaos_free = scenario.error_rate == 0 and scenario.timeout > 10
    statuses: Counter[SagaStatus] = Counter()
    for saga_id, fail_at in ids.items():
        detail = sagas[saga_id]
        statuses[detail.status] += 1
        if detail.status is SagaStatus.PARKED:
            # Parking is allowed, but only visibly: why, and at which step.
            assert detail.error
            assert any(s.error for s in detail.steps)
            continue
        assert detail.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
        if fail_at is not None:
            assert detail.status is SagaStatus.COMPENSATED
            failed = {s.name for s in detail.steps if s.status is StepStatus.FAILED}
            assert failed <= {fail_at}
        elif detail.status is SagaStatus.COMPENSATED:
            # A good order is only undone when chaos made a step's outcome unknown.
            assert not chaos_free
            assert may_have_run(detail) - {
                h.step for h in detail.history if h.event == "step_succeeded"
            }
        assert_compensated_in_reverse(detail)
        assert_books_balance(detail, effect_of)

    for status in statuses:
        event(f"saga {status}")
    history = [h for d in sagas.values() for h in d.history]
    for name in ("step_timed_out", "step_error", "reply_ignored", "compensation_error"):
        if any(h.event == name for h in history):
            event(name)
    if any((h.detail or "").startswith("gave up") for h in history):
        event("retries exhausted")
    if scenario.restarts:
        event("engine restarted")

    completed = statuses[SagaStatus.COMPLETED]
    if chaos_free:
        assert completed == scenario.plan.count(None)
    if statuses[SagaStatus.PARKED] == 0:
        assert totals.stock_reserved == QUANTITY * completed
        assert totals.charged_cents - totals.refunded_cents == PRICE * completed
        assert totals.shipments_created == completed
    assert totals.stock_conserved
    assert totals.money_conserved
    assert totals.stock_received == sum(DEFAULT_STOCK.values())


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
# Fixed corners the search might visit rarely: held-back messages past short step
# timeouts (null compensations, hanging actions); handlers failing often enough that
# retries run out; crashes and restarts on top of everything.
@example(
    Scenario(
        plan=(None, None, "create_shipment", None),
        error_rate=0.0,
        duplicate=0.5,
        delay=0.6,
        refuse=0.0,
        timeout=0.15,
        restarts=(),
        restart_worker=None,
        seed=11,
    )
)
@example(
    Scenario(
        plan=(None, None, None, "charge_payment"),
        error_rate=0.7,
        duplicate=0.3,
        delay=0.3,
        refuse=0.0,
        timeout=30.0,
        restarts=(),
        restart_worker=None,
        seed=12,
    )
)
@example(
    Scenario(
        plan=(None, "reserve_inventory", None, "create_shipment", None),
        error_rate=0.3,
        duplicate=0.3,
        delay=0.3,
        refuse=0.1,
        timeout=0.2,
        restarts=((0.02, True), (0.1, False), (0.2, True)),
        restart_worker="payment",
        seed=13,
    )
)
def test_sagas_settle_and_books_balance_under_chaos(scenario: Scenario) -> None:
    with tempfile.TemporaryDirectory(prefix="saga-prop-") as tmp:
        asyncio.run(run(scenario, Path(tmp) / "saga.db"))
