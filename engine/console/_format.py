"""How the pages write values that are not times (those are engine.timefmt's).

Every string a template prints goes through :func:`shown` (the environment's
``finalize``): :func:`engine.redact.displayed`, the CLI's rule (secrets hidden,
control characters escaped); jinja2's autoescape then makes it inert HTML.
"""

from __future__ import annotations

import json
from typing import Any

from markupsafe import Markup

from engine.redact import displayed


def shown(value: Any) -> Any:
    """A template's value as printed: text redacted and on one line; markup the
    templates built themselves, numbers and None as they are."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return "" if value is None else value
    return displayed(value)


def json_lines(value: Any) -> list[str]:
    """A JSON value pretty-printed, as lines (each shown on its own)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str).split("\n")


def text_lines(text: str) -> list[str]:
    """A text (a dead letter's body) as lines, each shown on its own."""
    return text.splitlines() or [""]
