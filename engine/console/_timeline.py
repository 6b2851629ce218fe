"""A saga's timeline: each step attempt and each compensation as a bar over time.

Pure: it reads a :class:`~engine.views.SagaDetail` (its steps and history) and
returns bars with start and end offsets; the pages draw them. The history records
how each attempt ended (``step_succeeded``, ``step_error``, ``step_timed_out``, ...)
but not when it was dispatched, so starts are derived as the state machine
(engine/statemachine.py) dispatches:

- a step's first attempt starts at the step's ``started_at``;
- a retry starts when the backoff its ``step_error`` names ("retry in 0.050s") is
  over, or when an operator's ``retried`` dispatched it;
- the first compensation starts when the saga began compensating, each next one
  when the one before it ended (compensations run one at a time), a compensation
  retry when its backoff is over.

A bar still open (the attempt in flight) ends at ``now``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from engine.states import SagaStatus, StepStatus
from engine.views import HistoryView, SagaDetail

Kind = Literal["forward", "compensation"]

#: History events that end a forward attempt, and the outcome each gives its bar.
_FORWARD_ENDS = {
    "step_succeeded": "succeeded",
    "step_error": "error",
    "step_failed": "failed",
    "step_timed_out": "timed_out",
    "step_cancelled": "cancelled",
    "undeliverable": "undeliverable",
}
#: History events that end a compensation attempt.
_COMPENSATION_ENDS = {
    "step_compensated": "compensated",
    "compensation_error": "error",
    "compensation_undeliverable": "undeliverable",
}

_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)s")
_RETRIED_STEP = re.compile(r"step '([^']+)' dispatched as attempt")

#: The narrowest a bar is drawn, in percent of the timeline, so an instant shows.
MIN_WIDTH = 0.6


@dataclass
class Bar:
    """One attempt of a step (``forward``) or of its compensation, over time."""

    step: str
    kind: Kind
    #: 1 for the first attempt; a retry or an operator's retry counts on.
    attempt: int
    start: datetime
    #: None while it is in flight.
    end: datetime | None
    #: succeeded, error (retried), failed, timed_out, cancelled, undeliverable,
    #: compensated, parked, or running (in flight).
    outcome: str
    #: What the history said of how it ended.
    detail: str | None = None
    #: The saga's pivot: once it succeeded, the saga can no longer be undone.
    pivot: bool = False
    #: Where it starts and how wide it is, in percent of the timeline.
    left: float = 0.0
    width: float = 0.0
    #: Its place in the history, to order bars that start at the same instant.
    order: int = 0

    @property
    def seconds(self) -> float | None:
        """How long it took (None while in flight)."""
        return None if self.end is None else (self.end - self.start).total_seconds()

    @property
    def timed_out(self) -> bool:
        """Whether no reply came within the step's timeout."""
        return self.outcome == "timed_out"


@dataclass
class Timeline:
    """The bars of one saga, in time order, over the span ``start`` to ``end``."""

    start: datetime
    end: datetime
    bars: list[Bar] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        """The span shown."""
        return (self.end - self.start).total_seconds()


@dataclass
class _Step:
    """What the walk knows of one step so far."""

    started_at: datetime | None
    attempts: int = 0
    compensations: int = 0
    #: When its next forward / compensation attempt starts (a backoff's end, an
    #: operator's retry), if known.
    next_start: datetime | None = None
    next_compensation: datetime | None = None
    last: Bar | None = None
    #: Whether its compensation succeeded.
    undone: bool = False


def timeline(detail: SagaDetail, now: datetime, *, pivot: str | None = None) -> Timeline:
    """The bars of saga ``detail`` as of ``now``; ``pivot`` names its pivot step."""
    steps = {s.name: _Step(s.started_at) for s in detail.steps}
    bars: list[Bar] = []
    #: When the next compensation starts: the saga began compensating, or the one
    #: before it ended.
    compensation_next: datetime | None = None
    for order, entry in enumerate(_in_order(detail.history)):
        event, name = entry.event, entry.step
        st = steps.get(name) if name is not None else None
        if event == "undeliverable":
            if "not waiting for it" in (entry.detail or ""):
                continue  # the saga was not waiting for it: no attempt ended
            if (entry.detail or "").startswith("compensation "):
                event = "compensation_undeliverable"
        if event == "compensating":
            compensation_next = entry.at
        elif event == "retried":
            _retried(entry, steps)
        elif event == "parked":
            _close_parked_compensation(detail, steps, bars, entry, compensation_next, order)
            compensation_next = None
        elif st is not None and name is not None and event in _FORWARD_ENDS:
            _end_forward(name, st, bars, entry, _FORWARD_ENDS[event], order)
        elif st is not None and name is not None and event in _COMPENSATION_ENDS:
            start = st.next_compensation or compensation_next or entry.at
            st.compensations += 1
            bar = Bar(
                name, "compensation", st.compensations, start, entry.at, _COMPENSATION_ENDS[event]
            )
            bar.detail, bar.order = entry.detail, order
            bars.append(bar)
            st.next_compensation = _retry_at(entry) if event == "compensation_error" else None
            if event == "step_compensated":
                compensation_next, st.undone = entry.at, True
    _open_bars(detail, steps, bars, now, compensation_next)
    for bar in bars:
        bar.pivot = bar.step == pivot and bar.kind == "forward"
    return _laid_out(detail, bars, now)


