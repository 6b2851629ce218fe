"""The README's "Your own saga", followed literally.

Every fenced block of that section marked ``<!-- walkthrough: KIND [ARG] -->`` is
taken in order, as a user would take it, in one shell session (the working directory
and the exported variables carry from block to block, as in a terminal):

* ``install``: not run (no package index here). It must install saga-engine with
  pip; this repository's virtualenv, on ``PATH`` from the start, stands in for it.
* ``run``: run with bash as written; a failing command fails the test.
* ``env``: its ``export SAGA_...=`` lines, run as written, except that the database
  and the broker are this test's: a fresh PostgreSQL database and RabbitMQ. The
  topic prefix is the test's own too (set before, and not by the README).
* ``daemons``: each line's command (``sagactl ... &``) started in the background,
  from the session's directory and environment, stopped with SIGTERM at the end.
* ``file NAME``: the block saved as ``NAME``.
* ``excerpt PATH``: the block must be found, line by line, in the file ``PATH``
  (written by an earlier command), so what the README shows is what users get.

Then the sagas the walkthrough started must have finished as it says, and the
participants' tables show their writes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy import text

from engine.client import SagaClient
from engine.database import create_engine
from engine.states import SagaStatus
from tests.brokers import drop_after_test, topology_objects
from tests.e2e import fresh_database, service_url, wait_until

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Your own saga"
BLOCK = re.compile(r"<!-- walkthrough: (\w+)(?: (\S+))? -->\n```\w*\n(.*?)```\n", re.S)


@dataclass(frozen=True)
class Block:
    kind: str
    arg: str | None
    text: str


def walkthrough(readme: str) -> list[Block]:
    """The marked blocks of the README's walkthrough section, in order."""
    start = readme.index(f"\n{SECTION}\n")
    end = readme.index("\n## ", start + 1)
    return [Block(m[1], m[2], m[3]) for m in BLOCK.finditer(readme[start:end])]


