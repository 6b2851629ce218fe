"""The same order saga on Temporal: three activities and, when one fails for a
business reason, the compensations of the completed ones in reverse order.

Retry policy and timeouts mirror ``bench.order``. The module is imported inside the
workflow sandbox, so it imports nothing but the standard library and temporalio.
Run a worker with ``python -m bench.temporal_worker ADDRESS TASK_QUEUE``.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

WORKFLOW_NAME = "OrderSaga"


@dataclass
class Order:
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int
    address: str
    fail_last: bool = False


@activity.defn
async def reserve_inventory(order: Order) -> str:
    return order.order_id


@activity.defn
async def release_inventory(order: Order) -> None:
    return None


@activity.defn
async def charge_payment(order: Order) -> str:
    return order.order_id


@activity.defn
async def refund_payment(order: Order) -> None:
    return None


@activity.defn
async def create_shipment(order: Order) -> str:
    if order.fail_last:
        raise ApplicationError("undeliverable address (benchmark failure)", non_retryable=True)
    return order.order_id


@activity.defn
async def cancel_shipment(order: Order) -> None:
    return None


ACTIVITIES = [
    reserve_inventory,
    release_inventory,
    charge_payment,
    refund_payment,
    create_shipment,
    cancel_shipment,
]

#: bench.order.RETRY: 4 attempts, 50 ms doubling to at most 2 s.
STEP_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50),
    maximum_interval=timedelta(seconds=2),
    maximum_attempts=4,
)
#: Compensations must eventually succeed: retried without a cap on attempts.
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=50), maximum_interval=timedelta(seconds=2)
)
TIMEOUT = timedelta(seconds=30)


@workflow.defn(name=WORKFLOW_NAME)
class OrderSaga:
    @workflow.run
    async def run(self, order: Order) -> str:
        steps = [
            (reserve_inventory, release_inventory),
            (charge_payment, refund_payment),
            (create_shipment, cancel_shipment),
        ]
        done = []
        try:
            for action, compensation in steps:
                await workflow.execute_activity(
                    action, order, start_to_close_timeout=TIMEOUT, retry_policy=STEP_RETRY
                )
                done.append(compensation)
        except ActivityError:
            for compensation in reversed(done):
                await workflow.execute_activity(
                    compensation,
                    order,
                    start_to_close_timeout=TIMEOUT,
                    retry_policy=COMPENSATION_RETRY,
                )
            return "compensated"
        return "completed"


async def serve(address: str, task_queue: str) -> None:
    """Poll until SIGTERM/SIGINT; prints ``ready`` once polling has begun."""
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Worker(client, task_queue=task_queue, workflows=[OrderSaga], activities=ACTIVITIES):
        print("ready", flush=True)
        await stop.wait()
