"""The example order saga edited without a version bump (its last step removed): a
deployment ``sagactl check`` must flag (tests/test_upgrades.py)."""

from __future__ import annotations

from dataclasses import replace

from tests.helpers import fast_order_saga

edited_order = replace(fast_order_saga(), steps=fast_order_saga().steps[:-1])
