"""What a process shows of text it did not write: no secret, no control character.

Secrets reach text through URLs (``amqp://user:password@host/``), through a library
quoting its configuration, or through a setting printed by mistake. :func:`redact`
hides both kinds it can know of:

- the password of every URL (``scheme://user:password@``) and the value of every URL
  query parameter whose name says it is secret (``?sslpassword=...``), wherever the
  URL comes from;
- every secret this process was configured with, wherever it appears: the settings
  register theirs when they are loaded (every ``SecretStr`` value, every URL password
  in a setting; :func:`remember_secrets_of`), so no list of secret settings is kept.

A secret shorter than :data:`MIN_SECRET_LENGTH` is hidden only inside URLs: hiding a
short word everywhere would garble ordinary text (the development password ``saga``
is also the project's name), and such a secret protects nothing anyway.

:func:`escape_controls` is the other half: user text (saga input, handler errors,
operator reasons) shown with its control characters escaped, so one log record or
table cell is one line and a terminal never acts on an escape sequence.
:func:`displayed` is both: the one rule for text shown to people (``sagactl``'s
tables, the web console's pages), which add only their own markup's escaping.

Every text that leaves the process goes through :func:`redact`: log records
(``engine.telemetry.logs``), ``/readyz`` details, exported spans, ``sagactl``'s error
line, and the errors and dead-letter reasons stored for operators.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from urllib.parse import quote, quote_plus, unquote, unquote_plus

#: ``scheme://user:password@``: the password runs to the last ``@`` before the host
#: (a raw ``@`` in a password is common enough), never past a ``/`` or white space.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<secret>[^/\s]*)@")

#: A URL query parameter whose name says it holds a secret: ``?password=``,
#: ``&sslpassword=``, ``&sasl_plain_password=``, ``&token=``, ``&client_secret=``.
_SECRET_PARAM = re.compile(
    r"(?P<head>[?&][^=&#\s]*(?:password|passwd|pwd|secret|token)[^=&#\s]*=)"
    r"(?P<secret>[^&#\s'\"]+)",
    re.IGNORECASE,
)

#: What a secret is shown as.
HIDDEN = "***"

#: Known secrets shorter than this are hidden only where they are a URL's password.
MIN_SECRET_LENGTH = 8

#: Control characters (newline, CR, ESC, ...), line and paragraph separators, and the
#: bidirectional overrides that make a terminal show text other than it is.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# Copy on write: remember() builds a new pattern under the lock and publishes it with
# one assignment; redact() reads that one reference, so it never takes the lock.
_lock = threading.Lock()
_known: frozenset[str] = frozenset()
_known_pattern: re.Pattern[str] | None = None


def redact(text: str) -> str:
    """``text`` with every URL password, secret URL parameter and known secret as ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{HIDDEN}@", text)
    text = _SECRET_PARAM.sub(lambda m: f"{m['head']}{HIDDEN}", text)
    pattern = _known_pattern
    return pattern.sub(HIDDEN, text) if pattern is not None else text


def escape_controls(text: str) -> str:
    """``text`` with control characters as Python escapes (``\\n``, ``\\x1b``): one line,
    inert on a terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def displayed(text: str) -> str:
    """``text`` as shown to a person: secrets hidden, control characters escaped (one
    line). The CLI then escapes rich's markup, the console HTML; nothing else differs."""
    return escape_controls(redact(text))


def remember(secret: str) -> None:
    """Hide ``secret`` from every text :func:`redact` sees from now on (if it is at
    least :data:`MIN_SECRET_LENGTH` long), also in its URL-encoded forms."""
    global _known, _known_pattern
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe="")}
    forms = {f for f in forms if len(f) >= MIN_SECRET_LENGTH}
    if forms <= _known:
        return
    with _lock:
        known = _known | forms
        # Longest first, so a secret containing another is hidden whole.
        alternatives = sorted(known, key=lambda s: (-len(s), s))
        _known_pattern = re.compile("|".join(re.escape(s) for s in alternatives))
        _known = known


def remember_urls_in(text: str) -> None:
    """Remember the password of every URL in ``text`` and its secret query parameters,
    decoded as well as written (a library may quote either)."""
    for match in (*_USERINFO.finditer(text), *_SECRET_PARAM.finditer(text)):
        written = match["secret"]
        for form in {written, unquote(written), unquote_plus(written)}:
            remember(form)


def remember_secrets_of(value: object) -> None:
    """Remember every secret in ``value``: each ``SecretStr`` / ``SecretBytes`` and
    every URL password in a string, through models, mappings and sequences.

    ``Settings`` calls it on itself once loaded, so a new secret setting is covered by
    being typed ``SecretStr``; nothing lists the secret settings.
    """
    # Here, not at the top: only settings (pydantic models, so pydantic is loaded
    # already) come here, and the CLI's error line needs redact() without pydantic.
    from pydantic import BaseModel, SecretBytes, SecretStr

    if isinstance(value, SecretStr):
        remember(value.get_secret_value())
    elif isinstance(value, SecretBytes):
        remember(value.get_secret_value().decode("utf-8", "replace"))
    elif isinstance(value, str):
        remember_urls_in(value)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            remember_secrets_of(getattr(value, name, None))
    elif isinstance(value, Mapping):
        for item in value.values():
            remember_secrets_of(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            remember_secrets_of(item)
