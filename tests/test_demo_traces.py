"""The demo traces its sagas as the daemons do: each records a trace id of its own."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects import sqlite

from engine.store.schema import sagas

ROOT = Path(__file__).resolve().parent.parent


def test_every_demo_saga_has_a_trace_id(tmp_path: Path) -> None:
    # A process of its own, as a user runs it: the tracer provider is set once per
    # process, so one set by another test here could hide a demo that sets none. No
    # OTEL_* setting: the trace id is recorded even when spans are exported nowhere.
    db = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    sagactl = [sys.executable, "-m", "engine.cli", "--database-url", f"sqlite:///{db}"]
    demo = subprocess.run(
        [*sagactl, "--json", "demo", "--orders", "10", "--seed", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr

    query = str(select(sagas.c.id, sagas.c.trace_id).compile(dialect=sqlite.dialect()))
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(query).fetchall()
    assert len(rows) == 10
    trace_ids = [trace_id for _, trace_id in rows]
    assert all(t is not None and re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids), rows
    assert len(set(trace_ids)) == len(rows), "each saga is a trace of its own"
