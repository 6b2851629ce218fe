"""Persistence of saga state: the write protocol the engine depends on (base.py), the
query protocol the client reads through (queries.py), and their SQL adapter."""

from engine.store.base import (
    DueTimer,
    OutboxRecord,
    PruneCounts,
    SagaIdTaken,
    SagaStore,
    StoreTransaction,
    write_transition,
    write_transitions,
)

__all__ = [
    "DueTimer",
    "OutboxRecord",
    "PruneCounts",
    "SagaIdTaken",
    "SagaStore",
    "StoreTransaction",
    "write_transition",
    "write_transitions",
]
