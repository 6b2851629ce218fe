"""Embedded mode on SQLite: a handler that takes long holds up no other saga.

One participant's handler is held (on an event the test controls) while an unrelated
saga on another participant must complete and a third saga's step timeout must fire;
then the held handler is let go and its saga completes with its effect written once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import Column, MetaData, String, Table, func, insert, select

from engine.database import create_engine, upgrade
from engine.definition import Compensation, Saga, Step
from engine.embedded import EmbeddedSystem
from engine.orchestrator import EngineSettings
from engine.states import SagaStatus, StepStatus
from engine.worker.worker import HandlerContext, Worker
from tests.helpers import wait_until

effects = Table("slow_effects", MetaData(), Column("saga_id", String(36), primary_key=True))


class Nothing(BaseModel):
    pass


def one_step(name: str, participant: str, timeout: float = 60.0) -> Saga:
    step = Step(
        name=f"{name}_step",
        participant=participant,
        command=lambda _: {},
        compensation=Compensation(f"undo_{name}", lambda _: {}),
        timeout=timedelta(seconds=timeout),
    )
    return Saga(name=name, version=1, input=Nothing, steps=[step])


SAGAS = [
    one_step("slow", "slow"),
    one_step("quick", "quick"),
    # No worker serves "silent": its step can only time out.
    one_step("silent", "silent", timeout=1.0),
]


def awaiting(release: asyncio.Event) -> Callable[[], Awaitable[None]]:
    return release.wait


def in_a_thread(release: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """A blocking call run off the event loop, as a handler calls a blocking client."""
    gate = threading.Event()
    release_wait = release.wait

    async def wait() -> None:
        waiter = asyncio.create_task(release_wait())
        waiter.add_done_callback(lambda _: gate.set())
        await asyncio.to_thread(gate.wait)

    return wait


def workers(slow_part: Callable[[], Awaitable[None]], entered: asyncio.Event) -> list[Worker]:
    slow, quick = Worker("slow"), Worker("quick")

    @slow.command("slow_step")
    async def held(command: dict[str, Any], ctx: HandlerContext) -> None:
        entered.set()
        await slow_part()
        await ctx.session.execute(insert(effects).values(saga_id=ctx.saga_id))

    @quick.command("quick_step")
    async def fast(command: dict[str, Any], ctx: HandlerContext) -> None:
        await ctx.session.execute(insert(effects).values(saga_id=ctx.saga_id))

    for worker in (slow, quick):

        @worker.compensation(f"undo_{worker.name}")
        async def undo(command: dict[str, Any], ctx: HandlerContext) -> None: ...

    return [slow, quick]


@pytest.mark.parametrize("slow_part", [awaiting, in_a_thread])
async def test_a_held_handler_holds_up_no_other_saga_nor_timeout(
    tmp_path: Path, slow_part: Callable[[asyncio.Event], Callable[[], Awaitable[None]]]
) -> None:
    database = create_engine(f"sqlite:///{tmp_path / 'embedded.db'}")
    await upgrade(database)
    async with database.begin() as conn:
        await conn.run_sync(effects.metadata.create_all)
    release, entered = asyncio.Event(), asyncio.Event()
    settings = EngineSettings(timer_interval=0.02, reply_settle=timedelta(seconds=0.1))
    system = EmbeddedSystem(
        sagas=SAGAS,
        workers=workers(slow_part(release), entered),
        database=database,
        migrate=False,
        tunables=settings,
        poll_interval=0.01,
    )
    try:
        async with system:
            client = system.client
            held = await client.start("slow", {})
            await asyncio.wait_for(entered.wait(), 30)

            quick = await client.start("quick", {})
            silent = await client.start("silent", {})

            async def status(saga_id: str) -> SagaStatus:
                return (await client.get(saga_id)).status

            async def completed() -> bool:
                return await status(quick) is SagaStatus.COMPLETED

            async def timed_out() -> bool:
                step = (await client.get(silent)).steps[0]
                return step.status in (StepStatus.TIMED_OUT, StepStatus.COMPENSATING)

            # While the handler is held: far less than SQLite's 30 s busy timeout.
            await wait_until(completed, 10, "the quick saga to complete")
            await wait_until(timed_out, 10, "the silent step to time out")
            assert not release.is_set() and await status(held) is SagaStatus.RUNNING

            release.set()

            async def held_completed() -> bool:
                return await status(held) is SagaStatus.COMPLETED

            await wait_until(held_completed, 30, "the held saga to complete")
        async with database.connect() as conn:
            rows = await conn.execute(select(effects.c.saga_id, func.count()).group_by("saga_id"))
            assert sorted(rows) == sorted([(held, 1), (quick, 1)])
    finally:
        release.set()
        await database.dispose()
