"""Test-only participants: the example workers with failure switches.

Run as ``sagactl worker tests.faults.workers:payment_flaky``. The business logic is
the example workers' own handlers; only the failures are added here:

* ``payment_flaky``: ``refund_payment`` raises a transient error while the switch
  file ``refund_fails`` exists in ``$SAGA_FAULTS_DIR`` (the test removes it to heal).
* ``shipment_poison``: ``create_shipment`` raises (a handler bug, every attempt) for
  an address containing ``poison``.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine import HandlerContext, Worker
from sagas.order import CreateShipment, RefundPayment
from workers import payment, shipment
from workers.shipment import ShipmentCreated

SWITCHES = "SAGA_FAULTS_DIR"
REFUND_FAILS = "refund_fails"
POISON = "poison"


def switched_on(name: str) -> bool:
    directory = os.environ.get(SWITCHES)
    return directory is not None and (Path(directory) / name).exists()


payment_flaky = Worker("payment")
payment_flaky.command("charge_payment")(payment.charge)


@payment_flaky.compensation("refund_payment")
async def flaky_refund(cmd: RefundPayment, ctx: HandlerContext) -> None:
    if switched_on(REFUND_FAILS):
        raise ConnectionError("payment provider unreachable (test switch refund_fails)")
    await payment.refund(cmd, ctx)


shipment_poison = Worker("shipment")
shipment_poison.compensation("cancel_shipment")(shipment.cancel)


@shipment_poison.command("create_shipment")
async def poisoned_create(cmd: CreateShipment, ctx: HandlerContext) -> ShipmentCreated:
    if POISON in cmd.address:
        raise TypeError(f"handler bug: cannot ship to {cmd.address!r}")
    return await shipment.create(cmd, ctx)
