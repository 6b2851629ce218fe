"""Test-only saga definitions: the order saga with fault-friendly timings.

Loaded next to ``sagas.order`` (``SAGA_SAGAS=sagas.order,tests.faults.sagas``). The
steps and participants are the example order saga's, so the example workers serve
them; only the timeouts and retry policies differ, to make the unknown-outcome and
capped-compensation scenarios take seconds instead of minutes.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

from engine import RetryPolicy, Saga, StepContext
from engine.definition import Builder, Parallel, build_payload
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


#: The size of ``bulky_order``'s charge_payment command: over Kafka's default
#: ``message.max.bytes`` (1 MiB) and the 1 MiB RabbitMQ limit the scenario sets, far
#: under the message size limit it gives the engine, so that the broker refuses it.
BULK = 2_000_000


def _padded(builder: Builder, size: int) -> Builder:
    def build(ctx: StepContext) -> dict[str, Any]:
        return {**build_payload(builder, ctx), "padding": "x" * size}

    return build


def _charging_too_much(name: str, size: int) -> Saga:
    """The order saga whose charge_payment command the broker refuses: reserve_inventory
    succeeds, the charge is refused, the stock is released."""
    steps = [
        dataclasses.replace(step, command=_padded(step.command, size))
        if step.name == "charge_payment"
        else step
        for step in order.place_order.steps
    ]
    return Saga(name=name, version=1, input=order.OrderInput, steps=steps)


bulky_order = _charging_too_much("bulky_order", BULK)
#: The same for the in-process broker of the unit tests, given a smaller limit: under
#: the engine's own default limit (1 MB), which would refuse ``bulky_order`` first.
PLUMP = 200_000
plump_order = _charging_too_much("plump_order", PLUMP)


#: The order saga with a shipment command no shipment worker has a handler for (a
#: participant deployed without it): the worker answers with a failure naming the
#: cause, and the saga compensates at once instead of after the step's timeout.
UNHANDLED = "create_shipment_v2"
unhandled_order = Saga(
    name="unhandled_order",
    version=1,
    input=order.OrderInput,
    steps=[
        dataclasses.replace(step, command_name=UNHANDLED)
        if step.name == "create_shipment"
        else step
        for step in order.place_order.steps
    ],
)


def _parallel(name: str, timeout: float) -> Saga:
    """The order saga with its reservation and its charge as parallel branches, then
    the shipment (the pivot): a refused shipment compensates both branches."""
    steps = {
        step.name: dataclasses.replace(step, timeout=timedelta(seconds=timeout))
        for step in order.place_order.steps
    }
    group = Parallel("prepare", [[steps["reserve_inventory"]], [steps["charge_payment"]]])
    return Saga(
        name=name, version=1, input=order.OrderInput, steps=[group, steps["create_shipment"]]
    )


#: Patient like ``patient_order``: crashes and restarts, not timeouts, are the point.
parallel_order = _parallel("parallel_order", PATIENT_TIMEOUT)
