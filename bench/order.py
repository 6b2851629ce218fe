"""The benchmark's order saga: the example's three steps and compensations, with a
flag that makes the last step fail so the run exercises compensation.

The example saga (``sagas/order.py``) is left alone: its participants do real
bookkeeping, while the benchmark wants trivial business work so that it measures
the orchestration, not the ledgers. Load with ``--sagas bench.order``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from engine import Compensation, RetryPolicy, Saga, Step, StepContext

SAGA_NAME = "bench_order"


class BenchOrder(BaseModel):
    customer_id: str = Field(min_length=1)
    sku: str = Field(min_length=1)
    quantity: int = Field(gt=0)
    amount_cents: int = Field(gt=0)
    address: str = Field(min_length=1)
    #: The shipment step answers with a business failure: steps 2 and 1 compensate.
    fail_last: bool = False


class Reserve(BaseModel):
    order_id: str
    sku: str
    quantity: int


class Charge(BaseModel):
    order_id: str
    customer_id: str
    amount_cents: int


class Ship(BaseModel):
    order_id: str
    address: str
    fail: bool = False


class Undo(BaseModel):
    order_id: str


def _order(ctx: StepContext) -> BenchOrder:
    assert isinstance(ctx.input, BenchOrder)
    return ctx.input


def _undo(ctx: StepContext) -> Undo:
    return Undo(order_id=ctx.saga_id)


# The example's policies, so both systems retry and time out alike.
RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=2.0)
TIMEOUT = timedelta(seconds=30)

bench_order = Saga(
    name=SAGA_NAME,
    version=1,
    input=BenchOrder,
    steps=[
        Step(
            name="reserve_inventory",
            participant="inventory",
            command=lambda ctx: Reserve(
                order_id=ctx.saga_id, sku=_order(ctx).sku, quantity=_order(ctx).quantity
            ),
            compensation=Compensation("release_inventory", _undo),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
        Step(
            name="charge_payment",
            participant="payment",
            command=lambda ctx: Charge(
                order_id=ctx.saga_id,
                customer_id=_order(ctx).customer_id,
                amount_cents=_order(ctx).amount_cents,
            ),
            compensation=Compensation("refund_payment", _undo),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
        Step(
            name="create_shipment",
            participant="shipment",
            command=lambda ctx: Ship(
                order_id=ctx.saga_id, address=_order(ctx).address, fail=_order(ctx).fail_last
            ),
            compensation=Compensation("cancel_shipment", _undo),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
    ],
)


def order_input(index: int, *, fail_last: bool) -> dict[str, Any]:
    """The same order shape the Temporal workflow gets (see ``bench.temporal_app``)."""
    return {
        "customer_id": f"c{index % 100}",
        "sku": f"sku-{index % 10}",
        "quantity": 1 + index % 3,
        "amount_cents": 1000 + index % 500,
        "address": "1 Main St",
        "fail_last": fail_last,
    }
