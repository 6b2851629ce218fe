"""Commands of ``sagactl``.

Every error a user can cause ends as one line on stderr and a non-zero exit: 1 for a
failed operation, 2 for bad usage (click's convention). Commands that wait for a saga
(``start --wait``, ``show --follow``) exit with its outcome: 0 completed,
:data:`EXIT_COMPENSATED`, :data:`EXIT_PARKED`, or :data:`EXIT_TIMEOUT`.
"""

from __future__ import annotations

import getpass
import json
import sys
import traceback
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from engine.errors import ConfigError, LimitError, SagaError
from engine.limits import check_actor, check_name, check_reason, check_saga_id
from engine.redact import escape_controls, redact
from engine.retention import PRUNE_BATCH, format_age, parse_age
from engine.states import SagaStatus
from engine.timefmt import TimeFormat

if TYPE_CHECKING:
    from pydantic import ValidationError

    from engine.cli.render import Times
    from engine.client import SagaClient
    from engine.settings import Settings
    from engine.views import BulkReplayResult, PruneResult, SagaDetail

# Only what ``sagactl --help`` needs is imported above: click, rich's console, and
# small modules. The database, the brokers, telemetry, Alembic and the settings'
# pydantic models are imported by the commands that use them, so a command starts
# without paying for the others (a test checks what --help and list import).

T = TypeVar("T")

stdout = Console(soft_wrap=False)
stderr = Console(stderr=True)

#: Exit status of ``start --wait`` and ``show --follow`` for a compensated saga.
EXIT_COMPENSATED = 3
#: ... for a parked saga (an operator must look: ``sagactl retry``).
EXIT_PARKED = 4
#: ... when ``start --wait --timeout`` ran out first (the saga goes on).
EXIT_TIMEOUT = 5
#: How often ``show --follow`` and ``start --wait`` read the saga (seconds): modest,
#: each read is a few small queries on the shared database.
POLL_INTERVAL = 0.5

OUTPUTS = ("text", "json", "jsonl")


def fail(message: str, code: int = 1) -> None:
    """One line on stderr (control characters shown escaped), exit status ``code``."""
    click.echo(f"sagactl: error: {escape_controls(redact(message))}", err=True)
    sys.exit(code)


def checked(value: str, check: Callable[[str, str], None], what: str) -> str:
    """``value`` if ``check`` (one of engine.limits' ``check_*``, which the client
    applies too) accepts it; else a one-line error naming ``what``, before anything
    is read or stored."""
    try:
        check(value, what)
    except LimitError as exc:
        fail(str(exc))
    return value


def run(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    from sqlalchemy.exc import DBAPIError

    try:
        return asyncio.run(coro)
    except SagaError as exc:
        fail(str(exc))
    except DBAPIError as exc:
        orig = getattr(exc, "orig", None) or exc
        fail(f"database error: {str(orig).strip().splitlines()[0]}")
    except KeyboardInterrupt:
        click.echo("sagactl: interrupted", err=True)
        sys.exit(130)
    raise AssertionError("unreachable")


def _output(options: Options, value: Any, human: Callable[..., None], **how: Any) -> None:
    """``value`` as ``--output`` says: JSON (``--json``), JSON lines, or the human
    rendering ``human(console, value, **how)``."""
    if options.as_json:
        _dump(options, value)
    else:
        human(stdout, value, **how)


def _dump(options: Options, value: Any) -> None:
    """``value`` as JSON, indented or (``--output jsonl``) one object per line."""
    from engine.cli import render

    if options.output == "jsonl":
        render.dump_json_lines(stdout, value)
    else:
        render.dump_json(stdout, value)


class Options:
    """What the group's options chose, shared with every command (``--json`` and
    ``--output`` after a command land here too)."""

    def __init__(
        self, settings: Settings, output: str = "text", time_format: TimeFormat | None = None
    ) -> None:
        self.settings = settings
        #: ``text``, ``json`` or ``jsonl``.
        self.output = output
        #: How tables show times (None: each command's default).
        self.time_format = time_format

    @property
    def as_json(self) -> bool:
        """Machine output (JSON or JSON lines): no tables, no progress bars."""
        return self.output != "text"

    def times(self, default: TimeFormat = TimeFormat.RELATIVE) -> Times:
        """How this command's tables show times, relative to one instant."""
        from engine.cli.render import Times

        return Times(self.time_format or default)


pass_options = click.make_pass_decorator(Options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    metavar="URL",
    help="sqlite:///file.db or postgresql://user:pass@host/db [env SAGA_DATABASE_URL; "
    "default sqlite:///saga.db]",
)
@click.option(
    "--sagas",
    metavar="MODULES",
    help="comma-separated modules with saga definitions [env SAGA_SAGAS; none by default]",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable JSON on stdout")
@click.option(
    "--output",
    "-o",
    type=click.Choice(OUTPUTS),
    help="text (tables), json (as --json) or jsonl (one JSON object per line)",
)
@click.option(
    "--time-format",
    type=click.Choice([f.value for f in TimeFormat]),
    help="times in tables: relative (3m ago; the default), iso (UTC) or raw; JSON is "
    "always ISO 8601 UTC",
)
@click.version_option(package_name="saga-engine")
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    sagas: str | None,
    as_json: bool,
    output: str | None,
    time_format: str | None,
) -> None:
    """Inspect and drive saga-engine sagas."""
    overrides: dict[str, Any] = {}
    if database_url:
        overrides["database_url"] = database_url
    if sagas:
        overrides["sagas"] = sagas
    from engine.settings import load_settings

    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc))
    ctx.obj = Options(
        settings,
        output or ("json" if as_json else "text"),
        TimeFormat(time_format) if time_format else None,
    )


