"""The workload phases, the same for every system.

Latency is always "end recorded by the system" minus "when the client asked": for
open-loop arrivals the scheduled arrival time, so a client that falls behind shows up
as latency instead of silently lowering the load.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.stats import latency_summary
from bench.system import Finish, System


class PhaseError(RuntimeError):
    pass


def fails(index: int, fail_ratio: float) -> bool:
    """Exactly ``fail_ratio`` of consecutive orders fail, spread evenly."""
    if fail_ratio <= 0:
        return False
    every = round(1 / fail_ratio)
    return index % every == every - 1


@dataclass
class Batch:
    starts: dict[str, float]
    finishes: dict[str, Finish]

    def latencies(self) -> list[float]:
        return [f.end - self.starts[k] for k, f in self.finishes.items()]

    def outcomes(self) -> dict[str, int]:
        counts = Counter(f.outcome for f in self.finishes.values())
        counts["unfinished"] = len(self.starts) - len(self.finishes)
        return dict(counts)

    def throughput(self) -> float:
        if not self.finishes:
            return 0.0
        span = max(f.end for f in self.finishes.values()) - min(self.starts.values())
        return len(self.finishes) / span if span > 0 else 0.0


async def _settle(system: System, starts: dict[str, float], timeout: float) -> Batch:
    if not await system.wait_settled(len(starts), timeout):
        raise PhaseError(f"{system.label}: sagas still running after {timeout:g}s")
    return Batch(starts, await system.finishes(list(starts)))


async def warmup(system: System, n: int, *, timeout: float) -> None:
    """Connections, consumer-group joins and caches, before anything is measured."""
    starts = {}
    for i in range(n):
        began = time.time()
        starts[await system.start_saga(i, fail_last=fails(i, 0.1))] = began
    await _settle(system, starts, timeout)


async def idle(system: System, samples: int, *, gap: float, timeout: float) -> dict[str, Any]:
    """One saga at a time on an otherwise idle system."""
    starts: dict[str, float] = {}
    for i in range(samples):
        began = time.time()
        key = await system.start_saga(i, fail_last=False)
        starts[key] = began
        await system.wait_one(key, timeout)
        await asyncio.sleep(gap)
    batch = Batch(starts, await system.finishes(list(starts)))
    return {"samples": samples, "latency": latency_summary(batch.latencies())}


async def saturate(
    system: System, n: int, *, clients: int, fail_ratio: float, timeout: float
) -> dict[str, Any]:
    """Start ``n`` sagas as fast as ``clients`` coroutines can, wait for all to end.

    Throughput = sagas ended / (last end - first start). CPU is measured over the same
    window, per process group.
    """
    starts: dict[str, float] = {}
    indexes = itertools.count()

    async def client() -> None:
        for i in indexes:
            if i >= n:
                return
            began = time.time()
            key = await system.start_saga(i, fail_last=fails(i, fail_ratio))
            starts[key] = began

    cpu_before = await system.monitor.cpu()
    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    start_seconds = time.perf_counter() - began
    settled = await system.wait_settled(n, timeout)
    cpu_after = await system.monitor.cpu()
    if not settled:
        raise PhaseError(f"{system.label}: sagas still running after {timeout:g}s")
    batch = Batch(starts, await system.finishes(list(starts)))
    cpu = system.monitor.cpu_delta(cpu_before, cpu_after)
    done = max(len(batch.finishes), 1)
    return {
        "sagas": n,
        "fail_ratio": fail_ratio,
        "throughput": batch.throughput(),
        "start_rate": n / start_seconds if start_seconds > 0 else 0.0,
        "outcomes": batch.outcomes(),
        "latency": latency_summary(batch.latencies()),
        "cpu_s": cpu,
        "cpu_ms_per_saga": {name: 1000 * s / done for name, s in cpu.items()},
    }


async def open_loop(
    system: System, rate: float, seconds: float, *, timeout: float, seed: int = 1
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second for ``seconds``, each start its own task."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    wall0, mono0 = time.time(), loop.time()
    starts: dict[str, float] = {}
    tasks: list[asyncio.Task[None]] = []

    async def arrive(index: int, scheduled: float) -> None:
        key = await system.start_saga(index, fail_last=False)
        starts[key] = scheduled

    at = rng.expovariate(rate)
    for index in itertools.count():
        if at >= seconds:
            break
        delay = mono0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(arrive(index, wall0 + at)))
        at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    batch = await _settle(system, starts, timeout)
    return {
        "rate": rate,
        "seconds": seconds,
        "sagas": len(starts),
        "achieved_rate": len(starts) / seconds,
        "outcomes": batch.outcomes(),
        "latency": latency_summary(batch.latencies()),
    }


class ClosedLoop:
    """Keeps about ``window`` sagas in flight from ``clients`` coroutines, until
    ``total`` have ended or :meth:`stop` is called: a steady load for long runs,
    without an ever-growing backlog."""

    def __init__(
        self,
        system: System,
        *,
        window: int,
        clients: int,
        total: int | None = None,
        stall_timeout: float = 300.0,
        poll: float = 0.1,
    ) -> None:
        self.system = system
        self.window = window
        self.clients = clients
        self.total = total
        self.stall_timeout = stall_timeout
        self.poll = poll
        self.issued = 0
        self.settled = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_progress: Callable[[int], Awaitable[None]] | None = None) -> None:
        base = await self.system.settled_count()

        async def client() -> None:
            while not self._stop.is_set():
                if self.total is not None and self.issued >= self.total:
                    return
                if self.issued - self.settled >= self.window:
                    await asyncio.sleep(0.005)
                    continue
                self.issued += 1
                await self.system.start_saga(self.issued, fail_last=False)

        async def watch() -> None:
            progress_at = time.monotonic()
            while not self._stop.is_set():
                now = await self.system.settled_count() - base
                if now > self.settled:
                    progress_at = time.monotonic()
                self.settled = now
                if on_progress is not None:
                    await on_progress(now)
                if self.total is not None and now >= self.total:
                    self._stop.set()
                    return
                if time.monotonic() - progress_at > self.stall_timeout:
                    self._stop.set()
                    raise PhaseError(
                        f"{self.system.label}: no saga ended for {self.stall_timeout:g}s"
                    )
                await asyncio.sleep(self.poll)

        await asyncio.gather(watch(), *(client() for _ in range(self.clients)))
