"""Signed messages (engine/signing.py): what a signature covers, each mode, rotation,
key configuration, and the seams: a worker refuses an unsigned or forged command
without effect, the engine such a reply, and a replayed dead letter is not laundered."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from engine.cli.app import cli
from engine.errors import ConfigError, SignatureError
from engine.messages import Envelope, Outcome, decode, encode
from engine.orchestrator import Engine
from engine.registry import SagaRegistry
from engine.settings import Settings
from engine.signing import (
    KEY_HEADER,
    MIN_SECRET_BYTES,
    NO_SIGNING,
    REPLAY_HEADER,
    SIGNATURE_HEADER,
    Signing,
    SigningMode,
    as_replayed,
    parse_keys,
    signature,
)
from engine.states import SagaStatus
from engine.store.schema import barrier
from engine.store.sql import SqlSagaStore
from engine.topology import Topology
from engine.transport.base import Message, Subscription
from engine.transport.memory import MemoryTransport
from engine.worker.barrier import SqlBarrier
from engine.worker.runner import WorkerRunner
from sagas.order import place_order
from tests.helpers import EmbeddedSystem, FakeDelivery, charge_command, order_input
from workers import payment

S1 = b"1" * MIN_SECRET_BYTES
S2 = b"2" * 40
S0 = b"0" * MIN_SECRET_BYTES
COMMANDS = "saga.commands.payment"


def signing(mode: SigningMode, *keys: tuple[str, bytes]) -> Signing:
    return Signing(mode, dict(keys))


REQUIRE = signing(SigningMode.REQUIRE, ("k1", S1))


def message(body: bytes = b'{"a": 1}', destination: str = COMMANDS) -> Message:
    return Message(destination, "saga-1", body, {"traceparent": "00-abc-def-01"})


def refused(check: Signing, msg: Message) -> str:
    with pytest.raises(SignatureError) as caught:
        check.check(msg, "command")
    return str(caught.value)


# -- what a signature covers ---------------------------------------------------------


def test_a_signed_message_names_its_key_and_verifies() -> None:
    signed = REQUIRE.sign(message())
    assert signed.headers[KEY_HEADER] == "k1"
    assert len(signed.headers[SIGNATURE_HEADER]) == 64
    assert signed.headers["traceparent"] == "00-abc-def-01"  # other headers kept
    assert (signed.destination, signed.key, signed.body) == (COMMANDS, "saga-1", b'{"a": 1}')
    REQUIRE.check(signed, "command")
    signing(SigningMode.ACCEPT_UNSIGNED, ("k1", S1)).check(signed, "command")


def test_a_tampered_body_destination_key_id_or_signature_is_refused() -> None:
    signed = REQUIRE.sign(message())
    both = signing(SigningMode.REQUIRE, ("k1", S1), ("k2", S2))
    cases = {
        "body": Message(COMMANDS, "saga-1", b'{"a": 2}', signed.headers),
        "destination": Message("saga.commands.shipment", "saga-1", signed.body, signed.headers),
        "key id": Message(COMMANDS, "saga-1", signed.body, {**signed.headers, KEY_HEADER: "k2"}),
        "signature": Message(
            COMMANDS, "saga-1", signed.body, {**signed.headers, SIGNATURE_HEADER: "0" * 64}
        ),
    }
    for what, tampered in cases.items():
        reason = refused(both, tampered)
        key = "k2" if what == "key id" else "k1"
        assert reason == f"bad signature on command (key {key})", what


def test_trace_context_and_broker_headers_are_not_signed() -> None:
    signed = REQUIRE.sign(message())
    moved = {**signed.headers, "traceparent": "00-other-01", "x-death": "1"}
    REQUIRE.check(Message(COMMANDS, "other-key", signed.body, moved), "command")


@given(
    body=st.binary(max_size=300),
    destination=st.text(min_size=1, max_size=40),
    flip=st.integers(min_value=0),
)
def test_any_changed_byte_of_a_body_is_refused(body: bytes, destination: str, flip: int) -> None:
    signed = REQUIRE.sign(Message(destination, "k", body))
    REQUIRE.check(signed, "reply")
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        with pytest.raises(SignatureError, match=r"bad signature on reply \(key k1\)"):
            REQUIRE.check(Message(destination, "k", changed, signed.headers), "reply")


@given(st.text(max_size=20), st.binary(max_size=20), st.integers(min_value=0, max_value=40))
def test_no_byte_can_move_between_the_signed_parts(destination: str, body: bytes, cut: int) -> None:
    """Length prefixes: the same bytes split differently between destination and body
    (or key id and destination) sign differently."""
    whole = destination.encode() + body
    cut = min(cut, len(whole))
    try:
        other = whole[:cut].decode()
    except UnicodeDecodeError:
        other = destination
    if other != destination:
        assert signature(S1, "k1", destination, body) != signature(S1, "k1", other, whole[cut:])
    assert signature(S1, "k1", "x" + destination, body) != signature(S1, "k1x", destination, body)


def test_signing_again_replaces_the_old_signature() -> None:
    old = signing(SigningMode.REQUIRE, ("k0", S0)).sign(message())
    again = REQUIRE.sign(old)
    assert again.headers[KEY_HEADER] == "k1"
    REQUIRE.check(again, "command")


# -- modes -------------------------------------------------------------------------


def test_an_unsigned_message_under_each_mode() -> None:
    unsigned = message()
    NO_SIGNING.check(unsigned, "command")
    accepting = signing(SigningMode.ACCEPT_UNSIGNED, ("k1", S1))
    accepting.check(unsigned, "command")
    accepting.check(unsigned, "command")
    assert accepting.unsigned_accepted == 2  # the operator's cue for require
    assert refused(REQUIRE, unsigned) == "unsigned command (signing is required)"
    assert NO_SIGNING.sign(unsigned) is unsigned  # off: nothing is signed


def test_under_accept_unsigned_a_signed_message_must_still_verify() -> None:
    accepting = signing(SigningMode.ACCEPT_UNSIGNED, ("k1", S1))
    forged = signing(SigningMode.REQUIRE, ("k1", S0)).sign(message())
    assert refused(accepting, forged) == "bad signature on command (key k1)"
    half = Message(COMMANDS, "k", b"{}", {KEY_HEADER: "k1"})
    assert refused(accepting, half) == "bad signature on command (key k1)"
    assert accepting.unsigned_accepted == 0


def test_unknown_and_malformed_signatures_are_refused() -> None:
    other = signing(SigningMode.REQUIRE, ("k9", S1)).sign(message())
    assert refused(REQUIRE, other) == "unknown signing key k9 on command"
    bare = {SIGNATURE_HEADER: "ab"}
    assert refused(REQUIRE, Message(COMMANDS, "k", b"{}", bare)) == (
        "bad signature on command: no key id"
    )
    odd = {KEY_HEADER: "k1\x1b[31m;drop", SIGNATURE_HEADER: "ab"}
    assert refused(REQUIRE, Message(COMMANDS, "k", b"{}", odd)) == (
        "bad signature on command: malformed key id"
    )
    wide = {KEY_HEADER: "k1", SIGNATURE_HEADER: "é" * 64}  # not ASCII: no TypeError
    assert refused(REQUIRE, Message(COMMANDS, "k", b"{}", wide)) == (
        "bad signature on command (key k1)"
    )


def test_rotation_add_then_switch_then_drop_the_old_key() -> None:
    """Every neighbouring pair of stages of a rolling rotation understands each other;
    only once the old key is dropped is a message signed with it refused."""
    stages = [
        signing(SigningMode.REQUIRE, ("k1", S1)),  # before
        signing(SigningMode.REQUIRE, ("k1", S1), ("k2", S2)),  # 1: k2 verifies
        signing(SigningMode.REQUIRE, ("k2", S2), ("k1", S1)),  # 2: k2 signs
        signing(SigningMode.REQUIRE, ("k2", S2)),  # 3: k1 dropped
    ]
    for before, after in itertools.pairwise(stages):
        for sender, receiver in ((before, after), (after, before)):
            receiver.check(sender.sign(message()), "command")
    assert [s.signing_key for s in stages] == ["k1", "k1", "k2", "k2"]
    assert refused(stages[3], stages[1].sign(message())) == "unknown signing key k1 on command"
    stages[3].check(stages[2].sign(message()), "command")


# -- configuration -------------------------------------------------------------------


def test_keys_parse_in_order_the_first_one_signs() -> None:
    keys = parse_keys(f" k2 : {S2.decode()} ,\nk1:{S1.decode()}\n\n")
    assert keys == {"k2": S2, "k1": S1}
    assert Signing(SigningMode.REQUIRE, keys).signing_key == "k2"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("k1:Hunter2secretPW", "the secret of key k1 is shorter than 32 bytes"),
        ("Hunter2secretPWHunter2secretPWHunter2secretPW", "entry 1 is not id:secret"),
        ("k 1:Hunter2secretPWHunter2secretPWHunter2secretPW", "entry 1: a key id is"),
        (f"k1:{S1.decode()},k1:Hunter2secretPWHunter2secretPWxx", "key id k1 is given twice"),
    ],
)
def test_bad_keys_are_one_config_error_line_without_the_secret(
    text: str, error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=error) as caught:
        Settings(signing_keys=text)
    assert "Hunter2" not in str(caught.value)
    monkeypatch.setenv("SAGA_SIGNING_KEYS", text)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert result.output == f"sagactl: error: {caught.value}\n"


def test_the_mode_defaults_to_require_with_keys_and_off_without() -> None:
    keys = f"k1:{S1.decode()}"
    assert Settings().message_signing.mode is SigningMode.OFF
    assert Settings(signing_keys=keys).message_signing.mode is SigningMode.REQUIRE
    rollout = Settings(signing_keys=keys, signing="accept-unsigned").message_signing
    assert rollout.mode is SigningMode.ACCEPT_UNSIGNED and rollout.signing_key == "k1"
    assert Settings(signing_keys=keys, signing="off").message_signing.signing_key is None
    for mode in ("require", "accept-unsigned"):
        with pytest.raises(ValueError, match=f"{mode} needs signing keys"):
            Settings(signing=mode)


def test_keys_come_from_a_file_and_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "Hunter2secretPW-" * 3
    path = tmp_path / "keys"
    path.write_text(f"k2:{secret}\nk1:{S1.decode()}\n")
    monkeypatch.setenv("SAGA_SIGNING_KEYS_FILE", str(path))
    settings = Settings()
    shown = f"{settings!r} {settings.message_signing!r} {settings.message_signing.describe()}"
    assert secret not in shown and S1.decode() not in shown
    assert settings.message_signing.describe() == (
        "message signing require: signing with key k2, verifying with k2, k1"
    )


# -- replaying a dead letter -----------------------------------------------------------


def test_a_replay_goes_as_archived_unless_re_signed() -> None:
    signed = REQUIRE.sign(message())
    archived = {**signed.headers, REPLAY_HEADER: "3"}  # replayed once before
    as_is = as_replayed(archived, 7, re_sign=False)
    assert as_is == {**signed.headers, REPLAY_HEADER: "7"}
    out = REQUIRE.sign(Message(COMMANDS, "k", b"forged", as_replayed({}, 8, re_sign=False)))
    assert KEY_HEADER not in out.headers  # an unsigned forgery is not laundered
    vouched = as_replayed(archived, 7, re_sign=True)
    assert vouched == {"traceparent": "00-abc-def-01"}
    REQUIRE.check(REQUIRE.sign(Message(COMMANDS, "k", b"x", vouched)), "command")


# -- the seams ----------------------------------------------------------------------


class Recording:
    """A transport that keeps what is published."""

    def __init__(self) -> None:
        self.published: list[Message] = []

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, messages: Sequence[Message]) -> None:
        self.published.extend(messages)

    async def subscribe(self, destination: str, *, group: str) -> Subscription:
        raise NotImplementedError


def charge(saga_id: str = "no-such-saga", amount: int = 123_456) -> Envelope:
    return charge_command(saga_id, amount=amount)


async def test_a_worker_refuses_a_forged_command_without_effect(db: AsyncEngine) -> None:
    from workers import ledger

    await ledger.seed(db, stock_by_sku={}, balances={"alice": 1_000_000})
    sent = Recording()
    runner = WorkerRunner(payment.worker, sent, SqlBarrier(db), signing=REQUIRE)
    body = encode(charge())
    unsigned = FakeDelivery(Message(COMMANDS, "no-such-saga", body))
    forged = FakeDelivery(signing(SigningMode.REQUIRE, ("k1", S0)).sign(unsigned.message))
    genuine = FakeDelivery(REQUIRE.sign(Message(COMMANDS, "s2", encode(charge("s2", 100)))))
    await runner.handle_deliveries([unsigned, forged, genuine])
    assert unsigned.settled == ["dead_letter: unsigned command (signing is required)"]
    assert forged.settled == ["dead_letter: bad signature on command (key k1)"]
    assert genuine.settled == ["ack"]
    (reply,) = sent.published  # the genuine one's, signed
    assert decode(reply.body).saga_id == "s2"
    REQUIRE.check(reply, "reply")
    async with db.connect() as conn:
        rows = await conn.scalar(select(func.count()).select_from(barrier))
        balance = await conn.scalar(select(payment.accounts.c.balance_cents))
    assert (rows, balance) == (1, 1_000_000 - 100)


async def test_the_engine_refuses_a_forged_reply_and_signs_what_it_sends(
    store: SqlSagaStore,
) -> None:
    from engine.client import SagaClient

    sent = Recording()
    engine = Engine(store, sent, SagaRegistry([place_order]), signing=REQUIRE)
    client = SagaClient(store, SagaRegistry([place_order]))
    saga_id = await client.start("place_order", order_input())
    await engine.relay.relay_once()
    (command,) = sent.published
    REQUIRE.check(command, "command")  # the relay signed it
    reply = decode(command.body).reply(Outcome.SUCCESS, {"reservation_id": 1})
    replies = Topology().replies
    forged = FakeDelivery(Message(replies, saga_id, encode(reply)))
    await engine.handle_deliveries([forged])
    assert forged.settled == ["dead_letter: unsigned reply (signing is required)"]
    detail = await client.get(saga_id)
    assert [h.event for h in detail.history if h.event == "step_succeeded"] == []
    genuine = FakeDelivery(REQUIRE.sign(forged.message))
    await engine.handle_deliveries([genuine])
    assert genuine.settled == ["ack"]
    detail = await client.get(saga_id)
    assert [h.step for h in detail.history if h.event == "step_succeeded"] == ["reserve_inventory"]


async def test_a_refused_forgery_replayed_is_refused_again_unless_vouched_for(
    tmp_path: Path,
) -> None:
    """End to end in one process: sagas complete signed; a forged charge is archived
    with its reason and no effect; replayed as archived it is refused again; only an
    operator's --re-sign makes the engine sign it (and then it runs: the flag vouches)."""
    async with EmbeddedSystem(tmp_path / "signed.db", signing=REQUIRE) as system:
        saga_id = await system.start_order()
        done = await system.wait_all_terminal(10, [saga_id])
        assert done[saga_id].status is SagaStatus.COMPLETED
        before = await system.totals()

        old = signing(SigningMode.REQUIRE, ("k0", S0))
        forged = old.sign(Message(COMMANDS, "no-such-saga", encode(charge())))
        await _publish(system, [forged])
        (letter,) = [d for d in await system.dead_letters(1) if d.source == COMMANDS]
        assert letter.reason == "unknown signing key k0 on command"
        assert (await system.totals()).balance_cents == before.balance_cents

        await system.client.replay_dead_letter(letter.id, actor="eve")
        letters = await system.dead_letters(2)
        again = letters[-1]
        assert again.reason == "unknown signing key k0 on command"
        assert again.headers[REPLAY_HEADER] == str(letter.id)
        assert (await system.totals()).balance_cents == before.balance_cents

        await system.client.replay_dead_letter(again.id, actor="ops", re_sign=True)

        async def charged() -> bool:
            return (await system.totals()).balance_cents == before.balance_cents - 123_456

        await system.wait_for(charged, 10, "the re-signed charge")


