"""Signed messages on the real brokers: engine and workers as separate processes on
PostgreSQL, over Kafka and over RabbitMQ, with SAGA_SIGNING_KEYS set (so: require).

A forged ``charge_payment`` published straight to the payment participant's commands
moves no money and lands in the dead letters with its reason; a key rotation done the
documented way (add, switch, drop; each a rolling restart) while sagas run loses none.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.client import SagaClient
from engine.database import create_engine
from engine.messages import Envelope, encode
from engine.signing import Signing, SigningMode
from engine.store.schema import barrier
from engine.topology import Topology
from engine.transport.base import Message
from engine.transport.factory import transport_from_url
from tests.e2e import Cluster, fresh_database, wait_until
from tests.helpers import charge_command
from workers import ledger, payment
from workers.demo import BALANCES, STOCK

pytestmark = pytest.mark.integration

K1 = "k1:" + "a1" * 20
K2 = "k2:" + "b2" * 20

ORDER = {
    "customer_id": "bob",
    "sku": "widget",
    "quantity": 1,
    "amount_cents": 700,
    "address": "1 Main Street, Springfield",
}


def forged_charge(saga_id: str) -> Envelope:
    """A charge for a saga that does not exist, as anyone on the broker could send."""
    return charge_command(saga_id, amount=123_456)


async def balance(database: AsyncEngine, customer: str) -> int:
    async with database.connect() as conn:
        query = select(payment.accounts.c.balance_cents).where(
            payment.accounts.c.customer_id == customer
        )
        return int((await conn.execute(query)).scalar_one())


async def test_forged_charges_are_refused_and_a_key_rotation_loses_nothing(
    broker_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """One cluster per broker (CI time), with signing keys set (so: require).

    A charge published straight to the payment commands, unsigned or signed with a
    guessed secret, is dead-lettered with its reason and never handled. Then, while
    sagas keep starting, the rotation as documented: k2 was added as a verifying key
    (step 1: it changes nothing on the wire, so the cluster starts there; every pair
    of neighbouring steps is checked in tests/test_signing.py), k2 becomes the signing
    key, k1 is dropped, each step a rolling restart of every process. k1 goes only
    once every saga begun before the switch finished, so nothing signed with it is
    left in flight. Every saga completes; nothing else is dead-lettered.
    """
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        keys = {"SAGA_SIGNING_KEYS": f"{K1},{K2}"}  # step 1 done: k1 signs, both verify
        cluster = Cluster(db_url, broker_url, tmp_path, extra_env=keys)
        topology = Topology(cluster.prefix)
        attacker = transport_from_url(broker_url, topology)
        await attacker.connect()
        cluster.start_all()
        client = await SagaClient.connect(db_url, ["sagas.order"], topology=topology)
        ids: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                ids.append(await client.start("place_order", ORDER))  # the engine signs
                await asyncio.sleep(0.2)

        async def up() -> bool:
            cluster.assert_running()
            return all(cluster.ready(d) for d in cluster.daemons)

        async def roll(keys: str) -> None:
            """One process after another, each up before the next goes: old and new
            key sets meet on the wire, as in a real rolling deploy."""
            cluster.extra_env["SAGA_SIGNING_KEYS"] = keys
            for daemon in list(cluster.daemons):
                cluster.restart(daemon)
                assert await wait_until(up, timeout=60), cluster.logs()

        async def finished(saga_ids: list[str]) -> bool:
            cluster.assert_running()
            statuses = await client.statuses(saga_ids)
            return all(s.is_terminal for s in statuses.values())

        feeder: asyncio.Task[None] | None = None
        try:
            commands = topology.commands("payment")
            unsigned = Message(commands, "forged-1", encode(forged_charge("forged-1")))
            guessed = Signing(SigningMode.REQUIRE, {"k1": b"g" * 32})  # our id, not our key
            wrong = guessed.sign(Message(commands, "forged-2", encode(forged_charge("forged-2"))))
            await attacker.publish([unsigned, wrong])
            assert await wait_until(up, timeout=60), cluster.logs()
            feeder = asyncio.create_task(load())

            await roll(f"{K2},{K1}")  # 2: every process signs with k2
            begun = list(ids)
            assert await wait_until(lambda: finished(begun), timeout=120), cluster.logs()
            await roll(K2)  # 3: nothing signed with k1 can come any more
            stop.set()
            await feeder
            assert await wait_until(lambda: finished(ids), timeout=120), cluster.logs()
            assert set(cluster.stop_all().values()) == {0}

            reasons = {d.key: (d.source, d.reason) for d in await client.dead_letters()}
            assert reasons == {
                "forged-1": (commands, "unsigned command (signing is required)"),
                "forged-2": (commands, "bad signature on command (key k1)"),
            }
            assert await balance(database, "alice") == BALANCES["alice"]
            async with database.connect() as conn:  # the handler never ran for them
                ran = await conn.scalar(
                    select(func.count())
                    .select_from(barrier)
                    .where(barrier.c.saga_id.in_(["forged-1", "forged-2"]))
                )
            assert ran == 0
            statuses = Counter(s.value for s in (await client.statuses(ids)).values())
            assert statuses == {"completed": len(ids)}, statuses
            assert await balance(database, "bob") == BALANCES["bob"] - 700 * len(ids)
            totals = await ledger.totals(database)
            assert totals.stock_conserved and totals.money_conserved, totals
            books = await ledger.effects(database)
            assert all(books[i].charges == 1 for i in ids)
            logged = "\n".join(d.log_path.read_text() for d in cluster.daemons)
            assert "signing with key k2, verifying with k2\n" in logged
        finally:
            stop.set()
            if feeder is not None:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            for d in itertools.chain(cluster.daemons, cluster.retired):
                if d.process.poll() is None:
                    d.process.kill()
            await attacker.close()
            await client.close()
            await database.dispose()
