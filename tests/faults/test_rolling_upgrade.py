"""A rolling upgrade (issue 12) on real brokers, engines as separate processes.

1. Engines move from v1 to v2 with v1 sagas in flight: an engine loading v1 and v2
   starts beside the v1 engine, which then leaves. The client starts what the live
   engines serve: v1 before, v2 after. The v1 sagas finish under the new engine.
2. A definition edited without a version bump (``rolling_edited``: v1's reservation
   and charge made parallel) is deployed with v1 sagas in flight: its engine holds
   them, with the reason, and runs none of their steps; an engine with the original
   v1 comes back and they resume and finish by themselves.

The ledgers balance in the end, every saga as expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.client import SagaClient
from engine.states import SagaStatus
from engine.topology import Topology
from tests.e2e import Daemon
from tests.faults.harness import Broker, Run, scenario

pytestmark = pytest.mark.faults

V1 = "tests.faults.rolling_v1"
V2 = "tests.faults.rolling_v2"
EDITED = "tests.faults.rolling_edited"


def engine(run: Run, modules: str) -> Daemon:
    return run.cluster.spawn("engine", "--sagas", modules, "engine", "--grace", "20")


async def served(run: Run, versions: set[int]) -> None:
    async def registered() -> bool:
        rows = await run.rows(
            "SELECT DISTINCT version FROM saga_served_definitions WHERE name = 'rolling_order'"
        )
        return {r.version for r in rows} == versions

    await run.wait_for(f"the live engines to serve v{sorted(versions)}", registered, 60)


async def start(
    run: Run, client: SagaClient, count: int, *, version: int, pick: bool = False
) -> list[str]:
    """``count`` orders, every other one refused by the shipment; each must have
    started as ``version`` (the client's choice, or with ``pick``, asked for)."""
    ids = []
    for i in range(count):
        fail = i % 2 == 1
        order = run.order(fail=fail)
        saga_id = await client.start("rolling_order", order, version=version if pick else None)
        run.orders[saga_id] = order
        run.expected[saga_id] = SagaStatus.COMPENSATED if fail else SagaStatus.COMPLETED
        assert (await client.get(saga_id)).version == version
        ids.append(saga_id)
    return ids


async def held(run: Run, ids: Sequence[str]) -> None:
    async def all_held() -> bool:
        rows = await run.rows("SELECT id, held FROM saga_instances WHERE held IS NOT NULL")
        return {r.id for r in rows} >= set(ids)

    await run.wait_for("the in-flight v1 sagas to be held", all_held, 60)


async def test_a_rolling_upgrade_and_an_edit_without_a_bump_strand_no_saga(
    broker: Broker, tmp_path: Path
) -> None:
    async with scenario(broker, tmp_path) as run:
        cluster = run.cluster
        prefix = Topology(cluster.prefix)
        client = await SagaClient.connect(cluster.database_url, [V2], topology=prefix)
        try:
            first = engine(run, V1)
            cluster.start_worker("inventory")
            cluster.start_worker("shipment")
            payment = cluster.start_worker("payment")
            await served(run, {1})
            cluster.stop(payment)  # the v1 sagas wait at the charge through the move
            old = await start(run, client, 4, version=1)

            # 1. v1 -> v2: the new engine serves both, then the old one leaves.
            second = engine(run, V2)
            await served(run, {1, 2})
            cluster.stop(first)
            await served(run, {1, 2})
            new = await start(run, client, 4, version=2)
            payment = cluster.start_worker("payment")
            await run.settle(timeout=120)

            # 2. v1 edited without a bump takes over with v1 sagas in flight.
            cluster.stop(payment)
            stranded = await start(run, client, 2, version=1, pick=True)
            edited = engine(run, EDITED)
            await served(run, {1, 2})  # both engines live for a moment
            cluster.stop(second)
            await served(run, {1})
            payment = cluster.start_worker("payment")
            await held(run, stranded)
            for saga_id in stranded:
                detail = await client.get(saga_id)
                assert detail.status is SagaStatus.RUNNING, detail
                assert "fingerprint" in (detail.held or ""), detail.held
            engine(run, V2)  # the original v1 is back: they resume by themselves
            cluster.stop(edited)
            details = await run.settle(timeout=120)
            await run.audit(details)
            assert {details[i].version for i in old + stranded} == {1}
            assert {details[i].version for i in new} == {2}
            for saga_id in stranded:
                events = [h.event for h in details[saga_id].history]
                # Nothing happened to it while held: the edited engine ran none of it.
                held_at, resumed_at = events.index("held"), events.index("resumed")
                assert events[held_at + 1 : resumed_at] == [], events
        finally:
            await client.close()
