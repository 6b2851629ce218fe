"""Limits where input is born, on SQLite and PostgreSQL: ``start`` and ``sagactl
start`` refuse before storing anything; a built command over the limit fails its step
and compensates; a handler reply over it becomes a failure with its writes undone."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from engine.cli.app import cli
from engine.client import SagaClient
from engine.database import create_engine, upgrade
from engine.embedded import EmbeddedSystem
from engine.errors import LimitError
from engine.limits import MIN_MESSAGE_BYTES, Limits
from engine.messages import Envelope, MessageKind, Outcome
from engine.registry import SagaRegistry
from engine.states import SagaStatus, StepStatus
from engine.store.schema import barrier, outbox, sagas
from engine.store.sql import SqlSagaStore
from engine.worker.barrier import guarded
from engine.worker.worker import HandlerContext, Worker
from sagas.order import OrderInput, ReleaseInventory, ReserveInventory, place_order
from tests.e2e import fresh_database, sagactl, service_url, wait_until
from tests.limit_sagas import with_big_charge
from workers import inventory, ledger, payment, shipment

SMALL = Limits(max_message_bytes=MIN_MESSAGE_BYTES)
ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 2,
    "amount_cents": 500,
    "address": "1 Main Street",
}
STOCK = {"widget": 100}
BALANCES = {"alice": 100_000}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A migrated, seeded database: SQLite, then a fresh PostgreSQL one."""
    if request.param == "sqlite":
        db = create_engine(f"sqlite:///{tmp_path / 'limits.db'}")
        await upgrade(db, scripts=[ledger.MIGRATIONS])
        await ledger.seed(db, stock_by_sku=STOCK, balances=BALANCES)
        try:
            yield db
        finally:
            await db.dispose()
        return
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        db = create_engine(url)
        await ledger.seed(db, stock_by_sku=STOCK, balances=BALANCES)
        try:
            yield db
        finally:
            await db.dispose()


async def count(db: AsyncEngine, table: Any) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


# -- start -------------------------------------------------------------------------


async def test_start_refuses_before_storing_anything(database: AsyncEngine) -> None:
    client = SagaClient(SqlSagaStore(database), SagaRegistry([place_order]), limits=SMALL)
    huge = dict(ORDER, address="a" * MIN_MESSAGE_BYTES)
    refusals: list[tuple[dict[str, Any], str | None, str]] = [
        (ORDER, "x" * 37, "the saga id is 37 characters long, the limit is 36"),
        (ORDER, "", "the saga id must not be empty"),
        (ORDER, "a\x00b", "control character (U+0000 at position 1)"),
        (ORDER, "tab\there", "control character (U+0009"),
        (dict(ORDER, address="a\x00"), None, "input refused: address holds a NUL character"),
        (
            huge,
            None,
            f"input too large: it is {len(OrderInput(**huge).model_dump_json()):,} bytes as "
            f"JSON, the limit is {MIN_MESSAGE_BYTES:,} (SAGA_MAX_MESSAGE_BYTES)",
        ),
        (
            # The input fits, its first command (the sku, with the envelope) does not.
            dict(ORDER, sku="s" * (MIN_MESSAGE_BYTES - 200)),
            None,
            "input too large: the first command would be ",
        ),
    ]
    for data, saga_id, why in refusals:
        with pytest.raises(LimitError) as caught:
            await client.start("place_order", data, saga_id=saga_id)
        assert why in str(caught.value)
        assert "\x00" not in str(caught.value)
    assert f"bytes, the limit is {MIN_MESSAGE_BYTES:,} (SAGA_MAX_MESSAGE_BYTES)" in str(
        caught.value
    )
    assert await count(database, sagas) == 0
    assert await count(database, outbox) == 0
    # The longest id there may be is taken.
    assert await client.start("place_order", ORDER, saga_id="i" * 36) == "i" * 36
    assert await count(database, outbox) == 1


# -- a built command over the limit --------------------------------------------------


