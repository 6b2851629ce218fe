"""The web console (issue 13): its pages read sagas through the client, show a saga's
timeline in order, escape whatever a saga holds, update a running saga's page live,
and act only when actions are on and the user authenticated (recorded as the actor).

The app is driven over ASGI (httpx) in the test's own event loop, beside an embedded
engine on SQLite (one scenario on real PostgreSQL); ``sagactl console`` once for real.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, SecretStr
from sqlalchemy import update

from engine.cli.app import cli
from engine.console import ConsoleSettings, create_app, load_console_settings
from engine.console._timeline import timeline
from engine.database import create_engine, upgrade
from engine.definition import Child, Local, Saga
from engine.errors import ConfigError
from engine.redact import redact
from engine.states import SagaStatus, StepStatus
from engine.store.base import DeadLetterRecord
from engine.store.schema import sagas
from engine.views import HistoryView, SagaDetail, StepView
from sagas.order import place_order
from tests.e2e import fresh_database, service_url
from tests.helpers import EmbeddedSystem, fast_order_saga, order_input

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-" + "s3cr3t" * 4
PASSWORD = "alice-pass-1234"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SCRIPT = "<script>alert(1)</script>"
IMAGE = "<img src=x onerror=alert(2)>"

#: The order saga with fast retries, keyed by customer as the example is.
ORDER = Saga(
    name=place_order.name,
    version=place_order.version,
    input=place_order.input,
    steps=fast_order_saga().steps,
    keys=place_order.keys,
)


def settings(**console: Any) -> ConsoleSettings:
    return load_console_settings(database_url="sqlite:///unused.db", **console)


@asynccontextmanager
async def browse(
    system: EmbeddedSystem, config: ConsoleSettings | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The console over the system's client, as a browser on the same host sees it."""
    app = create_app(config or settings(), client=system.client, live_interval=0.02)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
        yield http


def rows(page: httpx.Response) -> list[str]:
    """The saga ids of a list page's rows, in order."""
    return re.findall(r'<tr data-saga-id="([^"]+)"', page.text)


def bars(page: httpx.Response) -> list[tuple[str, str]]:
    """The timeline's bars (step, kind), in order."""
    return re.findall(r'class="bar [^"]*" data-step="([^"]+)" data-kind="([^"]+)"', page.text)


def element(page: httpx.Response, ident: str) -> str:
    """The text of the element with that id, up to its closing tag."""
    found = re.search(rf'id="{ident}"[^>]*>(.*?)</', page.text, re.S)
    assert found is not None, f"no #{ident}"
    return found.group(1)


async def archive(system: EmbeddedSystem, body: bytes) -> int:
    """A dead letter that is no envelope of ours, as a consumer archives one."""
    record = DeadLetterRecord(
        letter_id=str(uuid.uuid4()),
        source="saga.inventory",
        reason=f"cannot decode: {SCRIPT}",
        key="k",
        body=body,
        headers={"x-note": IMAGE},
        saga_id=None,
        received_at=datetime.now(UTC),
    )
    async with system.client.store.transaction() as tx:
        letter = await tx.add_dead_letter(record)
    assert letter is not None
    return letter


async def settle(system: EmbeddedSystem, *ids: str) -> None:
    for saga_id in ids:
        await system.client.wait(saga_id, timeout=20)


# -- reading ----------------------------------------------------------------------------


