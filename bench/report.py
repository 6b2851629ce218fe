"""The human side of a result: rich tables printed after a run (or re-printed from a
saved JSON with ``python -m bench --show FILE``)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = ("kafka", "rabbitmq", "temporal")
TITLES = {
    "kafka": "saga-engine Kafka+PG",
    "rabbitmq": "saga-engine RabbitMQ+PG",
    "temporal": "Temporal dev (SQLite)",
}

MAIN_ROWS = [
    ("throughput at saturation (sagas/s)", "saturation.throughput", 1),
    ("  start rate of the clients (sagas/s)", "saturation.start_rate", 0),
    ("half-rate load (sagas/s, Poisson)", "half_rate.rate", 1),
    ("  latency p50 (ms)", "half_rate.latency.p50", 1),
    ("  latency p95 (ms)", "half_rate.latency.p95", 1),
    ("  latency p99 (ms)", "half_rate.latency.p99", 1),
    ("single saga on idle system p50 (ms)", "idle.latency.p50", 1),
    ("  p95 (ms)", "idle.latency.p95", 1),
    ("  p99 (ms)", "idle.latency.p99", 1),
    ("latency at saturation p50 (ms)", "saturation.latency.p50", 0),
    ("10% fail at last step: throughput (sagas/s)", "fail10.throughput", 1),
    ("  latency at saturation p50 (ms)", "fail10.latency.p50", 0),
    ("  compensated sagas per run", "fail10.outcomes.compensated", 0),
]


def fmt(cell: dict[str, Any] | None, digits: int = 1) -> str:
    if not cell or cell.get("median") is None or math.isnan(cell["median"]):
        return "-"
    med, lo, hi = cell["median"], cell["min"], cell["max"]
    if len(cell.get("runs", [])) <= 1 or lo == hi:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} [dim]({lo:,.{digits}f}-{hi:,.{digits}f})[/]"


def machine(console: Console, m: dict[str, Any], meta: dict[str, Any]) -> None:
    pg = m.get("postgresql", {})
    console.print(
        f"[bold]Machine[/] {m['cpu_model']}, {m['cores_logical']} cores, {m['memory_gib']} GiB, "
        f"{m['os']}, Python {m['python']}; load average at start "
        f"{m['load_average_at_start']}, at end {meta.get('load_average_at_end')}"
    )
    p = m["packages"]
    console.print(
        f"[bold]Versions[/] saga-engine {p['saga-engine']} ({m['git_commit']}), "
        f"PostgreSQL {pg.get('server_version')} (synchronous_commit={pg.get('synchronous_commit')},"
        f" fsync={pg.get('fsync')}), Kafka {m.get('kafka')}, RabbitMQ {m.get('rabbitmq')}, "
        f"{m.get('temporal_cli')}, temporalio {p['temporalio']}, SQLAlchemy {p['sqlalchemy']}, "
        f"asyncpg {p['asyncpg']}, aiokafka {p['aiokafka']}, aio-pika {p['aio-pika']}"
    )
    cfg = meta.get("config", {})
    console.print(
        f"[bold]Run[/] {cfg.get('reps')} runs per system (median, [dim](min-max)[/]), "
        f"{cfg.get('clients')} client coroutines, worker concurrency "
        f"{cfg.get('worker_concurrency')}, {meta.get('duration_s', 0):.0f}s in all. "
        "Shared 2-core machine: other work ran beside it, so expect noise."
    )


def main_table(console: Console, systems: dict[str, Any]) -> None:
    present = [s for s in COLUMNS if s in systems]
    table = Table(title="Order saga, 3 steps, trivial business work", title_justify="left")
    table.add_column("metric")
    for s in present:
        table.add_column(TITLES[s], justify="right")
    for label, path, digits in MAIN_ROWS:
        cells = []
        for s in present:
            summary = systems[s].get("summary")
            cells.append(fmt(summary.get(path), digits) if summary else "[red]failed[/]")
        table.add_row(label, *cells)
    sizes = [str(systems[s].get("sagas_per_saturation_run", "-")) for s in present]
    table.add_row("[dim]sagas per saturation run[/]", *sizes)
    console.print(table)
    for s in present:
        if "error" in systems[s]:
            console.print(f"[red]{TITLES[s]}: {systems[s]['error']}")


def incidents(console: Console, result: dict[str, Any]) -> None:
    """Runs during which a process logged warnings or errors (a broker restart by
    someone else's test, say): their numbers are kept but should be read with that."""
    found = []
    for name, system in result.get("systems", {}).items():
        for run in system.get("runs", []):
            n = run.get("incidents", {}).get("count", 0)
            if n:
                first = run["incidents"]["first"][0]
                found.append(
                    f"{TITLES[name]} run {run['rep']}: {n} warnings/errors, first: {first}"
                )
    for broker, e in result.get("engines", {}).items():
        for run in e.get("2", {}).get("runs", []):
            n = run.get("incidents", {}).get("count", 0)
            if n:
                found.append(f"{TITLES[broker]} 2 engines run {run['rep']}: {n} warnings/errors")
    n = result.get("scale", {}).get("incidents", {}).get("count", 0)
    if n:
        found.append(f"growth run: {n} warnings/errors")
    for line in found:
        console.print(f"[yellow]disturbed: {line}[/]", overflow="fold")


def ratio_table(console: Console, ratios: dict[str, dict[str, float]]) -> None:
    if not ratios:
        return
    table = Table(title="saga-engine / Temporal (medians)", title_justify="left")
    table.add_column("metric")
    table.add_column("better when")
    for broker in ratios:
        table.add_column(TITLES[broker], justify="right")
    rows = [
        ("throughput", "throughput", "> 1"),
        ("throughput, 10% failing", "throughput_fail10", "> 1"),
        ("half-rate latency p50", "half_rate_p50", "< 1"),
        ("half-rate latency p95", "half_rate_p95", "< 1"),
        ("half-rate latency p99", "half_rate_p99", "< 1"),
        ("idle latency p50", "idle_p50", "< 1"),
        ("idle latency p99", "idle_p99", "< 1"),
    ]
    for label, key, better in rows:
        table.add_row(label, better, *(f"{ratios[b].get(key, math.nan):.2f}x" for b in ratios))
    console.print(table)


def per_group_table(
    console: Console, systems: dict[str, Any], title: str, prefix: str, digits: int
) -> None:
    present = [s for s in COLUMNS if systems.get(s, {}).get("summary")]
    groups: list[str] = []
    for s in present:
        for path in systems[s]["summary"]:
            if path.startswith(prefix):
                name = path[len(prefix) :]
                if name not in groups:
                    groups.append(name)
    if not groups:
        return
    table = Table(title=title, title_justify="left")
    table.add_column("process")
    for s in present:
        table.add_column(TITLES[s], justify="right")
    for g in groups:
        shared = g in ("kafka", "rabbitmq", "postgres bg")
        label = f"{g} [dim](shared service)[/]" if shared else g
        table.add_row(label, *(fmt(systems[s]["summary"].get(prefix + g), digits) for s in present))
    console.print(table)


def engines_table(console: Console, engines: dict[str, Any]) -> None:
    if not engines:
        return
    table = Table(title="Throughput by engine processes (sagas/s)", title_justify="left")
    table.add_column("broker")
    table.add_column("1 engine", justify="right")
    table.add_column("2 engines", justify="right")
    for broker, e in engines.items():
        two = e["2"]
        cell = fmt(two["summary"]["saturation.throughput"]) if "summary" in two else two["error"]
        table.add_row(TITLES[broker], fmt(e["1"]), cell)
    console.print(table)


def scale_table(console: Console, scale: dict[str, Any]) -> None:
    if not scale:
        return
    if "error" in scale:
        console.print(f"[red]scale run: {scale['error']}")
        return
    points = scale["checkpoints"][1:]
    if scale.get("stopped_early"):
        console.print(f"[yellow]growth run stopped early: {scale['stopped_early']}[/]")
    table = Table(
        title=f"Growth: saga-engine/{scale['broker']}, {points[-1]['sagas']:,} of "
        f"{scale['total']:,} sagas in {scale['seconds']:.0f}s (closed loop)",
        title_justify="left",
    )
    table.add_column("process")
    for w in scale["windows"]:
        table.add_column(f"CPU ms/saga {w['from']:,}-{w['to']:,}", justify="right")
    for p in points:
        table.add_column(f"MiB at {p['sagas']:,}", justify="right")
    table.add_column("memory within 10%", justify="right")
    for group, growth in scale["memory_growth"].items():
        flat = "[green]yes[/]" if growth["within_10pct"] else "[red]no[/]"
        if not growth.get("own"):
            flat = f"[dim]{'yes' if growth['within_10pct'] else 'no'} (not saga-engine)[/]"
        table.add_row(
            group,
            *(f"{w['cpu_ms_per_saga'].get(group, math.nan):.2f}" for w in scale["windows"]),
            *(f"{p['memory_mib'].get(group, math.nan):.1f}" for p in points),
            f"{flat} {100 * growth['change']:+.1f}%",
        )
    table.add_row(
        "[dim]database size[/]",
        *("" for _ in scale["windows"]),
        *(f"{p['database_mib']:.0f}" for p in points),
        "",
    )
    table.add_row(
        "[dim]throughput (sagas/s)[/]",
        *(f"{w['throughput']:.1f}" for w in scale["windows"]),
        *("" for _ in points),
        "",
    )
    console.print(table)
    verdict = "stayed" if scale["own_processes_flat"] else "did NOT stay"
    first, last = scale["checkpoints"][-2]["sagas"], scale["checkpoints"][-1]["sagas"]
    console.print(
        f"RSS of saga-engine's processes (engine, workers) {verdict} within 10% "
        f"between {first:,} and {last:,} sagas."
    )


def profile_tables(console: Console, profile: dict[str, Any], top: int = 10) -> None:
    if not profile:
        return
    if "error" in profile:
        console.print(f"[red]profile: {profile['error']}")
        return
    console.print(
        f"[bold]Profile[/] (py-spy, {profile['seconds']:g}s at "
        f"{profile['throughput_while_profiled']:.0f} sagas/s on {profile['broker']}); "
        "percent of each process's busy samples"
    )
    for name in ("engine", "inventory", "payment", "shipment"):
        p = profile.get(name)
        if not p:
            continue
        if "error" in p:
            console.print(f"[red]{name}: {p['error']}")
            continue
        n = top if name == "engine" else 5
        busy = (
            f"{p['cpu_percent']:.0f}% of a core busy "
            f"({p['cpu_user_s']:.1f}s user, {p['cpu_system_s']:.1f}s system)"
            if "cpu_percent" in p
            else ""
        )
        table = Table(title=f"{name}: {p['samples']} busy samples, {busy}", title_justify="left")
        lists = [p[k][:n] for k in ("self_by_package", "self_by_function", "inclusive_by_function")]
        for heading in ("self by package", "self by function", "inclusive by function"):
            table.add_column(heading, overflow="fold")
            table.add_column("%", justify="right")
        for i in range(max(len(x) for x in lists)):
            row: list[str] = []
            for entries in lists:
                entry = entries[i] if i < len(entries) else {"name": "", "percent": ""}
                row += [entry["name"], str(entry["percent"])]
            table.add_row(*row)
        console.print(table)
        calls = ", ".join(f"{c['name']} {c['percent']}%" for c in p.get("syscalls_by_caller", []))
        if calls:
            console.print(f"  [dim]{name} in system calls: {calls}[/]")


def render(console: Console, result: dict[str, Any]) -> None:
    machine(console, result["machine"], result)
    systems = result.get("systems", {})
    main_table(console, systems)
    incidents(console, result)
    ratio_table(console, result.get("ratios", {}))
    per_group_table(
        console,
        systems,
        "CPU ms per saga at saturation (all outcomes completed)",
        "saturation.cpu_ms_per_saga.",
        2,
    )
    per_group_table(
        console, systems, "Peak memory per process group (MiB; PostgreSQL: PSS)", "peak_mib.", 1
    )
    engines_table(console, result.get("engines", {}))
    scale_table(console, result.get("scale", {}))
    profile_tables(console, result.get("profile", {}))
    if result.get("json_path"):
        console.print(f"All numbers: {result['json_path']}")
