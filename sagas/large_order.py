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
    Compensation,
    Delay,
    Local,
    Parallel,
    Saga,
    Step,
    StepContext,
    WaitFor,
)
from sagas.order import (
    RETRY,
    TIMEOUT,
    CancelShipment,
    ChargePayment,
    CreateShipment,
    OrderInput,
    RefundPayment,
    ReleaseInventory,
    ReserveInventory,
)


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


def _order(ctx: StepContext) -> OrderInput:
    assert isinstance(ctx.input, OrderInput)
    return ctx.input


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


reserve_inventory = Step(
    name="reserve_inventory",
    participant="inventory",
    command=lambda ctx: ReserveInventory(
        order_id=ctx.saga_id, sku=_order(ctx).sku, quantity=_order(ctx).quantity
    ),
    compensation=Compensation(
        "release_inventory", lambda ctx: ReleaseInventory(order_id=ctx.saga_id)
    ),
    retry=RETRY,
    timeout=TIMEOUT,
)

charge_payment = Step(
    name="charge_payment",
    participant="payment",
    command=lambda ctx: ChargePayment(
        order_id=ctx.saga_id,
        customer_id=_order(ctx).customer_id,
        amount_cents=_order(ctx).amount_cents,
    ),
    compensation=Compensation("refund_payment", lambda ctx: RefundPayment(order_id=ctx.saga_id)),
    retry=RETRY,
    timeout=TIMEOUT,
)

create_shipment = Step(
    name="create_shipment",
    participant="shipment",
    command=lambda ctx: CreateShipment(
        order_id=ctx.saga_id,
        address=_order(ctx).address,
        sku=_order(ctx).sku,
        quantity=_order(ctx).quantity,
    ),
    compensation=Compensation("cancel_shipment", lambda ctx: CancelShipment(order_id=ctx.saga_id)),
    retry=RETRY,
    timeout=TIMEOUT,
)

large_order = Saga(
    name="large_order",
    version=1,
    input=OrderInput,
    steps=[
        Parallel("prepare", [[reserve_inventory], [charge_payment]]),
        WaitFor("manager_approval", timeout=APPROVAL_TIMEOUT),
        Local("check_approval", check_approval),
        Delay("cooling_off", COOLING_OFF),
        create_shipment,
    ],
)