def _bad_settings(exc: ValidationError) -> str:
    """One line naming each bad variable and why; never the value, which may be a
    secret (a URL with a password, a key)."""
    from engine.settings import bad_settings

    return bad_settings(exc)


def _json_option(func: Any) -> Any:
    """Accept ``--json`` and ``--output`` after the subcommand too (``sagactl list
    --json``, ``sagactl list -o jsonl``); the last one given wins."""

    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_object(Options).output = "json"  # type: ignore[union-attr]

    def set_output(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.find_object(Options).output = value  # type: ignore[union-attr]

    func = click.option(
        "--output",
        "-o",
        "output_local",
        type=click.Choice(OUTPUTS),
        expose_value=False,
        callback=set_output,
        help="text (tables), json (as --json) or jsonl (one JSON object per line)",
    )(func)
    return click.option(
        "--json",
        "as_json_local",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="machine-readable JSON on stdout",
    )(func)


def _time_format_option(func: Any) -> Any:
    """``--time-format`` after the subcommand too: how its tables show times."""

    def set_format(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.find_object(Options).time_format = TimeFormat(value)  # type: ignore[union-attr]

    return click.option(
        "--time-format",
        "time_format_local",
        type=click.Choice([f.value for f in TimeFormat]),
        expose_value=False,
        callback=set_format,
        help="relative (3m ago; the default), iso (UTC, to the second) or raw (full "
        "precision, durations in seconds); JSON is always ISO 8601 UTC",
    )(func)


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A positive duration: ``30s``, ``5m``, ``2h``, or seconds."""
    if value is None:
        return None
    try:
        duration = parse_age(value, bare_seconds=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if duration <= timedelta(0):
        raise click.BadParameter("must be positive", ctx, param)
    return duration


@cli.command()
@click.argument("saga")
@click.option(
    "--input",
    "input_text",
    required=True,
    metavar="JSON",
    help="saga input as JSON, @path to a JSON file, or - to read it from stdin",
)
@click.option("--id", "saga_id", metavar="ID", help="use this saga id instead of a new UUID")
@click.option(
    "--version",
    type=click.IntRange(1),
    help="start this version [default: SAGA_START_VERSIONS, else the newest an engine serves]",
)
@click.option(
    "--wait",
    is_flag=True,
    help="wait until the saga finishes (an engine must run) and print how it ended",
)
@click.option(
    "--timeout",
    callback=_duration_option,
    metavar="DURATION",
    help="with --wait: give up waiting after this long (30s, 5m, 2h) [default: never]",
)
@_json_option
@pass_options
def start(
    options: Options,
    saga: str,
    input_text: str,
    saga_id: str | None,
    version: int | None,
    wait: bool,
    timeout: timedelta | None,
) -> None:
    """Start saga SAGA with the given input (an engine daemon advances it); print its id.

    With --wait, then wait until it is completed (exit status 0), compensated (3) or
    parked (4), or until --timeout (5: the saga goes on, unwatched)."""
    from engine.cli import render

    if timeout is not None and not wait:
        raise click.UsageError("--timeout is for --wait")
    if saga_id is not None:
        checked(saga_id, check_saga_id, "--id")
    data = _json_argument(input_text, "--input")

    async def go() -> tuple[str, SagaDetail | None]:
        client = await _client(options, with_sagas=True)
        async with client:
            new_id = await client.start(saga, data, saga_id=saga_id, version=version)
            if not wait:
                return new_id, None
            if not options.as_json:
                stdout.print(render.shown(new_id))  # at once: the id is known now
            seconds = timeout.total_seconds() if timeout is not None else float("inf")
            try:
                return new_id, await client.wait(new_id, timeout=seconds, interval=POLL_INTERVAL)
            except TimeoutError:
                return new_id, None

    new_id, outcome = run(go())
    if not wait:
        if options.as_json:
            _dump(options, {"id": new_id, "saga": saga})
        else:
            stdout.print(render.shown(new_id))
        return
    if outcome is None:
        assert timeout is not None
        if options.as_json:
            _dump(options, {"id": new_id, "saga": saga, "status": None, "error": None})
        fail(
            f"saga {new_id} did not finish within {format_age(timeout)}; it goes on "
            f"(sagactl show --follow {new_id})",
            EXIT_TIMEOUT,
        )
    assert outcome is not None
    if options.as_json:
        _dump(
            options,
            {"id": new_id, "saga": saga, "status": outcome.status.value, "error": outcome.error},
        )
    else:
        stdout.print(render.outcome(outcome, options.times()), soft_wrap=True, highlight=False)
    sys.exit(_exit_status(outcome.status))


def _exit_status(status: SagaStatus) -> int:
    """The exit status of a command that waited for a saga to settle."""
    if status is SagaStatus.COMPENSATED:
        return EXIT_COMPENSATED
    if status is SagaStatus.PARKED:
        return EXIT_PARKED
    return 0


def _json_argument(text: str, flag: str) -> Any:
    """JSON given on the command line, ``@path`` to a file holding it, or ``-``: read
    it from stdin."""
    source = ""
    if text == "-":
        if _interactive():
            click.echo(f"reading {flag} from stdin (end with Ctrl-D)", err=True)
        try:
            text, source = sys.stdin.read(), " (from stdin)"
        except UnicodeDecodeError:
            fail(f"{flag} -: stdin is not UTF-8 text")
        if not text.strip():
            fail(f"{flag} -: stdin is empty; pipe the JSON in (echo '{{...}}' | sagactl ...)")
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            fail(f"cannot read {flag.lstrip('-')} file {str(path)!r}: {exc.strerror}")
        except UnicodeDecodeError:
            fail(f"{flag.lstrip('-')} file {str(path)!r} is not UTF-8 text")
        source = f" (from {str(path)!r})"
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"invalid JSON for {flag}{source}: {exc.msg} at line {exc.lineno} column {exc.colno}")


def _key_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``--key NAME=VALUE``, repeatable: the business keys a saga must all have."""
    keys: dict[str, str] = {}
    for text in values:
        name, eq, value = text.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"{text!r} is not NAME=VALUE (e.g. order_id=4711)", ctx, param)
        if name in keys and keys[name] != value:
            raise click.BadParameter(f"{name!r} is given two values", ctx, param)
        keys[name] = value
    return keys


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--since``/``--until``: :func:`engine.timefmt.parse_instant`."""
    from datetime import UTC, datetime

    from engine.timefmt import parse_instant

    if value is None:
        return None
    try:
        return parse_instant(value, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _cursor_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--after``: the cursor a list printed, checked before anything is read."""
    if value is None:
        return None
    from engine.views import SagaCursor

    try:
        return SagaCursor.decode(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@cli.command(name="list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in SagaStatus]),
    help="only sagas in this state",
)
@click.option("--saga", "name", metavar="NAME", help="only sagas of this definition")
@click.option("--version", type=click.IntRange(1), help="only sagas of this version")
@click.option("--held", is_flag=True, help="only sagas held for want of an engine serving them")
@click.option(
    "--key",
    "keys",
    multiple=True,
    metavar="NAME=VALUE",
    callback=_key_option,
    help="only sagas with this business key (repeat: all of them)",
)
@click.option(
    "--since",
    callback=_time_option,
    metavar="TIME",
    help="only sagas created since TIME: an age (2h, 7d) or ISO 8601",
)
@click.option(
    "--until",
    callback=_time_option,
    metavar="TIME",
    help="only sagas created before TIME: an age (2h, 7d) or ISO 8601",
)
@click.option(
    "--after",
    callback=_cursor_option,
    metavar="CURSOR",
    help="the next page: sagas after the cursor the previous page printed",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--wide", "-w", is_flag=True, help="the full id, the last update and the error too")
@_time_format_option
@_json_option
@pass_options
def list_(
    options: Options,
    status: str | None,
    name: str | None,
    version: int | None,
    held: bool,
    keys: dict[str, str],
    since: Any,
    until: Any,
    after: Any,
    limit: int,
    wide: bool,
) -> None:
    """List sagas, newest first: the short id (show, retry and cancel take it), the
    saga and its version, status, when created and how long it ran (so far).

    On a terminal a table as wide as the terminal (long values cut with "…"); in a
    pipe plain columns, a header and one line per saga. When more follow, the cursor
    of the next page is printed on stderr (each saga's "cursor" in --json): pass it
    to --after."""
    from engine.cli import render
    from engine.limits import check_key
    from engine.views import SagaPage, TimeRange

    if name is not None:
        checked(name, check_name, "--saga")
    for key, value in keys.items():
        checked(key, check_name, "--key's name")
        try:
            check_key(key, value)
        except LimitError as exc:
            fail(f"--key: {exc}")

    async def go() -> SagaPage:
        async with await _client(options) as client:
            return await client.page(
                status=SagaStatus(status) if status else None,
                name=name,
                limit=limit,
                version=version,
                held=held,
                keys=keys,
                created=TimeRange(since, until) if since or until else None,
                after=after,
            )

    page = run(go())
    _output(options, page.sagas, render.saga_list, wide=wide, times=options.times())
    if page.next is not None:
        import shlex

        click.echo(f"more: --after {shlex.quote(page.next)}", err=True)


@cli.command()
@click.argument("saga_id")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="stream its history as it grows until it finishes; exit status 0 completed, "
    "3 compensated, 4 parked",
)
@_time_format_option
@_json_option
@pass_options
def show(options: Options, saga_id: str, follow: bool) -> None:
    """Show one saga: what it awaits (each step's reply, signal or retry, until when,
    and whether its message is still unsent), its steps, their attempts and errors,
    and its history. SAGA_ID may be the start of an id (at least 4 characters), as
    list shows it.

    With --follow, print its history, then each new entry as it comes (read every
    half second), until the saga is completed (exit status 0), compensated (3) or
    parked (4); with --json or -o jsonl, each entry as one JSON object per line."""
    from engine.cli import render

    checked(saga_id, check_saga_id, "the saga id")
    if follow:
        _follow(options, saga_id)
        return

    async def go() -> Any:
        async with await _client(options) as client:
            return await client.get(await client.resolve(saga_id))

    detail = run(go())
    _output(options, detail, render.saga_detail, times=options.times())


def _follow(options: Options, saga_id: str) -> None:
    """``show --follow``: the history as it grows, then the outcome as exit status.
    Its lines carry times as instants (ISO) unless --time-format says otherwise: a
    relative time is stale as soon as the next line prints."""
    from engine.cli import render

    times = options.times(TimeFormat.ISO)

    async def go() -> SagaDetail:
        async with await _client(options) as client:
            full_id = await client.resolve(saga_id)
            printed = 0
            detail = None
            async for detail in client.follow(full_id, interval=POLL_INTERVAL):
                if printed == 0 and not options.as_json:
                    stdout.print(
                        f"[bold]saga[/] {render.shown(detail.id)}  {render.shown(detail.name)} "
                        f"v{detail.version}",
                        soft_wrap=True,
                    )
                for entry in detail.history[printed:]:
                    if options.as_json:
                        render.dump_json_lines(stdout, entry)
                    else:
                        stdout.print(
                            render.history_line(entry, times), highlight=False, soft_wrap=True
                        )
                printed = len(detail.history)
            assert detail is not None
            return detail

    detail = run(go())
    if not options.as_json:
        stdout.print(render.outcome(detail, times), highlight=False, soft_wrap=True)
    sys.exit(_exit_status(detail.status))


# -- operator repair -------------------------------------------------------------------


def default_actor() -> str:
    """The OS user name, recorded as who did an operator action."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (KeyError, OSError)
        return "operator"


def _actor_option(func: Any) -> Any:
    return click.option(
        "--actor",
        metavar="NAME",
        help="who acts, recorded in the saga's history [default: the OS user name]",
    )(func)


def _reason_option(func: Any) -> Any:
    return click.option("--reason", metavar="TEXT", help="why, recorded in the saga's history")(
        func
    )


def _actor(actor: str | None) -> str:
    return checked(
        (actor if actor is not None else default_actor()).strip(), check_actor, "--actor"
    )


def _reason(reason: str | None) -> str | None:
    return None if reason is None else checked(reason, check_reason, "--reason")


def _operate(
    options: Options, action: str, saga_id: str, actor: str | None, reason: str | None
) -> None:
    from engine.cli import render

    checked(saga_id, check_saga_id, "the saga id")
    who, why = _actor(actor), _reason(reason)

    async def go() -> Any:
        client = await _client(options, with_sagas=True)
        async with client:
            full_id = await client.resolve(saga_id)
            if action == "retry":
                return await client.retry(full_id, actor=who, reason=why)
            return await client.cancel(full_id, actor=who, reason=why)

    result = run(go())
    _output(options, result, render.operator_result)


@cli.command()
@click.argument("saga_id")
@_reason_option
@_actor_option
@_json_option
@pass_options
def retry(options: Options, saga_id: str, reason: str | None, actor: str | None) -> None:
    """Resume a parked saga: dispatch the compensation (or step) it stopped at again,
    with a fresh attempt budget. Also ends a retry backoff early. SAGA_ID may be the
    start of an id (at least 4 characters) that no other saga's id starts with."""
    _operate(options, "retry", saga_id, actor, reason)


@cli.command()
@click.argument("saga_id")
@_reason_option
@_actor_option
@_json_option
@pass_options
def cancel(options: Options, saga_id: str, reason: str | None, actor: str | None) -> None:
    """Stop a running saga and compensate what ran, the step in flight included.
    SAGA_ID may be the start of an id (at least 4 characters) that no other saga's id
    starts with."""
    _operate(options, "cancel", saga_id, actor, reason)


@cli.command()
@click.argument("saga_id")
@click.argument("event")
@click.option(
    "--payload",
    "payload_text",
    metavar="JSON",
    help="the event's data, a JSON object, or @path to a file holding one",
)
@_actor_option
@_json_option
@pass_options
def signal(
    options: Options, saga_id: str, event: str, payload_text: str | None, actor: str | None
) -> None:
    """Send the event EVENT to a saga: it completes the wait step waiting for it (or
    is kept until the saga gets there); PAYLOAD becomes that step's reply. SAGA_ID
    may be the start of an id (at least 4 characters) that no other saga's id starts
    with."""
    from engine.cli import render

    checked(saga_id, check_saga_id, "the saga id")
    checked(event, check_name, "the event name")
    payload = {} if payload_text is None else _json_argument(payload_text, "--payload")
    if not isinstance(payload, dict):
        fail("--payload must be a JSON object")
    who = _actor(actor)

    async def go() -> Any:
        client = await _client(options, with_sagas=True)
        async with client:
            return await client.signal(await client.resolve(saga_id), event, payload, actor=who)

    _output(options, run(go()), render.operator_result)


@cli.group()
def dlq() -> None:
    """Dead letters: messages a consumer gave up on, archived by the engine."""


@dlq.command(name="list")
@click.option("--limit", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--pending", is_flag=True, help="only dead letters not replayed yet")
@_time_format_option
@_json_option
@pass_options
def dlq_list(options: Options, limit: int, pending: bool) -> None:
    """List archived dead letters, newest first, with their reasons."""
    from engine.cli import render

    async def go() -> list[Any]:
        async with await _client(options) as client:
            return await client.dead_letters(limit=limit, pending_only=pending)

    letters = run(go())
    _output(options, letters, render.dead_letter_list, times=options.times())


@dlq.command(name="show")
@click.argument("letter", metavar="ID", type=int)
@_time_format_option
@_json_option
@pass_options
def dlq_show(options: Options, letter: int) -> None:
    """Show dead letter ID in full: where it came from and why, whether it was
    replayed, its headers and its body (text, or base64 if it is not UTF-8)."""
    from engine.cli import render

    async def go() -> Any:
        async with await _client(options) as client:
            return await client.dead_letter(letter)

    _output(options, run(go()), render.dead_letter, times=options.times())


@dlq.command(name="replay")
@click.argument("letter", metavar="[ID]", type=int, required=False)
@click.option("--saga", "saga_id", metavar="ID", help="every pending dead letter of saga ID")
@click.option(
    "--reason-contains",
    metavar="TEXT",
    help="every pending dead letter whose reason contains TEXT (any case)",
)
@click.option("--all", "every", is_flag=True, help="every pending dead letter")
@click.option(
    "--limit", type=click.IntRange(1), metavar="N", help="with a selection: at most N letters"
)
@click.option("--dry-run", is_flag=True, help="only list what would be replayed or refused")
@_reason_option
@_actor_option
@click.option(
    "--force",
    is_flag=True,
    help="replay even a message its saga no longer waits for",
)
@click.option(
    "--re-sign",
    is_flag=True,
    help="have the engine sign it afresh (you vouch for it: never for a forgery)",
)
@_json_option
@pass_options
def dlq_replay(
    options: Options,
    letter: int | None,
    saga_id: str | None,
    reason_contains: str | None,
    every: bool,
    limit: int | None,
    dry_run: bool,
    reason: str | None,
    actor: str | None,
    force: bool,
    re_sign: bool,
) -> None:
    """Send dead letter ID back to the destination it came from (through the outbox:
    the engine's relay publishes it) and mark it replayed. It goes as archived, with
    its own signature or none; --re-sign has the engine sign it with its key.

    Or many, oldest first: those of --saga, those whose reason contains
    --reason-contains (both: those of the saga with that reason), or --all. Each is
    checked as one alone; a refused one is listed with why, and the others go."""
    from engine.cli import render

    selected = saga_id is not None or reason_contains is not None
    if letter is not None and (selected or every or limit is not None or dry_run):
        raise click.UsageError(
            "give a dead letter ID or a selection (--saga, --reason-contains, --all; "
            "with --limit, --dry-run), not both"
        )
    if every and selected:
        raise click.UsageError("--all selects every pending letter: drop --saga/--reason-contains")
    if letter is None and not (selected or every):
        raise click.UsageError("give a dead letter ID, --saga, --reason-contains or --all")
    if saga_id is not None:
        checked(saga_id, check_saga_id, "--saga")
    if reason_contains is not None:
        checked(reason_contains, check_reason, "--reason-contains")
    who, why = _actor(actor), _reason(reason)
    if letter is None:
        _replay_many(options, saga_id, reason_contains, limit, dry_run, who, why, force, re_sign)
        return

    async def go() -> Any:
        async with await _client(options) as client:
            return await client.replay_dead_letter(
                letter, actor=who, reason=why, force=force, re_sign=re_sign
            )

    result = run(go())
    _output(options, result, render.replay_result)


def _replay_many(
    options: Options,
    saga_id: str | None,
    reason_contains: str | None,
    limit: int | None,
    dry_run: bool,
    actor: str,
    reason: str | None,
    force: bool,
    re_sign: bool,
) -> None:
    """``dlq replay`` of a selection: a progress bar on stderr while it runs (not with
    --json), then the summary. Refused letters are listed, not an error: the exit
    status is 0 once the selection was gone through."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from engine.cli import render

    async def go() -> BulkReplayResult:
        async with await _client(options) as client:

            async def replay(progress: Callable[[int], None] | None = None) -> BulkReplayResult:
                return await client.replay_dead_letters(
                    saga_id,
                    reason_contains,
                    limit,
                    actor=actor,
                    reason=reason,
                    force=force,
                    re_sign=re_sign,
                    dry_run=dry_run,
                    progress=progress,
                )

            if options.as_json:
                return await replay()
            total = await client.count_dead_letters(saga_id, reason_contains)
            columns = (
                TextColumn("checking dead letters" if dry_run else "replaying dead letters"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=stderr, transient=True) as bar:
                task = bar.add_task("replay", total=min(total, limit or total))
                return await replay(lambda done: bar.update(task, completed=done))

    result = run(go())
    _output(options, result, render.bulk_replay_result)


@cli.command()
@_json_option
@pass_options
def stats(options: Options) -> None:
    """Sagas by state and by saga, the oldest in progress, the outbox backlog and the
    dead letters not replayed."""
    from engine.cli import render

    async def go() -> Any:
        async with await _client(options) as client:
            return await client.stats()

    result = run(go())
    _output(options, result, render.stats)


@cli.command()
@click.argument("modules", nargs=-1, metavar="MODULES...")
@click.option(
    "--limit",
    type=click.IntRange(0, 100_000),
    default=20,
    show_default=True,
    help="saga ids shown per definition",
)
@_json_option
@pass_options
def check(options: Options, modules: tuple[str, ...], limit: int) -> None:
    """Before a deployment: which unfinished sagas engines loading only the saga
    modules MODULES (default: --sagas / SAGA_SAGAS) would hold, because their version
    is missing or was changed without a version bump. Exit status 1 if any."""
    from engine.cli import render
    from engine.registry import SagaRegistry

    names = [m for part in modules for m in part.split(",") if m.strip()]
    wanted = names or options.settings.saga_modules
    if not wanted:
        fail("no saga modules to check: name them, or set --sagas / SAGA_SAGAS")
    try:
        definitions = SagaRegistry.from_modules(wanted)
    except SagaError as exc:
        fail(str(exc))

    async def go() -> Any:
        async with await _client(options) as client:
            return await client.check(definitions, sample=limit)

    result = run(go())
    _output(options, result, render.check)
    if result.would_hold:
        sys.exit(1)


def _age_option(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    """``--older-than``: an age with its unit (``30d``, ``12h``, ``90m``, ``3600s``)."""
    try:
        return parse_age(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    callback=_age_option,
    required=True,
    metavar="AGE",
    help="finished sagas last changed longer ago than this: 30d, 12h, 90m, 3600s",
)
@click.option("--dry-run", is_flag=True, help="only count what would be removed")
@click.option(
    "--batch",
    type=click.IntRange(1, 5000),
    default=PRUNE_BATCH,
    show_default=True,
    help="sagas removed per transaction",
)
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    help="remove without asking (it asks only when stdin is a terminal)",
)
@_json_option
@pass_options
def prune(options: Options, older_than: timedelta, dry_run: bool, batch: int, yes: bool) -> None:
    """Remove finished sagas (completed, compensated) older than AGE with their steps,
    history, timers, sent outbox rows and inbox rows. Running, compensating and parked
    sagas are never removed.

    On a terminal it first says how many sagas would go and asks; --yes does not ask.
    Run from a script or a scheduler (stdin not a terminal) it does not ask."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from engine.cli import render

    age = older_than

    ask = not (yes or dry_run) and _interactive()

    async def go() -> PruneResult | None:
        async with await _client(options) as client:
            expected = None
            if ask:
                expected = await client.prune(age, dry_run=True)
                if expected.rows.sagas and not _confirm_prune(expected):
                    return None
            if dry_run or options.as_json:
                return await client.prune(age, dry_run=dry_run, batch=batch)
            expected = expected or await client.prune(age, dry_run=True)
            columns = (
                TextColumn("pruning finished sagas"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=stderr, transient=True) as bar:
                task = bar.add_task("prune", total=expected.rows.sagas)
                return await client.prune(
                    age,
                    batch=batch,
                    progress=lambda done: bar.update(task, completed=done.sagas),
                )

    result = run(go())
    if result is None:
        fail("not confirmed: nothing removed")
    _output(options, result, render.prune_result)


def _interactive() -> bool:
    """Whether someone at a terminal can answer a question (stdin is one)."""
    return sys.stdin.isatty()


def _confirm_prune(expected: PruneResult) -> bool:
    """Ask, on stderr, whether to remove what a dry run counted."""
    from engine.timefmt import iso

    rows = expected.rows
    click.echo(
        f"remove {rows.sagas:,} finished saga(s) last changed before {iso(expected.cutoff)}, "
        f"with {rows.steps:,} steps and {rows.history:,} history entries? [y/N] ",
        nl=False,
        err=True,
    )
    # Read here, not with click.confirm, whose input() echoes to stdout: stdout is
    # kept for the result (--json).
    return sys.stdin.readline().strip().lower() in ("y", "yes")


@cli.group()
def db() -> None:
    """Database schema."""


@db.command(name="upgrade")
@click.option("--revision", default="heads", show_default=True, help="of the engine's own history")
@click.option(
    "--scripts",
    "scripts",
    multiple=True,
    metavar="DIR",
    help="then a participant's Alembic scripts (a directory, or package:dir), to its "
    "heads; repeatable",
)
@pass_options
def db_upgrade(options: Options, revision: str, scripts: tuple[str, ...]) -> None:
    """Create or migrate the engine's tables (Alembic), then the participants' tables
    of each --scripts history (each keeps its own version table)."""

    from engine.cli import render
    from engine.connections import Connections

    async def go() -> None:
        async with Connections(options.settings) as connections:
            await connections.migrate(scripts, revision=revision)

    run(go())
    also = "".join(f"; {render.shown(location)} to heads" for location in scripts)
    stderr.print(f"database migrated to {render.shown(revision)}{also}")


@cli.group()
def new() -> None:
    """Write a saga or a worker of your own into your project, ready to run and test."""


_project_dir = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="your project's directory",
)


@new.command(name="worker")
@click.argument("name")
@_project_dir
def new_worker(name: str, directory: Path) -> None:
    """A participant NAME as a package NAME/: its commands, its worker (a handler and
    its compensation writing to its own table) and that table's Alembic history."""
    from engine.cli.scaffold import new_worker as write

    _wrote(lambda: write(name, directory))


@new.command(name="saga")
@click.argument("name")
@click.option(
    "--participant",
    "-p",
    "participants",
    multiple=True,
    required=True,
    metavar="NAME",
    help="a worker the saga reserves at, one step each, in this order; repeatable",
)
@_project_dir
def new_saga(name: str, participants: tuple[str, ...], directory: Path) -> None:
    """A saga NAME in sagas/NAME.py, and tests/test_NAME.py running it on the embedded
    runner: completed, and compensated when the last participant refuses."""
    from engine.cli.scaffold import new_saga as write

    _wrote(lambda: write(name, participants, directory))


def _wrote(write: Callable[[], Any]) -> None:
    """Run a ``sagactl new`` writer; list what it wrote and what to run next."""
    try:
        written = write()
    except ConfigError as exc:
        fail(str(exc))
    for path in written.files:
        click.echo(f"wrote {path}")
    click.echo("next:")
    for line in written.next_steps:
        click.echo(f"  {line}")


@cli.command()
@click.option(
    "--orders",
    "-n",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="how many orders to place",
)
@click.option("--seed", type=int, default=7, show_default=True, help="random seed of the order mix")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600,
    show_default=True,
    help="seconds to wait for every saga to finish",
)
@_json_option
@pass_options
def demo(options: Options, orders: int, seed: int, timeout: float) -> None:
    """Run the example (from a checkout of the repository): the engine and its three
    workers in this process, their tables migrated first; place orders.

    Some orders fail on purpose at each step (out of stock, insufficient funds,
    undeliverable address) and are compensated. One in ten is a large order (stock and
    payment in parallel, then a manager's approval), approved or rejected by a signal
    as `sagactl signal` sends one. Ends with the outcomes and the participants' ledger
    totals; exits 1 if any saga did not finish or a ledger does not balance.
    """
    from engine.cli.demo import run_demo

    result = run(
        run_demo(
            options.settings,
            orders=orders,
            seed=seed,
            timeout=timeout,
            console=stderr if options.as_json else stdout,
            quiet=options.as_json,
        )
    )
    if options.as_json:
        _dump(options, result)
    if not result.ok:
        sys.exit(1)


async def _client(options: Options, *, with_sagas: bool = False) -> SagaClient:
    """A client with this process's settings: database, topic prefix, broker kind.

    Commands that change sagas (``with_sagas``) trace what they do, so a saga's trace
    starts at ``sagactl start`` and an operator's retry shows up in it.
    """
    from engine.client import SagaClient

    if with_sagas:
        from engine.telemetry.setup import configure_tracing

        configure_tracing("sagactl")
    return await SagaClient.connect(settings=options.settings, sagas=None if with_sagas else ())


@cli.command(name="console")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8089, show_default=True, help="0: any free"
)
@pass_options
def console_cmd(options: Options, host: str, port: int) -> None:
    """Serve the web console: sagas, timelines, dead letters, stats (read-only unless
    SAGA_CONSOLE_ACTIONS; see README, Web console)."""
    try:
        from engine.console import load_console_settings, serve
    except ImportError as exc:
        missing = (exc.name or "its packages").split(".")[0]
        fail(f"the web console needs {missing}: pip install 'saga-engine[console]'")
    try:
        settings = load_console_settings(**options.settings.model_dump())
    except ConfigError as exc:
        fail(str(exc))
    run(serve(settings, host=host, port=port, announce=lambda url: click.echo(url)))


_grace = click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    help="seconds to finish in-flight work after SIGTERM/SIGINT",
)
_migrate = click.option(
    "--migrate/--no-migrate",
    default=False,
    show_default=True,
    help="apply database migrations on start",
)
_log_level = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error", "critical"]),
    default="info",
    show_default=True,
)
_metrics_port = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="serve /healthz, /readyz and /metrics on this port [env SAGA_METRICS_PORT; off]",
)
_log_format = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="stderr log lines as text or one JSON object each [env SAGA_LOG_FORMAT; text]",
)
_broker = click.option(
    "--broker-url",
    metavar="URL",
    help="kafka://host:9092, amqp://user:pass@host:5672/vhost or memory:// [env SAGA_BROKER_URL]",
)


