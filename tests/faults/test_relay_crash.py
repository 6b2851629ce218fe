"""The engine killed at the outbox boundaries (SIGKILL at a crash point).

* before publishing: a transition committed, its commands are only in the outbox;
  after a restart each is published once, and each step's command is handled once;
* after publishing, before marking the rows sent: the restarted relay publishes them
  again; the participants absorb the duplicates (one charge per order).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import Broker, scenario

pytestmark = pytest.mark.faults

ORDERS = 8


@pytest.mark.parametrize("point", ["relay.before_publish", "relay.after_publish"])
async def test_engine_killed_between_commit_publish_and_mark_sent(
    broker: Broker, tmp_path: Path, point: str
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        # The orders are committed before the engine starts, so its first publish is
        # every reserve command and its second one is charge commands, which the
        # engine's own reply transitions committed.
        # patient_order: the step timeouts run from these starts, before any engine
        # runs; two engine starts on a busy machine must not eat them (a reply waiting
        # in the broker would then lose to its timer: not what this scenario is about).
        ids = await run.start_many(ORDERS, saga="patient_order")
        engine = cluster.start_engine(crash=f"{point}:2")
        await cluster.crashed(engine, point)
        pending = await run.rows(
            "SELECT body FROM saga_outbox WHERE sent_at IS NULL AND destination = :d",
            d=run.topology.commands("payment"),
        )
        assert pending, "the crashed batch must still be in the outbox"
        crashed_batch = {saga_id for saga_id in ids if any(saga_id in r.body for r in pending)}

        cluster.start_engine()
        details = await run.settle(timeout=90)
        await run.audit(details)
        assert await run.unsent() == 0

        ignored = {
            saga_id: [(h.step, h.detail) for h in d.history if h.event == "reply_ignored"]
            for saga_id, d in details.items()
        }
        for saga_id, detail in details.items():
            for step in detail.steps:
                assert step.attempts <= 1, (saga_id, step)
                assert step.compensation_attempts <= 1, (saga_id, step)
        if point == "relay.before_publish":
            # Nothing was published twice: no command was handled twice, so no second
            # reply ever reached the engine.
            assert not any(ignored.values()), ignored
        else:
            # The crashed batch went out twice: the second charge command of each of
            # those orders was answered from the payment barrier, without a charge, and
            # that repeated reply was ignored by the saga.
            duplicated = {saga_id for saga_id, entries in ignored.items() if entries}
            assert duplicated and duplicated <= crashed_batch, (ignored, crashed_batch)
            for saga_id in duplicated:
                assert [step for step, _ in ignored[saga_id]] == ["charge_payment"], ignored
