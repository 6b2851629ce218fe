"""The wheel, installed in a fresh virtualenv, inside a user's project that has its own
``migrations/``, ``sagas/`` and ``workers/`` packages.

What it installs must not stand in for the user's packages nor they for it: the
engine's migrations are found by path, the example is not installed, and a saga of the
user's own runs. The example itself runs on the installed wheel from a directory of
its own, as compose.yaml's image runs it. The virtualenv has no access to this
checkout nor to the test environment's packages; its dependencies come from a
wheelhouse in ``.cache/`` that the first run fills from the package index (later runs
install offline).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from engine.database import head_revisions
from engine.store.schema import metadata

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"

#: A project as a user lays it out, with the generic names the example once took.
PROJECT = {
    # Imported, or used as Alembic scripts, it leaves a mark: neither may happen.
    "migrations/__init__.py": "from pathlib import Path\n"
    "(Path(__file__).parent / 'IMPORTED').touch()\n",
    "migrations/env.py": "from pathlib import Path\n(Path(__file__).parent / 'RAN').touch()\n",
    "sagas/__init__.py": "",
    "sagas/booking.py": """
        from pydantic import BaseModel

        from engine import Saga, Step


        class Trip(BaseModel):
            guest: str


        class ReserveRoom(BaseModel):
            guest: str


        book_trip = Saga(
            name="book_trip",
            version=1,
            input=Trip,
            steps=[
                Step(
                    name="reserve_room",
                    participant="hotel",
                    command=lambda ctx: ReserveRoom(guest=ctx.input.guest),
                )
            ],
        )
    """,
    "workers/__init__.py": "",
    "workers/hotel.py": """
        from sqlalchemy import text

        from engine import HandlerContext, Worker
        from sagas.booking import ReserveRoom

        worker = Worker("hotel")


        @worker.command("reserve_room")
        async def reserve(cmd: ReserveRoom, ctx: HandlerContext) -> dict[str, str]:
            await ctx.session.execute(
                text("INSERT INTO rooms (guest) VALUES (:guest)"), {"guest": cmd.guest}
            )
            return {"room": "12"}
    """,
    # The hotel's own Alembic history, as the README tells users to keep it.
    "hotel_migrations/env.py": """
        from engine.database import run_env

        run_env(version_table="hotel_version")
    """,
    "hotel_migrations/versions/h001_rooms.py": """
        import sqlalchemy as sa
        from alembic import op

        revision = "h001"
        down_revision = None
        branch_labels = None
        depends_on = None


        def upgrade() -> None:
            op.create_table("rooms", sa.Column("guest", sa.String(100), primary_key=True))


        def downgrade() -> None:
            op.drop_table("rooms")
    """,
    "run.py": """
        import asyncio
        import json
        import sys

        import engine
        from engine import EmbeddedSystem, SagaClient


        async def main(url: str) -> None:
            # connect checks the schema against the engine's own migrations.
            async with await SagaClient.connect(url, ["sagas.booking"]):
                pass
            async with EmbeddedSystem(
                sagas=["sagas.booking"],
                workers=["workers.hotel:worker"],
                database_url=url,
                migrate=False,
            ) as system:
                saga_id = await system.client.start("book_trip", {"guest": "ada"})
                detail = await system.client.wait(saga_id, timeout=30)
            print(json.dumps({"engine": engine.__file__, "status": detail.status.value}))


        asyncio.run(main(sys.argv[1]))
    """,
}


def _run(
    *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _user_env(venv: Path, home: Path, project: Path, database: Path) -> dict[str, str]:
    """A user's shell: the wheel's virtualenv on PATH and, as a user makes their sagas
    importable, their project first on the path; a SQLite database."""
    return {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "PYTHONPATH": str(project),
        "SAGA_DATABASE_URL": f"sqlite:///{database}",
    }


def _pip(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "pip", *args)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout's wheel (no build isolation: hatchling is a test dependency)."""
    dist = tmp_path_factory.mktemp("dist")
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    assert built.returncode == 0, built.stderr
    (path,) = dist.glob("saga_engine-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("venv")
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"

    def install() -> subprocess.CompletedProcess[str]:
        return _pip(
            "--python", python, "install", "-q", "--no-index", "--find-links", WHEELHOUSE, wheel
        )

    installed = install()
    if installed.returncode != 0:  # a cold or outdated wheelhouse: fill it once
        filled = _pip("wheel", "-q", "-w", WHEELHOUSE, wheel)
        assert filled.returncode == 0, filled.stderr
        for own in WHEELHOUSE.glob("saga_engine-*.whl"):
            own.unlink()
        installed = install()
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_wheel_installs_only_the_engine_with_its_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"engine", "saga_engine-0.1.0.dist-info"}
    revisions = {Path(n).name for n in names if n.startswith("engine/_migrations/versions/")}
    assert {p.name for p in (ROOT / "migrations" / "versions").glob("*.py")} == revisions
    assert "engine/_migrations/env.py" in names
    # The web console's templates and static files are package data.
    console = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "engine" / "console").rglob("*")
        if p.suffix in (".html", ".css", ".js")
    }
    assert "engine/console/templates/saga.html" in console
    assert console <= set(names)


