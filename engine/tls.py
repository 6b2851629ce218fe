"""What a TLS failure says, for every connection (database and brokers).

A certificate the client refuses (not signed by a trusted CA, not for the host it
connected to) or a handshake the server refuses (no or a wrong client certificate) is
configuration that no retry mends. A TLS connection that merely dropped (EOF, reset)
is not: that is an unreachable peer like any other.
"""

from __future__ import annotations

import ssl

#: TLS errors of a connection that went away rather than one that was refused.
_DROPPED = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def tls_refusal(error: BaseException) -> str | None:
    """One line on why TLS refused this connection, if ``error`` is such a refusal
    (``error`` alone, not what it wraps)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate refused: {error.verify_message or error.reason or error}"
    if isinstance(error, ssl.SSLError) and not isinstance(error, _DROPPED):
        return f"TLS handshake failed: {error.reason or error}"
    return None
