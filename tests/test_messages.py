from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from engine.errors import DecodeError
from engine.messages import Envelope, MessageKind, Outcome, decode, encode


def command(**overrides: object) -> Envelope:
    data: dict[str, object] = {
        "saga_id": "saga-1",
        "saga_name": "place_order",
        "saga_version": 2,
        "step": "charge_payment",
        "kind": MessageKind.COMMAND,
        "name": "charge_payment",
        "attempt": 3,
        "payload": {"amount_cents": 500, "nested": {"k": [1, 2]}},
        "created_at": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "headers": {"traceparent": "00-abc-def-01"},
    }
    data.update(overrides)
    return Envelope.model_validate(data)


def test_encode_decode_round_trip() -> None:
    original = command()
    body = encode(original)
    assert isinstance(body, bytes)
    assert decode(body) == original


def test_round_trip_of_a_reply() -> None:
    reply = command().reply(Outcome.FAILURE, {"why": "no"}, error="insufficient funds")
    assert decode(encode(reply)) == reply


def test_message_ids_are_unique() -> None:
    assert command().message_id != command().message_id


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\xff\xfe garbage", b"not json", b"[1, 2, 3]", b'"a string"', b"{}"],
)
def test_garbage_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError, match="not a saga envelope"):
        decode(body)


def test_missing_field_is_named() -> None:
    data = json.loads(encode(command()))
    del data["saga_id"]
    with pytest.raises(DecodeError, match=r"not a saga envelope: saga_id: Field required"):
        decode(json.dumps(data).encode())


def test_unknown_field_is_rejected() -> None:
    data = json.loads(encode(command()))
    data["surprise"] = 1
    with pytest.raises(DecodeError, match="surprise"):
        decode(json.dumps(data).encode())


def test_attempt_must_be_positive() -> None:
    data = json.loads(encode(command()))
    data["attempt"] = 0
    with pytest.raises(DecodeError, match="attempt"):
        decode(json.dumps(data).encode())


def test_unknown_kind_is_rejected() -> None:
    data = json.loads(encode(command()))
    data["kind"] = "gossip"
    with pytest.raises(DecodeError, match="kind"):
        decode(json.dumps(data).encode())


@pytest.mark.parametrize("missing", ["outcome", "in_reply_to"])
def test_reply_without_outcome_or_origin_is_a_decode_error(missing: str) -> None:
    data = json.loads(encode(command().reply(Outcome.SUCCESS)))
    data[missing] = None
    with pytest.raises(DecodeError, match="a reply needs outcome and in_reply_to"):
        decode(json.dumps(data).encode())


def test_reply_carries_the_attempt_token_and_causation() -> None:
    cmd = command(kind=MessageKind.COMPENSATION, name="refund_payment", attempt=5)
    reply = cmd.reply(Outcome.SUCCESS, {"refunded": 500})
    assert reply.kind is MessageKind.REPLY
    assert reply.in_reply_to is MessageKind.COMPENSATION
    assert (reply.saga_id, reply.saga_name, reply.saga_version) == ("saga-1", "place_order", 2)
    assert (reply.step, reply.name, reply.attempt) == ("charge_payment", "refund_payment", 5)
    assert reply.causation_id == cmd.message_id
    assert reply.message_id != cmd.message_id
    assert reply.outcome is Outcome.SUCCESS
    assert reply.payload == {"refunded": 500}
    assert reply.error is None
    assert reply.headers == cmd.headers


def test_reply_error_and_empty_payload() -> None:
    reply = command().reply(Outcome.ERROR, error="RuntimeError: boom")
    assert reply.payload == {}
    assert reply.error == "RuntimeError: boom"
    assert reply.outcome is Outcome.ERROR


def test_reply_headers_are_a_copy() -> None:
    cmd = command()
    reply = cmd.reply(Outcome.SUCCESS)
    reply.headers["x"] = "y"
    assert "x" not in cmd.headers
