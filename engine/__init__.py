"""saga-engine: event-driven saga orchestration with a transactional outbox.

The public API; everything else is internal and may change. Exported lazily:
``import engine`` (and so ``sagactl --help``) loads no database driver, broker client
or telemetry SDK; each name is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.client import SagaClient
    from engine.definition import (
        Child,
        Compensation,
        Delay,
        Local,
        Parallel,
        RetryPolicy,
        Saga,
        Step,
        StepContext,
        WaitFor,
    )
    from engine.embedded import EmbeddedSystem
    from engine.errors import (
        BusinessFailure,
        ConfigError,
        DatabaseError,
        DefinitionError,
        InvalidInputError,
        LimitError,
        OperationRefused,
        SagaError,
        SagaNotFoundError,
        UnknownSagaError,
    )
    from engine.limits import Limits
    from engine.messages import Envelope, MessageKind, Outcome
    from engine.orchestrator import Engine, EngineSettings
    from engine.registry import SagaRegistry
    from engine.settings import Settings
    from engine.states import SagaStatus, StepStatus
    from engine.topology import Topology
    from engine.views import SagaCursor, SagaDetail, SagaPage, SagaSummary, StepView, TimeRange
    from engine.wiring import Wiring
    from engine.worker import HandlerContext, Worker, WorkerRunner

#: Where each public name lives.
_EXPORTS = {
    "BusinessFailure": "engine.errors",
    "Child": "engine.definition",
    "Compensation": "engine.definition",
    "ConfigError": "engine.errors",
    "DatabaseError": "engine.errors",
    "DefinitionError": "engine.errors",
    "Delay": "engine.definition",
    "EmbeddedSystem": "engine.embedded",
    "Engine": "engine.orchestrator",
    "EngineSettings": "engine.orchestrator",
    "Envelope": "engine.messages",
    "HandlerContext": "engine.worker",
    "InvalidInputError": "engine.errors",
    "LimitError": "engine.errors",
    "Limits": "engine.limits",
    "Local": "engine.definition",
    "MessageKind": "engine.messages",
    "OperationRefused": "engine.errors",
    "Outcome": "engine.messages",
    "Parallel": "engine.definition",
    "RetryPolicy": "engine.definition",
    "Saga": "engine.definition",
    "SagaClient": "engine.client",
    "SagaCursor": "engine.views",
    "SagaDetail": "engine.views",
    "SagaError": "engine.errors",
    "SagaNotFoundError": "engine.errors",
    "SagaPage": "engine.views",
    "SagaRegistry": "engine.registry",
    "SagaStatus": "engine.states",
    "SagaSummary": "engine.views",
    "Settings": "engine.settings",
    "Step": "engine.definition",
    "StepContext": "engine.definition",
    "StepStatus": "engine.states",
    "StepView": "engine.views",
    "TimeRange": "engine.views",
    "Topology": "engine.topology",
    "UnknownSagaError": "engine.errors",
    "WaitFor": "engine.definition",
    "Wiring": "engine.wiring",
    "Worker": "engine.worker",
    "WorkerRunner": "engine.worker",
}

__all__ = [
    "BusinessFailure",
    "Child",
    "Compensation",
    "ConfigError",
    "DatabaseError",
    "DefinitionError",
    "Delay",
    "EmbeddedSystem",
    "Engine",
    "EngineSettings",
    "Envelope",
    "HandlerContext",
    "InvalidInputError",
    "LimitError",
    "Limits",
    "Local",
    "MessageKind",
    "OperationRefused",
    "Outcome",
    "Parallel",
    "RetryPolicy",
    "Saga",
    "SagaClient",
    "SagaCursor",
    "SagaDetail",
    "SagaError",
    "SagaNotFoundError",
    "SagaPage",
    "SagaRegistry",
    "SagaStatus",
    "SagaSummary",
    "Settings",
    "Step",
    "StepContext",
    "StepStatus",
    "StepView",
    "TimeRange",
    "Topology",
    "UnknownSagaError",
    "WaitFor",
    "Wiring",
    "Worker",
    "WorkerRunner",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
