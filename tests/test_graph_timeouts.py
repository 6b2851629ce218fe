"""Timeouts in a graph saga are their own step's: a branch's message must not push
back the timeout of another branch.

A timeout is postponed when the message it times went out late (engine or broker
down). That message is the step's own; another branch's message sent meanwhile says
nothing about it: a wait publishes nothing at all, and a step whose command went out
on time has had its time.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from engine.definition import Delay, Node, Parallel, Saga, Step, WaitFor
from engine.states import StepStatus
from engine.store.schema import outbox
from engine.views import SagaDetail
from sagas.order import OrderInput
from tests.helpers import EmbeddedSystem, fast_order_saga, order_input

TIMEOUT = timedelta(seconds=0.3)
ORDER = fast_order_saga()


def _step(name: str, timeout: timedelta) -> Step:
    step = ORDER.step(name)
    assert isinstance(step, Step)
    return replace(step, timeout=timeout)


def _beside(name: str, first: Node) -> Saga:
    """``first`` in one branch; in the other, a command that goes out after ``first``
    began and before its timeout is due (and is never answered: no worker runs)."""
    return Saga(
        name=name,
        version=1,
        input=OrderInput,
        steps=[
            Parallel(
                "g",
                branches=[
                    [first],
                    [Delay("pause", TIMEOUT * 2 / 3), _step("charge_payment", timedelta(30))],
                ],
            )
        ],
    )


WAITING = _beside("waiting", WaitFor("first", timeout=TIMEOUT))
SENDING = _beside("sending", replace(_step("reserve_inventory", TIMEOUT), name="first"))


async def test_a_timeout_is_not_postponed_by_another_branch_s_message(tmp_path: Path) -> None:
    async with EmbeddedSystem(
        tmp_path / "t.db", sagas=[WAITING, SENDING], run_workers=()
    ) as system:
        for name in ("waiting", "sending"):
            saga_id = await system.client.start(name, order_input())

            def ended(detail: SagaDetail) -> bool:
                return any(
                    s.name == "first" and s.status in (StepStatus.FAILED, StepStatus.TIMED_OUT)
                    for s in detail.steps
                )

            detail = await system.wait_status(saga_id, ended, 10, f"{name}: first to time out")
            steps = {s.name: s for s in detail.steps}
            charge, first = steps["charge_payment"], steps["first"]
            assert charge.started_at is not None and first.finished_at is not None
            assert charge.started_at < first.finished_at  # the other branch did send
            # A postponement may only name the step's own command (published late on a
            # busy machine): never the other branch's.
            async with system.db.connect() as conn:
                rows = await conn.execute(
                    select(outbox.c.sent_at).where(
                        outbox.c.key == saga_id, outbox.c.step == "first"
                    )
                )
                own = {r.sent_at.isoformat() for r in rows if r.sent_at is not None}
            for h in detail.history:
                if h.event == "timeout_postponed" and h.step == "first":
                    said = re.search(r"published only at (\S+);", h.detail or "")
                    assert said is not None and said.group(1) in own, (name, h.detail, own)
