"""Bulk replay of dead letters: by saga, by reason, all; dry runs; refusals reported.

The client on SQLite and on the real PostgreSQL; ``sagactl dlq replay`` on SQLite, at
80 columns.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from rich.console import Console
from sqlalchemy import select

from engine.client import SagaClient
from engine.database import create_engine, upgrade
from engine.deadletters import DeadLetterArchive
from engine.definition import Saga, Step
from engine.messages import decode, encode
from engine.registry import SagaRegistry
from engine.store.schema import outbox
from engine.store.sql import SqlSagaStore
from engine.transport.base import DEAD_LETTER_REASON, DEAD_LETTER_SOURCE, Message
from engine.views import DeadLetterRef
from tests.test_cli import assert_one_line_error, sagactl


class _Trip(BaseModel):
    who: str


trip = Saga(
    name="trip",
    version=1,
    input=_Trip,
    steps=[
        Step(name="flight", participant="flights", command=lambda ctx: {}),
        Step(name="hotel", participant="hotels", command=lambda ctx: {}),
    ],
)


def _letter(body: bytes, reason: str, source: str = "saga.commands.flights") -> Message:
    headers = {DEAD_LETTER_REASON: reason, DEAD_LETTER_SOURCE: source}
    return Message("saga.dead-letters", "k", body, headers)


async def _unsent(store: SqlSagaStore) -> list[bytes]:
    async with store.engine.connect() as conn:
        query = select(outbox.c.body).where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id)
        return [b if isinstance(b, bytes) else str(b).encode() for b in await conn.scalars(query)]


async def _archive_mix(store: SqlSagaStore) -> tuple[SagaClient, str, dict[str, int]]:
    """Two sagas waiting for their first command, and dead letters: the awaited
    command of each, a stale command (attempt 2, never sent) of the first, a body
    that is no envelope, and a binary one."""
    client = SagaClient(store, SagaRegistry([trip]))
    first = await client.start("trip", {"who": "ann"}, saga_id="saga-ann")
    second = await client.start("trip", {"who": "bob"}, saga_id="saga-bob")
    commands = {decode(b).saga_id: decode(b) for b in await _unsent(store)}
    stale = commands[first].model_copy(update={"attempt": 2})
    archive = DeadLetterArchive(store)
    ids = {}
    for name, message in {
        "ann": _letter(encode(commands[first]), "Handler crashed: boom"),
        "ann_stale": _letter(encode(stale), "handler CRASHED again"),
        "bob": _letter(encode(commands[second]), "unknown signing key k0"),
        "junk": _letter(b"{junk", "not a saga envelope: body: Invalid JSON"),
        "binary": _letter(b"\xff\x00", "not a saga envelope: binary, handler crashed"),
    }.items():
        archived = await archive.archive(message)
        assert archived is not None
        ids[name] = archived
    return client, first, ids


async def test_replay_by_saga_sends_the_awaited_and_reports_the_stale(
    any_store: SqlSagaStore,
) -> None:
    client, saga_id, ids = await _archive_mix(any_store)
    queued = len(await _unsent(any_store))

    result = await client.replay_dead_letters(saga_id, actor="ops", reason="flights fixed")

    assert [(d.id, d.outcome) for d in result.letters] == [
        (ids["ann"], "replayed"),
        (ids["ann_stale"], "refused"),
    ]
    assert (result.replayed, result.refused) == (1, 1)
    replayed, stale = result.letters
    assert (replayed.saga_id, replayed.source, replayed.message) == (
        saga_id,
        "saga.commands.flights",
        "command flight (attempt 1)",
    )
    assert stale.refusal is not None
    assert stale.refusal.startswith(f"dead letter {ids['ann_stale']} is a command flight")
    assert "no longer waits for" in stale.refusal
    assert len(await _unsent(any_store)) == queued + 1
    pending = {d.id for d in await client.dead_letters(pending_only=True)}
    assert pending == {ids["ann_stale"], ids["bob"], ids["junk"], ids["binary"]}
    # What was replayed is not selected again; the refused letter is, and is refused again.
    again = await client.replay_dead_letters(saga_id, actor="ops")
    assert [(d.id, d.outcome) for d in again.letters] == [(ids["ann_stale"], "refused")]


async def test_replay_by_reason_any_case_and_all_in_small_batches(
    any_store: SqlSagaStore,
) -> None:
    client, _, ids = await _archive_mix(any_store)

    crashed = await client.replay_dead_letters(
        reason_contains="HANDLER crashed", actor="ops", dry_run=True
    )
    assert [d.id for d in crashed.letters] == [ids["ann"], ids["ann_stale"], ids["binary"]]
    assert [d.outcome for d in crashed.letters] == ["would replay", "refused", "refused"]
    assert "its body is not text" in str(crashed.letters[2].refusal)
    # % and _ are no wildcards.
    assert (
        await client.replay_dead_letters(reason_contains="%", actor="o", dry_run=True)
    ).letters == []

    seen: list[int] = []
    limited = await client.replay_dead_letters(actor="ops", batch=1, limit=3, progress=seen.append)
    assert [d.id for d in limited.letters] == [ids["ann"], ids["ann_stale"], ids["bob"]]
    assert seen == [1, 2, 3]
    every = await client.replay_dead_letters(actor="ops", batch=2)
    assert [(d.id, d.outcome) for d in every.letters] == [
        (ids["ann_stale"], "refused"),
        (ids["junk"], "replayed"),
        (ids["binary"], "refused"),
    ]
    assert await client.count_dead_letters() == 2


async def test_a_dry_run_writes_nothing(any_store: SqlSagaStore) -> None:
    client, _, ids = await _archive_mix(any_store)
    queued = await _unsent(any_store)
    result = await client.replay_dead_letters(actor="ops", dry_run=True)
    assert (result.replayed, result.refused) == (3, 2)
    assert await _unsent(any_store) == queued
    assert await client.count_dead_letters() == len(ids)
    detail = await client.get("saga-ann")
    assert [h.event for h in detail.history if h.event == "dead_letter_replayed"] == []


async def test_a_letter_dead_lettered_again_during_the_run_waits_for_the_next(
    any_store: SqlSagaStore,
) -> None:
    client, _, ids = await _archive_mix(any_store)
    pages = client.queries.pending_dead_letters
    came_back: list[int | None] = []

    async def page(**selection: Any) -> list[DeadLetterRef]:
        if not came_back:  # the run has begun: as if its first replay came straight back
            came_back.append(await DeadLetterArchive(any_store).archive(_letter(b"{", "junk")))
        return await pages(**selection)

    client.queries.pending_dead_letters = page  # type: ignore[method-assign]
    result = await client.replay_dead_letters(actor="ops", batch=2)
    assert [d.id for d in result.letters] == sorted(ids.values())
    assert [d.id for d in await client.dead_letters(pending_only=True, limit=1)] == came_back


# -- sagactl -------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "saga.db"

    async def setup() -> None:
        database = create_engine(f"sqlite:///{path}")
        try:
            await upgrade(database)
            await _archive_mix(SqlSagaStore(database))
        finally:
            await database.dispose()

    asyncio.run(setup())
    return path


def test_sagactl_dlq_replay_many_at_80_columns(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Console(soft_wrap=False, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr("engine.cli.app.stdout", terminal)
    dry = sagactl(db, "dlq", "replay", "--reason-contains", "crashed", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), dry.stdout
    assert lines[0] == "dry run: 1 dead letter(s) with 'crashed' in the reason would be replayed"
    assert "saga-ann" in dry.stdout and "command flight (attempt" in dry.stdout
    assert "would refuse 2:" in lines
    assert "no longer waits for" in dry.stdout and "its body is not text" in dry.stdout

    # In a pipe: no border, one line per letter and per refusal, however long.
    monkeypatch.setattr("engine.cli.app.stdout", Console(soft_wrap=False, width=80))
    piped = sagactl(db, "dlq", "replay", "--reason-contains", "crashed", "--dry-run")
    lines = piped.stdout.splitlines()
    letter_row = r"1 +saga-ann +command flight \(attempt 1\) +saga\.commands\.flights"
    assert re.fullmatch(letter_row, lines[2]), piped.stdout
    refusals = [line for line in lines if line.startswith(" -  dead letter ")]
    assert len(refusals) == 2 and "Use --force to replay it anyway" in refusals[0], piped.stdout

    monkeypatch.setattr("engine.cli.app.stdout", terminal)
    done = sagactl(db, "dlq", "replay", "--saga", "saga-ann", "--actor", "eve", "--reason", "ok")
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), done.stdout
    assert lines[:2] == ["replayed 1 dead letter(s) of saga saga-ann, as eve", "refused 1:"]
    assert "no longer waits for" in done.stdout
    (entry,) = [
        h
        for h in json.loads(sagactl(db, "--json", "show", "saga-ann").stdout)["history"]
        if h["event"] == "dead_letter_replayed"
    ]
    assert (entry["actor"], entry["detail"].split(";")[0]) == ("eve", "reason: ok")

    every = json.loads(sagactl(db, "--json", "dlq", "replay", "--all", "--limit", "2").stdout)
    assert (every["replayed"], every["refused"], every["dry_run"]) == (1, 1, False)
    assert [d["outcome"] for d in every["letters"]] == ["refused", "replayed"]
    assert every["letters"][0]["refusal"].startswith("dead letter")


def test_sagactl_dlq_replay_selection_usage(db: Path) -> None:
    for args, words in [
        ([], "give a dead letter ID, --saga, --reason-contains or --all"),
        (["1", "--all"], "not both"),
        (["1", "--dry-run"], "not both"),
        (["--all", "--saga", "x"], "--all selects every pending letter"),
    ]:
        result = sagactl(db, "dlq", "replay", *args)
        assert result.exit_code == 2, result.output
        assert words in result.output
    assert_one_line_error(
        sagactl(db, "dlq", "replay", "--saga", "a\tb"), "--saga holds a control character"
    )
    assert_one_line_error(
        sagactl(db, "dlq", "replay", "--reason-contains", "a\x00"), "--reason-contains", "U+0000"
    )
