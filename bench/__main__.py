"""``python -m bench``: run the benchmark, print the tables, save every number as JSON.

``bench/run`` is the one-command entry point: it installs the ``bench`` extra and
makes sure the services run first, then calls this.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bench import machine, report
from bench.scenarios import BROKERS, Config, run_all

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = (*BROKERS, "temporal")


def count(text: str) -> int:
    """``10k``, ``100k``, ``2500``, or ``none`` / ``0``."""
    text = text.strip().lower()
    if text in ("none", "no", "off", "0", ""):
        return 0
    if text.endswith("k"):
        return int(float(text[:-1]) * 1000)
    return int(text)


def clean(value: Any) -> Any:
    """JSON without NaN (not JSON) and with paths as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


async def main(cfg: Config, json_path: Path, console: Console) -> dict[str, Any]:
    began = time.perf_counter()
    temporal = None
    if "temporal" in cfg.systems:
        from bench.temporal import temporal_version

        temporal = temporal_version()
    described = await machine.describe(
        postgres_url=cfg.postgres_url,
        kafka_url=cfg.kafka_url if "kafka" in cfg.systems else None,
        amqp_url=cfg.amqp_url if "rabbitmq" in cfg.systems else None,
        temporal=temporal,
    )
    result: dict[str, Any] = {
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": described,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if not k.endswith("_url")},
    }
    result |= await run_all(cfg, console)
    result["duration_s"] = time.perf_counter() - began
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["json_path"] = str(json_path)
    return result


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(result), indent=2) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="smoke run: 1 run each, small and short (~2 min)")
@click.option(
    "--only",
    type=click.Choice(["idle"]),
    help="only this phase: idle = warm-up, then the idle-latency run (no saturation, "
    "half-rate, 10%-failing, 2-engine or growth runs)",
)
@click.option(
    "--systems",
    default=",".join(SYSTEMS),
    show_default=True,
    help="comma-separated: kafka, rabbitmq (saga-engine over each), temporal",
)
@click.option(
    "--reps",
    type=click.IntRange(0, 20),
    help="runs per system [default 3; quick 1]; 0: only the growth run / profile",
)
@click.option("--sagas", type=click.IntRange(1), help="sagas per saturation run [default: sized]")
@click.option(
    "--seconds",
    type=click.FloatRange(1),
    help="target length of a saturation run, used to size it [default 15; quick 4]",
)
@click.option(
    "--clients",
    type=click.IntRange(1, 256),
    default=32,
    show_default=True,
    # 8 could not start sagas as fast as saga-engine finished them over Kafka.
    help="client coroutines starting sagas at saturation",
)
@click.option(
    "--worker-concurrency",
    type=click.IntRange(1, 1000),
    default=8,
    show_default=True,
    help="sagactl worker --concurrency for the three saga-engine workers",
)
@click.option(
    "--idle-samples",
    type=click.IntRange(1),
    help="sequential sagas for idle latency [default 100; quick 15]",
)
@click.option(
    "--open-seconds",
    type=click.FloatRange(1),
    help="length of the half-rate open-loop run [default 15; quick 4]",
)
@click.option(
    "--scale",
    "scale_text",
    help="growth run to this many sagas: 10k, 100k (long), none [default 10k; quick none]",
)
@click.option("--engines2/--no-engines2", default=None, help="also 2 engine processes [default on]")
@click.option("--profile", is_flag=True, help="py-spy the engine and workers under load")
@click.option(
    "--profile-seconds",
    type=click.FloatRange(2),
    default=20,
    show_default=True,
    help="how long py-spy samples each process",
)
@click.option("--output", type=click.Path(path_type=Path), help="JSON file to write")
@click.option(
    "--show",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="print the tables of a saved result and exit",
)
def cli(
    quick: bool,
    only: str | None,
    systems: str,
    reps: int | None,
    sagas: int | None,
    seconds: float | None,
    clients: int,
    worker_concurrency: int,
    idle_samples: int | None,
    open_seconds: float | None,
    scale_text: str | None,
    engines2: bool | None,
    profile: bool,
    profile_seconds: float,
    output: Path | None,
    show: Path | None,
) -> None:
    """Benchmark saga-engine (Kafka / RabbitMQ + PostgreSQL) against Temporal."""
    # Wide enough for the tables when the output goes to a file or a pipe.
    console = Console(width=None if sys.stdout.isatty() else 150)
    if show is not None:
        report.render(console, json.loads(show.read_text()))
        return
    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise click.BadParameter(
            f"unknown {unknown}; choose from {SYSTEMS}", param_hint="--systems"
        )
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = output or RESULTS / f"{stamp}.json"
    cfg = Config(
        postgres_url=os.environ.get(
            "SAGA_TEST_POSTGRES_URL", "postgresql+asyncpg://saga:saga@127.0.0.1:5432/saga"
        ),
        kafka_url=os.environ.get("SAGA_TEST_KAFKA_URL", "kafka://127.0.0.1:9092"),
        amqp_url=os.environ.get("SAGA_TEST_AMQP_URL", "amqp://saga:saga@127.0.0.1:5672/"),
        work_dir=json_path.parent / json_path.stem,
        systems=chosen,
        clients=clients,
        worker_concurrency=worker_concurrency,
        profile=profile,
        profile_seconds=profile_seconds,
    )
    if quick:
        cfg = dataclasses.replace(
            cfg,
            reps=1,
            warmup=10,
            calibration=50,
            target_seconds=4,
            min_sagas=20,
            idle_samples=15,
            open_seconds=4,
            engines2=False,
            scale=0,
            timeout=120,
        )
    overrides: dict[str, Any] = {}
    if reps is not None:
        overrides["reps"] = reps
    if sagas is not None:
        overrides |= {"sagas": sagas, "warmup": min(cfg.warmup, sagas)}
    if seconds is not None:
        overrides["target_seconds"] = seconds
    if idle_samples is not None:
        overrides["idle_samples"] = idle_samples
    if open_seconds is not None:
        overrides["open_seconds"] = open_seconds
    if scale_text is not None:
        overrides["scale"] = count(scale_text)
    if engines2 is not None:
        overrides["engines2"] = engines2
    if only == "idle":
        overrides |= {"idle_only": True, "engines2": False, "scale": 0, "profile": False}
    cfg = dataclasses.replace(cfg, **overrides)
    result = asyncio.run(main(cfg, json_path, console))
    save(result, json_path)
    report.render(console, result)
    failed = [n for n, s in result["systems"].items() if "error" in s]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    cli()
