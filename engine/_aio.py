"""Small asyncio helpers shared by the engine's loops."""

from __future__ import annotations

import asyncio


async def wait_either(stop: asyncio.Event, other: asyncio.Event | None, timeout: float) -> None:
    """Sleep up to ``timeout``, waking early when either event is set."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if other is not None:
        waiters.append(asyncio.ensure_future(other.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
