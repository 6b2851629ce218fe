"""The order saga end to end: engine and three workers as separate processes on
PostgreSQL, over Kafka and over RabbitMQ.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.client import SagaClient
from engine.database import create_engine
from engine.messages import Envelope, MessageKind, Outcome
from engine.states import SagaStatus
from engine.topology import Topology
from engine.transport.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.transport.factory import transport_from_url
from tests.e2e import (
    Cluster,
    fresh_database,
    kafka_sasl_ssl,
    sagactl,
    service_url,
    wait_until,
)
from tests.services import BROKERS
from tests.tls import Secured
from workers import ledger
from workers.demo import BALANCES, STOCK, UNDELIVERABLE, plan_orders

pytestmark = pytest.mark.integration

ORDERS = 200


def expected_outcomes(orders: list[dict[str, object]]) -> Counter[str]:
    gadgets = sum(1 for o in orders if o["sku"] == "gadget")
    failing = sum(
        1 for o in orders if o["customer_id"] == "mallory" or o["address"] == UNDELIVERABLE
    )
    completed = len(orders) - failing - gadgets + min(gadgets, STOCK["gadget"])
    return Counter({"completed": completed, "compensated": len(orders) - completed})


#: The order run goes over each plain broker, and over Kafka secured as a managed
#: cluster is: SASL_SSL with a SCRAM login and a verified certificate.
ORDER_RUNS = [*sorted(BROKERS), "kafka-sasl-ssl"]


@pytest.fixture(params=ORDER_RUNS)
def order_broker(request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """The broker URL, and the settings the processes need to reach it."""
    if request.param == "kafka-sasl-ssl":
        return kafka_sasl_ssl("SCRAM-SHA-512")
    return service_url(BROKERS[request.param]), {}


async def test_order_saga_end_to_end(
    order_broker: tuple[str, dict[str, str]],
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker_url, broker_settings = order_broker
    await order_run(broker_url, broker_settings, postgres_url, tmp_path, capsys)


async def test_order_saga_end_to_end_over_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same run over AMQPS, its broker verified against the test CA, on PostgreSQL
    with sslmode=verify-full."""
    secured = Secured.from_env()
    await order_run(secured.amqps(), {}, secured.postgres("verify-full"), tmp_path, capsys)


