"""Deterministic crash points: a test hook for the fault-injection suite.

The engine and the worker runtime call :func:`crashpoint` at the boundaries where a
crash is most dangerous (between a commit and a publish, a publish and its
acknowledgement). It does nothing unless the environment variable ``SAGA_CRASH``
names the point::

    SAGA_CRASH=relay.after_publish:3                # SIGKILL on the 3rd time it is reached
    SAGA_CRASH=worker.after_commit,worker.after_reply:2   # a bare name means :1

The variable is read once, when this module is imported; an entry that cannot be
parsed or names no known point is reported on stderr and ignored. Only the tests
(``tests/faults/``) set it: never set it in production.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "SAGA_CRASH"

#: Every crash point, and where it sits.
POINTS = {
    "relay.before_publish": "outbox rows claimed (their transition committed), not yet published",
    "relay.after_publish": "the broker confirmed the rows, they are not yet marked sent",
    "worker.after_commit": "a handler's business transaction committed, no reply published",
    "worker.after_reply": "the reply was confirmed by the broker, the command is not acked",
    "engine.after_commit": "a reply's transaction committed, the reply is not acked",
}


def parse(spec: str) -> dict[str, int]:
    """``name[:n],...`` to {name: n}; bad entries are reported and skipped."""
    plan: dict[str, int] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, count = entry.partition(":")
        times = int(count) if sep and count.strip().isdigit() else (1 if not sep else 0)
        if name not in POINTS or times < 1:
            sys.stderr.write(f"{ENV}: ignoring {entry!r} (known points: {', '.join(POINTS)})\n")
            continue
        plan[name] = times
    return plan


_plan = parse(os.environ.get(ENV, ""))
_reached: dict[str, int] = {}


def crashpoint(name: str) -> None:
    """SIGKILL this process if ``SAGA_CRASH`` says so for this visit of ``name``."""
    if not _plan or name not in _plan:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == _plan[name]:
        os.write(2, f"{ENV}: {name} reached {_reached[name]} time(s): SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
