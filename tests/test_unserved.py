"""A participant no worker serves shows in its step's error, on the real brokers.

* Its commands wait where nobody reads them (Kafka: no consumer group reads the
  topic; RabbitMQ: no consumer on the queue): the relay finds out a while after
  publishing, and the step's timeout error names the destination and participant.
* RabbitMQ, no queue is bound for them at all (a client with another prefix wrote
  them): past ``SAGA_RELAY_UNROUTABLE_TIMEOUT`` the rows are refused and the step
  fails at once, long before its timeout, naming the participant no worker serves.

The relay's own part, without a broker, is in ``tests/test_relay_unroutable.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from engine.client import SagaClient
from engine.definition import Saga, Step
from engine.orchestrator import EngineSettings
from engine.registry import SagaRegistry
from engine.settings import load_settings
from engine.states import SagaStatus
from engine.topology import Topology
from engine.wiring import Wiring
from tests.brokers import BrokerObjects, drop_after_test
from tests.e2e import service_url
from tests.services import BROKERS

pytestmark = pytest.mark.integration


class _Trip(BaseModel):
    who: str


#: Long enough for the relay's reader check (0.2s after the publish) to answer.
TIMEOUT = 3.0
lonely = Saga(
    name="lonely",
    version=1,
    input=_Trip,
    steps=[
        Step(
            name="book",
            participant="nobody",
            command=lambda ctx: {},
            timeout=timedelta(seconds=TIMEOUT),
        )
    ],
)


@asynccontextmanager
async def _engine(url: str, tmp_path: Path, **relay: str) -> AsyncIterator[Wiring]:
    """An engine serving ``lonely`` on broker ``url`` under a prefix of its own, with
    quick timers and reader checks; no worker at all."""
    topology = Topology(f"t{uuid.uuid4().hex[:10]}")
    registry = SagaRegistry([lonely])
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'unserved.db'}",
        broker_url=url,
        topic_prefix=topology.prefix,
        relay_reader_check_delay="0.2s",
        **relay,
    )
    tunables = EngineSettings(
        timer_interval=0.05, reply_settle=timedelta(seconds=0.1), watermark_interval=0.05
    )
    async with Wiring(settings, tunables=tunables, poll_interval=0.02) as wiring:
        drop_after_test(
            BrokerObjects(
                url,
                topology.prefix,
                tuple(wiring.engine_destinations(registry)),
                exchange=topology.prefix,
            )
        )
        await wiring.migrate()
        transport = wiring.transport(wiring.engine_destinations(registry))
        await transport.connect()
        engine = wiring.engine(registry, transport)
        running = asyncio.create_task(engine.run())
        try:
            yield wiring
        finally:
            engine.stop()
            await asyncio.wait_for(running, 30)
            await transport.close()


async def test_a_step_timing_out_at_a_participant_nobody_reads_says_so(
    broker_url: str, tmp_path: Path
) -> None:
    async with _engine(broker_url, tmp_path) as wiring:
        client = wiring.client(SagaRegistry([lonely]))
        saga_id = await client.start("lonely", {"who": "ann"})
        detail = await client.wait(saga_id, timeout=30)
    (step,) = detail.steps
    destination = wiring.topology.commands("nobody")
    assert step.error == (
        f"no reply within {TIMEOUT:g}s (attempt 1); no worker consumes "
        f"'{destination}' (participant 'nobody')"
    )
    # Its outcome is unknown and it has no compensation: an operator must look.
    assert detail.status is SagaStatus.PARKED


async def test_rabbitmq_rows_no_queue_receives_fail_their_step_past_the_bound(
    tmp_path: Path,
) -> None:
    url = service_url(BROKERS["rabbitmq"])
    async with _engine(url, tmp_path, relay_unroutable_timeout="0.5s") as wiring:
        # A client of another deployment (another prefix) wrote the command.
        other = Topology(f"{wiring.topology.prefix}x")
        client = SagaClient(wiring.store, SagaRegistry([lonely]), topology=other)
        saga_id = await client.start("lonely", {"who": "bob"})
        detail = await wiring.client(SagaRegistry([lonely])).wait(saga_id, timeout=TIMEOUT)
        letters = await client.dead_letters()
    reason = (
        f"no queue is bound for {other.commands('nobody')} after 0.5s: no worker serves "
        "participant 'nobody'"
    )
    (step,) = detail.steps
    assert step.error == f"command could not be delivered: {reason}"
    assert detail.status is SagaStatus.COMPENSATED
    events = [h.event for h in detail.history]
    assert "step_timed_out" not in events, events
    assert [(d.saga_id, d.reason) for d in letters] == [(saga_id, reason)]
