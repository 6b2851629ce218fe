"""Log lines that say which saga, step and trace they are about.

The saga and step come from a context variable the engine and the workers set while
handling a message; the trace id from the current span. ``--log-format json`` gives
one JSON object per line for log pipelines.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

from engine.telemetry.tracing import trace_id

_saga: ContextVar[tuple[str, str | None] | None] = ContextVar("saga_log_context", default=None)


@contextmanager
def saga_context(saga_id: str, step: str | None = None) -> Iterator[None]:
    token = _saga.set((saga_id, step))
    try:
        yield
    finally:
        _saga.reset(token)


class SagaContextFilter(logging.Filter):
    """Adds ``saga_id``, ``step`` and ``trace_id`` to every record (None if unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _saga.get()
        record.saga_id = current[0] if current else None
        record.step = current[1] if current else None
        record.trace_id = trace_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("saga_id", "step", "trace_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        tags = [
            f"{key}={value}"
            for key in ("saga_id", "step", "trace_id")
            if (value := getattr(record, key, None)) is not None
        ]
        return f"{line} [{' '.join(tags)}]" if tags and getattr(record, "saga_id", None) else line


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging to stderr in ``text`` or ``json`` format, with saga context."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SagaContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
