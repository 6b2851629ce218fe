"""What the workload driver needs from a benchmarked system."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bench.procs import Monitor


@dataclass(frozen=True)
class Finish:
    #: Wall-clock time the system durably recorded the saga's end.
    end: float
    #: "completed", "compensated", or the terminal state it was left in.
    outcome: str


class System(Protocol):
    label: str
    monitor: Monitor

    async def start_saga(self, index: int, *, fail_last: bool) -> str:
        """Start one order saga; returns its key."""
        ...

    async def wait_one(self, key: str, timeout: float) -> None:
        """Return once this saga has ended (used for sequential, idle latency)."""
        ...

    async def wait_settled(self, count: int, timeout: float) -> bool:
        """Wait until none of the ``count`` sagas started so far is still running;
        False on timeout. Cheap: it runs inside the CPU-measuring window."""
        ...

    async def finishes(self, keys: Sequence[str]) -> dict[str, Finish]:
        """End times of these sagas (those that have ended)."""
        ...

    async def settled_count(self) -> int:
        """How many sagas started so far have ended (polled by the scale run)."""
        ...

    def incidents(self) -> list[str]:
        """Warnings and errors its processes logged so far (e.g. a broker restarted
        by someone else's test): a run with incidents is marked in the report."""
        ...


def incident_lines(text: str, markers: tuple[str, ...], ignore: tuple[str, ...] = ()) -> list[str]:
    return [
        line.strip()[:300]
        for line in text.splitlines()
        if any(m in line for m in markers) and not any(i in line for i in ignore)
    ]