async def test_list_filters_search_and_pages(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER]) as system:
        ok = await system.client.start(ORDER, order_input())
        undone = await system.client.start(ORDER, order_input("charge_payment"))
        other = await system.client.start(ORDER, order_input())
        await settle(system, ok, undone, other)
        async with browse(system) as http:
            home = await http.get("/")
            assert (home.status_code, home.headers["location"]) == (307, "/sagas")
            listed = await http.get("/sagas")
            assert listed.status_code == 200
            assert rows(listed) == [other, undone, ok]  # newest first
            assert 'id="search"' in listed.text and 'name="q"' in listed.text

            async def found(query: str) -> list[str]:
                page = await http.get(f"/sagas?{query}")
                assert page.status_code == 200, page.text
                return rows(page)

            assert await found("status=compensated") == [undone]
            assert await found("q=customer_id%3Dpoor") == [undone]
            assert await found("key=customer_id%3Dalice") == [other, ok]
            assert await found("key=customer_id%3Dalice&status=completed&saga=place_order") == [
                other,
                ok,
            ]
            assert await found(f"q={ok[:6]}") == [ok]
            assert await found(f"q={undone}") == [undone]
            assert await found("q=customer_id%3Dnobody") == []
            assert await found("saga=place_order&version=2") == []
            assert await found("created_from=1h&updated_to=2999-01-01T00:00") == [other, undone, ok]
            assert await found("created_to=2000-01-01") == []

            first = await http.get("/sagas?limit=2&key=customer_id%3Dalice")
            assert rows(first) == [other, ok] and 'id="next"' not in first.text
            first = await http.get("/sagas?limit=2")
            assert rows(first) == [other, undone]
            following = re.search(r'<a href="([^"]+)" id="next"', first.text)
            assert following is not None
            second = await http.get(following.group(1).replace("&amp;", "&"))
            assert rows(second) == [ok] and 'id="next"' not in second.text

            for bad in ("status=lost", "key=nokey", "created_from=yesterday", "after=x"):
                refused = await http.get(f"/sagas?{bad}")
                assert refused.status_code == 400 and 'class="error"' in refused.text, bad


async def test_a_compensated_sagas_timeline_history_and_trace_link(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER]) as system:
        undone = await system.client.start(ORDER, order_input("charge_payment"))
        await settle(system, undone)
        async with system.db.begin() as conn:
            await conn.execute(update(sagas).where(sagas.c.id == undone).values(trace_id=TRACE_ID))
        viewer = settings(console_trace_url="http://jaeger:16686/trace/{trace_id}")
        async with browse(system, viewer) as http:
            page = await http.get(f"/sagas/{undone}")
            assert page.status_code == 200
            assert element(page, "status") == "compensated"
            assert bars(page) == [
                ("reserve_inventory", "forward"),
                ("charge_payment", "forward"),
                ("reserve_inventory", "compensation"),
            ]
            assert 'data-outcome="failed"' in page.text
            assert f'id="trace" href="http://jaeger:16686/trace/{TRACE_ID}"' in page.text
            history = element(page, "history")
            assert history  # rows follow
            for event in ("started", "step_failed", "compensating", "compensated"):
                assert f"<td>{event}</td>" in page.text
            assert "data-live" not in page.text  # finished: nothing to follow
        async with browse(system) as http:  # no trace viewer: the id, not a link
            page = await http.get(f"/sagas/{undone}")
            assert 'id="trace"' not in page.text and TRACE_ID in page.text
            missing = await http.get("/sagas/no-such-saga")
            assert missing.status_code == 404


class Note(BaseModel):
    text: str


#: A parent that starts a child saga: the page links one to the other.
NOTE = Saga(name="note", version=1, input=Note, steps=[Local("write", lambda ctx: {"ok": 1})])
NOTED = Saga(
    name="noted",
    version=1,
    input=Note,
    steps=[Child("child", saga=NOTE, input=lambda ctx: {"text": "hi"})],
)


async def test_a_parents_page_links_its_child_saga(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[NOTED, NOTE], run_workers=[]) as system:
        parent = await system.client.start(NOTED, {"text": "x"})
        await settle(system, parent)
        (child,) = [s.id for s in await system.client.list(name="note")]
        async with browse(system) as http:
            page = await http.get(f"/sagas/{parent}")
            assert f'<a class="child" href="/sagas/{child}">' in page.text
            assert bars(page) == [("child", "forward")]
            assert bars(await http.get(f"/sagas/{child}")) == [("write", "forward")]


