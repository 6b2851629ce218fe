"""Human-readable output of ``sagactl``: rich tables on stdout."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.markup import escape
from rich.table import Table

from engine.redact import escape_controls, redact
from engine.retention import format_age
from engine.states import SagaStatus, StepStatus
from engine.views import (
    BulkReplayResult,
    CheckView,
    DeadLetterView,
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
    (:func:`escape_controls`) plus rich's; secrets are hidden as everywhere."""
    return escape(escape_controls(redact(str(value))))


def styled(status: SagaStatus | StepStatus) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status.value}[/]" if style else status.value


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def dump_json(console: Console, value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    """Indented, highlighted JSON. JSON escapes C0 control characters itself; the C1
    ones (U+0080-U+009F, which some terminals act on) are escaped here too, which
    leaves the data the same."""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [v.model_dump(mode="json") for v in value]
    text = _C1.sub(
        lambda m: f"\\u{ord(m.group()):04x}", json.dumps(data, indent=2, ensure_ascii=False)
    )
    highlighted = JSONHighlighter()(text)
    highlighted.no_wrap, highlighted.overflow = True, None  # as Console.print_json
    console.print(highlighted, soft_wrap=True)


def saga_list(console: Console, sagas: Sequence[SagaSummary]) -> None:
    table = Table(title=f"{len(sagas)} saga(s), newest first", title_justify="left")
    table.add_column("id", no_wrap=True)
    for column in ("saga", "status", "created", "updated", "error"):
        table.add_column(column, overflow="fold")
    for s in sagas:
        table.add_row(
            shown(s.id),
            f"{shown(s.name)} v{s.version}",
            styled(s.status) + (" [magenta]held[/]" if s.held else ""),
            when(s.created_at),
            when(s.updated_at),
            shown(f"held: {s.held}" if s.held else s.error or ""),
        )
    console.print(table)


def saga_detail(console: Console, saga: SagaDetail) -> None:
    console.print(
        f"[bold]saga[/] {shown(saga.id)}  {shown(saga.name)} v{saga.version}  {styled(saga.status)}"
    )
    console.print(f"created {when(saga.created_at)}  updated {when(saga.updated_at)}")
    if saga.keys:
        console.print("keys " + "  ".join(f"{shown(k)}={shown(v)}" for k, v in saga.keys.items()))
    if saga.trace_id:
        console.print(f"trace {shown(saga.trace_id)}")
    if saga.held:
        console.print(f"[magenta]held[/] {shown(saga.held)}")
    if saga.error:
        console.print(f"[red]error[/] {shown(saga.error)}")
    if saga.fingerprint:
        console.print(f"definition fingerprint {shown(saga.fingerprint)}")
    console.print(f"input {shown(json.dumps(saga.input, sort_keys=True))}")
    steps = Table(title="steps", title_justify="left")
    for column in ("#", "step", "state"):
        steps.add_column(column, no_wrap=True)
    for column in ("attempts", "comp. attempts", "started", "finished"):
        steps.add_column(column)
    steps.add_column("error / reply", overflow="fold")
    for st in saga.steps:
        outcome = st.error or (json.dumps(st.reply, sort_keys=True) if st.reply else "")
        steps.add_row(
            str(st.position + 1),
            shown(f"{st.lane} {st.name}" if st.lane else st.name),
            styled(st.status),
            str(st.attempts),
            str(st.compensation_attempts),
            when(st.started_at),
            when(st.finished_at),
            shown(outcome),
        )
    console.print(steps)
    history = Table(title="history", title_justify="left")
    for column in ("at", "event", "step"):
        history.add_column(column, no_wrap=True)
    history.add_column("by", no_wrap=True)
    history.add_column("detail", overflow="fold")
    for h in saga.history:
        history.add_row(
            when(h.at), shown(h.event), shown(h.step or ""), shown(h.actor), shown(h.detail or "")
        )
    console.print(history)
    operator = [h for h in saga.history if h.actor != "engine"]
    if operator:
        # Who did what and why, unabridged however narrow the terminal.
        console.print("[bold]operator actions[/]")
        for h in operator:
            console.print(
                f"  {when(h.at)} {shown(h.event)} by {shown(h.actor)}: {shown(h.detail or '')}",
                highlight=False,
                soft_wrap=True,
            )


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


def dead_letter_list(console: Console, letters: Sequence[DeadLetterView]) -> None:
    table = Table(title=f"{len(letters)} dead letter(s), newest first", title_justify="left")
    table.add_column("id", no_wrap=True, justify="right")
    table.add_column("received", no_wrap=True)
    for column in ("source", "saga", "message", "reason", "replayed"):
        table.add_column(column, overflow="fold")
    for d in letters:
        replayed = f"{when(d.replayed_at)} by {shown(d.replayed_by)}" if d.replayed_at else "-"
        table.add_row(
            str(d.id),
            when(d.received_at),
            shown(d.source or "?"),
            shown(d.saga_id or "-"),
            _message_of(d),
            shown(d.reason),
            replayed,
        )
    console.print(table)


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
            console.print(table)
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
        console.print(reasons, highlight=False)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


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
    console.print(table)
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
    console.print(table)
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
        f"finished sagas last changed before {when(result.cutoff)} "
        f"(older than {format_age(timedelta(seconds=result.older_than_seconds))})",
        soft_wrap=True,
    )
    table = Table(title=verb, title_justify="left")
    table.add_column("rows", no_wrap=True)
    table.add_column("count", justify="right")
    for field, label in PRUNED_TABLES.items():
        table.add_row(label, str(getattr(result.rows, field)))
    console.print(table)
    if not result.dry_run:
        console.print(f"{result.batches} batch(es)", soft_wrap=True)
