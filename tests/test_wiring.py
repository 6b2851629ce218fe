"""The composition root and the public embedded runner, used as a user would.

``Wiring`` builds every part from the same ``SAGA_*`` settings as ``sagactl``: the
prefix, limits, signing and tunables reach the engine, the worker runtime and the
client it builds. ``EmbeddedSystem`` runs one's sagas (by module name) and workers (by
``module:attr``) with a participant's Alembic history, on SQLite and the in-process
broker; ``SagaClient.wait`` gives up with an error naming the saga.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from engine import EmbeddedSystem, SagaClient, SagaStatus, Wiring
from engine.signing import SigningMode
from engine.store.schema import outbox
from tests.helpers import DEFAULT_BALANCES, DEFAULT_STOCK, order_input
from workers import ledger

SECRET = "k1:" + "s" * 40


@pytest.fixture
def saga_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A deployment configured as the daemons are: by the environment alone."""
    url = f"sqlite:///{tmp_path / 'wired.db'}"
    for name, value in {
        "DATABASE_URL": url,
        "BROKER_URL": "memory://",
        "TOPIC_PREFIX": "acme",
        "SAGAS": "sagas.order",
        "WORKERS": "workers.inventory:worker,workers.payment:worker",
        "MAX_MESSAGE_BYTES": "65536",
        "SIGNING_KEYS": SECRET,
        "TIMEOUT_HOLD": "7s",
        "REPLY_SETTLE": "2s",
    }.items():
        monkeypatch.setenv(f"SAGA_{name}", value)
    return url


async def test_wiring_builds_every_part_from_the_saga_settings(saga_env: str) -> None:
    async with Wiring() as wiring:
        await wiring.migrate()
        registry = wiring.registry()
        assert [s.name for s in registry] == ["place_order"]
        destinations = wiring.engine_destinations(registry)
        assert destinations[:2] == ["acme.replies", "acme.dead-letters"]
        assert "acme.commands.payment" in destinations

        engine = wiring.engine(registry, wiring.transport(destinations))
        assert engine.topology.prefix == "acme"
        assert engine.limits.max_message_bytes == 65536
        assert engine.signing.mode is SigningMode.REQUIRE
        assert engine.relay.signing is engine.signing  # what it sends is signed
        assert engine.settings.timeout_hold == timedelta(seconds=7)
        assert engine.settings.reply_settle == timedelta(seconds=2)

        workers = wiring.workers()
        assert [w.name for w in workers] == ["inventory", "payment"]
        runner = wiring.worker_runner(workers[1], wiring.transport(), concurrency=3)
        assert runner.destination == "acme.commands.payment"
        assert runner.topology.replies == "acme.replies"
        assert runner.limits.max_message_bytes == 65536
        assert runner.signing.mode is SigningMode.REQUIRE
        assert runner.concurrency == 3

        client = wiring.client()
        assert client.limits.max_message_bytes == 65536
        saga_id = await client.start("place_order", order_input())

    # SagaClient.connect() reads the same settings: its first command goes where the
    # deployment's inventory worker listens.
    async with await SagaClient.connect() as connected:
        assert connected.topology.prefix == "acme"
        assert connected.limits.max_message_bytes == 65536
        second = await connected.start("place_order", order_input())
        async with connected.store.engine.connect() as conn:
            rows = (await conn.execute(select(outbox.c.key, outbox.c.destination))).all()
    assert sorted(rows) == sorted(
        [(saga_id, "acme.commands.inventory"), (second, "acme.commands.inventory")]
    )


async def test_embedded_system_runs_sagas_and_workers_named_as_a_user_names_them(
    tmp_path: Path,
) -> None:
    async with EmbeddedSystem(
        sagas=["sagas.order"],
        workers=[
            "workers.inventory:worker",
            "workers.payment:worker",
            "workers.shipment:worker",
        ],
        database_url=f"sqlite:///{tmp_path / 'dev.db'}",
        migrations=[ledger.MIGRATIONS],
    ) as system:
        # The participants' tables exist: their Alembic history ran with the engine's.
        await ledger.seed(system.database, stock_by_sku=DEFAULT_STOCK, balances=DEFAULT_BALANCES)
        done = await system.client.start("place_order", order_input())
        failed = await system.client.start("place_order", order_input("charge_payment"))
        assert (await system.client.wait(done, timeout=30)).status is SagaStatus.COMPLETED
        assert (await system.client.wait(failed, timeout=30)).status is SagaStatus.COMPENSATED
        effects = await ledger.effects(system.database)
        assert effects[done].shipped and effects[done].charges == 1
        undone = effects.get(failed, ledger.OrderEffect())
        assert undone.reserved == 0 and undone.net_charged_cents == 0


async def test_wait_gives_up_naming_the_saga_and_its_status(tmp_path: Path) -> None:
    # No worker serves the saga's first step: it stays running.
    async with EmbeddedSystem(
        sagas=["sagas.order"], workers=[], database_url=f"sqlite:///{tmp_path / 'idle.db'}"
    ) as system:
        saga_id = await system.client.start("place_order", order_input())
        with pytest.raises(TimeoutError) as caught:
            await system.client.wait(saga_id, timeout=0.2)
    assert str(caught.value) == f"saga {saga_id!r} is still running after 0.2s"