async def test_stats_and_dead_letters_pages(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER]) as system:
        await settle(system, await system.client.start(ORDER, order_input()))
        letter = await archive(system, b"\x1b[2J not json " + SCRIPT.encode())
        async with browse(system) as http:
            stats = await http.get("/stats")
            assert stats.status_code == 200
            assert 'data-status="completed"' in stats.text and "place_order" in stats.text
            listed = await http.get("/dlq")
            assert f'data-letter-id="{letter}"' in listed.text
            shown = await http.get(f"/dlq/{letter}")
            assert shown.status_code == 200
            body = element(shown, "body")
            assert "\\x1b[2J not json &lt;script&gt;alert(1)&lt;/script&gt;" in body
            assert "&lt;img src=x onerror=alert(2)&gt;" in shown.text  # a header
            for raw in (SCRIPT, IMAGE, "\x1b"):
                assert raw not in shown.text and raw not in listed.text
            assert (await http.get("/dlq/999999")).status_code == 404


async def test_nothing_a_saga_holds_is_read_as_html(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER]) as system:
        scripted = await system.client.start(ORDER, order_input(address=SCRIPT + "\x1b[31m"))
        imaged = await system.client.start(ORDER, order_input(customer_id=IMAGE))
        await settle(system, scripted, imaged)
        async with browse(system) as http:
            pages = [
                await http.get("/sagas"),
                await http.get(f"/sagas/{scripted}"),
                await http.get(f"/sagas/{imaged}"),
                await http.get(f"/sagas?q=customer_id%3D{IMAGE}"),
                await http.get(f"/sagas/{scripted}/events"),
            ]
        for page in pages:
            assert page.status_code == 200
            for raw in (SCRIPT, IMAGE, "<img", "<script>alert", "\x1b"):
                assert raw not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;\\u001b[31m" in element(pages[1], "input")
        assert "&lt;img src=x onerror=alert(2)&gt;" in element(pages[2], "input")
        assert rows(pages[3]) == [imaged]
        assert pages[0].headers["content-security-policy"].startswith("default-src 'self'")


async def test_a_running_sagas_page_updates_itself(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER], run_workers=[]) as system:
        saga_id = await system.client.start(ORDER, order_input())
        async with browse(system) as http:
            page = await http.get(f"/sagas/{saga_id}")
            assert element(page, "status") == "running"
            assert f'data-live="/sagas/{saga_id}/events"' in page.text
            assert bars(page) == [("reserve_inventory", "forward")]  # in flight
            assert 'data-outcome="running"' in page.text

            read = asyncio.Event()
            get = system.client.get

            async def spied(saga: str) -> SagaDetail:
                found = await get(saga)
                read.set()  # the stream's first read is done: the workers may start
                return found

            system.client.get = spied  # type: ignore[method-assign]
            stream = asyncio.create_task(http.get(f"/sagas/{saga_id}/events"))
            await asyncio.wait_for(read.wait(), 10)
            for name in ("inventory", "payment", "shipment"):
                await system.start_worker(name)
            events = await asyncio.wait_for(stream, 20)
        assert events.headers["content-type"].startswith("text/event-stream")
        statuses = re.findall(r'"status":"(\w+)"', events.text)
        assert statuses[0] == "running" and statuses[-1] == "completed"
        assert '"finished":true' in events.text.splitlines()[-2]
        assert events.text.count('data-kind=\\"forward\\"') >= 3


# -- acting -----------------------------------------------------------------------------


async def test_read_only_by_default(tmp_path: Path) -> None:
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER], run_workers=[]) as system:
        saga_id = await system.client.start(ORDER, order_input())
        async with browse(system) as http:
            page = await http.get(f"/sagas/{saga_id}")
            assert 'method="post"' not in page.text and "read-only" in page.text
            for path in (f"/sagas/{saga_id}/cancel", f"/sagas/{saga_id}/retry", "/dlq/1/replay"):
                refused = await http.post(path, data={"reason": "x"})
                assert refused.status_code == 403, path
            assert (await http.post(f"/sagas/{saga_id}/delete")).status_code == 404
            assert (await http.put(f"/sagas/{saga_id}")).status_code == 405
            login = await http.post("/login", data={"password": TOKEN})
            assert login.status_code == 403
        # Credentials alone do not turn actions on.
        async with browse(system, settings(console_token=TOKEN)) as http:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            page = await http.get(f"/sagas/{saga_id}", headers=bearer)
            assert page.status_code == 200 and 'id="cancel"' not in page.text
            refused = await http.post(f"/sagas/{saga_id}/cancel", headers=bearer)
            assert refused.status_code == 403
        assert (await system.client.get(saga_id)).status is SagaStatus.RUNNING