#: The order saga, except that its charge command comes out over the limit.
BIG_CHARGE = with_big_charge("big_charge", MIN_MESSAGE_BYTES)


async def test_a_command_over_the_limit_fails_its_step_and_compensates(
    database: AsyncEngine,
) -> None:
    workers = [inventory.worker, payment.worker, shipment.worker]
    registry = SagaRegistry([BIG_CHARGE, place_order])
    async with EmbeddedSystem(
        sagas=registry,
        workers=workers,
        database=database,
        migrate=False,
        poll_interval=0.01,
        limits=SMALL,
    ) as system:
        big = await system.client.start("big_charge", ORDER)
        good = await system.client.start("place_order", ORDER)

        async def finished() -> bool:
            statuses = await system.client.statuses([big, good])
            return all(s.is_terminal for s in statuses.values())

        assert await wait_until(finished, timeout=60)
        detail = await system.client.get(big)
        assert detail.status is SagaStatus.COMPENSATED
        steps = {s.name: s for s in detail.steps}
        assert steps["reserve_inventory"].status is StepStatus.COMPENSATED
        charge = steps["charge_payment"]
        assert charge.status is StepStatus.FAILED
        assert charge.error is not None
        assert charge.error.startswith("command not sent: the message is ")
        assert "SAGA_MAX_MESSAGE_BYTES" in charge.error
        assert detail.error is not None and "could not send its command" in detail.error
        assert (await system.client.get(good)).status is SagaStatus.COMPLETED
    effects = await ledger.effects(database)
    undone = effects.get(big, ledger.OrderEffect())
    assert undone.reserved == 0 and undone.charges == 0
    assert effects[good].reserved == 2 and effects[good].shipped
    totals = await ledger.totals(database)
    assert totals.stock_conserved and totals.money_conserved


# -- a handler reply over the limit ----------------------------------------------------


def oversized_inventory() -> tuple[Worker, list[str]]:
    """The inventory worker, whose reservation replies come out over the limit."""
    ran: list[str] = []
    worker = Worker("inventory")

    @worker.command("reserve_inventory")
    async def reserve(cmd: ReserveInventory, ctx: HandlerContext) -> dict[str, Any]:
        ran.append(cmd.order_id)
        reserved = await inventory.reserve(cmd, ctx)  # the business write
        return {**reserved.model_dump(), "padding": "p" * MIN_MESSAGE_BYTES}

    @worker.compensation("release_inventory")
    async def release(cmd: ReleaseInventory, ctx: HandlerContext) -> None:
        await inventory.release(cmd, ctx)

    return worker, ran


async def test_a_reply_over_the_limit_is_a_failure_and_undoes_the_writes(
    database: AsyncEngine,
) -> None:
    worker, ran = oversized_inventory()
    registry = SagaRegistry([place_order])
    async with EmbeddedSystem(
        sagas=registry,
        workers=[worker, payment.worker, shipment.worker],
        database=database,
        migrate=False,
        limits=SMALL,
    ) as system:
        saga_id = await system.client.start("place_order", ORDER)

        async def finished() -> bool:
            return (await system.client.statuses([saga_id]))[saga_id].is_terminal

        assert await wait_until(finished, timeout=60)
        detail = await system.client.get(saga_id)
    assert detail.status is SagaStatus.COMPENSATED
    step = next(s for s in detail.steps if s.name == "reserve_inventory")
    assert step.status is StepStatus.FAILED
    assert step.error is not None
    assert step.error.startswith("reply not sent: the message is ")
    assert "SAGA_MAX_MESSAGE_BYTES" in step.error
    assert ran == [saga_id]
    # The reservation was rolled back with the refused reply.
    effect = (await ledger.effects(database)).get(saga_id, ledger.OrderEffect())
    assert effect.reserved == 0
    totals = await ledger.totals(database)
    assert totals.stock_available == STOCK["widget"] and totals.stock_conserved
    # The barrier recorded the failure, not the oversized success: a redelivery gets
    # the same answer and runs nothing.
    async with database.connect() as conn:
        rows = (await conn.execute(select(barrier).where(barrier.c.saga_id == saga_id))).all()
    assert [(r.op, r.outcome) for r in rows] == [("action", "failure")]
    assert rows[0].error == step.error
    redelivered = Envelope(
        saga_id=saga_id,
        saga_name="place_order",
        saga_version=1,
        step="reserve_inventory",
        kind=MessageKind.COMMAND,
        name="reserve_inventory",
        attempt=1,
        payload={"order_id": saga_id, "sku": "widget", "quantity": 2},
    )
    registration = worker.registration(MessageKind.COMMAND, "reserve_inventory")
    assert registration is not None
    async with async_sessionmaker(database)() as session, session.begin():
        again = await guarded(session, "inventory", registration, redelivered, limits=SMALL)
    assert again.outcome is Outcome.FAILURE and again.error == step.error
    assert ran == [saga_id]


