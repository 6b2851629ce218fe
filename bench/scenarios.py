"""The benchmark's scenarios: repeated runs per system, 1 vs 2 engines, growth over
many sagas, and a profile of the engine under load."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import profiling
from bench.sagaengine import PARTICIPANTS, SagaEngineSystem
from bench.stats import summarize
from bench.system import System
from bench.temporal import TemporalSystem
from bench.workload import ClosedLoop, PhaseError, idle, open_loop, saturate, warmup

BROKERS = ("kafka", "rabbitmq")


@dataclass
class Config:
    postgres_url: str
    kafka_url: str
    amqp_url: str
    work_dir: Path
    systems: list[str] = field(default_factory=lambda: ["kafka", "rabbitmq", "temporal"])
    reps: int = 3
    #: Sagas per saturation run; None: sized from a calibration burst.
    sagas: int | None = None
    target_seconds: float = 15.0
    min_sagas: int = 100
    max_sagas: int = 50_000
    calibration: int = 200
    warmup: int = 50
    idle_samples: int = 100
    idle_gap: float = 0.02
    open_seconds: float = 15.0
    clients: int = 8
    worker_concurrency: int = 8
    fail_ratio: float = 0.1
    engines2: bool = True
    scale: int = 10_000
    scale_window: int = 256
    profile: bool = False
    profile_seconds: float = 20.0
    timeout: float = 300.0
    #: Only the warm-up and the idle-latency phase (``--only idle``).
    idle_only: bool = False

    def url(self, broker: str) -> str:
        return self.kafka_url if broker == "kafka" else self.amqp_url


Factory = Callable[[], AbstractAsyncContextManager[Any]]


def factory(cfg: Config, system: str, *, engines: int = 1) -> Factory:
    if system == "temporal":
        return lambda: TemporalSystem(work_dir=cfg.work_dir)
    return lambda: SagaEngineSystem(
        broker=system,
        broker_url=cfg.url(system),
        postgres_url=cfg.postgres_url,
        log_dir=cfg.work_dir,
        engines=engines,
        worker_concurrency=cfg.worker_concurrency,
    )


def summary_paths(runs: list[dict[str, Any]]) -> list[str]:
    paths = [
        "saturation.throughput",
        "saturation.start_rate",
        "saturation.latency.p50",
        "saturation.latency.p99",
        "half_rate.rate",
        "half_rate.achieved_rate",
        "half_rate.latency.p50",
        "half_rate.latency.p95",
        "half_rate.latency.p99",
        "idle.latency.p50",
        "idle.latency.p95",
        "idle.latency.p99",
        "fail10.throughput",
        "fail10.latency.p50",
        "fail10.latency.p99",
        "fail10.outcomes.compensated",
    ]
    groups = sorted({g for r in runs for g in r.get("peak_mib", {})})
    paths += [f"saturation.cpu_ms_per_saga.{g}" for g in groups]
    paths += [f"fail10.cpu_ms_per_saga.{g}" for g in groups]
    paths += [f"peak_mib.{g}" for g in groups]
    return paths


def incident_summary(lines: list[str]) -> dict[str, Any]:
    return {"count": len(lines), "first": lines[:10]}


def clamp_sagas(cfg: Config, throughput: float) -> int:
    return int(min(cfg.max_sagas, max(cfg.min_sagas, round(throughput * cfg.target_seconds))))


async def one_run(cfg: Config, system: System, sagas: int | None) -> tuple[int, dict[str, Any]]:
    """Warm up, then idle latency, saturation, half-rate open loop and the 10%-failing
    saturation, on one fresh system; returns the saturation size used and the run."""
    timeout = cfg.timeout
    run: dict[str, Any] = {}
    began = time.perf_counter()
    await warmup(system, cfg.warmup, timeout=timeout)
    if cfg.idle_only:
        run["idle"] = await idle(system, cfg.idle_samples, gap=cfg.idle_gap, timeout=60)
        run["wall_s"] = time.perf_counter() - began
        return sagas or 0, run
    if sagas is None:
        # Throughput can depend on the backlog (Temporal's falls as it grows), so a
        # probe far from the size it suggests is repeated once at that size.
        size, probes = cfg.calibration, []
        sagas = size
        for _ in range(2):
            probe = await saturate(system, size, clients=cfg.clients, fail_ratio=0, timeout=timeout)
            probes.append({"sagas": size, "throughput": probe["throughput"]})
            sagas = clamp_sagas(cfg, probe["throughput"])
            if 0.5 <= sagas / size <= 2:
                break
            size = sagas
        run["calibration"] = probes
    run["idle"] = await idle(system, cfg.idle_samples, gap=cfg.idle_gap, timeout=60)
    run["saturation"] = await saturate(
        system, sagas, clients=cfg.clients, fail_ratio=0, timeout=timeout
    )
    rate = max(0.5, run["saturation"]["throughput"] / 2)
    run["half_rate"] = await open_loop(system, rate, cfg.open_seconds, timeout=timeout)
    run["fail10"] = await saturate(
        system, sagas, clients=cfg.clients, fail_ratio=cfg.fail_ratio, timeout=timeout
    )
    run["wall_s"] = time.perf_counter() - began
    return sagas, run


async def system_runs(cfg: Config, name: str, console: Console) -> dict[str, Any]:
    """``cfg.reps`` runs of one system, each on fresh processes and storage."""
    runs: list[dict[str, Any]] = []
    sagas = cfg.sagas
    for rep in range(1, cfg.reps + 1):
        async with factory(cfg, name)() as system:
            system.monitor.start()
            try:
                sagas, run = await one_run(cfg, system, sagas)
            finally:
                await system.monitor.stop()
            run["peak_mib"] = dict(system.monitor.peak_mib)
            run["rep"] = rep
            run["incidents"] = incident_summary(system.incidents())
            label = system.label
        runs.append(run)
        idle_ = run["idle"]["latency"]
        if cfg.idle_only:
            console.log(
                f"{label} run {rep}/{cfg.reps}: idle p50 {idle_['p50']:.1f} ms, "
                f"p95 {idle_['p95']:.1f} ms, p99 {idle_['p99']:.1f} ms"
            )
            continue
        sat, half = run["saturation"], run["half_rate"]
        console.log(
            f"{label} run {rep}/{cfg.reps}: {sat['throughput']:.1f} sagas/s "
            f"({sagas} sagas), half rate p50 {half['latency']['p50']:.1f} ms, "
            f"idle p50 {idle_['p50']:.1f} ms, 10% fail {run['fail10']['throughput']:.1f}/s"
        )
    return {
        "label": label,
        "sagas_per_saturation_run": sagas,
        "runs": runs,
        "summary": summarize(runs, summary_paths(runs)),
    }


async def engines_runs(
    cfg: Config, broker: str, engines: int, sagas: int, console: Console
) -> dict[str, Any]:
    """Saturation throughput with several engine processes sharing the work."""
    runs: list[dict[str, Any]] = []
    for rep in range(1, cfg.reps + 1):
        async with factory(cfg, broker, engines=engines)() as system:
            system.monitor.start()
            try:
                await warmup(system, cfg.warmup, timeout=cfg.timeout)
                sat = await saturate(
                    system, sagas, clients=cfg.clients, fail_ratio=0, timeout=cfg.timeout
                )
            finally:
                await system.monitor.stop()
            run = {
                "saturation": sat,
                "peak_mib": dict(system.monitor.peak_mib),
                "rep": rep,
                "incidents": incident_summary(system.incidents()),
            }
        runs.append(run)
        console.log(
            f"saga-engine/{broker} with {engines} engines run {rep}/{cfg.reps}: "
            f"{sat['throughput']:.1f} sagas/s"
        )
    paths = ["saturation.throughput"] + [
        f"saturation.cpu_ms_per_saga.{g}" for g in sorted(runs[0]["saturation"]["cpu_s"])
    ]
    return {"engines": engines, "sagas": sagas, "runs": runs, "summary": summarize(runs, paths)}


def checkpoints(total: int) -> list[int]:
    marks = [m for m in (1_000, 10_000, 100_000) if m < total]
    return [*marks, total]


async def scale_run(cfg: Config, broker: str, total: int, console: Console) -> dict[str, Any]:
    """One long closed-loop run to ``total`` sagas: CPU per saga between checkpoints,
    and the memory of every process and the database size at each."""
    pending = checkpoints(total)
    points: list[dict[str, Any]] = []
    async with factory(cfg, broker)() as system:
        assert isinstance(system, SagaEngineSystem)
        system.monitor.start()
        began = time.perf_counter()

        async def point(sagas: int) -> None:
            entry: dict[str, Any] = {
                "sagas": sagas,
                "elapsed_s": time.perf_counter() - began,
                "cpu": await system.monitor.cpu(),
                "memory_mib": await system.monitor.memory(),
                "database_mib": await system.database_mib(),
            }
            points.append(entry)
            if sagas:
                # Everything a reader needs if a long run is cut short.
                memory = ", ".join(
                    f"{g.name} {entry['memory_mib'].get(g.name, 0):.1f}"
                    for g in system.monitor.groups
                    if g.own
                )
                console.log(
                    f"scale {broker}: {sagas} sagas in {entry['elapsed_s']:.0f}s, "
                    f"RSS MiB: {memory}; database {entry['database_mib']:.0f} MiB"
                )

        async def progress(settled: int) -> None:
            while pending and settled >= pending[0]:
                pending.pop(0)
                await point(settled)

        try:
            await warmup(system, cfg.warmup, timeout=cfg.timeout)
            began = time.perf_counter()
            await point(0)
            load = ClosedLoop(
                system,
                window=cfg.scale_window,
                clients=cfg.clients,
                total=total,
                stall_timeout=cfg.timeout,
            )
            stopped = None
            try:
                await load.run(progress)
            except PhaseError as exc:
                # A long run on shared services can lose its broker: keep what was
                # measured up to there, and say why it stopped.
                if len(points) < 2:
                    raise
                stopped = str(exc)
                await point(load.settled)
        finally:
            await system.monitor.stop()
        shared = {g.name for g in system.monitor.groups if g.shared}
        own = {g.name for g in system.monitor.groups if g.own}
        incidents = incident_summary(system.incidents())
    report = scale_report(broker, total, points, shared, own)
    return report | {"incidents": incidents, "stopped_early": stopped}


def scale_report(
    broker: str, total: int, points: list[dict[str, Any]], shared: set[str], own: set[str]
) -> dict[str, Any]:
    windows = []
    for a, b in itertools.pairwise(points):
        n = b["sagas"] - a["sagas"]
        cpu = {
            g: sum(t - a["cpu"].get(g, {}).get(pid, 0.0) for pid, t in times.items())
            for g, times in b["cpu"].items()
        }
        windows.append(
            {
                "from": a["sagas"],
                "to": b["sagas"],
                "seconds": b["elapsed_s"] - a["elapsed_s"],
                "throughput": n / max(b["elapsed_s"] - a["elapsed_s"], 1e-9),
                "cpu_ms_per_saga": {g: 1000 * s / max(n, 1) for g, s in cpu.items()},
            }
        )
    last, before = points[-1], points[-2] if len(points) > 2 else points[-1]
    growth = {}
    for group, mib in last["memory_mib"].items():
        prev = before["memory_mib"].get(group, 0.0)
        change = (mib - prev) / prev if prev else 0.0
        growth[group] = {
            "from_sagas": before["sagas"],
            "to_sagas": last["sagas"],
            "from_mib": prev,
            "to_mib": mib,
            "change": change,
            "within_10pct": abs(change) <= 0.10,
            "shared": group in shared,
            "own": group in own,
        }
    return {
        "broker": broker,
        "total": total,
        "seconds": last["elapsed_s"],
        "checkpoints": [
            {k: v for k, v in p.items() if k != "cpu"} | {"cpu_s": _sum_cpu(p["cpu"])}
            for p in points
        ],
        "windows": windows,
        "memory_growth": growth,
        # The target is about saga-engine's processes: PostgreSQL's PSS grows with the
        # shared buffers its backends touch, which is the database, not per-saga state.
        "own_processes_flat": all(g["within_10pct"] for g in growth.values() if g["own"]),
    }


def _sum_cpu(cpu: dict[str, dict[int, float]]) -> dict[str, float]:
    return {g: sum(times.values()) for g, times in cpu.items()}


async def profile_run(cfg: Config, broker: str, console: Console) -> dict[str, Any]:
    """py-spy on the engine and the three workers while a closed-loop load runs."""
    out: dict[str, Any] = {"broker": broker, "seconds": cfg.profile_seconds}
    async with factory(cfg, broker)() as system:
        assert isinstance(system, SagaEngineSystem)
        await warmup(system, cfg.warmup, timeout=cfg.timeout)
        targets = {"engine": system.pids("engine")[0]}
        targets |= {p: system.pids(p)[0] for p in PARTICIPANTS}
        files = {n: cfg.work_dir / f"profile-{broker}-{n}.txt" for n in targets}
        load = ClosedLoop(system, window=cfg.scale_window, clients=cfg.clients)
        running = asyncio.create_task(load.run())
        await asyncio.sleep(1)  # let the load reach its steady state first
        cpu_before = {n: profiling.cpu_times(pid) for n, pid in targets.items()}
        spies = {
            n: profiling.record(pid, files[n], cfg.profile_seconds) for n, pid in targets.items()
        }
        began, settled_before = time.perf_counter(), load.settled
        try:
            for spy in spies.values():
                await asyncio.to_thread(spy.wait)
        finally:
            elapsed = time.perf_counter() - began
            rate = (load.settled - settled_before) / elapsed
            cpu_after = {n: profiling.cpu_times(pid) for n, pid in targets.items()}
            load.stop()
            await running
        await system.wait_settled(0, cfg.timeout)
    out["throughput_while_profiled"] = rate
    for name, spy in spies.items():
        if spy.returncode != 0 or not files[name].exists():
            err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
            out[name] = {"error": f"py-spy exited {spy.returncode}: {err.strip()[-500:]}"}
            continue
        user = cpu_after[name][0] - cpu_before[name][0]
        system_ = cpu_after[name][1] - cpu_before[name][1]
        out[name] = profiling.summarize(files[name]) | {
            "raw": str(files[name]),
            # py-spy's percentages are of busy samples; these say how busy it was.
            "cpu_user_s": user,
            "cpu_system_s": system_,
            "cpu_percent": 100 * (user + system_) / elapsed,
        }
    console.log(f"profiled {', '.join(targets)} for {cfg.profile_seconds:g}s at {rate:.0f} sagas/s")
    return out


async def run_all(cfg: Config, console: Console) -> dict[str, Any]:
    results: dict[str, Any] = {"systems": {}}
    for name in cfg.systems if cfg.reps else []:
        try:
            results["systems"][name] = await system_runs(cfg, name, console)
        except Exception as exc:
            console.log(f"[red]{name} failed: {exc}")
            results["systems"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    results["ratios"] = ratios(results["systems"])
    brokers = [b for b in cfg.systems if b in BROKERS]
    if cfg.engines2:
        results["engines"] = {}
        for broker in brokers:
            sys_result = results["systems"].get(broker, {})
            sagas = sys_result.get("sagas_per_saturation_run")
            if not sagas:
                continue
            try:
                two = await engines_runs(cfg, broker, 2, sagas, console)
            except Exception as exc:
                console.log(f"[red]{broker} with 2 engines failed: {exc}")
                two = {"error": f"{type(exc).__name__}: {exc}"}
            one = sys_result["summary"]["saturation.throughput"]
            results["engines"][broker] = {"1": one, "2": two}
    if cfg.scale and brokers:
        try:
            results["scale"] = await scale_run(cfg, brokers[0], cfg.scale, console)
        except Exception as exc:
            console.log(f"[red]scale run failed: {exc}")
            results["scale"] = {"error": f"{type(exc).__name__}: {exc}"}
    if cfg.profile and brokers:
        try:
            results["profile"] = await profile_run(cfg, brokers[0], console)
        except Exception as exc:
            console.log(f"[red]profile failed: {exc}")
            results["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


RATIO_PATHS = {
    "throughput": "saturation.throughput",
    "throughput_fail10": "fail10.throughput",
    "half_rate_p50": "half_rate.latency.p50",
    "half_rate_p95": "half_rate.latency.p95",
    "half_rate_p99": "half_rate.latency.p99",
    "idle_p50": "idle.latency.p50",
    "idle_p99": "idle.latency.p99",
}


def ratios(systems: dict[str, Any]) -> dict[str, dict[str, float]]:
    """saga-engine / Temporal on the medians: above 1 is better for throughput,
    below 1 is better for latency."""
    temporal = systems.get("temporal", {}).get("summary")
    if not temporal:
        return {}
    out: dict[str, dict[str, float]] = {}
    for broker in BROKERS:
        mine = systems.get(broker, {}).get("summary")
        if not mine:
            continue
        out[broker] = {}
        for name, path in RATIO_PATHS.items():
            theirs = temporal.get(path, {}).get("median")
            ours = mine.get(path, {}).get("median")
            if theirs and ours is not None and theirs == theirs and ours == ours:
                out[broker][name] = ours / theirs
    return out