def test_a_users_own_saga_beside_its_own_migrations_and_sagas_packages(
    venv: Path, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    for name, text in PROJECT.items():
        path = project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    database = project / "app.db"
    env = _user_env(venv, tmp_path, project, database)
    sagactl = venv / "bin" / "sagactl"

    upgraded = _run(sagactl, "db", "upgrade", "--scripts", "hotel_migrations", cwd=project, env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    ran = _run(venv / "bin" / "python", "run.py", f"sqlite:///{database}", cwd=project, env=env)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report["status"] == "completed"
    assert Path(report["engine"]).is_relative_to(venv)  # the wheel's, not this checkout's

    with sqlite3.connect(database) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        (engine_revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        (hotel_revision,) = conn.execute("SELECT version_num FROM hotel_version").fetchone()
        rooms = conn.execute("SELECT guest FROM rooms").fetchall()
    engine_tables = {t.name for t in metadata.sorted_tables}
    # The engine's tables and the user's, nothing of the example's.
    assert tables == engine_tables | {"alembic_version", "hotel_version", "rooms"}
    assert {engine_revision} == head_revisions()
    assert (hotel_revision, rooms) == ("h001", [("ada",)])
    assert not list((project / "migrations").glob("IMPORTED")), "the user's migrations imported"
    assert not list((project / "migrations").glob("RAN")), "the user's env.py ran"

    # The demo is the repository's: from the wheel it says where to find it.
    demo = _run(sagactl, "demo", "-n", "1", cwd=project, env=env)
    assert demo.returncode == 1
    assert "checkout of the saga-engine repository" in demo.stderr


def test_the_example_runs_on_the_installed_wheel_from_a_directory_of_its_own(
    venv: Path, tmp_path: Path
) -> None:
    """As compose.yaml's image runs it: the wheel installed, the example beside it."""
    example = tmp_path / "example"
    for package in ("sagas", "workers"):
        shutil.copytree(
            ROOT / package, example / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    env = _user_env(venv, tmp_path, example, tmp_path / "example.db")
    sagactl = venv / "bin" / "sagactl"
    upgraded = _run(
        sagactl, "db", "upgrade", "--scripts", "workers/migrations", cwd=example, env=env
    )
    assert upgraded.returncode == 0, upgraded.stderr
    demo = _run(sagactl, "--json", "demo", "-n", "6", cwd=example, env=env)
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert (summary["orders"], summary["unfinished"], summary["inconsistent_orders"]) == (6, 0, 0)


def test_sagactl_new_writes_a_project_from_the_wheels_templates(venv: Path, tmp_path: Path) -> None:
    """The templates are package data: a worker and a saga written from the installed
    wheel, and the worker's table made by its own migration history."""
    project = tmp_path / "trips"
    project.mkdir()
    database = project / "trips.db"
    env = _user_env(venv, tmp_path, project, database)
    sagactl = venv / "bin" / "sagactl"
    for args in (("worker", "hotel"), ("saga", "book_trip", "--participant", "hotel")):
        made = _run(sagactl, "new", *args, cwd=project, env=env)
        assert made.returncode == 0, made.stderr
    upgraded = _run(sagactl, "db", "upgrade", "--scripts", "hotel/migrations", cwd=project, env=env)
    assert upgraded.returncode == 0, upgraded.stderr

    assert (project / "sagas" / "book_trip.py").is_file()
    assert (project / "tests" / "test_book_trip.py").is_file()
    with sqlite3.connect(database) as conn:
        (revision,) = conn.execute("SELECT version_num FROM hotel_version").fetchone()
        columns = [r[1] for r in conn.execute("PRAGMA table_info(hotel_reservations)")]
    assert (revision, columns) == ("hotel_0001", ["reservation_id", "quantity", "status"])
