"""W3C trace context in message headers, and spans named by the messaging conventions.

A saga is one trace: the start span is its root; every command's ``send`` span is a
child of whatever the engine was doing when it wrote the outbox row (so the context
is fixed at write time, not when the relay happens to publish); a participant's
``process`` span continues the context it finds in the headers, and its reply carries
that context back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

from engine.messages import Envelope, MessageKind
from engine.model import HistoryEntry, OutboxMessage, SagaState

TRACER_NAME = "saga-engine"


def tracer() -> trace.Tracer:
    # Looked up per use: the daemon may install its provider after import.
    return trace.get_tracer(TRACER_NAME)


def inject(headers: Mapping[str, str], context: Context | None = None) -> dict[str, str]:
    """``headers`` plus ``traceparent`` / ``tracestate`` / ``baggage`` of ``context``."""
    carrier = dict(headers)
    propagate.inject(carrier, context=context)
    return carrier


def extract(headers: Mapping[str, str]) -> Context:
    return propagate.extract(dict(headers))


def trace_id(span: Span | None = None) -> str | None:
    """Hex trace id of ``span`` (default: the current one), None if there is none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def span_context_of(headers: Mapping[str, str]) -> trace.SpanContext | None:
    ctx = trace.get_current_span(extract(headers)).get_span_context()
    return ctx if ctx.is_valid else None


def messaging_attributes(
    envelope: Envelope, *, system: str, operation: str, destination: str
) -> dict[str, Any]:
    """Attributes of the OpenTelemetry messaging conventions plus ``saga.*``."""
    op_type = {"send": "send", "process": "process", "receive": "receive"}[operation]
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.name": operation,
        "messaging.operation.type": op_type,
        "messaging.destination.name": destination,
        "messaging.message.id": envelope.message_id,
        "messaging.message.conversation_id": envelope.saga_id,
        "saga.id": envelope.saga_id,
        "saga.name": envelope.saga_name,
        "saga.step": envelope.step,
        "saga.message.kind": envelope.kind.value,
        "saga.attempt": envelope.attempt,
    }
    if system == "kafka":
        attributes["messaging.kafka.message.key"] = envelope.saga_id
    elif system == "rabbitmq":
        attributes["messaging.rabbitmq.destination.routing_key"] = destination
    if envelope.outcome is not None:
        attributes["saga.outcome"] = envelope.outcome.value
    return attributes


def trace_outgoing(
    messages: Sequence[OutboxMessage],
    *,
    system: str,
    links: Sequence[trace.SpanContext] = (),
) -> list[OutboxMessage]:
    """A ``send`` span per message, its context written into the message's headers.

    ``links`` tie compensations to the span of the step whose failure caused them.
    """
    traced: list[OutboxMessage] = []
    for message in messages:
        envelope = message.envelope
        with tracer().start_as_current_span(
            f"send {message.destination}",
            kind=SpanKind.PRODUCER,
            attributes=messaging_attributes(
                envelope, system=system, operation="send", destination=message.destination
            ),
            links=[Link(c) for c in links],
        ):
            headers = inject(envelope.headers)
        traced.append(
            OutboxMessage(
                message.destination,
                message.key,
                envelope.model_copy(update={"headers": headers}),
            )
        )
    return traced


@contextmanager
def process_span(
    envelope: Envelope,
    *,
    system: str,
    destination: str,
    group: str | None = None,
) -> Iterator[Span]:
    """The CONSUMER span around handling one message, continuing the sender's trace."""
    attributes = messaging_attributes(
        envelope, system=system, operation="process", destination=destination
    )
    if group:
        attributes["messaging.consumer.group.name"] = group
    with tracer().start_as_current_span(
        f"process {destination}",
        context=extract(envelope.headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


#: Key in the saga's stored trace context holding the ``traceparent`` of the span
#: whose failure started compensation: every compensation span links to it.
CAUSE_KEY = "saga-compensation-cause"


def trace_transition(
    state: SagaState,
    messages: Sequence[OutboxMessage],
    history: Sequence[HistoryEntry],
    *,
    system: str,
) -> list[OutboxMessage]:
    """Give a transition's messages their ``send`` spans and remember the saga's context.

    Call it inside the span of whatever caused the transition (start, reply, timer,
    operator). The span that turns the saga to compensating is remembered as the
    cause, and every compensation's span is linked to it.
    """
    current = trace.get_current_span().get_span_context()
    cause = state.trace_context.get(CAUSE_KEY)
    if any(h.event == "compensating" for h in history) and current.is_valid:
        cause = inject({})["traceparent"]
    links: list[trace.SpanContext] = []
    if cause and any(m.envelope.kind is MessageKind.COMPENSATION for m in messages):
        linked = span_context_of({"traceparent": cause})
        links = [linked] if linked is not None else []
    traced = trace_outgoing(messages, system=system, links=links)
    carrier = inject({})
    if "traceparent" in carrier:
        if cause:
            carrier[CAUSE_KEY] = cause
        state.trace_context = carrier
        state.trace_id = state.trace_id or trace_id()
    return traced


def saga_span(
    name: str, state: SagaState, *, kind: SpanKind = SpanKind.INTERNAL
) -> AbstractContextManager[Span]:
    """A span continuing the saga's stored trace (timers, operator actions)."""
    return tracer().start_as_current_span(
        name,
        context=extract(state.trace_context) if state.trace_context else None,
        kind=kind,
        attributes={"saga.id": state.id, "saga.name": state.name},
    )
