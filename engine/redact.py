"""One redaction for every text a process shows: no URL password is ever printed.

Secrets reach error messages through URLs (``amqp://user:password@host/``,
``postgresql://user:password@host/db``). Messages that quote a URL redact it where
they are born, and ``sagactl``'s last line redacts again, so a URL a library quotes
in its own error is covered too.
"""

from __future__ import annotations

import re

#: ``scheme://user:password@``: the password runs to the last ``@`` before the host
#: (a raw ``@`` in a password is common enough), never past a ``/`` or white space.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^/\s]*@")

#: What a password is shown as.
HIDDEN = "***"


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['head']}:{HIDDEN}@", text)
