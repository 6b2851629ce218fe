"""engine.faults: the SAGA_CRASH test hook (parsing, and a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from engine import faults


def test_parse_reads_names_and_counts() -> None:
    assert faults.parse("") == {}
    assert faults.parse("relay.after_publish:3") == {"relay.after_publish": 3}
    assert faults.parse(" worker.after_commit , engine.after_commit:2 ") == {
        "worker.after_commit": 1,
        "engine.after_commit": 2,
    }


@pytest.mark.parametrize("entry", ["nope:1", "relay.after_publish:0", "relay.after_publish:x"])
def test_bad_entries_are_reported_and_ignored(
    entry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert faults.parse(f"{entry},relay.before_publish") == {"relay.before_publish": 1}
    assert f"ignoring {entry!r}" in capsys.readouterr().err


def test_without_the_variable_a_crash_point_does_nothing() -> None:
    for _ in range(3):
        faults.crashpoint("relay.after_publish")


def _run(spec: str, visits: int) -> subprocess.CompletedProcess[str]:
    code = (
        "from engine.faults import crashpoint\n"
        f"for i in range({visits}):\n"
        "    crashpoint('worker.after_reply')\n"
        "    crashpoint('relay.before_publish')\n"
        "    print(i, flush=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, faults.ENV: spec},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_nth_visit_kills_the_process_with_sigkill() -> None:
    proc = _run("worker.after_reply:3", visits=5)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.split() == ["0", "1"]
    assert "SAGA_CRASH: worker.after_reply reached 3 time(s): SIGKILL" in proc.stderr


def test_a_point_visited_fewer_times_never_fires() -> None:
    proc = _run("relay.before_publish:9", visits=5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "2", "3", "4"]
