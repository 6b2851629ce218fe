"""Signed messages: an HMAC-SHA256 on every command, compensation and reply.

Without it, whoever can publish to a participant's command destination can make it
act (charge a customer for a saga that does not exist). With signing keys configured,
each message leaves its process signed and each consumer checks the signature before
anything else happens, so an unsigned or forged message is dead-lettered with its
reason and has no effect.

What is signed: the exact body bytes, the destination, and the key id. The body is the
whole envelope (message and saga ids, saga name and version, step, kind, name, attempt,
payload, the engine's last-attempt header, the reply's outcome and what it answers):
everything that decides what a message does is in it, and the engine and the workers
act on none of the broker's headers but the two below (trace context travels in the
body too; what a broker adds is outside the signature and read by nobody). Binding
the destination stops a signed command for one participant from being replayed to
another. Each part is length-prefixed, so no byte can move from one part into the
next.

Where: a message is signed at the one place each process sends it (the engine's
outbox relay, a worker's reply) and checked at the one place each process decodes
what it consumes (the engine's reply consumer, the worker runner), through the same
dead-letter path as an undecodable message. Processes that only write the outbox
(``sagactl start``, operator commands) need no key: the engine's relay signs for them.

Modes (``SAGA_SIGNING``): ``off`` signs and checks nothing; ``accept-unsigned`` signs
everything and accepts an unsigned message still in flight, but a message that is
signed must verify (the rollout step); ``require`` refuses an unsigned one too. With
keys and no mode, ``require``: a key set that silently let forgeries through would
promise a protection it does not give.

Rotation: every key in the set verifies, the first one signs. Add the new key second
everywhere, then make it first everywhere, then drop the old one once nothing signed
with it can still arrive.

A dead letter replayed by ``sagactl dlq replay`` is sent as it was archived, with its
own signature or none (:func:`as_replayed`): signing it again would launder a
forgery the consumer refused. ``--re-sign`` vouches for it explicitly.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum

from engine.errors import SignatureError
from engine.transport.base import Message

log = logging.getLogger("saga.signing")

#: The id of the key a message is signed with.
KEY_HEADER = "x-saga-key-id"
#: The HMAC-SHA256, lowercase hex.
SIGNATURE_HEADER = "x-saga-signature"
#: On an outbox row replayed from the dead letters (its archive id): the relay sends
#: it as archived, without signing it.
REPLAY_HEADER = "x-saga-replay"

#: Key ids: short, printable, safe in a header, a log line and a dead-letter reason.
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: At least the length of the hash's output (RFC 2104): a shorter secret weakens the
#: HMAC, and a guessable one (a word, a password) is what such a bound turns away.
MIN_SECRET_BYTES = 32

#: Sets the signed data apart from any other use of the same secret; a new scheme
#: gets a new tag.
_SCHEME = b"saga-engine message signature v1"


class SigningMode(StrEnum):
    OFF = "off"
    #: Sign everything; accept unsigned messages (still in flight from before the
    #: rollout), but a signed one must verify.
    ACCEPT_UNSIGNED = "accept-unsigned"
    #: Sign everything; refuse what is unsigned or does not verify.
    REQUIRE = "require"


def parse_keys(text: str) -> dict[str, bytes]:
    """``id:secret`` entries separated by commas or newlines, in order (the first
    signs). Raises ValueError with a message that never holds a secret."""
    keys: dict[str, bytes] = {}
    entries = [e.strip() for e in re.split(r"[,\n]", text)]
    for number, entry in enumerate(entries, 1):
        if not entry:
            continue
        key_id, sep, secret = entry.partition(":")
        key_id = key_id.strip()
        if not sep:
            raise ValueError(f"entry {number} is not id:secret")
        if not KEY_ID.fullmatch(key_id):
            # Not shown: a malformed entry may be a secret put where the id goes.
            raise ValueError(f"entry {number}: a key id is 1 to 64 of A-Z a-z 0-9 . _ -")
        if key_id in keys:
            raise ValueError(f"key id {key_id} is given twice")
        raw = secret.strip().encode("utf-8")
        if len(raw) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the secret of key {key_id} is shorter than {MIN_SECRET_BYTES} bytes "
                "(make one with: openssl rand -hex 32)"
            )
        keys[key_id] = raw
    return keys


def signature(secret: bytes, key_id: str, destination: str, body: bytes) -> str:
    """The HMAC-SHA256 of one message, as lowercase hex."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in (_SCHEME, key_id.encode(), destination.encode(), body):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest()


def as_replayed(headers: Mapping[str, str], letter: int, *, re_sign: bool) -> dict[str, str]:
    """The headers of dead letter ``letter`` sent back through the outbox: marked to go
    as archived, with its own signature or none (the relay does not sign it); or, when
    an operator vouches for it (``re_sign``), without its old signature, so the relay
    signs it afresh."""
    drop = {REPLAY_HEADER, KEY_HEADER, SIGNATURE_HEADER} if re_sign else {REPLAY_HEADER}
    kept = {k: v for k, v in headers.items() if k.lower() not in drop}
    if not re_sign:
        kept[REPLAY_HEADER] = str(letter)
    return kept


