"""Upgrades that never strand a saga: held sagas, kept replies, paused timers, and a
client that starts only what the running engines serve (engine/held.py,
engine/served.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from engine.advance import Advancer
from engine.cli.app import cli
from engine.client import SagaClient
from engine.clock import utc_now
from engine.database import create_engine, upgrade
from engine.definition import Saga
from engine.errors import ConfigError, UnknownSagaError
from engine.held import HeldSagaScan
from engine.messages import Envelope, Outcome, decode
from engine.model import SagaState
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.relay import OutboxRelay
from engine.replies import ReplyOutcome
from engine.served import Registration, Serving
from engine.settings import load_settings
from engine.statemachine import new_saga
from engine.states import SagaStatus, StepStatus
from engine.store.schema import held_replies, sagas
from engine.store.sql import SqlSagaStore
from engine.transport.memory import MemoryTransport
from sagas.order import place_order
from tests.helpers import (
    QUANTITY,
    EmbeddedSystem,
    fast_order_saga,
    history_events,
    order_input,
)
from tests.upgrade_bumped import bumped_order
from tests.upgrade_edited import edited_order

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 30.0

#: The order saga as first deployed (as sagas.order, with other timeouts)...
original = fast_order_saga(timeout=TIMEOUT)
#: ...edited without a version bump (its last step is gone), and done right.
edited, bumped = edited_order, bumped_order


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


async def _commands(store: SqlSagaStore, at: datetime) -> list[Envelope]:
    """The unsent commands, marked sent at ``at``."""
    async with store.transaction() as tx:
        rows = await tx.claim_outbox(1000)
        await tx.mark_sent([r.id for r in rows], at)
    return [decode(r.body) for r in rows]


async def _start(store: SqlSagaStore, definition: Saga, saga_id: str, clock: Clock) -> None:
    data = definition.parse_input(order_input()).model_dump(mode="json")
    await Advancer(SagaRegistry([definition]), clock=clock).start(store, definition, saga_id, data)


# -- the fingerprint a saga records -------------------------------------------------------


def test_an_edit_without_a_bump_changes_the_fingerprint_a_bump_keeps_it() -> None:
    assert original.fingerprint != edited.fingerprint == bumped.fingerprint
    assert original.key == edited.key != bumped.key


def test_why_an_engine_does_not_serve_a_saga() -> None:
    saga = _state(original)
    only_v2 = Serving(SagaRegistry([bumped]))
    assert only_v2.definition(saga) is None
    assert only_v2.why_not(saga) == "no running engine loads place_order v1 (this one loads v2)"
    mismatch = Serving(SagaRegistry([edited]))
    assert mismatch.definition(saga) is None
    assert mismatch.why_not(saga) == (
        f"this engine's place_order v1 has fingerprint {edited.fingerprint}, the saga "
        f"started with {original.fingerprint}: its definition changed without a version bump"
    )
    assert Serving(SagaRegistry([original])).definition(saga) is original
    # A saga from before fingerprints were recorded trusts its name and version, if
    # the definition has its steps.
    legacy = replace(saga, fingerprint=None)
    reordered = replace(original, steps=list(reversed(original.steps)))
    assert Serving(SagaRegistry([reordered])).definition(legacy) is reordered
    assert mismatch.definition(legacy) is None
    assert mismatch.why_not(legacy) == (
        "this engine's place_order v1 has the steps charge_payment, reserve_inventory, "
        "the saga has charge_payment, create_shipment, reserve_inventory: its definition "
        "changed without a version bump"
    )
    # Another live engine that serves it: left to that one.
    mismatch.others = frozenset({("place_order", 1, original.fingerprint)})
    assert mismatch.elsewhere(saga)
    mismatch.others = frozenset({("place_order", 1, edited.fingerprint)})
    assert not mismatch.elsewhere(saga)


def _state(definition: Saga) -> SagaState:
    return new_saga(definition, "s-1", definition.parse_input(order_input()).model_dump(), NOW)


# -- held and resumed, on SQLite and PostgreSQL ---------------------------------------------


async def test_a_saga_is_held_with_its_reply_kept_and_timers_paused_then_resumes(
    any_store: SqlSagaStore,
) -> None:
    store = any_store
    clock = Clock()
    for saga_id in ("replied", "stale", "silent"):
        await _start(store, original, saga_id, clock)
    commands = {c.saga_id: c for c in await _commands(store, clock.now)}
    reply = commands["replied"].reply(Outcome.SUCCESS, payload={"reservation": "r-1"})
    # A late copy of an attempt the saga no longer waits for.
    stale = commands["stale"].reply(Outcome.SUCCESS).model_copy(update={"attempt": 7})

    # An engine with the edited v1 meets the replies: held, kept, no inbox claim.
    wrong = Advancer(SagaRegistry([edited]), clock=clock)
    async with store.transaction() as tx:
        results, changed = await wrong.replies(tx, [reply, stale, reply])  # a copy too
    assert [r.outcome for r in results] == [ReplyOutcome.HELD] * 3 and changed == []
    assert results[0].reason is not None
    assert "changed without a version bump" in results[0].reason
    # Their timeouts fall due while they are held: paused, for any engine; "silent"'s
    # falls due unheld, and the engine that cannot serve it holds it.
    clock.now = NOW + timedelta(seconds=TIMEOUT + 5)
    async with store.transaction() as tx:
        assert await wrong.timers(tx, clock.now, 100) == (0, [])
    right = Advancer(SagaRegistry([original]), clock=clock)
    async with store.transaction() as tx:
        assert (await right.timers(tx, clock.now, 100))[0] == 0
    for saga_id in ("replied", "stale", "silent"):
        detail = await store.get_saga(saga_id)
        assert detail is not None and detail.held is not None
        assert (detail.status, detail.fingerprint) == (SagaStatus.RUNNING, original.fingerprint)
        assert [h.event for h in detail.history] == ["started", "held"]
    # Another reply to a held saga is kept too, with no second "held" entry.
    async with store.transaction() as tx:
        (again,), _ = await wrong.replies(tx, [reply])
    assert again.outcome is ReplyOutcome.HELD
    assert sorted(s.id for s in await store.list_sagas(held=True)) == ["replied", "silent", "stale"]
    assert [(h.name, h.version, h.count) for h in (await store.stats()).held] == [
        ("place_order", 1, 3)
    ]
    assert (await store.get_saga("silent")).held == (  # type: ignore[union-attr]
        f"this engine's place_order v1 has fingerprint {edited.fingerprint}, the saga "
        f"started with {original.fingerprint}: its definition changed without a version bump"
    )

    # An engine serving the edited definition finds nothing to resume...
    scan = HeldSagaScan(store, wrong, clock=clock, interval=1, batch=10, error_backoff=1)
    assert await scan.scan() == 0
    # ...one with the original resumes all three, each kept reply applied once.
    clock.now = NOW + timedelta(seconds=TIMEOUT + 65)
    scan = HeldSagaScan(store, right, clock=clock, interval=1, batch=10, error_backoff=1)
    assert await scan.scan() == 3
    assert (scan.resumed, scan.reapplied) == (3, 2)
    assert await scan.scan() == 0  # nothing kept, nothing held any more
    replied = await store.get_saga("replied")
    assert replied is not None and replied.held is None
    assert [h.event for h in replied.history] == ["started", "held", "resumed", "step_succeeded"]
    assert [s.status for s in replied.steps[:2]] == [StepStatus.SUCCEEDED, StepStatus.DISPATCHED]
    async with store.transaction() as tx:
        states = await tx.lock_sagas(["stale", "silent"])
    # Held from NOW to NOW + 95s: the deadline moved on by as much.
    timer = states["stale"].timer
    assert timer is not None and timer.due_at == NOW + timedelta(seconds=TIMEOUT + 95)
    # Held from NOW + 35s, 5s after its deadline: still 5s overdue, it fires now.
    timer = states["silent"].timer
    assert timer is not None and timer.due_at == NOW + timedelta(seconds=TIMEOUT + 60)
    async with store.transaction() as tx:
        assert (await right.timers(tx, clock.now, 100))[0] == 1
    silent = await store.get_saga("silent")
    assert silent is not None and silent.status is SagaStatus.COMPENSATING


async def test_a_reply_another_live_engine_serves_is_left_to_it_unheld(
    store: SqlSagaStore,
) -> None:
    clock = Clock()
    await _start(store, original, "s", clock)
    (command,) = await _commands(store, clock.now)
    v2_only = Advancer(SagaRegistry([bumped]), clock=clock)
    v2_only.serving.others = frozenset({("place_order", 1, original.fingerprint)})
    async with store.transaction() as tx:
        (result,), _ = await v2_only.replies(tx, [command.reply(Outcome.SUCCESS)])
    assert result.outcome is ReplyOutcome.HELD
    detail = await store.get_saga("s")
    assert detail is not None and detail.held is None  # not held: another engine serves it
    assert [h.event for h in detail.history] == ["started"]
    v1 = Advancer(SagaRegistry([original]), clock=clock)
    scan = HeldSagaScan(store, v1, clock=clock, interval=1, batch=10, error_backoff=1)
    assert await scan.scan() == 1
    detail = await store.get_saga("s")
    assert detail is not None and [h.event for h in detail.history] == ["started", "step_succeeded"]


# -- what the engines serve, and what a client starts -------------------------------------------


async def test_engines_register_what_they_serve_until_they_leave_or_expire(
    store: SqlSagaStore,
) -> None:
    now = utc_now()
    first = Registration(store, Serving(SagaRegistry([original])), "engine-1", interval=5)
    second = Registration(store, Serving(SagaRegistry([original, bumped])), "engine-2", interval=5)
    await first.beat(now)
    await second.beat(now)
    live = await store.live_definitions(now)
    assert [(d.engine_id, d.name, d.version) for d in live] == [
        ("engine-1", "place_order", 1),
        ("engine-2", "place_order", 1),
        ("engine-2", "place_order", 2),
    ]
    assert {d.fingerprint for d in live if d.version == 2} == {bumped.fingerprint}
    await first.beat(now + timedelta(seconds=1))  # not due: nothing happens
    assert first.serving.others == set()
    await first.beat(now + timedelta(seconds=5))  # what the others serve is re-read
    assert first.serving.others == {
        ("place_order", 1, original.fingerprint),
        ("place_order", 2, bumped.fingerprint),
    }
    later = now + timedelta(seconds=16)  # engine-2 missed three beats
    assert [d.engine_id for d in await store.live_definitions(later)] == ["engine-1"]
    await second.leave()
    assert [d.engine_id for d in await store.live_definitions(now)] == ["engine-1"]


async def test_a_client_starts_the_newest_version_a_running_engine_serves(
    store: SqlSagaStore,
) -> None:
    client = SagaClient(store, SagaRegistry([original, bumped]))
    # No engine registered (embedded, tests): the newest this process loads.
    assert await client.definition("place_order") is bumped
    await store.register(
        "engine-1",
        [("place_order", 1, original.fingerprint)],
        started_at=utc_now(),
        now=utc_now(),
        expires_at=utc_now() + timedelta(minutes=1),
    )
    client._served = None  # forget the cached read
    assert await client.definition("place_order") is original
    saga_id = await client.start("place_order", order_input())
    detail = await store.get_saga(saga_id)
    assert detail is not None and (detail.version, detail.fingerprint) == (1, original.fingerprint)
    with pytest.raises(UnknownSagaError) as refused:
        await client.start("place_order", order_input(), version=2)
    assert str(refused.value) == (
        f"cannot start saga 'place_order' v2 (fingerprint {bumped.fingerprint}): running "
        f"engines serve place_order v1 (fingerprint {original.fingerprint})"
    )
    pinned = SagaClient(store, SagaRegistry([original, bumped]), start_versions={"place_order": 2})
    with pytest.raises(UnknownSagaError, match="cannot start saga 'place_order' v2"):
        await pinned.start("place_order", order_input())
    # A client whose v1 is not the engines' v1 starts nothing.
    stale = SagaClient(store, SagaRegistry([edited]))
    with pytest.raises(UnknownSagaError) as refused:
        await stale.start("place_order", order_input())
    assert str(refused.value) == (
        f"cannot start saga 'place_order': running engines serve place_order v1 (fingerprint "
        f"{original.fingerprint}), and this process loads v1 (v1 fingerprint "
        f"{edited.fingerprint})"
    )
    with pytest.raises(UnknownSagaError, match=r"unknown saga 'place_order' v3 \(known: "):
        await client.start("place_order", order_input(), version=3)
    assert place_order.fingerprint == original.fingerprint  # timeouts are not structure


# -- sagactl check ------------------------------------------------------------------------


def test_check_lists_the_unfinished_sagas_a_deployment_would_hold(tmp_path: Path) -> None:
    db = tmp_path / "check.db"

    async def prepare() -> None:
        database = create_engine(f"sqlite:///{db}")
        await upgrade(database)
        store = SqlSagaStore(database)
        clock = Clock()
        for n in range(3):
            await _start(store, original, f"v1-{n}", clock)
        await _start(store, bumped, "v2-0", clock)
        async with database.begin() as conn:  # one from before fingerprints, one finished
            await conn.execute(update(sagas).where(sagas.c.id == "v1-2").values(fingerprint=None))
            await conn.execute(
                update(sagas).where(sagas.c.id == "v1-1").values(status=SagaStatus.COMPLETED)
            )
        await database.dispose()

    asyncio.run(prepare())
    # What runs now (v1 and v2): nothing held.
    both = sagactl(db, "--json", "check", "sagas.order", "tests.upgrade_bumped")
    assert both.exit_code == 0, both.output
    assert json.loads(both.stdout)["would_hold"] == 0
    # v2 alone: the unfinished v1 sagas (one without a fingerprint) would be held.
    alone = sagactl(db, "--json", "check", "tests.upgrade_bumped")
    assert alone.exit_code == 1, alone.output
    view = json.loads(alone.stdout)
    assert view["would_hold"] == 2
    assert [
        (d["name"], d["version"], d["fingerprint"], d["count"], d["saga_ids"], d["problem"])
        for d in view["definitions"]
    ] == [
        ("place_order", 1, None, 1, ["v1-2"], "version missing"),
        ("place_order", 1, original.fingerprint, 1, ["v1-0"], "version missing"),
        ("place_order", 2, bumped.fingerprint, 1, ["v2-0"], None),
    ]
    assert view["definitions"][0]["reason"] == "place_order v1 is not loaded (loaded: v2)"
    # v1 edited without a bump: its sagas that recorded a fingerprint would be held.
    edit = sagactl(db, "--json", "check", "tests.upgrade_edited,tests.upgrade_bumped")
    assert edit.exit_code == 1, edit.output
    view = json.loads(edit.stdout)
    assert view["would_hold"] == 1
    assert [d["problem"] for d in view["definitions"]] == [None, "fingerprint mismatch", None]
    assert view["definitions"][1]["reason"] == (
        f"place_order v1 has fingerprint {edited.fingerprint} here, these sagas started with "
        f"{original.fingerprint}: bump the version of the changed definition"
    )
    table = sagactl(db, "check", "tests.upgrade_edited", "tests.upgrade_bumped")
    assert table.exit_code == 1 and table.stdout.endswith("1 saga(s) would be held\n")
    missing = sagactl(db, "check", "no.such.module")
    assert missing.exit_code == 1 and "cannot import saga module 'no.such.module'" in missing.stderr


def sagactl(db: Path, *args: str) -> Result:
    return CliRunner().invoke(
        cli, ["--database-url", f"sqlite:///{db}", *args], prog_name="sagactl"
    )


# -- the scenario: an engine replaced by one with an edited v1, then the original back ---------


async def test_an_edit_without_a_bump_holds_in_flight_sagas_until_the_original_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="saga.engine")
    async with EmbeddedSystem(
        tmp_path / "upgrade.db", sagas=[original], run_workers=["payment", "shipment"]
    ) as system:
        saga_id = await system.start_order()
        await system.wait_status(
            saga_id,
            lambda d: d.steps[0].status is StepStatus.DISPATCHED,
            10,
            "the first command to go out",
        )
        # The engine is replaced by one whose place_order v1 lost a step, unbumped;
        # the inventory worker answers only now.
        await system.stop_engine()
        system.registry = SagaRegistry([edited])
        await system.start_engine()
        await system.start_worker("inventory")
        held = await system.wait_status(
            saga_id, lambda d: d.held is not None, 10, "the saga to be held"
        )
        assert held.held == (
            f"this engine's place_order v1 has fingerprint {edited.fingerprint}, the saga "
            f"started with {original.fingerprint}: its definition changed without a version bump"
        )
        assert [h.event for h in held.history] == ["started", "held"]
        assert held.steps[0].status is StepStatus.DISPATCHED

        async def kept() -> bool:
            async with system.db.connect() as conn:
                return await conn.scalar(select(func.count()).select_from(held_replies)) == 1

        await system.wait_for(kept, 10, "the reply to be kept")
        assert await system.client.dead_letters() == []

        # The original definition comes back: the saga resumes by itself and completes.
        await system.stop_engine()
        system.registry = SagaRegistry([original])
        await system.start_engine()
        final = await system.wait_status(
            saga_id, lambda d: d.status is SagaStatus.COMPLETED, 15, "the saga to complete"
        )
        events = [h.event for h in final.history]
        assert events[:4] == ["started", "held", "resumed", "step_succeeded"], events
        assert final.held is None
        assert await system.client.dead_letters() == []
        effect = (await system.effects())[saga_id]
        assert (effect.reserved, effect.charges, effect.shipped) == (QUANTITY, 1, True)
    holding = [r for r in caplog.records if r.getMessage().startswith("holding saga")]
    assert len(holding) == 1  # one line, no traceback loop
    assert not [r for r in caplog.records if r.exc_info]


def test_the_held_gauge_reports_a_definition_no_longer_held_at_zero() -> None:
    from engine.telemetry import metrics

    before = dict(metrics.snapshot.held)
    try:
        metrics.snapshot.held = {}
        metrics.update_held({("trip", "1"): 3})
        metrics.update_held({("trip", "2"): 1})
        assert metrics.snapshot.held == {("trip", "1"): 0, ("trip", "2"): 1}
    finally:
        metrics.snapshot.held = before


async def test_engines_of_two_deployments_side_by_side_serve_both_versions(
    tmp_path: Path,
) -> None:
    """The rolling upgrade: an engine loading v1 only runs beside one loading v1 and
    v2, both consuming the replies. A v2 reply the old engine takes is left to the
    new one (it is registered as serving v2), not held; the old client still starts
    v1, the new client v2, and every saga completes under its own version."""
    tunables = EngineSettings(
        timer_interval=0.02,
        unknown_saga_patience=0.5,
        reply_settle=timedelta(seconds=0.1),
        watermark_interval=0.02,
        # A registration lives three heartbeats: 3 s, so a busy machine that delays a
        # heartbeat does not make the v2 engine look gone to the new client.
        heartbeat_interval=1.0,
        held_interval=0.05,
    )
    async with EmbeddedSystem(
        tmp_path / "rolling.db", sagas=[original], settings=tunables
    ) as system:
        old = system.engine
        assert old is not None
        second_db = create_engine(f"sqlite:///{system.db_path}")
        transport = MemoryTransport(system.broker)
        await transport.connect()
        second_store = SqlSagaStore(second_db)
        both = SagaRegistry([original, bumped])
        new = Engine(
            second_store,
            transport,
            both,
            settings=tunables,
            relay=OutboxRelay(second_store, transport, poll_interval=0.01),
            instance_id="engine-v1-v2",
        )
        task = asyncio.create_task(new.run())
        try:

            async def registered() -> bool:
                return ("place_order", 2, bumped.fingerprint) in old.advancer.serving.others

            await system.wait_for(registered, 10, "the old engine to know the new one")
            new_client = SagaClient(system.store, both, on_commit=system._wake)
            v2_ids = [await new_client.start("place_order", order_input()) for _ in range(4)]
            v1_ids = [await system.client.start("place_order", order_input()) for _ in range(4)]
            sagas = await system.wait_all_terminal(20, v1_ids + v2_ids)
            assert {sagas[i].version for i in v1_ids} == {1}
            assert {sagas[i].version for i in v2_ids} == {2}
            assert {d.status for d in sagas.values()} == {SagaStatus.COMPLETED}
            assert not [d.id for d in sagas.values() if history_events(d, "held")]
            assert all(len(sagas[i].steps) == 2 for i in v2_ids)
        finally:
            new.stop()
            await asyncio.wait_for(task, 10)
            await transport.close()
            await second_db.dispose()


def test_start_versions_are_read_from_the_settings() -> None:
    settings = load_settings(start_versions="place_order=1, book_trip=3")
    assert settings.start_version_map == {"place_order": 1, "book_trip": 3}
    with pytest.raises(ConfigError, match="bad setting SAGA_START_VERSIONS: expected name="):
        load_settings(start_versions="place_order=1,book_trip")
