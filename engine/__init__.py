"""saga-engine: event-driven saga orchestration with a transactional outbox.

The public API; everything else is internal and may change.
"""

from engine.client import SagaClient
from engine.definition import Compensation, RetryPolicy, Saga, Step, StepContext
from engine.errors import (
    BusinessFailure,
    ConfigError,
    DatabaseError,
    DefinitionError,
    InvalidInputError,
    LimitError,
    SagaError,
    SagaNotFoundError,
    UnknownSagaError,
)
from engine.limits import Limits
from engine.messages import Envelope, MessageKind, Outcome
from engine.orchestrator import Engine, EngineSettings
from engine.registry import SagaRegistry
from engine.states import SagaStatus, StepStatus
from engine.topology import Topology
from engine.views import SagaDetail, SagaSummary, StepView
from engine.worker import HandlerContext, Worker, WorkerRunner

__all__ = [
    "BusinessFailure",
    "Compensation",
    "ConfigError",
    "DatabaseError",
    "DefinitionError",
    "Engine",
    "EngineSettings",
    "Envelope",
    "HandlerContext",
    "InvalidInputError",
    "LimitError",
    "Limits",
    "MessageKind",
    "Outcome",
    "RetryPolicy",
    "Saga",
    "SagaClient",
    "SagaDetail",
    "SagaError",
    "SagaNotFoundError",
    "SagaRegistry",
    "SagaStatus",
    "SagaSummary",
    "Step",
    "StepContext",
    "StepStatus",
    "StepView",
    "Topology",
    "UnknownSagaError",
    "Worker",
    "WorkerRunner",
]
