"""Test-only saga definitions for the size limits, loaded next to ``sagas.order``
(``SAGA_SAGAS=sagas.order,tests.limit_sagas``) so engine processes can serve them.

``big_charge`` is the order saga whose charge command comes out at 1.2 MB: over the
default ``SAGA_MAX_MESSAGE_BYTES`` and over Kafka's own 1 MiB record limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine import Saga, StepContext
from engine.definition import Builder, build_payload
from sagas import order

#: Characters of padding in ``big_charge``'s charge command.
BIG_CHARGE_PADDING = 1_200_000


def padded(command: Builder, padding: int) -> Builder:
    """``command``, with a ``memo`` of ``padding`` characters added to its payload."""

    def build(ctx: StepContext) -> dict[str, Any]:
        return {**build_payload(command, ctx), "memo": "m" * padding}

    return build


def with_big_charge(name: str, padding: int) -> Saga:
    """The order saga under another name, its charge command padded."""
    reserve, charge, ship = order.place_order.steps
    big = dataclasses.replace(charge, command=padded(charge.command, padding))
    return Saga(name=name, version=1, input=order.OrderInput, steps=[reserve, big, ship])


big_charge = with_big_charge("big_charge", BIG_CHARGE_PADDING)