async def test_actions_need_authentication_and_record_the_user(tmp_path: Path) -> None:
    config = settings(
        console_actions=True,
        console_token=TOKEN,
        console_users=f"alice:{PASSWORD},bob:bob-pass-5678",
    )
    seen: list[httpx.Response] = []
    async with EmbeddedSystem(tmp_path / "c.db", sagas=[ORDER], run_workers=[]) as system:
        first = await system.client.start(ORDER, order_input())
        second = await system.client.start(ORDER, order_input())
        letter = await archive(system, b"a command nobody could read")
        async with browse(system, config) as http:

            async def get(path: str, **kw: Any) -> httpx.Response:
                seen.append(await http.get(path, **kw))
                return seen[-1]

            anonymous = await get(f"/sagas/{first}")
            assert anonymous.status_code == 303
            assert anonymous.headers["location"].startswith("/login?next=%2Fsagas%2F")
            assert (await http.post(f"/sagas/{first}/cancel")).status_code == 401
            wrong = {"Authorization": f"Bearer {TOKEN[:-1]}x"}
            assert (await get("/sagas", headers=wrong)).status_code == 303
            assert (await http.post(f"/sagas/{first}/cancel", headers=wrong)).status_code == 401
            bad_basic = _basic("alice", PASSWORD + "x")
            assert (await http.post(f"/sagas/{first}/cancel", headers=bad_basic)).status_code == 401
            swapped = _basic("bob", PASSWORD)  # alice's password with bob's name
            assert (await get("/sagas", headers=swapped)).status_code == 303

            # A bearer token: no CSRF token needed (no browser sends it by itself).
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            page = await get(f"/sagas/{first}", headers=bearer)
            assert 'id="cancel"' in page.text and 'id="retry"' in page.text
            done = await http.post(
                f"/sagas/{first}/cancel", headers=bearer, data={"reason": "customer called"}
            )
            assert done.status_code == 303, done.text

            # Basic auth: the browser resends it by itself, so the form's token is needed.
            basic = _basic("alice", PASSWORD)
            no_csrf = await http.post(f"/sagas/{second}/cancel", headers=basic)
            assert no_csrf.status_code == 403
            page = await get(f"/sagas/{second}", headers=basic)
            csrf = _csrf(page)
            other_site = {**basic, "Origin": "http://evil.example"}
            forged = await http.post(
                f"/sagas/{second}/cancel", headers=other_site, data={"csrf": csrf}
            )
            assert forged.status_code == 403
            proxied = {**basic, "Origin": "https://ops.example", "X-Forwarded-Host": "ops.example"}
            done = await http.post(f"/sagas/{second}/cancel", headers=proxied, data={"csrf": csrf})
            assert done.status_code == 303, done.text

            # The login form: a session cookie, its own CSRF token.
            failed = await http.post("/login", data={"user": "alice", "password": "nope-nope"})
            assert failed.status_code == 401
            login = await http.post(
                "/login", data={"user": "alice", "password": PASSWORD, "next": "//evil.example"}
            )
            assert (login.status_code, login.headers["location"]) == (303, "/sagas")
            cookie = login.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            page = await get(f"/sagas/{first}")
            assert page.status_code == 200 and 'action="/logout"' in page.text
            refused = await http.post(f"/sagas/{first}/retry", data={"csrf": "guess"})
            assert refused.status_code == 403
            retried = await http.post(f"/sagas/{first}/retry", data={"csrf": _csrf(page)})
            assert retried.status_code == 409  # compensating: nothing to retry, said why
            page = await get(f"/dlq/{letter}")
            assert 'id="replay"' in page.text
            replayed = await http.post(f"/dlq/{letter}/replay", data={"csrf": _csrf(page)})
            assert replayed.status_code == 303, replayed.text
            page = await get(f"/dlq/{letter}")
            assert "by alice" in page.text and 'id="replay"' not in page.text
            await http.post("/logout")
            assert (await get("/sagas")).status_code == 303

    actors = {
        saga_id: [(h.event, h.actor, h.detail) for h in detail.history if h.actor != "engine"]
        for saga_id in (first, second)
        if (detail := await _detail(tmp_path, saga_id))
    }
    assert actors[first][0][:2] == ("cancelled", "console")
    assert "reason: customer called" in (actors[first][0][2] or "")
    assert actors[second][0][:2] == ("cancelled", "alice")
    for response in seen:
        for secret in (TOKEN, PASSWORD, "bob-pass-5678"):
            assert secret not in response.text
            assert secret not in str(response.headers)


