"""The engine's and workers' metrics, as OpenTelemetry instruments.

Counters count what this process did. The gauges of sagas by state and of the outbox
backlog are read from the database by the daemon (every process then reports the same
truth, whichever replica did the work).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from engine.model import HistoryEntry, SagaState

METER_NAME = "saga-engine"


class _Snapshot:
    """Latest values polled by the daemon; read by observable-gauge callbacks."""

    def __init__(self) -> None:
        self.sagas: dict[tuple[str, str], int] = {}
        self.outbox_backlog: int = 0
        #: Held sagas by (name, version); a definition seen once stays, at 0.
        self.held: dict[tuple[str, str], int] = {}
        self.consumer_lag: dict[str, int] = {}


snapshot = _Snapshot()
_meter = metrics.get_meter(METER_NAME)

started = _meter.create_counter("saga.started", unit="{saga}", description="sagas started")
completed = _meter.create_counter("saga.completed", unit="{saga}", description="sagas completed")
compensated = _meter.create_counter(
    "saga.compensated", unit="{saga}", description="sagas fully compensated"
)
parked = _meter.create_counter(
    "saga.parked", unit="{saga}", description="sagas parked for an operator"
)
retries = _meter.create_counter(
    "saga.step.retries", unit="{retry}", description="step and compensation retries scheduled"
)
step_duration = _meter.create_histogram(
    "saga.step.duration", unit="s", description="first dispatch to final outcome of a step"
)
handled = _meter.create_counter(
    "saga.messages.handled", unit="{message}", description="messages handled by this process"
)
batch_redone = _meter.create_counter(
    "saga.worker.batch_redone",
    unit="{message}",
    description="commands handled again one by one after their batch's transaction failed "
    "(their handlers ran twice)",
)
unsigned = _meter.create_counter(
    "saga.messages.unsigned",
    unit="{message}",
    description="unsigned messages accepted (SAGA_SIGNING=accept-unsigned)",
)


def _sagas(_options: CallbackOptions) -> Iterable[Observation]:
    for (name, status), count in snapshot.sagas.items():
        yield Observation(count, {"saga.name": name, "saga.status": status})


def _backlog(_options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(snapshot.outbox_backlog)


def _held(_options: CallbackOptions) -> Iterable[Observation]:
    for (name, version), count in snapshot.held.items():
        yield Observation(count, {"saga.name": name, "saga.version": version})


def _lag(_options: CallbackOptions) -> Iterable[Observation]:
    for destination, lag in snapshot.consumer_lag.items():
        yield Observation(lag, {"messaging.destination.name": destination})


_meter.create_observable_gauge(
    "saga.sagas", [_sagas], unit="{saga}", description="sagas in the database by state"
)
_meter.create_observable_gauge(
    "saga.outbox.backlog", [_backlog], unit="{message}", description="unsent outbox rows"
)
_meter.create_observable_gauge(
    "saga.held",
    [_held],
    unit="{saga}",
    description="sagas held because no running engine serves their definition",
)
_meter.create_observable_gauge(
    "saga.consumer.lag", [_lag], unit="{message}", description="messages behind, per destination"
)

_STEP_END = {"step_succeeded", "step_failed", "step_timed_out"}


def record_transition(state: SagaState, history: Iterable[HistoryEntry]) -> None:
    """Count what one committed transition did."""
    attrs = {"saga.name": state.name}
    for entry in history:
        if entry.event == "started":
            started.add(1, attrs)
        elif entry.event == "completed":
            completed.add(1, attrs)
        elif entry.event == "compensated":
            compensated.add(1, attrs)
        elif entry.event == "parked":
            parked.add(1, attrs)
        elif entry.event in ("step_error", "compensation_error"):
            retries.add(1, {**attrs, "saga.step": entry.step or ""})
        if entry.event in _STEP_END and entry.step in state.steps:
            began = state.steps[entry.step].started_at
            if began is not None:
                step_duration.record(
                    _seconds(began, entry.at),
                    {**attrs, "saga.step": entry.step, "saga.outcome": entry.event[5:]},
                )


def update_sagas(counts: Mapping[tuple[str, str], int]) -> None:
    snapshot.sagas = dict(counts)


def update_held(counts: Mapping[tuple[str, str], int]) -> None:
    """The held sagas by (name, version); one no longer held reports 0."""
    snapshot.held = {**dict.fromkeys(snapshot.held, 0), **counts}


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())
