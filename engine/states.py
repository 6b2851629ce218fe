"""Saga and step states, persisted as their string values."""

from __future__ import annotations

from enum import StrEnum


class SagaStatus(StrEnum):
    """Where a saga is: running, compensating, or finished one way or the other."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    #: Compensation kept failing past its retry cap, or a step failed after the pivot:
    #: nothing more happens by itself; an operator must look.
    PARKED = "parked"

    @property
    def is_terminal(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


class StepStatus(StrEnum):
    """Where one step is, from pending through dispatched to its outcome."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: No reply within the step's timeout: the outcome is unknown, so the step is
    #: compensated as if it had succeeded (the participant's barrier makes that safe).
    TIMED_OUT = "timed_out"
    #: An operator cancelled the saga while this step was in flight (or between its
    #: attempts): its outcome is unknown, so it is compensated like a timed-out step.
    CANCELLED = "cancelled"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
