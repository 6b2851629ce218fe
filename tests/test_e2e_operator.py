"""Operator repair end to end: engine and workers as separate processes on PostgreSQL,
over Kafka and over RabbitMQ, repaired with ``sagactl`` run as a subprocess.

* A compensation that keeps failing parks its saga; once the participant works again,
  ``sagactl retry`` completes the compensation and the books balance.
* A reply for a saga definition the engine does not load is kept and its saga held,
  visibly (``sagactl show``, ``list --held``, ``stats``; ``sagactl check`` says so
  before a deployment); the deployment that loads the definition resumes it by itself.
  An undecodable command is archived with its reason, shown by ``sagactl dlq list
  --json``, and ``sagactl dlq replay`` republishes it once.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.advance import Advancer
from engine.client import SagaClient
from engine.database import create_engine
from engine.registry import SagaRegistry
from engine.states import SagaStatus
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from tests.e2e import Cluster, fresh_database, sagactl, wait_until
from tests.operator_fixtures import RELEASE_FAILS, SWITCHES, brittle_order, legacy_order
from workers import ledger
from workers.demo import BALANCES, STOCK

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 2,
    "amount_cents": 700,
    "address": "1 Main Street",
}


@dataclass
class OperatorCluster(Cluster):
    """A cluster whose daemons load ``sagas`` and see the test's switch directory."""

    sagas: str = "sagas.order,tests.operator_fixtures"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["SAGA_SAGAS"] = self.sagas
        env[SWITCHES] = str(self.log_dir / "switches")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        return env

    def switch(self, name: str, on: bool) -> None:
        path = self.log_dir / "switches" / name
        path.parent.mkdir(exist_ok=True)
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sagactl(self.env, *args)

    def ctl_json(self, *args: str) -> Any:
        done = self.ctl("--json", *args)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", done.stderr
        return json.loads(done.stdout)

    def kill_all(self) -> None:
        for d in self.daemons:
            if d.process.poll() is None:
                d.process.kill()


