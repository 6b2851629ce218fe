"""How times are shown to people: ISO 8601 in UTC, relative (``3m ago``), durations
(``1.2s``); and how an instant they type is read (:func:`parse_instant`).

Pure functions of their arguments (no clock, no I/O), so ``sagactl``'s tables and the
web console show the same instant the same way, and a test pins ``now``. Stored times
are UTC already (engine.store.schema.UTCDateTime); a naive datetime is taken as UTC.
JSON output does not come through here: it prints every instant in full, in UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from engine.retention import parse_age

__all__ = ["TimeFormat", "duration", "iso", "parse_instant", "relative", "utc"]


class TimeFormat(StrEnum):
    """How a table shows instants and durations (``sagactl --time-format``)."""

    #: ``2026-11-30T12:03:04Z``: UTC, to the second; durations as :func:`duration`.
    ISO = "iso"
    #: ``3m ago``, ``in 20s``; durations as :func:`duration`. The tables' default.
    RELATIVE = "relative"
    #: Full precision: ``2026-11-30T12:03:04.123456+00:00``; durations in seconds
    #: (``1.234567``). For pasting into other tools.
    RAW = "raw"

    def instant(self, when: datetime | None, now: datetime) -> str:
        """``when`` in this format (``-`` for None); ``now`` anchors relative times."""
        if when is None:
            return "-"
        if self is TimeFormat.RELATIVE:
            return relative(when, now)
        if self is TimeFormat.ISO:
            return iso(when)
        return utc(when).isoformat()

    def span(self, delta: timedelta | float | None) -> str:
        """A duration in this format (``-`` for None); seconds when given a number."""
        if delta is None:
            return "-"
        if self is TimeFormat.RAW:
            seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
            return f"{seconds:.6f}".rstrip("0").rstrip(".")
        return duration(delta)


def utc(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime (a naive one is taken as UTC already)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def iso(when: datetime) -> str:
    """ISO 8601 in UTC to the second, ``Z`` marking the zone: ``2026-11-30T12:03:04Z``.
    Sorts as text; the fraction of a second is in :attr:`TimeFormat.RAW` and JSON."""
    return utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def relative(when: datetime, now: datetime) -> str:
    """``when`` from ``now``, in its largest unit: ``just now``, ``12s ago``,
    ``3m ago``, ``5h ago`` (up to two days), ``9d ago``; in the future ``in 20s``.
    Truncated, never rounded up: ``3m ago`` is three to four minutes ago."""
    seconds = (utc(now) - utc(when)).total_seconds()
    if abs(seconds) < 1:
        return "just now"
    amount = abs(seconds)
    if amount < 60:
        text = f"{int(amount)}s"
    elif amount < 3600:
        text = f"{int(amount // 60)}m"
    elif amount < 2 * 86400:
        text = f"{int(amount // 3600)}h"
    else:
        text = f"{int(amount // 86400)}d"
    return f"{text} ago" if seconds > 0 else f"in {text}"


def duration(delta: timedelta | float) -> str:
    """A duration, compact and exact enough to compare: ``340ms``, ``1.2s``,
    ``59.9s``, ``3m5s``, ``2h10m``, ``3d4h`` (a number is seconds). Truncated to the
    unit shown, so a duration never reads longer than it was."""
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.floor(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return _two(whole // 60, "m", whole % 60, "s")
    if whole < 86400:
        return _two(whole // 3600, "h", whole % 3600 // 60, "m")
    return _two(whole // 86400, "d", whole % 86400 // 3600, "h")


def _two(big: int, big_unit: str, small: int, small_unit: str) -> str:
    return f"{big}{big_unit}{small}{small_unit}" if small else f"{big}{big_unit}"


def parse_instant(text: str, now: datetime) -> datetime:
    """An instant as a person types it (``sagactl list --since``, the console's
    filters): an age before ``now`` (``2h``, ``7d``) or an ISO 8601 time
    (``2026-11-30T11:00:00Z``; without a zone: UTC). In UTC; ValueError with a
    message fit for the user."""
    try:
        return utc(now) - parse_age(text)
    except ValueError:
        pass
    try:
        return utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an age (2h, 7d) nor an ISO 8601 time (2026-11-30T11:00Z)"
        ) from None