async def test_guessing_credentials_is_throttled() -> None:
    app = create_app(settings(console_token=TOKEN, console_users=f"alice:{PASSWORD}"))
    app.state.console.sessions.max_failures = 3
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
        for guess in ("a" * 16, "b" * 16):
            wrong = await http.get("/sagas", headers={"Authorization": f"Bearer {guess}"})
            assert wrong.status_code == 303
        failed = await http.post("/login", data={"user": "alice", "password": "guess-guess"})
        assert failed.status_code == 401
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, _basic("alice", PASSWORD)):
            throttled = await http.get("/sagas", headers=headers)  # even the right ones
            assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "60")
        login = await http.post("/login", data={"user": "alice", "password": PASSWORD})
        assert login.status_code == 429


def _basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def _csrf(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, "no CSRF token in the form"
    return found.group(1)


async def _detail(tmp_path: Path, saga_id: str) -> SagaDetail:
    """The saga as stored, read after the system stopped."""
    from engine.client import SagaClient

    async with await SagaClient.connect(f"sqlite:///{tmp_path / 'c.db'}", ()) as client:
        return await client.get(saga_id)


# -- settings ---------------------------------------------------------------------------


def test_console_settings_refuse_weak_or_malformed_secrets_without_showing_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cases = {
        "SAGA_CONSOLE_TOKEN": ("short-token", "at least 16 characters"),
        "SAGA_CONSOLE_USERS": ("alice:shortpw", "at least 8 characters"),
        "SAGA_CONSOLE_TRACE_URL": ("javascript:alert(1)//{trace_id}", "http(s) URL"),
    }
    for variable, (value, message) in cases.items():
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            with pytest.raises(ConfigError, match=re.escape(message)) as refused:
                load_console_settings()
            assert value not in str(refused.value)
    for users in ("alice", "alice:password1,alice:password2", "a\nb:password1"):
        with pytest.raises(ConfigError, match="SAGA_CONSOLE_USERS"):
            settings(console_users=users)
    secret_file = tmp_path / "users"
    secret_file.write_text("carol:carol-password-1\n")
    monkeypatch.setenv("SAGA_CONSOLE_USERS_FILE", str(secret_file))
    loaded = load_console_settings()
    assert loaded.users == {"carol": "carol-password-1"}
    assert loaded.authenticate("carol", "carol-password-1") == "carol"
    assert loaded.authenticate("carol", "carol-password-2") is None
    assert "carol-password-1" not in repr(loaded)
    assert redact("password carol-password-1 said") == "password *** said"
    assert isinstance(loaded.console_users, SecretStr)


# -- the pure timeline --------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def detail(
    status: SagaStatus, steps: list[StepView], *history: tuple[float, str, str | None, str | None]
) -> SagaDetail:
    return SagaDetail(
        id="s",
        name="trip",
        version=1,
        status=status,
        created_at=T0,
        updated_at=at(max(h[0] for h in history)),
        input={},
        steps=steps,
        history=[
            HistoryView(at=at(t), event=e, step=s, detail=d, actor="engine")
            for t, e, s, d in history
        ],
    )


