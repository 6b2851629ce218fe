"""Log lines that say which saga, step and trace they are about.

The saga and step come from a context variable the engine and the workers set while
handling a message; the trace id from the current span. ``--log-format json`` gives
one JSON object per line for log pipelines. Both formats redact every record
(``engine.redact``: URL passwords and the configured secrets), exception tracebacks
included; the text format shows control characters escaped, so a record is exactly
one line whatever a saga, a handler or an operator wrote.

The libraries under the daemons (Alembic, the broker clients, asyncio) log their own
plumbing at INFO: Alembic's plugin setup and each migration step, every connection
attempt and reconnect. Those are shown from WARNING up, or all of them with
``--log-level debug``. While a daemon starts, their records are held back: a start
that fails ends with one error line of saga-engine's own (the libraries' view of the
same failure would only repeat it), and one that succeeds shows what they said.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType

from engine.redact import escape_controls, redact
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


#: Record fields shown after the message when they are set.
CONTEXT_FIELDS = ("saga_id", "step", "trace_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every text in it redacted (``engine.redact``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = redact(str(value))
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        # json.dumps escapes every control character: a record is always one line.
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [saga_id=... step=... trace_id=...]``, redacted and
    always one line: newlines, ESC and other control characters in the message, the
    saga fields or a traceback are shown escaped (``\\n``, ``\\x1b``), so no text
    a saga, a handler or an operator wrote can forge a record or drive a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        tags = [
            f"{key}={value}"
            for key in CONTEXT_FIELDS
            if (value := getattr(record, key, None)) is not None
        ]
        if tags and getattr(record, "saga_id", None):
            line = f"{line} [{' '.join(tags)}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return escape_controls(redact(line))


#: Loggers of the libraries whose INFO lines are plumbing, not the daemon's story.
LIBRARIES = ("alembic", "aiokafka", "aio_pika", "aiormq", "asyncio", "sqlalchemy")
#: Library records kept while a daemon starts; the oldest go first beyond this.
HELD_AT_MOST = 200


def _from_library(name: str) -> bool:
    return any(name == lib or name.startswith(f"{lib}.") for lib in LIBRARIES)


class _StartupHold(logging.Filter):
    """Holds the libraries' records back until :func:`started` (see module doc)."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.holding = False
        self.held: deque[logging.LogRecord] = deque(maxlen=HELD_AT_MOST)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.holding and _from_library(record.name):
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        self.holding = False
        while self.held:
            self.handler.handle(self.held.popleft())


_hold: _StartupHold | None = None


def configure_logging(level: str, fmt: str = "text", *, starting: bool = False) -> None:
    """Root logging to stderr in ``text`` or ``json`` format, with saga context;
    an uncaught exception is logged too, so its traceback is redacted like the rest.

    The libraries log from WARNING up unless ``level`` is debug; with ``starting``
    (a daemon) their records wait for :func:`started`, and are dropped if it never
    comes: a failed start says why in one line of its own.
    """
    global _hold
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SagaContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    debug = root.level <= logging.DEBUG
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    _hold = _StartupHold(handler)
    _hold.holding = starting and not debug
    handler.addFilter(_hold)
    sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    """A crash's traceback through the log: redacted, and in the log's format."""
    logging.getLogger("saga").critical(
        "uncaught %s: %s", kind.__name__, value, exc_info=(kind, value, traceback)
    )


def started() -> None:
    """The daemon is up: show what the libraries said while it started."""
    if _hold is not None:
        _hold.release()