async def order_run(
    broker_url: str,
    broker_settings: dict[str, str],
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The order saga end to end: ORDERS sagas through every participant, the outcomes
    as planned, stock and money conserved, each charge at most once."""
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = Cluster(db_url, broker_url, tmp_path, extra_env=broker_settings)
        cluster.start_all()
        client = await SagaClient.connect(db_url, ["sagas.order"])
        client.topology = Topology(cluster.prefix)
        try:
            orders = plan_orders(ORDERS, seed=11)
            began = time.perf_counter()
            ids = [await client.start("place_order", o) for o in orders]

            async def all_finished() -> bool:
                cluster.assert_running()
                statuses = await client.statuses(ids)
                return all(s.is_terminal for s in statuses.values())

            finished = await wait_until(all_finished, timeout=240)
            elapsed = time.perf_counter() - began
            assert finished, f"sagas did not finish:\n{cluster.logs()}"
            with capsys.disabled():
                print(
                    f"\n[e2e {broker_url.split(':')[0]}{' secured' if broker_settings else ''}] "
                    f"{ORDERS} sagas in {elapsed:.2f}s: "
                    f"{ORDERS / elapsed:.1f} sagas/s"
                )
            exits = cluster.stop_all()
            assert set(exits.values()) == {0}, f"daemons did not stop cleanly: {exits}"

            listed = sagactl(cluster.env, "list", "--json", "--limit", "1000")
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)
            assert len(rows) == ORDERS
            assert Counter(r["status"] for r in rows) == expected_outcomes(orders)

            totals = await ledger.totals(database)
            assert totals.stock_conserved, totals
            assert totals.money_conserved, totals
            books = await ledger.effects(database)
            status = {r["id"]: r["status"] for r in rows}
            for saga_id, order in zip(ids, orders, strict=True):
                effect = books.get(saga_id, ledger.OrderEffect())
                assert effect.charges <= 1, (saga_id, effect)
                assert effect.refunds <= effect.charges, (saga_id, effect)
                if status[saga_id] == SagaStatus.COMPLETED:
                    assert effect.reserved == order["quantity"]
                    assert effect.net_charged_cents == order["amount_cents"]
                    assert effect.shipped
                else:
                    assert effect.reserved == 0, (saga_id, effect)
                    assert effect.net_charged_cents == 0, (saga_id, effect)
                    assert not effect.shipped
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await client.close()
            await database.dispose()


async def test_malformed_command_is_dead_lettered_and_worker_keeps_going(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> None:
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = Cluster(db_url, broker_url, tmp_path)
        topology = Topology(cluster.prefix)
        transport = transport_from_url(broker_url, topology)
        await transport.connect()
        cluster.start_all()
        client = await SagaClient.connect(db_url, ["sagas.order"])
        client.topology = topology
        try:
            destination = topology.commands("inventory")
            await transport.publish([Message(destination, "poison", b"{not an envelope")])
            wrong_kind = Envelope(
                saga_id="s",
                saga_name="place_order",
                saga_version=1,
                step="reserve_inventory",
                kind=MessageKind.REPLY,
                name="x",
                attempt=1,
                in_reply_to=MessageKind.COMMAND,
                outcome=Outcome.SUCCESS,
            )
            await transport.publish(
                [Message(destination, "poison", wrong_kind.model_dump_json().encode())]
            )

            # The engine consumes the dead letters into its archive (sagactl dlq).
            async def archived() -> bool:
                cluster.assert_running()
                return len(await client.dead_letters()) == 2

            assert await wait_until(archived, timeout=60), cluster.logs()
            letters = sorted(await client.dead_letters(), key=lambda d: d.id)
            assert sorted(m.body for m in letters) == sorted(
                ["{not an envelope", wrong_kind.model_dump_json()]
            )
            reasons = {m.body: m.reason for m in letters}
            for m in letters:
                assert m.source == destination
                assert m.headers[DEAD_LETTER_SOURCE] == destination
                assert m.headers[DEAD_LETTER_REASON] == m.reason
            assert "not a saga envelope" in reasons["{not an envelope"]
            assert "takes commands, not replies" in reasons[wrong_kind.model_dump_json()]

            order = plan_orders(1, seed=1)[0] | {
                "sku": "widget",
                "customer_id": "alice",
                "address": "1 Main Street",
            }
            saga_id = await client.start("place_order", order)

            async def done() -> bool:
                cluster.assert_running()
                return (await client.statuses([saga_id]))[saga_id] is SagaStatus.COMPLETED

            assert await wait_until(done, timeout=90), cluster.logs()
            assert set(cluster.stop_all().values()) == {0}
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await transport.close()
            await client.close()
            await database.dispose()


async def test_two_engines_share_database_and_broker(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """Two engine processes over one database and broker: no saga advanced twice."""
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = Cluster(db_url, broker_url, tmp_path)
        cluster.start_all()
        cluster.start_engine()
        client = await SagaClient.connect(db_url, ["sagas.order"])
        client.topology = Topology(cluster.prefix)
        try:
            orders = plan_orders(100, seed=5)
            ids = [await client.start("place_order", o) for o in orders]

            async def all_finished() -> bool:
                cluster.assert_running()
                statuses = await client.statuses(ids)
                return all(s.is_terminal for s in statuses.values())

            assert await wait_until(all_finished, timeout=240), cluster.logs()
            assert set(cluster.stop_all().values()) == {0}
            statuses = Counter(s.value for s in (await client.statuses(ids)).values())
            assert statuses == expected_outcomes(orders)
            for saga_id in ids:
                detail = await client.get(saga_id)
                advanced = Counter(
                    (h.event, h.step)
                    for h in detail.history
                    if h.event in ("step_succeeded", "step_failed", "step_compensated")
                )
                assert max(advanced.values()) == 1, (saga_id, advanced)
            totals = await ledger.totals(database)
            assert totals.stock_conserved and totals.money_conserved, totals
            books = await ledger.effects(database)
            assert all(e.charges <= 1 for e in books.values())
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await client.close()
            await database.dispose()
