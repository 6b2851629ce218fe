"""The example order saga: reserve stock, charge the customer, ship.

On failure the completed steps are undone in reverse: the shipment is cancelled, the
charge refunded, the stock released.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field

from engine import Compensation, RetryPolicy, Saga, Step, StepContext


class OrderInput(BaseModel):
    customer_id: str = Field(min_length=1)
    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    amount_cents: int = Field(gt=0)
    address: str = Field(min_length=1)


# Commands: the contract between this saga and the participants (workers import them).


class ReserveInventory(BaseModel):
    order_id: str
    sku: str
    quantity: int


class ReleaseInventory(BaseModel):
    order_id: str


class ChargePayment(BaseModel):
    order_id: str
    customer_id: str
    amount_cents: int


class RefundPayment(BaseModel):
    order_id: str


class CreateShipment(BaseModel):
    order_id: str
    address: str
    sku: str
    quantity: int


class CancelShipment(BaseModel):
    order_id: str


def _order(ctx: StepContext) -> OrderInput:
    assert isinstance(ctx.input, OrderInput)
    return ctx.input


RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=2.0)
TIMEOUT = timedelta(seconds=30)

place_order = Saga(
    name="place_order",
    version=1,
    input=OrderInput,
    # The order's id is the saga's own id; the customer finds every order of theirs.
    keys=("customer_id",),
    steps=[
        Step(
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
        ),
        Step(
            name="charge_payment",
            participant="payment",
            command=lambda ctx: ChargePayment(
                order_id=ctx.saga_id,
                customer_id=_order(ctx).customer_id,
                amount_cents=_order(ctx).amount_cents,
            ),
            compensation=Compensation(
                "refund_payment", lambda ctx: RefundPayment(order_id=ctx.saga_id)
            ),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
        Step(
            name="create_shipment",
            participant="shipment",
            command=lambda ctx: CreateShipment(
                order_id=ctx.saga_id,
                address=_order(ctx).address,
                sku=_order(ctx).sku,
                quantity=_order(ctx).quantity,
            ),
            compensation=Compensation(
                "cancel_shipment", lambda ctx: CancelShipment(order_id=ctx.saga_id)
            ),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
    ],
)
