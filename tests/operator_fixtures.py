"""Test-only definitions and a participant for the operator end-to-end tests.

Loaded by the daemons of ``tests/test_e2e_operator.py`` by module path:

* ``brittle_order``: the order saga whose compensations get three quick attempts, so
  a failing compensation parks the saga within a second;
* ``legacy_order``: the order saga under another name, with long step timeouts; the
  first engine of a test does not load it (it holds the saga, keeping its replies),
  a second one does (the deployment that resumes it);
* ``inventory_brittle``: the example inventory participant whose
  ``release_inventory`` raises while the file ``release_fails`` exists in
  ``$SAGA_TEST_SWITCHES``.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

from engine import HandlerContext, RetryPolicy, Saga, Worker
from sagas import order
from workers import inventory

SWITCHES = "SAGA_TEST_SWITCHES"
RELEASE_FAILS = "release_fails"

BRITTLE_COMPENSATION = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.2)

brittle_order = Saga(
    name="brittle_order",
    version=1,
    input=order.OrderInput,
    steps=[
        dataclasses.replace(step, compensation_retry=BRITTLE_COMPENSATION)
        for step in order.place_order.steps
    ],
)

legacy_order = Saga(
    name="legacy_order",
    version=1,
    input=order.OrderInput,
    steps=[
        dataclasses.replace(step, timeout=timedelta(minutes=5)) for step in order.place_order.steps
    ],
)


def switched_on(name: str) -> bool:
    directory = os.environ.get(SWITCHES)
    return directory is not None and (Path(directory) / name).exists()


inventory_brittle = Worker("inventory")
inventory_brittle.command("reserve_inventory")(inventory.reserve)


@inventory_brittle.compensation("release_inventory")
async def brittle_release(cmd: order.ReleaseInventory, ctx: HandlerContext) -> None:
    if switched_on(RELEASE_FAILS):
        raise ConnectionError("inventory database unreachable (test switch release_fails)")
    await inventory.release(cmd, ctx)
