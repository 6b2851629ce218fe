"""The engine's seams (engine/timers.py, engine/relay.py): the timer scanner behind its
protocol, and the settings and flags that reach the scanner and the relay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from engine.advance import Advancer
from engine.cli.app import cli
from engine.client import SagaClient
from engine.errors import ConfigError
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.settings import Settings, load_settings
from engine.store.sql import SqlSagaStore
from engine.timers import StoreTimerScanner, TimerScanner
from engine.transport.memory import MemoryBroker, MemoryTransport
from engine.wiring import engine_settings, relay_options
from sagas.order import place_order
from tests.helpers import fast_order_saga, history_events, order_input

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 30.0


async def test_the_store_scanner_fires_due_timeouts_a_batch_at_a_time(
    any_store: SqlSagaStore,
) -> None:
    store = any_store
    registry = SagaRegistry([fast_order_saga(timeout=TIMEOUT)])
    client = SagaClient(store, registry, clock=lambda: NOW)
    ids = [await client.start(place_order.name, order_input()) for _ in range(3)]
    async with store.transaction() as tx:  # the commands went out at once
        await tx.mark_sent([r.id for r in await tx.claim_outbox(100)], NOW)
    late = NOW + timedelta(seconds=TIMEOUT + 1)
    scanner: TimerScanner = StoreTimerScanner(
        store, Advancer(registry, clock=lambda: late), batch=2
    )

    # Held back by the watermark's bound: no timeout fell due by then.
    assert await scanner.fire_due(late, timeouts_due_by=NOW) == 0
    fired = [await scanner.fire_due(late, timeouts_due_by=None) for _ in range(3)]

    assert fired == [2, 1, 0]
    for saga_id in ids:
        state = await client.get(saga_id)
        assert history_events(state, "step_timed_out") == ["reserve_inventory"]


class FakeScanner:
    """A timer scanner that fires what it is told to, and notes how it was asked."""

    def __init__(self, fires: list[int], batch: int, scans: int) -> None:
        self.fires = fires
        self.batch = batch
        self.asked: list[tuple[datetime, datetime | None]] = []
        #: Set once it was asked ``scans`` times.
        self.scanned = asyncio.Event()
        self._scans = scans

    async def fire_due(self, now: datetime, *, timeouts_due_by: datetime | None) -> int:
        self.asked.append((now, timeouts_due_by))
        if len(self.asked) >= self._scans:
            self.scanned.set()
        return self.fires.pop(0) if self.fires else 0


async def test_the_engine_runs_any_timer_scanner_with_its_watermark(
    store: SqlSagaStore,
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    await transport.connect()
    scanner = FakeScanner([3, 3, 1], batch=3, scans=5)
    engine = Engine(
        store,
        transport,
        SagaRegistry([place_order]),
        timers=scanner,
        settings=EngineSettings(timer_interval=0.01),
    )
    running = asyncio.create_task(engine.run())
    try:
        await asyncio.wait_for(scanner.scanned.wait(), 10)
    finally:
        engine.stop()
        await running
        await transport.close()

    assert engine.timers_fired == 7
    # While it consumes replies, every scan is bounded by the reply watermark.
    assert all(bound is not None and bound <= now for now, bound in scanner.asked)


def test_timer_and_relay_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "TIMER_INTERVAL": "0.25s",
        "TIMER_BATCH": "7",
        "RELAY_BATCH": "50",
        "RELAY_POLL_INTERVAL": "0.2",
        "RELAY_UNROUTABLE_PAUSE": "2s",
        "RELAY_MAX_UNROUTABLE_PAUSE": "1m",
        "RELAY_UNROUTABLE_TIMEOUT": "5s",
        "RELAY_READER_CHECK_DELAY": "0",
    }.items():
        monkeypatch.setenv(f"SAGA_{name}", value)
    settings = load_settings()

    tunables = engine_settings(settings)
    assert (tunables.timer_interval, tunables.timer_batch) == (0.25, 7)
    assert relay_options(settings) == {
        "batch_size": 50,
        "poll_interval": 0.2,
        "unroutable_pause": 2.0,
        "max_unroutable_pause": 60.0,
        "unroutable_timeout": 5.0,
        "reader_check_delay": 0.0,
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIMER_BATCH", "0"),
        ("TIMER_INTERVAL", "0"),
        ("RELAY_BATCH", "0"),
        ("RELAY_POLL_INTERVAL", "-1"),
        ("RELAY_MAX_UNROUTABLE_PAUSE", "0.5s"),  # shorter than the first pause
        ("RELAY_UNROUTABLE_TIMEOUT", "0"),
    ],
)
def test_bad_timer_and_relay_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"SAGA_{name}", value)
    with pytest.raises(ConfigError, match=f"SAGA_{name}"):
        load_settings()


def test_engine_flags_reach_the_timer_scanner(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    async def run_engine(settings: Settings, **_: Any) -> None:
        seen.append(settings)

    monkeypatch.setattr("engine.daemon.run_engine", run_engine)
    monkeypatch.setattr("engine.telemetry.logs.configure_logging", lambda *a, **k: None)
    monkeypatch.setenv("SAGA_TIMER_BATCH", "5")
    runner = CliRunner()

    shown = runner.invoke(cli, ["engine", "--help"])
    assert "--timer-interval" in shown.output and "--timer-batch" in shown.output
    assert runner.invoke(cli, ["engine", "--timer-batch", "0"]).exit_code == 2
    assert runner.invoke(cli, ["engine", "--timer-interval", "0s"]).exit_code == 2
    assert seen == []

    done = runner.invoke(cli, ["engine", "--timer-interval", "2s"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(cli, ["engine", "--timer-batch", "9"])
    assert done.exit_code == 0, done.output

    by_env, by_flag = (engine_settings(s) for s in seen)
    assert (by_env.timer_interval, by_env.timer_batch) == (2.0, 5)  # the flag over 0.1s
    assert (by_flag.timer_interval, by_flag.timer_batch) == (0.1, 9)  # the flag over env