def step(
    name: str, position: int, status: StepStatus, attempts: int, undo: int = 0, started: float = 0
) -> StepView:
    return StepView(
        name=name,
        position=position,
        status=status,
        attempts=attempts,
        compensation_attempts=undo,
        started_at=at(started),
        finished_at=None,
        error=None,
        reply=None,
    )


def test_the_timeline_shows_retries_timeouts_and_the_pivot() -> None:
    saga = detail(
        SagaStatus.COMPLETED,
        [
            step("hotel", 0, StepStatus.SUCCEEDED, 2),
            step("pay", 1, StepStatus.SUCCEEDED, 1, started=2),
            step("mail", 2, StepStatus.SUCCEEDED, 2, started=3),
        ],
        (0, "started", None, None),
        (1, "step_error", "hotel", "attempt 1/4: busy; retry in 0.500s"),
        (2, "step_succeeded", "hotel", "attempt 2"),
        (3, "step_succeeded", "pay", "attempt 1"),
        (5, "step_timed_out", "mail", "no reply within 2s (attempt 1)"),
        (5, "step_error", "mail", "attempt 1/unlimited: no reply; retry in 1.000s"),
        (7, "step_succeeded", "mail", "attempt 2"),
        (7, "completed", None, None),
    )
    shown = timeline(saga, at(10), pivot="pay")
    assert [(b.step, b.attempt, b.outcome, b.start, b.end) for b in shown.bars] == [
        ("hotel", 1, "error", at(0), at(1)),
        ("hotel", 2, "succeeded", at(1.5), at(2)),
        ("pay", 1, "succeeded", at(2), at(3)),
        ("mail", 1, "timed_out", at(3), at(5)),
        ("mail", 2, "succeeded", at(6), at(7)),
    ]
    assert [b.pivot for b in shown.bars] == [False, False, True, False, False]
    assert (shown.start, shown.end) == (at(0), at(7))
    assert [b.left for b in shown.bars] == [0.0, 21.429, 28.571, 42.857, 85.714]


def test_the_timeline_shows_compensation_retries_and_what_is_in_flight() -> None:
    undone = detail(
        SagaStatus.COMPENSATED,
        [
            step("hotel", 0, StepStatus.COMPENSATED, 1, undo=2),
            step("pay", 1, StepStatus.FAILED, 1, started=1),
        ],
        (0, "started", None, None),
        (1, "step_succeeded", "hotel", "attempt 1"),
        (2, "step_failed", "pay", "declined"),
        (2, "compensating", None, "step 'pay' failed: declined"),
        (3, "compensation_error", "hotel", "attempt 1/20: down; retry in 1.000s"),
        (5, "step_compensated", "hotel", "attempt 2"),
        (5, "compensated", None, None),
    )
    shown = timeline(undone, at(9))
    assert [(b.step, b.kind, b.attempt, b.outcome, b.start, b.end) for b in shown.bars] == [
        ("hotel", "forward", 1, "succeeded", at(0), at(1)),
        ("pay", "forward", 1, "failed", at(1), at(2)),
        ("hotel", "compensation", 1, "error", at(2), at(3)),
        ("hotel", "compensation", 2, "compensated", at(4), at(5)),
    ]
    running = detail(
        SagaStatus.RUNNING,
        [
            step("hotel", 0, StepStatus.SUCCEEDED, 1),
            step("pay", 1, StepStatus.DISPATCHED, 1, started=1),
        ],
        (0, "started", None, None),
        (1, "step_succeeded", "hotel", "attempt 1"),
    )
    shown = timeline(running, at(4))
    assert [(b.step, b.outcome, b.start, b.end) for b in shown.bars] == [
        ("hotel", "succeeded", at(0), at(1)),
        ("pay", "running", at(1), None),
    ]
    assert shown.end == at(4) and shown.bars[1].width == 75.0


