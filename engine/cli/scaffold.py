"""``sagactl new``: a saga or a worker of the user's own, written into their project.

The layout it writes (a package per participant, the sagas in one package)::

    hotel/commands.py        what a saga sends the participant (pydantic models)
    hotel/worker.py          its table, ``worker = Worker("hotel")``, handler, compensation
    hotel/migrations/        its own Alembic history (version table ``hotel_version``)
    sagas/book_trip.py       a saga: one step per participant, each compensated
    tests/test_book_trip.py  the saga on the embedded runner: completed and compensated

The files come from ``templates/`` beside this module (package data: the wheel ships
them). A ``.tmpl`` file is filled in with :class:`string.Template` (``${name}``; path
components too) and loses its suffix; any other file is copied as it is. Nothing is
ever overwritten: one existing file and nothing is written.
"""

from __future__ import annotations

import keyword
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

from engine.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: A module name, and a saga / participant / table name: lowercase, a Python identifier.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
#: Top-level names a participant package may not take: what the generated code imports.
_TAKEN = frozenset({"alembic", "engine", "pydantic", "sagas", "sqlalchemy", "tests"})
#: Written only where missing; an existing one is the user's and stays as it is.
_SHARED = frozenset({Path("sagas/__init__.py")})


@dataclass(frozen=True)
class Written:
    """What a ``sagactl new`` command wrote, and what to run next."""

    files: list[Path]
    next_steps: list[str]


def check_name(name: str, what: str) -> str:
    """``name`` if it can name a module, a saga, a participant and its tables."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        raise ConfigError(
            f"{what} {name!r} is not a valid name: lowercase letters, digits and '_', "
            "starting with a letter, at most 40 characters (it names a Python module)"
        )
    return name


def _check_package(name: str, what: str) -> str:
    check_name(name, what)
    if name in sys.stdlib_module_names or name in _TAKEN:
        raise ConfigError(f"{what} {name!r} would hide the Python module {name!r}: pick another")
    return name


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _render(kind: str, values: Mapping[str, str]) -> dict[Path, str]:
    """Every file of ``templates/kind``, by its path in the project."""
    root = TEMPLATES / kind
    out: dict[Path, str] = {}
    for source in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = Template(source.relative_to(root).as_posix()).substitute(values)
        text = source.read_text()
        if relative.endswith(".tmpl"):
            relative = relative.removesuffix(".tmpl")
            text = Template(text).substitute(values)
        out[Path(relative)] = text
    return out


def _write(directory: Path, files: Mapping[Path, str]) -> list[Path]:
    """Write ``files`` under ``directory``: all of them, or none if one exists."""
    fresh = {p: t for p, t in files.items() if p not in _SHARED or not (directory / p).exists()}
    existing = [directory / p for p in fresh if (directory / p).exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} exists: sagactl new never overwrites a file (nothing written)"
        )
    for path, text in fresh.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return [directory / p for p in fresh]


def new_worker(name: str, directory: Path) -> Written:
    """A participant package ``name/``: commands, worker, migrations."""
    _check_package(name, "worker")
    files = _write(directory, _render("worker", {"name": name, "Class": _class_name(name)}))
    return Written(
        files,
        [
            f"sagactl new saga SAGA --participant {name}    # a saga with a step at {name}",
            f"sagactl db upgrade --scripts {name}/migrations    # the engine's tables, {name}'s",
        ],
    )


def new_saga(name: str, participants: Sequence[str], directory: Path) -> Written:
    """``sagas/name.py``, one step per participant in order, and its test."""
    check_name(name, "saga")
    if not participants:
        raise ConfigError(f"saga {name!r} needs at least one --participant")
    for participant in participants:
        _check_package(participant, "participant")
    if len(set(participants)) != len(participants):
        raise ConfigError(f"saga {name!r}: a participant is named twice: one step each")
    files = _write(directory, _render("saga", _saga_values(name, participants)))
    missing = [p for p in participants if not (directory / p / "worker.py").exists()]
    workers = ",".join(f"{p}.worker:worker" for p in participants)
    return Written(
        files,
        [
            *(f"sagactl new worker {p}    # {name} sends it commands" for p in missing),
            'export PYTHONPATH="$PWD:$PYTHONPATH"    # your modules, importable',
            f"python -m pytest tests/test_{name}.py    # {name} on the embedded runner",
            f"SAGA_SAGAS=sagas.{name} SAGA_WORKERS={workers} "
            "sagactl engine    # and sagactl worker NAME: README, Your own saga",
        ],
    )


#: One step of a generated saga, per participant.
_STEP = Template(
    """\
        Step(
            name="reserve_${p}",
            participant="${p}",
            command=lambda ctx: Reserve${Class}(
                reservation_id=ctx.saga_id, quantity=_input(ctx).${p}
            ),
            compensation=Compensation(
                "release_${p}",
                lambda ctx: Release${Class}(reservation_id=ctx.saga_id),
            ),
            retry=RETRY,
            timeout=TIMEOUT,
        ),
"""
)
#: The generated test's check of one participant's table.
_CHECK = Template(
    "    assert reservation(database, ${p}.worker.reservations, detail.id) ${expected}\n"
)


def _saga_values(name: str, participants: Sequence[str]) -> dict[str, str]:
    """What the saga's and its test's templates are filled in with."""
    example = ", ".join(f'"{p}": 1' for p in participants)
    *before, last = participants

    def check(p: str, expected: str) -> str:
        return _CHECK.substitute(p=p, expected=expected)

    return {
        "name": name,
        "Class": _class_name(name),
        "summary": ", then ".join(f"reserve at {p}" for p in participants),
        "example": "{" + example + "}",
        "imports": "\n".join(
            f"from {p}.commands import Release{_class_name(p)}, Reserve{_class_name(p)}"
            for p in participants
        ),
        "fields": "\n".join(f"    {p}: int = Field(gt=0)" for p in participants),
        "steps": "".join(_STEP.substitute(p=p, Class=_class_name(p)) for p in participants),
        # The test's.
        "worker_imports": "\n".join(f"import {p}.worker" for p in participants),
        "workers": ", ".join(f"{p}.worker.worker" for p in participants),
        "migrations": ", ".join(f"{p}.worker.MIGRATIONS" for p in participants),
        "ok_input": "{" + example + "}",
        "refused_input": "{" + "".join(f'"{p}": 1, ' for p in before) + f'"{last}": too_many}}',
        "last": last,
        "completed_checks": "".join(check(p, '== "reserved"') for p in participants),
        "compensated_checks": "".join(check(p, '== "released"') for p in before)
        + f"    # {last} refused: its write rolled back with the handler's transaction.\n"
        + check(last, "is None"),
    }
