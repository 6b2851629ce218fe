"""CPU seconds and peak memory of the processes a benchmarked system is made of.

A group is a named set of processes, re-resolved at every look because some of them
come and go (PostgreSQL backends) or are found only by a listening port (the brokers,
which serve everyone on this machine: their numbers include other load).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import psutil

MiB = 1024 * 1024

PidSource = Callable[[], Awaitable[set[int]]]


@dataclass
class Group:
    name: str
    pids: PidSource
    #: The processes also serve other users of this machine (shared services).
    shared: bool = False
    #: Part of the system under test itself (engine, workers, Temporal worker), as
    #: opposed to the services it uses and the benchmark's own client.
    own: bool = False
    #: "pss" for process families sharing memory (PostgreSQL's shared buffers would be
    #: counted once per backend in RSS); "rss" otherwise.
    memory: str = "rss"


def fixed(*pids: int) -> PidSource:
    async def source() -> set[int]:
        return set(pids)

    return source


def with_children(pids: Iterable[int]) -> set[int]:
    out: set[int] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return out


def listener_pid(port: int) -> int | None:
    """The process listening on ``port`` on this machine (needs root for others')."""
    for conn in psutil.net_connections(kind="tcp"):
        listening = conn.status == psutil.CONN_LISTEN and conn.laddr
        if listening and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def listener(port: int) -> PidSource:
    """The listener on ``port`` and its children, looked up once."""
    found: set[int] = set()

    async def source() -> set[int]:
        if not found:
            pid = await asyncio.to_thread(listener_pid, port)
            if pid is not None:
                found.update(with_children([pid]))
        return set(found)

    return source


class _Processes:
    """psutil handles by pid, dropped when the pid is gone or reused."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def get(self, pid: int) -> psutil.Process | None:
        proc = self._procs.get(pid)
        if proc is not None and proc.is_running():
            return proc
        try:
            proc = self._procs[pid] = psutil.Process(pid)
        except psutil.Error:
            self._procs.pop(pid, None)
            return None
        return proc


@dataclass
class Monitor:
    """Samples memory of every group in the background; snapshots CPU on demand."""

    groups: list[Group]
    interval: float = 0.5
    peak_mib: dict[str, float] = field(default_factory=dict)
    _procs: _Processes = field(default_factory=_Processes)
    _task: asyncio.Task[None] | None = None

    async def resolve(self) -> dict[str, set[int]]:
        return {g.name: await g.pids() for g in self.groups}

    async def cpu(self) -> dict[str, dict[int, float]]:
        """Per group, each process's user + system CPU seconds so far."""
        out: dict[str, dict[int, float]] = {}
        for name, pids in (await self.resolve()).items():
            times: dict[int, float] = {}
            for pid in pids:
                proc = self._procs.get(pid)
                if proc is None:
                    continue
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    times[pid] = t.user + t.system
            out[name] = times
        return out

    @staticmethod
    def cpu_delta(
        before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
    ) -> dict[str, float]:
        """CPU seconds spent between two snapshots; a process that appeared in between
        counts from its start, one that exited in between is lost (rare: pools)."""
        return {
            name: sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in times.items())
            for name, times in after.items()
        }

    async def memory(self) -> dict[str, float]:
        """Current memory of each group in MiB (RSS, or PSS for "pss" groups)."""
        out: dict[str, float] = {}
        pids = await self.resolve()
        for group in self.groups:
            total = 0
            for pid in pids[group.name]:
                proc = self._procs.get(pid)
                if proc is None:
                    continue
                with contextlib.suppress(psutil.Error):
                    if group.memory == "pss":
                        total += proc.memory_full_info().pss
                    else:
                        total += proc.memory_info().rss
            out[group.name] = total / MiB
        return out

    async def sample(self) -> dict[str, float]:
        now = await self.memory()
        for name, mib in now.items():
            self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), mib)
        return now

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                await self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="bench-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(psutil.Error):
            await self.sample()