def test_the_timeline_of_a_compensation_parked_then_retried_by_an_operator() -> None:
    saga = detail(
        SagaStatus.COMPENSATED,
        [
            step("hotel", 0, StepStatus.COMPENSATED, 1, undo=3),
            step("pay", 1, StepStatus.FAILED, 1, started=1),
        ],
        (0, "started", None, None),
        (1, "step_succeeded", "hotel", "attempt 1"),
        (2, "step_failed", "pay", "declined"),
        (2, "compensating", None, "step 'pay' failed: declined"),
        (3, "compensation_error", "hotel", "attempt 1/2: down; retry in 1.000s"),
        (5, "parked", None, "compensation of step 'hotel' failed 2 times: down"),
        (
            8,
            "retried",
            "hotel",
            "reason: back up; compensation of step 'hotel' dispatched as attempt 3, with a "
            "fresh budget of 2 attempts",
        ),
        (9, "step_compensated", "hotel", "attempt 3"),
        (9, "compensated", None, None),
    )
    shown = timeline(saga, at(20))
    assert [(b.step, b.kind, b.attempt, b.outcome, b.start, b.end) for b in shown.bars] == [
        ("hotel", "forward", 1, "succeeded", at(0), at(1)),
        ("pay", "forward", 1, "failed", at(1), at(2)),
        ("hotel", "compensation", 1, "error", at(2), at(3)),
        ("hotel", "compensation", 2, "parked", at(4), at(5)),
        ("hotel", "compensation", 3, "compensated", at(8), at(9)),
    ]


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_the_console_on_postgresql(tmp_path: Path) -> None:
    async with (
        fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as url,
        EmbeddedSystem(tmp_path / "unused.db", database_url=url, sagas=[ORDER]) as system,
    ):
        ok = await system.client.start(ORDER, order_input(), saga_id="ord_1%x")
        undone = await system.client.start(ORDER, order_input("charge_payment"))
        await settle(system, ok, undone)
        async with browse(system) as http:
            assert rows(await http.get("/sagas?q=customer_id%3Dpoor")) == [undone]
            # LIKE's wildcards are searched for as themselves.
            assert rows(await http.get("/sagas?q=ord_1%25")) == [ok]
            assert rows(await http.get("/sagas?q=ord%251")) == []
            assert rows(await http.get("/sagas?limit=1")) == [undone]
            page = await http.get(f"/sagas/{undone}")
            assert element(page, "status") == "compensated"
            assert [b for b in bars(page)][-1] == ("reserve_inventory", "compensation")


# -- sagactl console ----------------------------------------------------------------------


def test_sagactl_console_serves_and_prints_its_url(tmp_path: Path) -> None:
    database = tmp_path / "served.db"
    asyncio.run(_migrated(f"sqlite:///{database}"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAGA_DATABASE_URL": f"sqlite:///{database}",
        "SAGA_SAGAS": "",
        "SAGA_CONSOLE_TOKEN": TOKEN,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "console", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # the server prints it once it listens
        found = re.match(r"saga-engine console on (http://127\.0\.0\.1:\d+/) \(read-only\)$", line)
        assert found, line
        with httpx.Client(base_url=found.group(1), timeout=30) as http:
            page = http.get("/sagas", headers={"Authorization": f"Bearer {TOKEN}"})
            assert page.status_code == 200 and "No saga matches." in page.text
            css = http.get("/static/console.css")
            assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert TOKEN not in errors


async def _migrated(url: str) -> None:
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()


def test_the_core_imports_without_the_console_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, engine, engine.cli.app, engine.client; "
            "print(sorted(m for m in ('starlette', 'jinja2', 'uvicorn') if m in sys.modules))",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (probe.returncode, probe.stdout.strip()) == (0, "[]"), probe.stderr
    for name in [m for m in sys.modules if m.startswith("engine.console")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m == "starlette" or m.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    result = CliRunner().invoke(cli, ["console"])
    assert result.exit_code == 1
    assert "console needs starlette: pip install 'saga-engine[console]'" in result.stderr
