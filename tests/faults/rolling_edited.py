"""``rolling_order`` v1 edited without a version bump: the reservation and the charge
made parallel. An engine loading it must hold the v1 sagas in flight, not run them
with steps they never had."""

from __future__ import annotations

from engine import Parallel, Saga
from sagas import order
from tests.faults.rolling_v1 import STEPS

rolling_order_edited = Saga(
    name="rolling_order",
    version=1,
    input=order.OrderInput,
    steps=[
        Parallel("prepare", [[STEPS["reserve_inventory"]], [STEPS["charge_payment"]]]),
        STEPS["create_shipment"],
    ],
)
