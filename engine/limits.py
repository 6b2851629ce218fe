"""One home for the size limits of everything that travels or is stored.

A limit is checked where its value is born (``start``, a step's builder, a handler's
reply) with a clear error, and again at the wire edge (``decode``), so nothing reaches
the broker or a column that either would refuse. The field lengths are those of the
columns in ``engine/store/schema.py`` (changing one takes a migration, so they are
constants); the message size is a setting, ``SAGA_MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from engine.errors import LimitError
from engine.redact import redact

#: Saga ids and message ids: ``saga_instances.id``, ``saga_inbox.message_id``, ... (a UUID).
ID_LENGTH = 36
#: Saga, step, command and actor names: ``saga_instances.name``, ``saga_steps.name``, ...
NAME_LENGTH = 200
#: A parallel step's lane, ``group[branch]``: a name and a branch number.
LANE_LENGTH = NAME_LENGTH + 16
#: An operator's reason for an action (``--reason``): kept in the saga's history
#: (``saga_history.detail``) and, for a cancel, its error. Text columns: the limit is ours.
REASON_LENGTH = 2_000
#: Error text in a reply (kept in ``saga_steps.error``; longer text is cut where born).
ERROR_LENGTH = 8_000
#: Business keys of a saga (``saga_keys``): how many a saga may have, and the length
#: of a value (a name is a name: :data:`NAME_LENGTH`).
MAX_KEYS = 16
KEY_VALUE_LENGTH = 200
#: Broker / envelope headers: how many, and the length of a name and of a value (W3C
#: trace context needs 55 and at most 512; ``baggage`` at most 8192).
MAX_HEADERS = 32
HEADER_NAME_LENGTH = 200
HEADER_VALUE_LENGTH = 8_192

#: Below Kafka's default 1 MiB record and request limit, leaving room for headers.
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
#: A smaller limit could refuse an ordinary command with its trace headers.
MIN_MESSAGE_BYTES = 65_536
#: An upper bound: RabbitMQ 3.x refuses bodies over 128 MiB by default (4.x: 16 MiB).
MAX_MESSAGE_BYTES = 128 * 1024 * 1024

#: An unescaped JSON ``\u0000``: preceded by an even number of backslashes.
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NUL = re.compile("\x00")
#: What undecodable bytes of a command line become (``surrogateescape``).
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Limits:
    """The limits one process applies; every process of a deployment should agree."""

    #: Largest encoded envelope (the message body) a process sends or accepts.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    id_length: ClassVar[int] = ID_LENGTH
    name_length: ClassVar[int] = NAME_LENGTH
    error_length: ClassVar[int] = ERROR_LENGTH

    def __post_init__(self) -> None:
        if not MIN_MESSAGE_BYTES <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be between {MIN_MESSAGE_BYTES} and "
                f"{MAX_MESSAGE_BYTES}, not {self.max_message_bytes}"
            )


DEFAULT_LIMITS = Limits()
#: For reading what was sent already (a dead letter, a row the broker refused): its
#: size is not the reader's to judge, only which saga it belongs to.
ANY_SIZE = Limits(MAX_MESSAGE_BYTES)


class MessageTooLarge(LimitError):
    """An encoded envelope is over :attr:`Limits.max_message_bytes`."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the message is {size:,} bytes, over the limit of {limit:,} bytes "
            "(SAGA_MAX_MESSAGE_BYTES)"
        )
        self.size = size
        self.limit = limit


def has_nul(body: bytes) -> bool:
    """True if a JSON body holds an unescaped ``\\u0000``: a NUL, which PostgreSQL text
    cannot store. One scan for a backslash on the common path (most bodies have none).

    A raw 0x00 byte is not valid JSON anywhere, so parsing refuses it on its own.
    """
    return b"\\" in body and b"\\u0000" in body and _ESCAPED_NUL.search(body) is not None


def nul_path(value: Any, path: str = "") -> str | None:
    """Where in a JSON-like value the first NUL is (``payload.items[2].sku``), or None."""
    if isinstance(value, str):
        return (path or "value") if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{clip(str(key), 40)}" if path else clip(str(key), 40)
            if "\x00" in str(key):
                return where
            found = nul_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = nul_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def nul_in_body(body: bytes) -> str:
    """Where the NUL in a body is (the body's fields), for a reason; ``body`` if the
    body does not parse. Only called once :func:`has_nul` said there is one."""
    try:
        return nul_path(json.loads(body)) or "body"
    except ValueError:
        return "body"


def storable(text: str) -> str:
    """``text`` as any database can keep it: NUL (which PostgreSQL refuses in text and
    JSON) shown as ``\\x00``."""
    return text.replace("\x00", "\\x00")


def clip(text: str, length: int) -> str:
    """``text`` made storable and short enough: secrets redacted (``engine.redact``),
    NUL replaced, cut to ``length`` characters with a marker. For text born from
    exceptions and user input, which operators read later (a handler's error)."""
    text = storable(redact(text))
    if len(text) <= length:
        return text
    return text[: length - 1] + "…"


def _check_text(text: str, what: str, length: int, *, controls: bool = False) -> None:
    """Refuse text no column (or terminal) should take: empty, longer than ``length``
    characters, not Unicode (undecodable bytes from a command line), a NUL, and, unless
    ``controls``, any control character (newline, tab, ESC, ...)."""
    if not text.strip():
        raise LimitError(f"{what} must not be empty")
    if len(text) > length:
        raise LimitError(f"{what} is {len(text):,} characters long, the limit is {length:,}")
    if _SURROGATE.search(text) is not None:
        raise LimitError(f"{what} is not valid UTF-8 text")
    control = (_NUL if controls else _CONTROL).search(text)
    if control is not None:
        raise LimitError(
            f"{what} holds a control character (U+{ord(control.group()):04X} at "
            f"position {control.start()})"
        )


def check_saga_id(saga_id: str, what: str = "the saga id") -> None:
    """Refuse a saga id the columns (or a terminal) cannot take: one printable line of
    at most :data:`ID_LENGTH` characters."""
    _check_text(saga_id, what, ID_LENGTH)


def check_actor(actor: str, what: str = "the actor") -> None:
    """Refuse an operator name (who did an action) that is not one printable line of
    at most :data:`NAME_LENGTH` characters."""
    _check_text(actor, what, NAME_LENGTH)


def check_name(name: str, what: str = "the name") -> None:
    """Refuse a saga, step or command name that is not one printable line of at most
    :data:`NAME_LENGTH` characters."""
    _check_text(name, what, NAME_LENGTH)


def check_key(name: str, value: str) -> None:
    """Refuse a business key value over :data:`KEY_VALUE_LENGTH` characters or holding
    a NUL (a key is searched for, never cut: a cut value would find the wrong saga).
    Line breaks and other control characters come from the user's input and are kept
    as written, so the key finds its saga; every reader shows them escaped."""
    _check_text(value, f"business key {name!r}", KEY_VALUE_LENGTH, controls=True)


def check_reason(reason: str | None, what: str = "the reason") -> None:
    """Refuse an operator's reason that is empty, over :data:`REASON_LENGTH` characters
    or holds a NUL. Line breaks, tabs and other control characters are kept as written
    (an audit trail keeps what was said); every reader shows them escaped."""
    if reason is not None:
        _check_text(reason, what, REASON_LENGTH, controls=True)
