"""Bounded input, end to end: engine and workers as separate processes on PostgreSQL,
over Kafka and over RabbitMQ. A step whose command is over the limit (and over Kafka's
own) fails and compensates while the orders after it complete; a reply the database
could not store (an over-long message id, a NUL in its text) is dead-lettered with a
reason naming the field, and orders started afterwards keep completing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.client import SagaClient
from engine.database import create_engine
from engine.messages import Envelope, MessageKind, Outcome, encode
from engine.states import SagaStatus
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from tests.e2e import Cluster, fresh_database, service_url, wait_until
from tests.limit_sagas import BIG_CHARGE_PADDING
from workers import ledger
from workers.demo import BALANCES, STOCK

pytestmark = pytest.mark.integration

ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 1,
    "amount_cents": 700,
    "address": "1 Main Street",
}


def bad_reply(saga_id: str, **overrides: object) -> bytes:
    """A reply to ``saga_id``'s first step, with fields no envelope may have."""
    reply = Envelope(
        saga_id=saga_id,
        saga_name="place_order",
        saga_version=1,
        step="reserve_inventory",
        kind=MessageKind.REPLY,
        name="reserve_inventory",
        attempt=1,
        in_reply_to=MessageKind.COMMAND,
        outcome=Outcome.FAILURE,
        error="out of stock",
    )
    data = json.loads(encode(reply))
    data.update(overrides)
    return json.dumps(data).encode()


async def test_replies_the_database_cannot_store_are_dead_lettered(
    broker_url: str, tmp_path: Path
) -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = Cluster(db_url, broker_url, tmp_path)
        topology = Topology(cluster.prefix)
        transport = transport_from_url(broker_url, topology)
        await transport.connect()
        cluster.start_all()
        client = await SagaClient.connect(db_url, ["sagas.order"])
        client.topology = topology

        async def completed(ids: list[str]) -> bool:
            cluster.assert_running()
            statuses = await client.statuses(ids)
            return all(statuses.get(i) is SagaStatus.COMPLETED for i in ids)

        try:
            first = await client.start("place_order", ORDER)
            assert await wait_until(lambda: completed([first]), timeout=120), cluster.logs()

            # Both name a saga that exists: before the edge refused them, the first
            # failed the inbox insert (String(36)) and the second the saga's text
            # column, each redelivered without end.
            long_id = bad_reply(first, message_id="m" * 37)
            nul = bad_reply(first, error="out of stock\x00")
            assert b"\\u0000" in nul
            await transport.publish(
                [Message(topology.replies, first, long_id), Message(topology.replies, first, nul)]
            )
            later = [await client.start("place_order", ORDER) for _ in range(10)]

            async def archived() -> bool:
                cluster.assert_running()
                return len(await client.dead_letters()) >= 2

            assert await wait_until(archived, timeout=120), cluster.logs()
            assert await wait_until(lambda: completed(later), timeout=120), cluster.logs()

            letters = await client.dead_letters()
            reasons = {letter.body: letter.reason for letter in letters}
            assert len(letters) == 2, reasons
            assert reasons[long_id.decode()].startswith(
                "not a saga envelope: message_id: String should have at most 36 characters"
            )
            # A body with a NUL is stored as it came (binary in the archive's column).
            nul_letter = next(m for m in letters if m.body != long_id.decode())
            assert nul_letter.reason.startswith("not a saga envelope: error: holds a NUL")
            assert all(m.source == topology.replies for m in letters)
            # Neither touched the saga they named.
            detail = await client.get(first)
            assert detail.status is SagaStatus.COMPLETED
            assert not [h for h in detail.history if h.event == "reply_ignored"]
            assert set(cluster.stop_all().values()) == {0}
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await transport.close()
            await client.close()
            await database.dispose()


async def test_a_command_over_the_limit_fails_its_step_while_200_orders_complete(
    broker_url: str, tmp_path: Path
) -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        modules = ["sagas.order", "tests.limit_sagas"]
        cluster = Cluster(db_url, broker_url, tmp_path, extra_env={"SAGA_SAGAS": ",".join(modules)})
        cluster.start_all()
        client = await SagaClient.connect(db_url, modules)
        client.topology = Topology(cluster.prefix)
        try:
            big = await client.start("big_charge", ORDER)
            good = [await client.start("place_order", ORDER) for _ in range(200)]

            async def finished() -> bool:
                cluster.assert_running()
                statuses = await client.statuses([big, *good])
                return all(s.is_terminal for s in statuses.values())

            assert await wait_until(finished, timeout=240), cluster.logs()
            statuses = await client.statuses(good)
            assert all(statuses[i] is SagaStatus.COMPLETED for i in good)
            detail = await client.get(big)
            assert detail.status is SagaStatus.COMPENSATED
            charge = next(s for s in detail.steps if s.name == "charge_payment")
            assert charge.error is not None
            assert charge.error.startswith("command not sent: the message is 1,2")
            assert "SAGA_MAX_MESSAGE_BYTES" in charge.error
            assert BIG_CHARGE_PADDING > 1024 * 1024  # over Kafka's own limit too
            stats = await client.stats()
            assert stats.outbox.unsent == 0
            effects = await ledger.effects(database)
            undone = effects.get(big, ledger.OrderEffect())
            assert undone.reserved == 0 and undone.charges == 0
            totals = await ledger.totals(database)
            assert totals.stock_conserved and totals.money_conserved
            assert set(cluster.stop_all().values()) == {0}
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await client.close()
            await database.dispose()