async def test_a_rollout_from_off_to_require_without_a_stop(tmp_path: Path) -> None:
    """The documented rollout while sagas run: every process gets the keys with
    accept-unsigned (one after another), then require (one after another). Nothing
    is refused on the way; once everyone signs, nothing unsigned is accepted."""
    keys = ("k1", S1)
    accepting = [signing(SigningMode.ACCEPT_UNSIGNED, keys) for _ in range(4)]
    async with EmbeddedSystem(tmp_path / "rollout.db") as system:
        ids: list[str] = []

        async def roll(stage: list[Signing]) -> None:
            """Workers one after another while sagas start, then the engine."""
            for name, each in zip(system.workers, stage, strict=False):
                ids.extend([await system.start_order() for _ in range(3)])
                system.workers_signing[name] = each
                await system.stop_worker(name)
                await system.start_worker(name)
            last = [await system.start_order() for _ in range(3)]
            await system.wait_all_terminal(20, last)  # new workers, the old engine
            ids.extend(last)
            ids.extend([await system.start_order() for _ in range(3)])
            system.signing = stage[-1]
            await system.restart_engine()

        await roll(accepting)
        # The old engine's commands were unsigned: each new worker accepted them.
        assert all(s.unsigned_accepted > 0 for s in accepting[:3])
        await roll([REQUIRE] * 4)
        done = await system.wait_all_terminal(20, ids)
        assert {d.status for d in done.values()} == {SagaStatus.COMPLETED}
        assert len(done) == len(ids) == 2 * 15
        assert await system.client.dead_letters() == []


async def _publish(system: EmbeddedSystem, messages: list[Message]) -> None:
    sender = MemoryTransport(system.broker)
    await sender.connect()
    await sender.publish(messages)
    await sender.close()
