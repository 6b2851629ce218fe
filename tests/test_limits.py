"""Limits where input is born (engine/limits.py): the wire edge, the settings and the
state machine; the client, the worker and the CLI in tests/test_limits_edges.py."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from engine.definition import Compensation, RetryPolicy, Saga, Step, StepContext
from engine.errors import DecodeError, LimitError
from engine.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ERROR_LENGTH,
    MIN_MESSAGE_BYTES,
    NAME_LENGTH,
    REASON_LENGTH,
    Limits,
    MessageTooLarge,
    check_actor,
    check_reason,
    check_saga_id,
    clip,
    has_nul,
)
from engine.messages import Envelope, MessageKind, Outcome, decode, encode, sized
from engine.model import SagaState
from engine.settings import Settings
from engine.statemachine import Transition, new_saga
from engine.states import SagaStatus, StepStatus
from engine.topology import Topology

SMALL = Limits(max_message_bytes=MIN_MESSAGE_BYTES)


def reply_data(**overrides: Any) -> dict[str, Any]:
    command = Envelope(
        saga_id="0b5c8e8e-3f5a-4a55-9d4e-2f6b7f2a9c11",
        saga_name="place_order",
        saga_version=1,
        step="charge_payment",
        kind=MessageKind.COMMAND,
        name="charge_payment",
        attempt=1,
        payload={"order_id": "o1"},
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    data: dict[str, Any] = json.loads(encode(command.reply(Outcome.SUCCESS, {"charge": "c1"})))
    data.update(overrides)
    return data


def body(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


def test_a_typical_reply_decodes() -> None:
    assert decode(body(reply_data())).outcome is Outcome.SUCCESS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message_id", "m" * 37),
        ("saga_id", "s" * 37),
        ("saga_id", ""),
        ("causation_id", "c" * 37),
        ("saga_name", "n" * 201),
        ("step", "s" * 201),
        ("name", "n" * 201),
        ("error", "e" * (ERROR_LENGTH + 1)),
        ("attempt", 2**31),
        ("saga_version", 2**40),
    ],
)
def test_decode_refuses_an_over_long_field_naming_it(field: str, value: object) -> None:
    with pytest.raises(DecodeError, match=rf"^not a saga envelope: {field}: "):
        decode(body(reply_data(**{field: value})))


def test_decode_refuses_unbounded_headers() -> None:
    with pytest.raises(DecodeError, match=r"^not a saga envelope: headers\.big: .*at most 8192"):
        decode(body(reply_data(headers={"big": "v" * 8193})))
    with pytest.raises(DecodeError, match=r"^not a saga envelope: headers\.n{39}…\.\[key\]"):
        decode(body(reply_data(headers={"n" * 201: "v"})))
    with pytest.raises(DecodeError, match=r"^not a saga envelope: headers: .*at most 32 items"):
        decode(body(reply_data(headers={f"h{i}": "v" for i in range(33)})))


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        ({"error": "boom\x00"}, "error"),
        ({"payload": {"items": [{"sku": "a\x00b"}]}}, r"payload\.items\[0\]\.sku"),
        ({"payload": {"k\x00": 1}}, r"payload\.k\\x00"),
        ({"headers": {"traceparent": "\x00"}}, r"headers\.traceparent"),
        ({"step": "charge\x00payment"}, "step"),
    ],
)
def test_decode_refuses_a_nul_anywhere_naming_where(overrides: dict[str, Any], where: str) -> None:
    with pytest.raises(DecodeError, match=rf"^not a saga envelope: {where}: holds a NUL"):
        decode(body(reply_data(**overrides)))


def test_decode_refuses_a_raw_nul_byte_and_keeps_the_reason_clean() -> None:
    raw = body(reply_data()).replace(b'"charge_payment"', b'"charge\x00payment"', 1)
    with pytest.raises(DecodeError, match=r"^not a saga envelope: body: holds a NUL") as caught:
        decode(raw)
    assert "\x00" not in str(caught.value)


def test_an_escaped_backslash_before_u0000_is_text_not_nul() -> None:
    text = "C:\\u0000 is a path"  # a backslash, then the letters u0000
    encoded = body(reply_data(error=text))
    assert b"\\\\u0000" in encoded
    assert not has_nul(encoded)
    assert decode(encoded).error == text
    assert has_nul(body(reply_data(error="\\\x00")))  # backslash, then a real NUL


def test_decode_refuses_a_body_over_the_size_limit() -> None:
    big = body(reply_data(payload={"blob": "x" * MIN_MESSAGE_BYTES}))
    with pytest.raises(DecodeError, match=r"^not a saga envelope: body: the message is [\d,]+ b"):
        decode(big, SMALL)
    assert decode(big).payload["blob"]  # within the default limit


def test_field_names_from_the_wire_are_clipped_in_the_reason() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(body(reply_data(**{"x" * 5000: 1})))
    assert len(str(caught.value)) < 200
    assert "Extra inputs are not permitted" in str(caught.value)


def test_sized_measures_what_would_be_sent() -> None:
    envelope = Envelope.model_validate(reply_data(payload={"blob": "x" * MIN_MESSAGE_BYTES}))
    with pytest.raises(MessageTooLarge) as caught:
        sized(envelope, SMALL)
    assert caught.value.size == len(encode(envelope))
    assert caught.value.limit == MIN_MESSAGE_BYTES
    assert "SAGA_MAX_MESSAGE_BYTES" in str(caught.value)
    with pytest.raises(LimitError, match=r"payload\.k holds a NUL"):
        sized(Envelope.model_validate(reply_data(payload={"k": "\x00"})))


def test_reply_error_text_is_clipped_and_cleared_of_nul_where_it_is_born() -> None:
    command = Envelope.model_validate(reply_data(kind="command", outcome=None, in_reply_to=None))
    reply = command.reply(Outcome.ERROR, error="RuntimeError: " + "\x00" * 10 + "y" * 20_000)
    assert reply.error is not None
    assert len(reply.error) == ERROR_LENGTH
    assert "\x00" not in reply.error
    assert decode(encode(reply)) == reply
    assert clip("short", 10) == "short"


def test_saga_ids_are_checked() -> None:
    check_saga_id("a" * 36)
    for bad, why in [
        ("", "must not be empty"),
        ("a" * 37, "37 characters long, the limit is 36"),
        ("a\x00b", "control character (U+0000 at position 1)"),
        ("line\nbreak", "U+000A"),
    ]:
        with pytest.raises(LimitError, match=re.escape(why)):
            check_saga_id(bad)


def test_operator_text_is_checked() -> None:
    """Actors are one printable line; a reason keeps its line breaks and ESC (shown
    escaped by every reader) but never a NUL, and both have a length."""
    check_actor("a" * NAME_LENGTH)
    said = "line one\nline two\t\x1b[1m"
    check_reason(said + "r" * (REASON_LENGTH - len(said)))
    check_reason(None)
    for check, bad, why in [
        (check_actor, " ", "the actor must not be empty"),
        (check_actor, "a\nb", "the actor holds a control character (U+000A at position 1)"),
        (check_actor, "a" * (NAME_LENGTH + 1), f"the limit is {NAME_LENGTH}"),
        (check_reason, "", "the reason must not be empty"),
        (check_reason, "a\x00", "the reason holds a control character (U+0000"),
        (check_reason, "r" * (REASON_LENGTH + 1), f"the limit is {REASON_LENGTH:,}"),
        (check_reason, "\udcff", "the reason is not valid UTF-8 text"),
    ]:
        with pytest.raises(LimitError, match=re.escape(why)):
            check(bad)


def test_the_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().limits == Limits(DEFAULT_MAX_MESSAGE_BYTES)
    assert DEFAULT_MAX_MESSAGE_BYTES < 1024 * 1024  # Kafka's default record limit
    monkeypatch.setenv("SAGA_MAX_MESSAGE_BYTES", "200000")
    assert Settings().limits.max_message_bytes == 200_000
    monkeypatch.setenv("SAGA_MAX_MESSAGE_BYTES", "1000")
    with pytest.raises(ValueError, match="max_message_bytes"):
        Settings()
    with pytest.raises(ValueError, match="between"):
        Limits(max_message_bytes=10)


# -- the state machine -------------------------------------------------------------


class Trip(BaseModel):
    traveller: str
    notes: str = ""


T0 = datetime(2024, 1, 1, tzinfo=UTC)
ONCE = RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0)


def _small(name: str) -> Any:
    return lambda ctx: {"op": name, "saga": ctx.saga_id}


def _notes(name: str) -> Any:
    def build(ctx: StepContext) -> dict[str, Any]:
        assert isinstance(ctx.input, Trip)
        return {"op": name, "notes": ctx.input.notes}

    return build


TRIP = Saga(
    name="trip",
    version=1,
    input=Trip,
    steps=[
        Step(
            name="flight",
            participant="airline",
            command=_small("book_flight"),
            compensation=Compensation("cancel_flight", _small("cancel_flight")),
            timeout=timedelta(seconds=10),
            retry=ONCE,
            compensation_retry=ONCE,
        ),
        Step(
            name="hotel",
            participant="hotels",
            command=_notes("book_hotel"),
            compensation=Compensation("cancel_hotel", _notes("cancel_hotel")),
            timeout=timedelta(seconds=10),
            retry=ONCE,
            compensation_retry=ONCE,
        ),
        Step(name="pay", participant="bank", command=_small("pay"), timeout=timedelta(seconds=10)),
    ],
)


def _apply(state: SagaState, event: str, reply: Outcome | None = None) -> Transition:
    transition = Transition(TRIP, state, now=T0, topology=Topology(), limits=SMALL)
    if event == "start":
        transition.start()
    else:
        token = state.awaiting
        assert token is not None and reply is not None
        command = transition.state
        envelope = Envelope(
            saga_id=command.id,
            saga_name="trip",
            saga_version=1,
            step=token.step,
            kind=MessageKind.REPLY,
            name=token.step,
            attempt=token.attempt,
            in_reply_to=token.kind,
            outcome=reply,
        )
        assert transition.on_reply(envelope)
    return transition


def test_a_built_command_over_the_limit_fails_its_step_and_compensates() -> None:
    state = new_saga(TRIP, "t1", {"traveller": "ann", "notes": "n" * MIN_MESSAGE_BYTES}, T0)
    _apply(state, "start")
    transition = _apply(state, "reply", Outcome.SUCCESS)  # flight booked, hotel built
    hotel = state.steps["hotel"]
    assert hotel.status is StepStatus.FAILED
    assert hotel.error is not None and hotel.error.startswith("command not sent: the message is")
    assert "SAGA_MAX_MESSAGE_BYTES" in hotel.error
    assert state.status is SagaStatus.COMPENSATING
    assert state.error is not None and "could not send its command" in state.error
    # Nothing of the refused command goes out: only the flight's compensation.
    assert [(m.envelope.step, m.envelope.kind) for m in transition.messages] == [
        ("flight", MessageKind.COMPENSATION)
    ]
    assert isinstance(transition.refused, MessageTooLarge)
    _apply(state, "reply", Outcome.SUCCESS)
    assert state.status is SagaStatus.COMPENSATED


def test_a_compensation_over_the_limit_parks_the_saga() -> None:
    state = new_saga(TRIP, "t2", {"traveller": "ann"}, T0)
    _apply(state, "start")
    _apply(state, "reply", Outcome.SUCCESS)
    _apply(state, "reply", Outcome.SUCCESS)  # hotel booked, pay dispatched
    # The notes grow after the hotel's command was sent (an operator's data fix).
    state.input["notes"] = "n" * MIN_MESSAGE_BYTES
    transition = _apply(state, "reply", Outcome.FAILURE)  # pay fails: undo the hotel
    assert state.status is SagaStatus.PARKED
    assert state.error is not None
    assert "compensation of step 'hotel' could not be sent: the message is" in state.error
    assert state.steps["hotel"].error is not None
    assert state.steps["hotel"].error.startswith("compensation not sent")
    assert transition.messages == []
    assert state.awaiting is None and state.timer is None
