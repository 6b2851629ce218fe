"""Human-readable output of ``sagactl``: rich tables on a terminal, plain columns in a
pipe, and JSON (indented, or one object per line)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as default
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.markup import escape
from rich.segment import Segments
from rich.table import Table
from rich.text import Text

from engine.clock import utc_now
from engine.redact import displayed
from engine.retention import format_age
from engine.states import SagaStatus, StepStatus
from engine.timefmt import TimeFormat, iso, utc
from engine.views import (
    AwaitView,
    BulkReplayResult,
    CheckView,
    DeadLetterView,
    HistoryView,
    OperatorResult,
    PruneResult,
    ReplayResult,
    SagaDetail,
    SagaSummary,
    StatsView,
)

STATUS_STYLE = {
    SagaStatus.RUNNING: "cyan",
    SagaStatus.COMPENSATING: "yellow",
    SagaStatus.COMPLETED: "green",
    SagaStatus.COMPENSATED: "magenta",
    SagaStatus.PARKED: "bold red",
    StepStatus.FAILED: "red",
    StepStatus.TIMED_OUT: "red",
    StepStatus.CANCELLED: "red",
    StepStatus.SUCCEEDED: "green",
    StepStatus.COMPENSATED: "magenta",
}


#: C1 control characters, which JSON allows raw but a terminal may act on.
_C1 = re.compile(r"[\x80-\x9f]")


def shown(value: object) -> str:
    """Text from a saga, a handler, a message or an operator, as rich must print it:
    never read as markup (``[/]``, ``[link=...]``) and with control characters escaped.
    The one escaping rule of the CLI's tables and lines, the logs' rule
    (:func:`~engine.redact.displayed`, the console's too) plus rich's."""
    return escape(displayed(str(value)))


def styled(status: SagaStatus | StepStatus) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status.value}[/]" if style else status.value


@dataclass(frozen=True)
class Times:
    """How a rendering shows instants and durations (``--time-format``), and the
    instant relative times count from (one per command, so a table is consistent)."""

    format: TimeFormat = TimeFormat.RELATIVE
    now: datetime = default(default_factory=utc_now)

    def at(self, when: datetime | None) -> str:
        """An instant: ``3m ago``, ``2026-11-30T12:03:04Z``, ...; ``-`` for None."""
        return self.format.instant(when, self.now)

    def took(self, delta: timedelta | None) -> str:
        """A duration: ``1.2s``, ``3m5s`` (raw: seconds); ``-`` for None."""
        return self.format.span(delta)

    def due(self, when: datetime) -> str:
        """A deadline in a sentence: ``in 20s`` (relative), else ``at <instant>``."""
        text = self.at(when)
        return text if self.format is TimeFormat.RELATIVE else f"at {text}"


def _utc_times(value: Any) -> Any:
    """``value`` (a model's python dump) with every datetime in UTC."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, dict):
        return {k: _utc_times(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_utc_times(v) for v in value]
    return value


def json_data(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> Any:
    """What ``--json`` prints of ``value``: its fields as JSON values, every instant
    an ISO 8601 time in UTC (``2026-11-30T12:03:04.123456Z``), whatever zone it
    was read in."""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump()
    elif isinstance(value, dict):
        data = value
    else:
        data = [v.model_dump() for v in value]
    return to_jsonable_python(_utc_times(data))


def _json_text(data: Any, indent: int | None) -> str:
    """JSON escapes C0 control characters itself; the C1 ones (U+0080-U+009F, which
    some terminals act on) are escaped here too, which leaves the data the same."""
    separators = None if indent else (",", ":")
    text = json.dumps(data, indent=indent, ensure_ascii=False, separators=separators)
    return _C1.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def dump_json(console: Console, value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """Indented, highlighted JSON (``--json``, ``--output json``)."""
    highlighted = JSONHighlighter()(_json_text(json_data(value), 2))
    highlighted.no_wrap, highlighted.overflow = True, None  # as Console.print_json
    console.print(highlighted, soft_wrap=True)


def dump_json_lines(
    console: Console, value: BaseModel | Sequence[BaseModel] | dict[str, Any]
) -> None:
    """One JSON object per line (``--output jsonl``): each item of a list, or the one
    object; never wrapped nor coloured, for ``jq``, ``grep`` and log shippers."""
    data = json_data(value)
    for item in data if isinstance(data, list) else [data]:
        console.out(_json_text(item, None), highlight=False)


def plain_columns(
    console: Console, header: Sequence[str] | None, rows: Sequence[Sequence[str | Text]]
) -> None:
    """Stable plain columns, as for a pipe: the header (if any), then one line per row,
    cells padded to their column's width with two spaces between; no colour, no
    border, no wrapping, nothing cut. Cells are markup as the tables take it (values
    through :func:`shown`) or Text, printed as the terminal would show them."""
    lines = [[_plain(cell) for cell in row] for row in ([header] if header else []) + [*rows]]
    if not lines:
        return
    widths = [max(cell_len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [c + " " * (w - cell_len(c)) for c, w in zip(line, widths, strict=True)]
        console.out("  ".join(cells).rstrip(), highlight=False)


def _plain(cell: object) -> str:
    """What a cell (markup or Text) shows, without its styles."""
    return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain


def table_out(console: Console, table: Table, *, title: bool = True) -> None:
    """``table`` as a rich table on a terminal; in a pipe its title (unless
    ``title`` is false: a list whose rows say it all) and :func:`plain_columns`, so
    that ``grep`` and ``awk`` see each row whole on one line."""
    if console.is_terminal:
        console.print(table, highlight=False)
        return
    if title and table.title:
        console.out(_plain(table.title), highlight=False)
    header = [_plain(c.header) for c in table.columns] if table.show_header else None
    rows = [list(row) for row in zip(*(c.cells for c in table.columns), strict=True)]
    plain_columns(console, header, rows)


def short_id(saga_id: str) -> str:
    """How ``sagactl list`` shows an id: a UUID by its first 8 characters (``show``,
    ``retry`` and ``cancel`` take any unambiguous start of an id); any other id whole."""
    return saga_id[:8] if _UUID.fullmatch(saga_id) else saga_id


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _ran(s: SagaSummary, now: datetime) -> timedelta:
    """How long a saga ran: to its end if finished, else until now."""
    end = s.updated_at if s.status.is_terminal else now
    return end - s.created_at


def saga_list(
    console: Console,
    sagas: Sequence[SagaSummary],
    *,
    wide: bool = False,
    times: Times | None = None,
) -> None:
    """The sagas, one row each: id (short unless ``wide``), saga and version, status,
    created, how long it ran; ``wide`` adds the last update and the error (or why it
    is held). A table cut to the terminal's width (``…``) on a terminal, else
    :func:`plain_columns`."""
    times = times or Times()
    header = ["id", "saga", "status", "created"] + (["updated"] if wide else []) + ["ran"]
    if wide:
        header.append("error")
    rows = []
    for s in sagas:
        status = styled(s.status) + (" [magenta]held[/]" if s.held else "")
        row = [
            shown(s.id if wide else short_id(s.id)),
            f"{shown(s.name)} v{s.version}",
            status,
            times.at(s.created_at),
        ]
        if wide:
            row.append(times.at(s.updated_at))
        row.append(times.took(_ran(s, times.now)))
        if wide:
            row.append(shown(f"held: {s.held}" if s.held else s.error or ""))
        rows.append(row)
    table = Table(
        title=f"{len(sagas)} saga(s), newest first",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    narrowest = natural = 0
    for i, column in enumerate(header):
        # Only the free-text columns give way to a narrow terminal (rich narrows only
        # columns that may wrap), down to a few characters; their cells are cut with
        # "…", never wrapped. A short id cut so is still the start of its id.
        widest = max([len(column)] + [cell_len(_plain(r[i])) for r in rows])
        free = column in ("saga", "error") or (column == "id" and not wide)
        least = min(widest, 12 if column != "id" else 9) if free else widest
        table.add_column(column, no_wrap=not free, min_width=least)
        narrowest += least + 3  # its padding and the space between columns
        natural += widest + 3
    for row in rows:
        table.add_row(*(_one_line(cell) for cell in row))
    if not console.is_terminal or narrowest <= console.width:
        # A terminal wide enough draws it (titled); a pipe gets one plain line a saga.
        table_out(console, table, title=False)
        return
    # --wide may not fit a narrow terminal even so: then its lines are as long as they
    # need, nothing cut (the terminal folds them) rather than a column lost to cropping.
    options = console.options.update(width=natural)
    for line in console.render_lines(table, options, new_lines=True):
        console.print(Segments(line), crop=False, end="")


def _one_line(markup: str) -> Text:
    """A cell that is cut with "…" where its column ends, never wrapped."""
    text = Text.from_markup(markup)
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def saga_detail(console: Console, saga: SagaDetail, *, times: Times | None = None) -> None:
    """One saga: its header lines, what it awaits, its steps and its history."""
    times = times or Times()
    console.print(
        f"[bold]saga[/] {shown(saga.id)}  {shown(saga.name)} v{saga.version}  {styled(saga.status)}"
    )
    console.print(f"created {times.at(saga.created_at)}  updated {times.at(saga.updated_at)}")
    if saga.keys:
        console.print("keys " + "  ".join(f"{shown(k)}={shown(v)}" for k, v in saga.keys.items()))
    if saga.trace_id:
        console.print(f"trace {shown(saga.trace_id)}")
    # Long values on one line each, whole: the terminal folds them, a pipe keeps them.
    if saga.held:
        console.print(f"[magenta]held[/] {shown(saga.held)}", soft_wrap=True)
    if saga.error:
        console.print(f"[red]error[/] {shown(saga.error)}", soft_wrap=True)
    if saga.fingerprint:
        console.print(f"definition fingerprint {shown(saga.fingerprint)}")
    console.print(f"input {shown(json.dumps(saga.input, sort_keys=True))}", soft_wrap=True)
    if saga.awaits:
        console.print("[bold]awaits[/]")
        for waiting in saga.awaits:
            console.print(f"  {awaited(waiting, times)}", highlight=False, soft_wrap=True)
    unsent = {w.step for w in saga.awaits if w.unsent}
    # The short columns whole; a long step name cut with "…" (its line below is whole).
    steps = Table(title="steps", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    steps.add_column("#", no_wrap=True, justify="right")
    steps.add_column("step", min_width=12)
    for column in ("state", "attempts", "started", "took"):
        steps.add_column(column, no_wrap=True)
    outcomes = []
    for st in saga.steps:
        name = shown(f"{st.lane} {st.name}" if st.lane else st.name)
        attempts = str(st.attempts)
        if st.compensation_attempts:
            attempts += f", comp. {st.compensation_attempts}"
        took = st.finished_at - st.started_at if st.started_at and st.finished_at else None
        steps.add_row(
            str(st.position + 1),
            _one_line(name),
            styled(st.status) + (" [yellow]unsent[/]" if st.name in unsent else ""),
            attempts,
            times.at(st.started_at),
            times.took(took),
        )
        if st.error:
            outcomes.append(f"{st.position + 1} {name}: [red]error[/] {shown(st.error)}")
        elif st.reply:
            reply = shown(json.dumps(st.reply, sort_keys=True))
            outcomes.append(f"{st.position + 1} {name}: reply {reply}")
    table_out(console, steps)
    # Errors and replies whole, one line each (the terminal folds a long one), at the
    # table's edge: two spaces in lead mark the lines of operator actions.
    for line in outcomes:
        console.print(f" {line}", highlight=False, soft_wrap=True)
    history = Table(title="history", title_justify="left")
    for column in ("at", "event", "step"):
        history.add_column(column, no_wrap=True)
    history.add_column("by", no_wrap=True)
    history.add_column("detail", overflow="fold")
    for h in saga.history:
        history.add_row(
            times.at(h.at),
            shown(h.event),
            shown(h.step or ""),
            shown(h.actor),
            shown(h.detail or ""),
        )
    table_out(console, history)
    operator = [h for h in saga.history if h.actor != "engine"]
    if operator:
        # Who did what and why, unabridged however narrow the terminal.
        console.print("[bold]operator actions[/]")
        for h in operator:
            console.print(
                f"  {times.at(h.at)} {shown(h.event)} by {shown(h.actor)}: {shown(h.detail or '')}",
                highlight=False,
                soft_wrap=True,
            )


def awaited(waiting: AwaitView, times: Times) -> str:
    """One line of what a saga awaits at a step (markup, values through
    :func:`shown`): ``reserve_inventory: reply to attempt 1, times out in 29s;
    command unsent: in the outbox since 3s ago (is an engine running?)``."""
    step = shown(f"{waiting.lane} {waiting.step}" if waiting.lane else waiting.step)
    n = waiting.attempt
    kind = waiting.waits_for
    if kind in ("retry", "compensation retry"):
        what = "compensation" if kind == "compensation retry" else "step"
        assert waiting.next_retry is not None
        text = f"backoff: {what} attempt {n} goes {times.due(waiting.next_retry)}"
    else:
        if kind == "delay":
            text, ends = "a delay", "ends"
        elif kind == "signal":
            text, ends = "a signal", "times out"
        elif kind == "child saga":
            text, ends = f"its child saga (attempt {n})", "times out"
        else:
            text, ends = f"{kind} to attempt {n}", "times out"
        if waiting.deadline is not None:
            text += f", {ends} {times.due(waiting.deadline)}"
    if waiting.unsent:
        message = "compensation" if kind == "compensation reply" else "command"
        since = f" since {times.at(waiting.queued_at)}" if waiting.queued_at else ""
        text += (
            f"; [yellow]{message} unsent[/]: in the outbox{since}, not published yet "
            "(is an engine running?)"
        )
    return f"{step}: {text}"


def outcome(saga: SagaDetail, times: Times) -> str:
    """How a saga ended, on one line (markup): ``completed in 1.2s``, ``compensated
    in 3.4s: step 'charge_payment' failed: ...``, ``parked: ...``."""
    line = f"{styled(saga.status)} in {times.took(saga.updated_at - saga.created_at)}"
    if saga.status is SagaStatus.PARKED:
        line = styled(saga.status)
    return line + (f": {shown(saga.error)}" if saga.error else "")


def history_line(entry: HistoryView, times: Times) -> str:
    """One history entry on one line, as ``show --follow`` streams them (markup)."""
    line = f"{times.at(entry.at)}  {shown(entry.event)}"
    if entry.step:
        line += f"  {shown(entry.step)}"
    if entry.actor != "engine":
        line += f"  by {shown(entry.actor)}"
    if entry.detail:
        line += f": {shown(entry.detail)}"
    return line


def operator_result(console: Console, result: OperatorResult) -> None:
    past = {"retry": "retried", "cancel": "cancelled", "signal": "signalled"}.get(
        result.action, result.action
    )
    console.print(
        f"saga {shown(result.saga_id)} {past} by {shown(result.actor)}: "
        f"{styled(result.previous_status)} -> {styled(result.status)}",
        soft_wrap=True,
    )
    console.print(f"  {shown(result.summary)}", highlight=False, soft_wrap=True)
    for d in result.dispatched:
        console.print(
            f"  queued {d.kind} {shown(d.name)} of step {shown(d.step)} "
            f"(attempt {d.attempt}) for {shown(d.destination)}",
            highlight=False,
            soft_wrap=True,
        )


def _message_of(letter: DeadLetterView) -> str:
    if letter.kind is None:
        return "(not an envelope)"
    return f"{letter.kind} {shown(letter.name)} #{letter.attempt}"


def dead_letter_list(
    console: Console, letters: Sequence[DeadLetterView], *, times: Times | None = None
) -> None:
    times = times or Times()
    table = Table(title=f"{len(letters)} dead letter(s), newest first", title_justify="left")
    table.add_column("id", no_wrap=True, justify="right")
    table.add_column("received", no_wrap=True)
    for column in ("source", "saga", "message", "reason", "replayed"):
        table.add_column(column, overflow="fold")
    for d in letters:
        replayed = f"{times.at(d.replayed_at)} by {shown(d.replayed_by)}" if d.replayed_at else "-"
        table.add_row(
            str(d.id),
            times.at(d.received_at),
            shown(d.source or "?"),
            shown(d.saga_id or "-"),
            _message_of(d),
            shown(d.reason),
            replayed,
        )
    table_out(console, table, title=False)


def dead_letter(console: Console, letter: DeadLetterView, *, times: Times | None = None) -> None:
    """One dead letter in full (``dlq show``): where it came from, why, whether it was
    replayed, its headers and its body, each value through :func:`shown` (a body
    that is not UTF-8 is shown as its base64)."""
    times = times or Times()
    replayed = (
        f"{times.at(letter.replayed_at)} by {shown(letter.replayed_by)}"
        if letter.replayed_at
        else "no"
    )
    fields = [
        ("received", times.at(letter.received_at)),
        ("source", shown(letter.source or "?")),
        ("saga", shown(letter.saga_id or "-")),
        ("message", _message_of(letter) + (f", step {shown(letter.step)}" if letter.step else "")),
        ("reason", shown(letter.reason)),
        ("replayed", replayed),
        ("key", shown(letter.key)),
    ]
    console.print(f"[bold]dead letter[/] {letter.id}", highlight=False)
    grid = Table.grid(padding=(0, 2))  # a hanging indent when a value wraps
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in fields:
        grid.add_row(name, value)
    table_out(console, grid)
    console.print(f"headers ({len(letter.headers)})", highlight=False)
    for name, value in sorted(letter.headers.items()):
        console.print(f"  {shown(name)}: {shown(value)}", highlight=False, soft_wrap=True)
    size = f"{len(letter.body):,} characters"
    console.print(f"body ({letter.body_encoding}, {size})", highlight=False)
    console.print(f"  {shown(letter.body)}", highlight=False, soft_wrap=True)


def replay_result(console: Console, result: ReplayResult) -> None:
    letter = result.dead_letter
    console.print(
        f"dead letter {letter.id} ({_message_of(letter)}) queued for "
        f"{shown(result.destination)} by {shown(result.actor)}",
        highlight=False,
        soft_wrap=True,
    )
    if result.saga_id:
        console.print(f"  recorded in the history of saga {shown(result.saga_id)}", soft_wrap=True)


def bulk_replay_result(console: Console, result: BulkReplayResult) -> None:
    """A bulk replay: the letters a dry run would send (a table), the count sent,
    and each refused letter with why."""
    selection = []
    if result.saga_id is not None:
        selection.append(f"of saga {shown(result.saga_id)}")
    if result.reason_contains is not None:
        selection.append(f"with {shown(repr(result.reason_contains))} in the reason")
    which = " ".join(selection) or "all pending"
    if result.dry_run:
        console.print(
            f"dry run: {result.replayed} dead letter(s) {which} would be replayed",
            highlight=False,
        )
        table = Table()
        table.add_column("id", no_wrap=True, justify="right")
        for column in ("saga", "message", "back to"):
            table.add_column(column, overflow="fold")
        for d in result.letters:
            if d.outcome != "refused":
                table.add_row(
                    str(d.id),
                    shown(d.saga_id or "-"),
                    shown(d.message or "(not an envelope)"),
                    shown(d.source),
                )
        if result.replayed:
            table_out(console, table)
    else:
        console.print(
            f"replayed {result.replayed} dead letter(s) {which}, as {shown(result.actor)}",
            highlight=False,
        )
    refused = [d for d in result.letters if d.outcome == "refused"]
    if refused:
        verb = "would refuse" if result.dry_run else "refused"
        console.print(f"{verb} {len(refused)}:", highlight=False)
        reasons = Table.grid(padding=(0, 1))  # a hanging indent when a reason wraps
        reasons.add_column(no_wrap=True)
        reasons.add_column(overflow="fold")
        for d in refused:
            reasons.add_row(" -", shown(d.refusal))
        table_out(console, reasons)


def _age(seconds: float | None) -> str:
    return TimeFormat.RELATIVE.span(seconds)


def stats(console: Console, view: StatsView) -> None:
    names = sorted(view.by_saga)
    table = Table(title=f"{view.total} saga(s)", title_justify="left")
    table.add_column("state", no_wrap=True)
    for name in names:
        table.add_column(shown(name), justify="right")
    table.add_column("all", justify="right")
    for status in SagaStatus:
        table.add_row(
            styled(status),
            *(str(view.by_saga[n].get(status, 0)) for n in names),
            str(view.by_status.get(status, 0)),
        )
    table_out(console, table)
    oldest = view.oldest_running
    if oldest is None:
        console.print("oldest running: none")
    else:
        console.print(
            f"oldest running: {shown(oldest.id)} ({shown(oldest.name)}, {styled(oldest.status)}) "
            f"age {_age(oldest.age_seconds)}",
            soft_wrap=True,
        )
    console.print(
        f"outbox backlog: {view.outbox.unsent} unsent, oldest "
        f"{_age(view.outbox.oldest_unsent_age_seconds)}",
        soft_wrap=True,
    )
    console.print(
        f"dead letters: {view.dead_letters.not_replayed} not replayed "
        f"({view.dead_letters.total} archived)",
        soft_wrap=True,
    )
    console.print(f"replies set aside (saga not visible yet): {view.replies_deferred}")
    held = sum(h.count for h in view.held)
    console.print(f"held (no running engine serves them): {held}")
    for h in view.held:
        console.print(
            f"  {shown(h.name)} v{h.version}: {h.count}, e.g. {shown(h.reason)}", soft_wrap=True
        )


def check(console: Console, view: CheckView) -> None:
    console.print(f"definitions checked: {', '.join(shown(d) for d in view.loads)}", soft_wrap=True)
    table = Table(title="unfinished sagas by definition", title_justify="left")
    for column in ("saga", "fingerprint", "sagas", "verdict"):
        table.add_column(column, no_wrap=column != "verdict", overflow="fold")
    table.add_column("ids", overflow="fold")
    for d in view.definitions:
        verdict = f"[red]held: {shown(d.problem)}[/] {shown(d.reason)}" if d.problem else "served"
        shown_ids = ", ".join(shown(i) for i in d.saga_ids)
        more = d.count - len(d.saga_ids)
        table.add_row(
            f"{shown(d.name)} v{d.version}",
            shown(d.fingerprint or "(none recorded)"),
            str(d.count),
            verdict,
            shown_ids + (f" and {more} more" if more > 0 else ""),
        )
    table_out(console, table)
    if view.would_hold:
        console.print(f"[red]{view.would_hold} saga(s) would be held[/]")
    else:
        console.print("no saga would be held")


#: Rows of ``sagactl prune``, in the order they are shown.
PRUNED_TABLES = {
    "sagas": "sagas",
    "steps": "steps",
    "history": "history entries",
    "timers": "timers",
    "outbox": "sent outbox rows",
    "inbox": "inbox rows",
}


def prune_result(console: Console, result: PruneResult) -> None:
    verb = "would remove (dry run)" if result.dry_run else "removed"
    console.print(
        f"finished sagas last changed before {iso(result.cutoff)} "
        f"(older than {format_age(timedelta(seconds=result.older_than_seconds))})",
        soft_wrap=True,
    )
    table = Table(title=verb, title_justify="left")
    table.add_column("rows", no_wrap=True)
    table.add_column("count", justify="right")
    for field, label in PRUNED_TABLES.items():
        table.add_row(label, str(getattr(result.rows, field)))
    table_out(console, table)
    if not result.dry_run:
        console.print(f"{result.batches} batch(es)", soft_wrap=True)
