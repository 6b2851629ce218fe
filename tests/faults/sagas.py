"""Test-only saga definitions: the order saga with fault-friendly timings.

Loaded next to ``sagas.order`` (``SAGA_SAGAS=sagas.order,tests.faults.sagas``). The
steps and participants are the example order saga's, so the example workers serve
them; only the timeouts and retry policies differ, to make the unknown-outcome and
capped-compensation scenarios take seconds instead of minutes.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from engine import RetryPolicy, Saga
from sagas import order

#: The step timeout of ``quick_order``: a lost reply is noticed this fast.
QUICK_TIMEOUT = 4.0

#: The compensation policy of ``fragile_order``: five attempts, 0.2s doubling to 0.8s.
FRAGILE_COMPENSATION = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=0.8)


def _variant(name: str, **changes: object) -> Saga:
    steps = [dataclasses.replace(step, **changes) for step in order.place_order.steps]  # type: ignore[arg-type]
    return Saga(name=name, version=1, input=order.OrderInput, steps=steps)


#: The step timeout of ``patient_order``: longer than a broker restart takes here
#: (Kafka: ~17 s to lead its partitions again, then ~10 s for the consumer groups to
#: rejoin), so a restart under load must lose nothing and compensate nothing. A
#: shorter outage than the timeout is what that scenario is about; an outage longer
#: than it compensates, as the unknown-outcome scenarios show.
PATIENT_TIMEOUT = 120.0

#: The step timeout of ``steady_order``: longer than a broker outage of the outage
#: scenario (stopped ~10s, plus its restart), short enough that the deadlines of the
#: steps in flight fall due while the consumers are still coming back.
STEADY_TIMEOUT = 45.0

quick_order = _variant("quick_order", timeout=timedelta(seconds=QUICK_TIMEOUT))
fragile_order = _variant("fragile_order", compensation_retry=FRAGILE_COMPENSATION)
patient_order = _variant("patient_order", timeout=timedelta(seconds=PATIENT_TIMEOUT))
steady_order = _variant("steady_order", timeout=timedelta(seconds=STEADY_TIMEOUT))
