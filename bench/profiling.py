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

import psutil

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")

#: Frames every asyncio program has at the bottom of each stack: their inclusive
#: time is ~100% and says nothing.
_PLUMBING = ("asyncio/", "<module>", "<frozen", "runpy.py", "click/", "engine/cli/")

#: A sample whose leaf waits in epoll is the event loop with nothing to do; py-spy's
#: own idle detection misses many of them, so they are counted apart.
_WAITING = ("EpollSelector.select", "select")

#: Leaves that are a system call, named for what the time is: on loopback the kernel
#: does both ends of a TCP send inside the sender's send().
_SYSCALLS = {
    "_SelectorSocketTransport.write": "socket send (kernel)",
    "_SelectorSocketTransport._read_ready__data_received": "socket recv (kernel)",
}


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


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user, t.system


def _plumbing(func: str, file: str) -> bool:
    return file.startswith(_PLUMBING) or func.startswith(_PLUMBING)


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip() or "(no Python frame)", ""
    return match.group("func"), match.group("file")


def package(file: str) -> str:
    """``sqlalchemy/engine/base.py`` -> ``sqlalchemy``; ``engine/store/sql.py`` ->
    ``engine.store.sql``; stdlib ``asyncio/events.py`` -> ``asyncio``."""
    if not file:
        return "(no Python frame)"
    if file.startswith(("engine/", "bench/", "sagas/", "workers/")):
        return file.removesuffix(".py").replace("/", ".")
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares (in % of the process's busy samples)."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    syscall_callers: Counter[str] = Counter()
    total = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        func, file = frames[-1]
        if func in _WAITING and file.startswith("selectors"):
            waiting += count
            continue
        total += count
        self_fn[f"{func} ({file})"] += count
        syscall = _SYSCALLS.get(func)
        self_pkg[syscall or package(file)] += count
        if syscall:
            # Whose socket: the nearest caller outside asyncio (asyncpg, aiokafka, ...).
            callers = [package(f) for fn, f in reversed(frames) if not _plumbing(fn, f)]
            syscall_callers[f"{syscall} from {callers[0] if callers else 'event loop'}"] += count
        seen = set()
        for func, file in frames:
            key = f"{func} ({file})"
            if key in seen or _plumbing(func, file):
                continue
            seen.add(key)
            incl_fn[key] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        if not total:
            return []
        return [
            {"name": name, "samples": n, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {
        "samples": total,
        "epoll_wait_samples": waiting,
        "self_by_package": share(self_pkg),
        "self_by_function": share(self_fn),
        "inclusive_by_function": share(incl_fn),
        "syscalls_by_caller": share(syscall_callers),
    }