async def test_retry_completes_a_saga_parked_by_a_failing_compensation(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> None:
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = OperatorCluster(db_url, broker_url, tmp_path)
        cluster.switch(RELEASE_FAILS, True)
        cluster.start_worker("tests.operator_fixtures:inventory_brittle")
        cluster.start_worker("payment")
        cluster.start_worker("shipment")
        cluster.start_engine()
        client = await SagaClient.connect(db_url)
        client.registry = SagaRegistry([brittle_order])
        client.topology = Topology(cluster.prefix)
        try:
            # mallory (1000 cents) cannot pay: the reservation must be released, which fails.
            order = {**ORDER, "customer_id": "mallory", "amount_cents": 5_000}
            saga_id = await client.start("brittle_order", order)

            async def status_is(wanted: SagaStatus) -> bool:
                cluster.assert_running()
                return (await client.statuses([saga_id]))[saga_id] is wanted

            assert await wait_until(lambda: status_is(SagaStatus.PARKED), timeout=90), (
                cluster.logs()
            )
            parked = cluster.ctl_json("show", saga_id)
            assert "compensation of step 'reserve_inventory' failed 3 times" in parked["error"]
            effect = (await ledger.effects(database))[saga_id]
            assert effect.reserved == ORDER["quantity"]  # still held: not undone yet

            refused = cluster.ctl("cancel", saga_id)
            assert refused.returncode == 1
            assert refused.stderr.startswith("sagactl: error: ")
            assert "is parked" in refused.stderr and "Traceback" not in refused.stderr

            cluster.switch(RELEASE_FAILS, False)  # the participant is repaired
            result = cluster.ctl_json(
                "retry", saga_id, "--reason", "inventory db restored", "--actor", "ops"
            )
            assert (result["previous_status"], result["status"]) == ("parked", "compensating")
            assert [(d["name"], d["attempt"]) for d in result["dispatched"]] == [
                ("release_inventory", 4)
            ]
            assert await wait_until(lambda: status_is(SagaStatus.COMPENSATED), timeout=60), (
                cluster.logs()
            )
            final = cluster.ctl_json("show", saga_id)
            (retried,) = [h for h in final["history"] if h["event"] == "retried"]
            assert retried["actor"] == "ops"
            assert retried["detail"].startswith("reason: inventory db restored; ")
            again = cluster.ctl("retry", saga_id)
            assert again.returncode == 1 and "is compensated" in again.stderr

            assert set(cluster.stop_all().values()) == {0}
            effect = (await ledger.effects(database)).get(saga_id, ledger.OrderEffect())
            assert (effect.reserved, effect.net_charged_cents, effect.charges) == (0, 0, 0)
            totals = await ledger.totals(database)
            assert totals.stock_conserved and totals.money_conserved, totals
        finally:
            cluster.kill_all()
            await client.close()
            await database.dispose()


async def test_a_held_saga_resumes_on_deployment_and_poison_is_archived_and_replayed(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> None:
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = OperatorCluster(db_url, broker_url, tmp_path, sagas="sagas.order")
        topology = Topology(cluster.prefix)
        cluster.start_all()
        client = await SagaClient.connect(db_url)
        transport = transport_from_url(broker_url, topology)
        await transport.connect()
        try:
            # A saga of a definition this engine does not load, started by the older
            # deployment's client (today's refuses a version no engine serves).
            saga_id = "legacy-order-1"
            starter = Advancer(SagaRegistry([legacy_order]), topology=topology)
            data = legacy_order.parse_input(ORDER).model_dump(mode="json")
            await starter.start(client.store, legacy_order, saga_id, data)
            commands = topology.commands("payment")
            await transport.publish([Message(commands, "junk", b"{not an envelope")])

            async def settled() -> bool:
                cluster.assert_running()
                held = (await client.get(saga_id)).held is not None
                return held and len(await client.dead_letters()) >= 1

            assert await wait_until(settled, timeout=60), cluster.logs()
            # Its reply is kept and the saga held, visibly; only the junk is a dead letter.
            why = "no running engine loads legacy_order v1 (this one loads no version of it)"
            shown = cluster.ctl_json("show", saga_id)
            assert (shown["status"], shown["held"]) == ("running", why)
            assert [h["event"] for h in shown["history"]] == ["started", "held"]
            assert [s["id"] for s in cluster.ctl_json("list", "--held")] == [saga_id]
            stats = cluster.ctl_json("stats")
            assert stats["held"] == [
                {"name": "legacy_order", "version": 1, "count": 1, "reason": why}
            ]
            assert stats["dead_letters"] == {"not_replayed": 1, "total": 1}
            (junk,) = cluster.ctl_json("dlq", "list")
            assert (junk["source"], junk["saga_id"]) == (commands, None)
            assert junk["reason"].startswith("not a saga envelope")
            # Before deploying: this set of definitions would keep it held, that one not.
            check = cluster.ctl("--json", "check", "sagas.order")
            assert check.returncode == 1, check.stderr
            (legacy,) = [
                d for d in json.loads(check.stdout)["definitions"] if d["name"] == "legacy_order"
            ]
            assert (legacy["problem"], legacy["saga_ids"]) == ("version missing", [saga_id])
            assert (
                cluster.ctl_json("check", "sagas.order,tests.operator_fixtures")["would_hold"] == 0
            )

            # The deployment that loads legacy_order replaces the engine: the saga
            # resumes by itself, its kept reply first.
            engine = cluster.daemons[-1]
            assert cluster.stop(engine) == 0
            cluster.daemons.remove(engine)
            cluster.sagas = "sagas.order,tests.operator_fixtures"
            cluster.start_engine()

            async def completed() -> bool:
                cluster.assert_running()
                return (await client.statuses([saga_id]))[saga_id] is SagaStatus.COMPLETED

            assert await wait_until(completed, timeout=90), cluster.logs()
            events = [h["event"] for h in cluster.ctl_json("show", saga_id)["history"]]
            assert events[:4] == ["started", "held", "resumed", "step_succeeded"], events
            assert events[-1] == "completed"

            # The undecodable command goes round once more: the worker dead-letters it
            # again, and the archive keeps the second time as a letter of its own.
            cluster.ctl_json("dlq", "replay", str(junk["id"]))

            async def archived(count: int) -> bool:
                cluster.assert_running()
                return len(await client.dead_letters()) >= count

            assert await wait_until(lambda: archived(2), timeout=60), cluster.logs()
            newest = cluster.ctl_json("dlq", "list", "--pending")
            assert [(d["source"], d["body"]) for d in newest] == [(commands, "{not an envelope")]
            twice = cluster.ctl("dlq", "replay", str(junk["id"]))
            assert twice.returncode == 1
            assert f"dead letter {junk['id']} was already replayed" in twice.stderr

            assert set(cluster.stop_all().values()) == {0}
            effect = (await ledger.effects(database))[saga_id]
            assert (effect.reserved, effect.net_charged_cents, effect.charges) == (
                ORDER["quantity"],
                ORDER["amount_cents"],
                1,
            )
            assert effect.shipped
            totals = await ledger.totals(database)
            assert totals.stock_conserved and totals.money_conserved, totals
        finally:
            cluster.kill_all()
            await transport.close()
            await client.close()
            await database.dispose()