def _daemon_settings(
    options: Options,
    broker_url: str | None,
    metrics_port: int | None,
    log_format: str | None,
    log_level: str,
    **flags: Any,
) -> Settings:
    """Flags over environment (``flags``: more settings, None where not given); sets
    up logging as a side effect (it needs the format), holding the libraries' lines
    back until the daemon is up (engine.telemetry.logs)."""
    updates: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if broker_url:
        updates["broker_url"] = broker_url
    if metrics_port is not None:
        updates["metrics_port"] = metrics_port
    if log_format:
        updates["log_format"] = log_format
    from engine.telemetry.logs import configure_logging

    settings = options.settings.model_copy(update=updates)
    configure_logging(log_level, settings.log_format, starting=True)
    return settings


@cli.command(name="engine")
@_broker
@_migrate
@_grace
@click.option(
    "--timer-interval",
    metavar="AGE",
    callback=_duration_option,
    help="pause between timer scans when the last one fired less than a batch: "
    "0.1s, 2m, or seconds [env SAGA_TIMER_INTERVAL; 0.1s]",
)
@click.option(
    "--timer-batch",
    type=click.IntRange(1, 100_000),
    help="most timers fired per transaction [env SAGA_TIMER_BATCH; 100]",
)
@_metrics_port
@_log_format
@_log_level
@pass_options
def engine_cmd(
    options: Options,
    broker_url: str | None,
    migrate: bool,
    grace: float,
    timer_interval: timedelta | None,
    timer_batch: int | None,
    metrics_port: int | None,
    log_format: str | None,
    log_level: str,
) -> None:
    """Run the orchestrator: reply consumer, timer scanner, outbox relay, and scheduled
    pruning of sent outbox and inbox rows (SAGA_OUTBOX_RETENTION, SAGA_INBOX_RETENTION)."""
    from engine.daemon import run_engine

    settings = _daemon_settings(
        options,
        broker_url,
        metrics_port,
        log_format,
        log_level,
        timer_interval=timer_interval,
        timer_batch=timer_batch,
    )
    run(run_engine(settings, migrate=migrate, grace=grace))


@cli.command(name="worker")
@click.argument("name")
@_broker
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="messages handled at once",
)
@_migrate
@_grace
@_metrics_port
@_log_format
@_log_level
@pass_options
def worker_cmd(
    options: Options,
    name: str,
    broker_url: str | None,
    concurrency: int,
    migrate: bool,
    grace: float,
    metrics_port: int | None,
    log_format: str | None,
    log_level: str,
) -> None:
    """Run participant NAME: a module:object holding a Worker, or the name of one of
    the workers SAGA_WORKERS lists; prunes its barrier rows older than
    SAGA_BARRIER_RETENTION on a schedule."""
    from engine.daemon import run_worker

    settings = _daemon_settings(options, broker_url, metrics_port, log_format, log_level)
    run(
        run_worker(
            settings,
            name,
            concurrency=concurrency,
            migrate=migrate,
            grace=grace,
        )
    )


def main() -> None:
    """The ``sagactl`` entry point. A crash's traceback is redacted like every other
    text (the daemons log it instead, once their logging is configured)."""
    sys.excepthook = _print_redacted
    cli(prog_name="sagactl")


def _print_redacted(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
