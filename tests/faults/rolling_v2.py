"""The deployment after ``rolling_v1``: ``rolling_order`` v1 still loaded, for the
sagas in flight, and v2, which confirms the order in the engine after shipping."""

from __future__ import annotations

from engine import Local, Saga
from sagas import order
from tests.faults.rolling_v1 import STEPS, rolling_order_v1

rolling_order_v2 = Saga(
    name="rolling_order",
    version=2,
    input=order.OrderInput,
    steps=[*STEPS.values(), Local("confirm", lambda ctx: {"confirmed": True})],
)

__all__ = ["rolling_order_v1", "rolling_order_v2"]
