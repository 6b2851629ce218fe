"""``rolling_order`` v1 for the rolling-upgrade scenario (test_rolling_upgrade.py):
the example order saga, patient (crashes and hand-overs, not timeouts, are the point)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from engine import Saga
from sagas import order
from tests.faults.sagas import PATIENT_TIMEOUT

STEPS = {
    step.name: dataclasses.replace(step, timeout=timedelta(seconds=PATIENT_TIMEOUT))
    for step in order.place_order.steps
}

rolling_order_v1 = Saga(
    name="rolling_order", version=1, input=order.OrderInput, steps=list(STEPS.values())
)
