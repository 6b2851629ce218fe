"""Persistence of saga state: a protocol the engine depends on, and its SQL adapter."""

from engine.store.base import (
    DueTimer,
    OutboxRecord,
    SagaStore,
    StoreTransaction,
    write_transition,
    write_transitions,
)

__all__ = [
    "DueTimer",
    "OutboxRecord",
    "SagaStore",
    "StoreTransaction",
    "write_transition",
    "write_transitions",
]
