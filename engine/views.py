"""Read models returned by the client and printed by ``sagactl``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from engine.messages import MessageKind
from engine.states import SagaStatus, StepStatus


class SagaSummary(BaseModel):
    id: str
    name: str
    version: int
    status: SagaStatus
    created_at: datetime
    updated_at: datetime
    error: str | None = None


class StepView(BaseModel):
    name: str
    position: int
    status: StepStatus
    attempts: int
    compensation_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    reply: dict[str, Any] | None


class HistoryView(BaseModel):
    at: datetime
    event: str
    step: str | None
    detail: str | None
    actor: str


class SagaDetail(SagaSummary):
    input: dict[str, Any]
    trace_id: str | None = None
    steps: list[StepView]
    history: list[HistoryView]


class DispatchView(BaseModel):
    """A message an operator action put in the outbox (the relay publishes it)."""

    destination: str
    step: str
    kind: MessageKind
    name: str
    attempt: int


class OperatorResult(BaseModel):
    """What ``retry`` or ``cancel`` did to one saga."""

    saga_id: str
    action: str
    actor: str
    reason: str | None
    previous_status: SagaStatus
    status: SagaStatus
    summary: str
    dispatched: list[DispatchView]