class Signing:
    """A process's signing keys and mode: signs what it sends, checks what it takes."""

    def __init__(
        self, mode: SigningMode = SigningMode.OFF, keys: Mapping[str, bytes] | None = None
    ) -> None:
        keys = dict(keys or {})
        if mode is not SigningMode.OFF and not keys:
            raise ValueError(f"signing mode {mode} needs at least one key")
        self.mode = mode
        #: Key id to secret; the first one signs, every one verifies.
        self._keys = keys
        #: Unsigned messages accepted (``accept-unsigned``): when it stays 0, every
        #: sender signs and ``require`` can follow.
        self.unsigned_accepted = 0

    def __repr__(self) -> str:  # key ids only, never a secret
        return f"Signing({self.mode.value!r}, keys={list(self._keys)!r})"

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    @property
    def signing_key(self) -> str | None:
        """The id of the key this process signs with; None when it does not sign."""
        if self.mode is SigningMode.OFF:
            return None
        return next(iter(self._keys))

    def describe(self) -> str:
        """For the startup log: the mode and key ids, never a secret."""
        if self.mode is SigningMode.OFF:
            return "message signing is off"
        return (
            f"message signing {self.mode}: signing with key {self.signing_key}, "
            f"verifying with {', '.join(self._keys)}"
        )

    def sign(self, message: Message) -> Message:
        """``message`` with this process's signature (replacing any it carried); as it
        is when signing is off or it is a dead letter replayed as archived."""
        key_id = self.signing_key
        if key_id is None or REPLAY_HEADER in message.headers:
            return message
        mac = signature(self._keys[key_id], key_id, message.destination, message.body)
        headers = {
            **{k: v for k, v in message.headers.items() if k not in (KEY_HEADER, SIGNATURE_HEADER)},
            KEY_HEADER: key_id,
            SIGNATURE_HEADER: mac,
        }
        return replace(message, headers=headers)

    def check(self, message: Message, what: str) -> None:
        """Raise :class:`SignatureError` (a DecodeError: the message is dead-lettered
        with its reason, unhandled) unless ``message`` may be handled. ``what`` names
        the kind of message in that reason ("command", "reply")."""
        if self.mode is SigningMode.OFF:
            return
        headers = message.headers
        key_id = headers.get(KEY_HEADER)
        given = headers.get(SIGNATURE_HEADER)
        if key_id is None and given is None:
            if self.mode is SigningMode.REQUIRE:
                raise SignatureError(f"unsigned {what} (signing is required)")
            self._accepted_unsigned(message)
            return
        if key_id is None:
            raise SignatureError(f"bad signature on {what}: no key id")
        if not KEY_ID.fullmatch(key_id):
            raise SignatureError(f"bad signature on {what}: malformed key id")
        secret = self._keys.get(key_id)
        if secret is None:
            raise SignatureError(f"unknown signing key {key_id} on {what}")
        expected = signature(secret, key_id, message.destination, message.body)
        if given is None or not hmac.compare_digest(
            expected.encode(), given.encode("utf-8", "replace")
        ):
            raise SignatureError(f"bad signature on {what} (key {key_id})")

    def _accepted_unsigned(self, message: Message) -> None:
        # Imported here: the settings import this module, and a command that only
        # reads (sagactl list) starts without OpenTelemetry.
        from engine.telemetry import metrics

        self.unsigned_accepted += 1
        metrics.unsigned.add(1, {"messaging.destination.name": message.destination})
        if self.unsigned_accepted == 1:
            log.warning(
                "accepted an unsigned message on %s (SAGA_SIGNING=accept-unsigned); switch "
                "to require once no sender is left that does not sign (metric "
                "saga.messages.unsigned)",
                message.destination,
            )


#: Signing off: nothing signed, nothing checked.
NO_SIGNING = Signing()


def signing_from(mode: str | None, keys: str | None) -> Signing:
    """The signing of a process from its settings (validated there)."""
    parsed = parse_keys(keys or "")
    return Signing(resolve_mode(mode, has_keys=bool(parsed)), parsed)


def resolve_mode(mode: str | None, *, has_keys: bool) -> SigningMode:
    """The mode in force: as set, or with keys and no mode ``require``, else ``off``.
    Raises ValueError for a mode that needs keys when there are none."""
    if mode is None:
        return SigningMode.REQUIRE if has_keys else SigningMode.OFF
    resolved = SigningMode(mode)
    if resolved is not SigningMode.OFF and not has_keys:
        raise ValueError(f"{resolved} needs signing keys (SAGA_SIGNING_KEYS)")
    return resolved
