"""A compensation that keeps failing: retried with capped exponential backoff, never
in a hot loop; after the cap the saga parks where an operator sees it; the
operator's ``sagactl retry`` completes it once the cause is fixed.

``fragile_order`` (tests/faults/sagas.py) gives compensations 5 attempts, 0.2s
doubling up to 0.8s; ``tests.faults.workers:payment_flaky`` fails every refund while
the switch file ``refund_fails`` exists.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from engine.states import SagaStatus
from tests.e2e import sagactl
from tests.faults.harness import Broker, scenario
from tests.faults.sagas import FRAGILE_COMPENSATION
from tests.faults.workers import REFUND_FAILS

pytestmark = pytest.mark.faults

#: How a compensation_error entry names the delay before the next attempt.
RETRY_IN = re.compile(r"retry in ([0-9.]+)s")


async def test_a_failing_compensation_backs_off_parks_and_an_operator_retry_finishes_it(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        (cluster.switches / REFUND_FAILS).touch()
        cluster.start_engine()
        cluster.start_worker("inventory")
        cluster.start_worker("shipment")
        cluster.start_worker("payment", spec="tests.faults.workers:payment_flaky")
        await run.warm_up()
        # The shipment refuses these orders; undoing their charge keeps failing.
        stuck = [await run.start("fragile_order", fail=True) for _ in range(2)]
        parked = await run.settle(stuck, timeout=60, accept=[SagaStatus.PARKED])
        await run.audit(parked, parked=stuck)

        policy = FRAGILE_COMPENSATION
        for detail in parked.values():
            assert "compensation of step 'charge_payment' failed 5 times" in (detail.error or "")
            errors = [h for h in detail.history if h.event == "compensation_error"]
            assert len(errors) == policy.max_attempts - 1, detail.history
            # The engine chose each delay by the policy, doubling up to the cap and no
            # further; and it really waited that long before the next attempt (the
            # history's timestamps): the attempt rate stays bounded.
            delays = [float(RETRY_IN.search(h.detail or "").group(1)) for h in errors]
            rounding = 0.0005  # the history prints each delay to the millisecond
            for attempt, delay in enumerate(delays, start=1):
                base = min(policy.max_backoff, policy.initial_backoff * 2 ** (attempt - 1))
                low, high = base * (1 - policy.jitter) - rounding, base + rounding
                assert low <= delay <= high, (attempt, delays)
            parked_at = next(h.at for h in detail.history if h.event == "parked")
            times = [h.at for h in errors] + [parked_at]
            gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
            assert all(gap >= delay for gap, delay in zip(gaps, delays, strict=True)), gaps
            span = (parked_at - errors[0].at).total_seconds()
            assert span >= sum(delays)
            assert len(errors) / span <= 1 / (policy.initial_backoff * (1 - policy.jitter))
            charge = next(s for s in detail.steps if s.name == "charge_payment")
            assert charge.compensation_attempts == policy.max_attempts
        # The charges are not refunded yet, and nothing moves by itself.
        books = await run.rows(
            "SELECT order_id, kind FROM payment_ledger WHERE order_id IN (:a, :b)",
            a=stuck[0],
            b=stuck[1],
        )
        assert sorted(kind for _, kind in books) == ["charge", "charge"]

        # The parked saga names the cause; a routine failure is no dead letter (checked
        # at the end, once the archive had all this time to receive one).
        cause = "ConnectionError: payment provider unreachable (test switch refund_fails)"
        assert all(cause in (d.error or "") for d in parked.values()), parked

        # Visible to an operator...
        listed = sagactl(cluster.env, "list", "--status", "parked", "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(row["id"] for row in json.loads(listed.stdout)) == sorted(stuck)
        # ...who fixes the payment provider and retries.
        (cluster.switches / REFUND_FAILS).unlink()
        for saga_id in stuck:
            done = sagactl(
                cluster.env, "retry", saga_id, "--actor", "ops", "--reason", "provider is back"
            )
            assert done.returncode == 0, done.stderr

        details = await run.settle(timeout=60)
        await run.audit(details)
        for saga_id in stuck:
            history = details[saga_id].history
            retried = [h for h in history if h.event == "retried"]
            assert len(retried) == 1 and retried[0].actor == "ops", history
            assert history[-1].event == "compensated", history
        assert await run.scalar("SELECT count(*) FROM saga_dead_letters") == 0
