"""How the pages write values: the CLI's rule for text, times in UTC, durations.

Every string a template prints goes through :func:`shown` (the environment's
``finalize``): secrets redacted and control characters escaped, like ``sagactl``;
jinja2's autoescape then makes it inert HTML.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup

from engine.redact import escape_controls, redact


def shown(value: Any) -> Any:
    """A template's value as printed: text redacted and on one line; markup the
    templates built themselves, numbers and None as they are."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return "" if value is None else value
    return escape_controls(redact(value))


def json_lines(value: Any) -> list[str]:
    """A JSON value pretty-printed, as lines (each shown on its own)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str).split("\n")


def text_lines(text: str) -> list[str]:
    """A text (a dead letter's body) as lines, each shown on its own."""
    return text.splitlines() or [""]


def utc(at: datetime | None) -> str:
    """An instant as UTC to the second: ``2026-03-01 12:00:05Z``."""
    if at is None:
        return ""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def iso(at: datetime | None) -> str:
    """An instant as ISO 8601 in UTC, for ``<time datetime=...>``."""
    return "" if at is None else at.astimezone(UTC).isoformat(timespec="milliseconds")


def duration(seconds: float | None) -> str:
    """A duration as a person reads it: ``85ms``, ``1.2s``, ``3m 05s``, ``2h 10m``,
    ``3d 4h``."""
    if seconds is None:
        return ""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def ago(at: datetime | None, now: datetime) -> str:
    """How long before ``now``: ``3m 05s ago``."""
    if at is None:
        return ""
    return f"{duration((now - at).total_seconds())} ago"