def _in_order(history: Iterable[HistoryView]) -> list[HistoryView]:
    """The history by time; entries of one instant keep the order they were written."""
    return sorted(history, key=lambda h: h.at)


def _retried(entry: HistoryView, steps: dict[str, _Step]) -> None:
    """An operator's retry dispatched steps (or a compensation) again, now."""
    names = [entry.step] if entry.step is not None else []
    names += _RETRIED_STEP.findall(entry.detail or "")
    for name in names:
        st = steps.get(name)
        if st is None:
            continue
        if "compensation of step" in (entry.detail or ""):
            st.next_compensation = entry.at
        else:
            st.next_start = entry.at


def _end_forward(
    name: str, st: _Step, bars: list[Bar], entry: HistoryView, outcome: str, order: int
) -> None:
    """A forward attempt ended; one ending told twice at one instant (a timeout past
    the pivot is also a failed attempt) stays one bar."""
    last = st.last
    if (
        last is not None
        and last.end == entry.at
        and st.next_start is None
        and outcome in ("error", "failed")
        and last.outcome == "timed_out"
    ):
        last.detail = f"{last.detail}; {entry.detail}" if last.detail else entry.detail
        st.next_start = _retry_at(entry) if outcome == "error" else None
        return
    start = st.next_start or (st.started_at if st.attempts == 0 else None) or entry.at
    if start > entry.at:
        # Ended (cancelled) during its backoff: that attempt was never dispatched.
        st.next_start = None
        return
    st.attempts += 1
    bar = Bar(name, "forward", st.attempts, start, entry.at, outcome, entry.detail)
    bar.order = order
    bars.append(bar)
    st.last = bar
    st.next_start = _retry_at(entry) if outcome == "error" else None


def _retry_at(entry: HistoryView) -> datetime | None:
    """When the retry an error entry announces starts ("retry in 0.050s")."""
    found = _RETRY_IN.search(entry.detail or "")
    return entry.at + timedelta(seconds=float(found.group(1))) if found else entry.at


def _close_parked_compensation(
    detail: SagaDetail,
    steps: dict[str, _Step],
    bars: list[Bar],
    entry: HistoryView,
    compensation_next: datetime | None,
    order: int,
) -> None:
    """The saga parked while compensating: the compensation in flight ended there,
    failed for good. It is the one whose retry was pending, else the next the saga
    would undo (the latest completed step with a compensation attempt not seen yet)."""
    candidates = [
        view
        for view in detail.steps
        if steps[view.name].compensations < view.compensation_attempts
        and not steps[view.name].undone
    ]
    pending = [v for v in candidates if steps[v.name].next_compensation is not None]
    if compensation_next is None and not pending:
        return  # parked going forward (past the pivot): no compensation was in flight
    if not candidates:
        return  # parked before any compensation went (at a pivot)
    view = (pending or sorted(candidates, key=lambda v: (v.completed or -1, v.position)))[-1]
    st = steps[view.name]
    st.compensations += 1
    start = st.next_compensation or compensation_next or entry.at
    bar = Bar(view.name, "compensation", st.compensations, start, entry.at, "parked")
    bar.detail, bar.order = entry.detail, order
    bars.append(bar)
    st.next_compensation = None


def _open_bars(
    detail: SagaDetail,
    steps: dict[str, _Step],
    bars: list[Bar],
    now: datetime,
    compensation_next: datetime | None,
) -> None:
    """The attempts in flight: a step dispatched and unanswered, a compensation sent."""
    if detail.status is SagaStatus.PARKED or detail.status.is_terminal:
        return
    for view in detail.steps:
        st = steps[view.name]
        if view.status is StepStatus.DISPATCHED and view.attempts > st.attempts:
            start = st.next_start or view.started_at or now
            bars.append(
                Bar(view.name, "forward", view.attempts, start, None, "running", order=1 << 30)
            )
        elif (
            view.status is StepStatus.COMPENSATING
            and view.compensation_attempts > st.compensations
            and detail.status is SagaStatus.COMPENSATING
        ):
            start = st.next_compensation or compensation_next or now
            if start <= now:
                bars.append(
                    Bar(
                        view.name,
                        "compensation",
                        view.compensation_attempts,
                        start,
                        None,
                        "running",
                        order=1 << 30,
                    )
                )


def _laid_out(detail: SagaDetail, bars: list[Bar], now: datetime) -> Timeline:
    """Bars in time order with their offsets over the saga's span."""
    bars.sort(key=lambda b: (b.start, b.order))
    start = min([detail.created_at, *(b.start for b in bars)])
    finished = detail.status.is_terminal or detail.status is SagaStatus.PARKED
    end = max(
        [
            detail.updated_at if finished else max(now, detail.updated_at),
            *(b.end or now for b in bars),
        ]
    )
    span = max((end - start).total_seconds(), 1e-6)
    for bar in bars:
        left = (bar.start - start).total_seconds() / span * 100
        right = ((bar.end or now) - start).total_seconds() / span * 100
        bar.left = round(min(left, 100 - MIN_WIDTH), 3)
        bar.width = round(max(right - left, MIN_WIDTH), 3)
    return Timeline(start=start, end=end, bars=bars)
