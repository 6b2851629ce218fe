"""Broker transports behind one small protocol."""

from engine.transport.base import (
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE,
    Delivery,
    Message,
    Subscription,
    Transport,
)

__all__ = [
    "DEAD_LETTER_REASON",
    "DEAD_LETTER_SOURCE",
    "Delivery",
    "Message",
    "Subscription",
    "Transport",
]
