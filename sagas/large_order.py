"""The example's large order: stock and payment at once, then a manager's approval.

An order too large to ship unchecked reserves the stock and charges the customer in
parallel, then waits for the manager's decision (``SagaClient.signal(id,
"manager_approval", {"approved": true})``, ``sagactl signal ID manager_approval
--payload '{"approved": false, "reason": "..."}'``). A rejection, or no decision within
a day, compensates both branches in reverse order of completion. An approved order
waits a short cooling-off period (a durable timer) in which ``sagactl cancel`` still
undoes it, then ships.

It sends the same commands as the order saga (sagas/order.py), to the same workers.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ValidationError

from engine import (
    BusinessFailure,
    Delay,
    Local,
    Parallel,
    Saga,
    StepContext,
    WaitFor,
)
from sagas.order import OrderInput, place_order


class Approval(BaseModel):
    """The manager's decision: the payload of the ``manager_approval`` signal."""

    approved: bool
    by: str = "the manager"
    reason: str | None = None


class Approved(BaseModel):
    """The reply of ``check_approval``, visible to later steps."""

    approved_by: str


#: How long the saga waits for the manager before giving the order up.
APPROVAL_TIMEOUT = timedelta(days=1)
#: Seconds here, so the demo stays quick; hours in a real shop.
COOLING_OFF = timedelta(seconds=1)


def check_approval(ctx: StepContext) -> Approved:
    """Run by the engine in the transaction that advances the saga: a rejection (or a
    payload that is no decision) is a business failure, so the saga compensates."""
    try:
        decision = Approval.model_validate(ctx.replies["manager_approval"])
    except ValidationError as exc:
        raise BusinessFailure(f"the approval is not a decision: {exc.errors()[0]['msg']}") from None
    if not decision.approved:
        raise BusinessFailure(
            f"rejected by {decision.by}" + (f": {decision.reason}" if decision.reason else "")
        )
    return Approved(approved_by=decision.by)


#: The order saga's own steps: the same commands to the same workers.
reserve_inventory, charge_payment, create_shipment = place_order.steps

large_order = Saga(
    name="large_order",
    version=1,
    input=OrderInput,
    keys=place_order.keys,
    steps=[
        Parallel("prepare", [[reserve_inventory], [charge_payment]]),
        WaitFor("manager_approval", timeout=APPROVAL_TIMEOUT),
        Local("check_approval", check_approval),
        Delay("cooling_off", COOLING_OFF),
        create_shipment,
    ],
)
