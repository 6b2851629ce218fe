"""Where the engine's time goes under load: py-spy samples of a running process,
folded into the hot spots a reader can act on (self time per function and per
package, inclusive time per function)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: Frames every asyncio program has at the bottom of each stack: their inclusive
#: time is ~100% and says nothing.
_PLUMBING = ("asyncio/", "<module>", "runpy.py", "click/", "engine/cli/")


def py_spy() -> str:
    here = Path(sysconfig.get_path("scripts")) / "py-spy"
    found = str(here) if here.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("py-spy is missing: pip install 'saga-engine[bench]'")
    return found


def record(pid: int, output: Path, seconds: float, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` (raw folded stacks into ``output``)."""
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    return match.group("func"), match.group("file")


def package(file: str) -> str:
    """``sqlalchemy/engine/base.py`` -> ``sqlalchemy``; ``engine/store/sql.py`` ->
    ``engine.store.sql``; stdlib ``asyncio/events.py`` -> ``asyncio``."""
    if not file:
        return "?"
    if file.startswith(("engine/", "bench/", "sagas/", "workers/")):
        return file.removesuffix(".py").replace("/", ".")
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares (in % of the process's busy samples)."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        func, file = frames[-1]
        self_fn[f"{func} ({file})"] += count
        self_pkg[package(file)] += count
        seen = set()
        for func, file in frames:
            key = f"{func} ({file})"
            if key in seen or file.startswith(_PLUMBING) or func.startswith(_PLUMBING):
                continue
            seen.add(key)
            incl_fn[key] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "samples": n, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self_by_package": share(self_pkg),
        "self_by_function": share(self_fn),
        "inclusive_by_function": share(incl_fn),
    }
