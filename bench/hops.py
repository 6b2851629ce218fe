"""Where the idle latency goes, hop by hop: ``python -m bench.hops``.

Starts saga-engine as the benchmark does (``sagactl engine`` and three workers on a
fresh PostgreSQL database), runs sagas one at a time on the idle system, and reads the
timestamps the system records itself, per step:

* ``relay``: the command's outbox row written -> its publish confirmed (``sent_at``);
  the relay's wake-up, the claim, and the broker round trip;
* ``to worker``: publish confirmed -> the worker's barrier row (its transaction has
  begun: consumer fetch, decode);
* ``back``: barrier row -> the engine's transition on the reply (the worker's commit,
  the reply's publish and confirm, the engine's fetch and its inbox claim).

The last column is the end-to-end latency as ``bench`` measures it.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import click

from bench.sagaengine import SagaEngineSystem
from bench.workload import warmup

RESULTS = Path(__file__).resolve().parent / "results"


async def measure(broker: str, samples: int, gap: float) -> list[dict[str, Any]]:
    url = (
        os.environ.get("SAGA_TEST_KAFKA_URL", "kafka://127.0.0.1:9092")
        if broker == "kafka"
        else os.environ.get("SAGA_TEST_AMQP_URL", "amqp://saga:saga@127.0.0.1:5672/")
    )
    postgres = os.environ.get(
        "SAGA_TEST_POSTGRES_URL", "postgresql+asyncpg://saga:saga@127.0.0.1:5432/saga"
    )
    out: list[dict[str, Any]] = []
    async with SagaEngineSystem(
        broker=broker, broker_url=url, postgres_url=postgres, log_dir=RESULTS / "hops"
    ) as system:
        await warmup(system, 20, timeout=120)
        cpu_before = await system.monitor.cpu()
        for i in range(samples):
            began = time.time()
            key = await system.start_saga(i, fail_last=False)
            await system.wait_one(key, 60)
            out.append(await _timeline(system, key, began))
            await asyncio.sleep(gap)
        cpu = system.monitor.cpu_delta(cpu_before, await system.monitor.cpu())
    # CPU per saga of each process group (the reading of timelines included: small).
    out.append({"cpu_ms_per_saga": {g: 1000 * s / samples for g, s in cpu.items()}})
    return out


async def _timeline(system: SagaEngineSystem, saga_id: str, began: float) -> dict[str, Any]:
    pool = system._pool
    assert pool is not None
    ep = "extract(epoch FROM {})::float8"
    saga = await pool.fetchrow(
        f"SELECT {ep.format('updated_at')} AS end_at FROM saga_instances WHERE id = $1", saga_id
    )
    steps = await pool.fetch(
        f"SELECT name, position, {ep.format('finished_at')} AS finished "
        "FROM saga_steps WHERE saga_id = $1 ORDER BY position",
        saga_id,
    )
    sent = await pool.fetch(
        f"SELECT {ep.format('created_at')} AS created, {ep.format('sent_at')} AS sent "
        "FROM saga_outbox WHERE key = $1 ORDER BY id",
        saga_id,
    )
    barrier = await pool.fetch(
        f"SELECT step, {ep.format('created_at')} AS at FROM participant_barrier "
        "WHERE saga_id = $1 AND op = 'action'",
        saga_id,
    )
    at_worker = {r["step"]: r["at"] for r in barrier}
    hops: list[tuple[float, float, float]] = []
    for step, row in zip(steps, sent, strict=False):
        worker = at_worker.get(step["name"], float("nan"))
        hops.append((row["sent"] - row["created"], worker - row["sent"], step["finished"] - worker))
    return {
        "start_to_first_row": sent[0]["created"] - began if sent else float("nan"),
        "hops": hops,
        "total": saga["end_at"] - began,
    }


def report(rows: list[dict[str, Any]]) -> None:
    cpu = rows.pop()["cpu_ms_per_saga"]

    def med(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):6.1f}"

    print(f"{len(rows)} sagas, medians in ms")
    print(f"  client start -> command row      {med([r['start_to_first_row'] for r in rows])}")
    steps = min(len(r["hops"]) for r in rows)
    for i in range(steps):
        relay = [r["hops"][i][0] for r in rows]
        worker = [r["hops"][i][1] for r in rows]
        back = [r["hops"][i][2] for r in rows]
        print(
            f"  step {i + 1}: relay {med(relay)}  to worker {med(worker)}  "
            f"back to engine {med(back)}"
        )
    print(f"  end to end                       {med([r['total'] for r in rows])}")
    print("CPU ms per saga (the idle run, polling loops included):")
    for group, ms in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<28} {ms:6.2f}")


@click.command()
@click.option("--broker", type=click.Choice(["kafka", "rabbitmq"]), default="kafka")
@click.option("--samples", type=click.IntRange(1), default=30)
@click.option("--gap", type=float, default=0.02)
def cli(broker: str, samples: int, gap: float) -> None:
    """Idle latency of saga-engine split into its hops."""
    rows = asyncio.run(measure(broker, samples, gap))
    report(rows)
    sys.exit(0)


if __name__ == "__main__":
    cli()