# -- sagactl start -----------------------------------------------------------------


def assert_one_line(stderr: str, exit_code: int, fragment: str) -> None:
    assert exit_code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sagactl: error: ")
    assert fragment in lines[0], lines[0]


def test_sagactl_start_refuses_in_one_line_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"

    def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
        return CliRunner().invoke(
            cli, ["--database-url", f"sqlite:///{db}", *args], prog_name="sagactl", env=env
        )

    assert invoke("db", "upgrade").exit_code == 0
    big = tmp_path / "big.json"
    big.write_text(json.dumps(dict(ORDER, sku="s" * 1_500_000)))
    result = invoke("start", "place_order", "--input", f"@{big}")
    assert_one_line(result.stderr, result.exit_code, "input too large: it is 1,500,")
    # Under a smaller setting, an input that fits but whose first command does not.
    fits = tmp_path / "fits.json"
    fits.write_text(json.dumps(dict(ORDER, sku="s" * (MIN_MESSAGE_BYTES - 200))))
    small = {"SAGA_MAX_MESSAGE_BYTES": str(MIN_MESSAGE_BYTES)}
    result = invoke("start", "place_order", "--input", f"@{fits}", env=small)
    assert_one_line(result.stderr, result.exit_code, "input too large: the first command would be")
    assert f"the limit is {MIN_MESSAGE_BYTES:,} (SAGA_MAX_MESSAGE_BYTES)" in result.stderr
    result = invoke(
        "start", "place_order", "--input", f"@{fits}", env={"SAGA_MAX_MESSAGE_BYTES": "5"}
    )
    assert result.exit_code == 1 and "bad setting" in result.stderr
    result = invoke("start", "place_order", "--input", json.dumps(ORDER), "--id", "x" * 37)
    assert_one_line(result.stderr, result.exit_code, "37 characters long, the limit is 36")
    result = invoke("--json", "list")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


@pytest.mark.integration
async def test_sagactl_start_refuses_in_one_line_on_postgresql(tmp_path: Path) -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url:
        env = {**os.environ, "SAGA_DATABASE_URL": url, "SAGA_SAGAS": "sagas.order"}
        big = tmp_path / "big.json"
        big.write_text(json.dumps(dict(ORDER, sku="s" * 1_500_000)))
        order = json.dumps(ORDER)
        for args, fragment in [
            (["--input", f"@{big}"], "input too large: it is 1,500,"),
            (["--input", order, "--id", "x" * 37], "37 characters long, the limit is 36"),
            (["--input", order, "--id", "bell\x07"], "control character (U+0007 at position 4)"),
        ]:
            proc = sagactl(env, "start", "place_order", *args, timeout=120)
            assert_one_line(proc.stderr, proc.returncode, fragment)
            assert "Traceback" not in proc.stderr and "DBAPIError" not in proc.stderr
        db = create_engine(url)
        try:
            assert await count(db, sagas) == 0
            assert await count(db, outbox) == 0
        finally:
            await db.dispose()