@dataclass
class Session:
    """One shell session across blocks: directory and exported variables carry over."""

    cwd: Path
    env: dict[str, str]
    logs: Path
    daemons: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def run(self, script: str) -> str:
        """Run ``script`` with bash (stopping at the first failing command); its stdout."""
        state = self.logs / "state"
        done = subprocess.run(
            ["bash", "-c", f"set -eo pipefail\n{script}\npwd >{state}.pwd\nenv -0 >{state}.env"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, (
            f"README command failed ({done.returncode}):\n{script}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n{self.tails()}"
        )
        self.cwd = Path(Path(f"{state}.pwd").read_text().strip())
        pairs = Path(f"{state}.env").read_text().split("\0")
        self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
        return done.stdout

    def background(self, command: str) -> None:
        log = (self.logs / f"daemon-{len(self.daemons)}.log").open("wb")
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.daemons.append((command, process, log))

    def tails(self) -> str:
        out = []
        for index, (command, _process, log) in enumerate(self.daemons):
            log.flush()
            lines = (self.logs / f"daemon-{index}.log").read_text(errors="replace").splitlines()
            out.append(f"--- {command}\n" + "\n".join(lines[-30:]))
        return "\n".join(out)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to every daemon, as ``kill %1 ...``; their exit statuses."""
        for _command, process, _log in self.daemons:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        statuses: dict[str, int | None] = {}
        for command, process, log in self.daemons:
            try:
                statuses[command] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                statuses[command] = None
            log.close()
        return statuses


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    """A user's shell: this checkout's virtualenv on PATH (as if activated), no SAGA_*
    setting but a topic prefix of this test's own, nothing of the outer pytest's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SAGA_", "PYTEST_", "VIRTUAL_ENV")) and k != "BASH_ENV"
    }
    venv_bin = Path(sys.executable).parent
    env = {
        **clean,
        "PATH": f"{venv_bin}{os.pathsep}{clean['PATH']}",
        "SAGA_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "PYTHONUNBUFFERED": "1",
    }
    running = Session(tmp_path, env, logs)
    try:
        yield running
    finally:
        running.stop()


def lines(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip()]


def follow(session: Session, blocks: list[Block], ours: dict[str, str]) -> list[str]:
    """Take the blocks in order, as a user would; the output of each ``run`` block.
    ``ours``: the settings whose values are this test's (each must be exported)."""
    outputs = []
    for block in blocks:
        if block.kind == "install":
            assert re.search(r"pip install .*saga-engine", block.text), block.text
        elif block.kind == "run":
            outputs.append(session.run(block.text))
        elif block.kind == "env":
            session.run("\n".join(_exports(block.text, ours)))
        elif block.kind == "daemons":
            for line in lines(block.text):
                command = line.split("#", 1)[0].strip()
                assert command.endswith("&"), f"not a background command: {line}"
                session.background(command.removesuffix("&").strip())
        elif block.kind == "file":
            assert block.arg
            (session.cwd / block.arg).write_text(block.text)
        elif block.kind == "excerpt":
            assert block.arg
            shown = "\n".join(lines(block.text))
            written = "\n".join(lines((session.cwd / block.arg).read_text()))
            assert shown in written, f"the README shows what {block.arg} does not say"
        else:
            raise AssertionError(f"unknown walkthrough block kind {block.kind!r}")
    return outputs


def _exports(block: str, ours: dict[str, str]) -> list[str]:
    """The block's ``export SAGA_X=...`` lines, with this test's value for ``ours``."""
    exports, missing = [], dict(ours)
    for line in lines(block):
        export = re.match(r"export (SAGA_\w+)=\S+", line)
        assert export, f"not an export of a SAGA_ setting: {line}"
        name = export[1]
        exports.append(f"export {name}={shlex.quote(missing.pop(name))}" if name in ours else line)
    assert not missing, f"the walkthrough never sets {sorted(missing)}"
    return exports


async def reservations(db_url: str) -> dict[str, dict[str, str]]:
    """Each participant's table: status by reservation (saga) id."""
    database = create_engine(db_url)
    try:
        async with database.connect() as conn:
            return {
                table: dict(
                    (await conn.execute(text(f"SELECT reservation_id, status FROM {table}"))).all()
                )
                for table in ("flight_reservations", "hotel_reservations")
            }
    finally:
        await database.dispose()


@pytest.mark.integration
async def test_your_own_saga_as_the_readme_says(session: Session, postgres_url: str) -> None:
    broker_url = service_url("SAGA_TEST_AMQP_URL")
    blocks = walkthrough((ROOT / "README.md").read_text())
    kinds = [b.kind for b in blocks]
    for kind in ("install", "run", "env", "daemons", "file", "excerpt"):
        assert kind in kinds, f"the walkthrough has no {kind!r} block: {kinds}"
    which = session.run("python -c 'import engine; print(engine.__file__)'")
    assert Path(which.strip()).is_relative_to(ROOT), "the session would not test this checkout"
    prefix = session.env["SAGA_TOPIC_PREFIX"]
    drop_after_test(lambda: topology_objects(broker_url, prefix, {"flight", "hotel"}))

    async with fresh_database(postgres_url, migrate=False) as db_url:
        try:
            outputs = follow(
                session, blocks, {"SAGA_DATABASE_URL": db_url, "SAGA_BROKER_URL": broker_url}
            )
            async with await SagaClient.connect(db_url, sagas=()) as client:

                async def finished() -> bool:
                    sagas = await client.list()
                    return len(sagas) == 2 and all(s.status.is_terminal for s in sagas)

                done = await wait_until(finished, timeout=60)
                sagas = await client.list()
            books = await reservations(db_url)
        finally:
            statuses = session.stop()

    # The embedded part: the generated test ran, and both of its cases passed.
    assert any(re.search(r"\b2 passed\b", out) for out in outputs), outputs
    # The daemons: start_trip.py saw its saga complete; the one the hotel refused
    # was compensated, the flight's reservation released.
    assert any(re.search(r"^\S+ completed$", out, re.M) for out in outputs), outputs
    assert done, f"{[(s.id, s.status) for s in sagas]}\n{session.tails()}"
    ids = {s.status: s.id for s in sagas}
    assert set(ids) == {SagaStatus.COMPLETED, SagaStatus.COMPENSATED}
    completed, compensated = ids[SagaStatus.COMPLETED], ids[SagaStatus.COMPENSATED]
    assert books == {
        "flight_reservations": {completed: "reserved", compensated: "released"},
        "hotel_reservations": {completed: "reserved"},
    }
    # Stopped as the README says (SIGTERM), each drained and exited cleanly.
    assert set(statuses.values()) == {0}, f"{statuses}\n{session.tails()}"


def test_the_walkthrough_finds_its_blocks() -> None:
    """The markers parse: a block a typo hides would silently not be run."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(f"\n{SECTION}\n") :]
    section = section[: section.index("\n## ", 1)]
    assert len(walkthrough(readme)) == section.count("<!-- walkthrough:")
    assert "install" in [b.kind for b in walkthrough(readme)]
