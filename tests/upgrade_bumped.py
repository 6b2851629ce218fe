"""The same edit as tests/upgrade_edited.py done right: version 2 of the order saga."""

from __future__ import annotations

from dataclasses import replace

from tests import upgrade_edited

bumped_order = replace(upgrade_edited.edited_order, version=2)
