"""Which database errors pass and which are refusals, and how one is told in a line.

Apart from :mod:`engine.database` (URLs, engines, migrations) because the engine core
classifies the errors its store raises, and must not depend on drivers or Alembic for
it: SQLAlchemy's exception types and the SQLSTATE codes the drivers carry are enough.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

from engine.tls import tls_refusal

#: SQLSTATE classes of errors that pass: connection exception, transaction rollback
#: (serialization failure, deadlock), insufficient resources, operator intervention
#: (shutdown, query cancelled), system error.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass by itself (the database or the network is away or busy)
    rather than being this message's own problem (a value the database refuses, a bug).

    A transient error is everyone's: whoever meets it retries later and dead-letters
    nothing. Anything else fails one message, which is retried a bounded number of
    times and then set aside with the error as its reason.
    """
    if connection_refusal(exc) is not None:
        # The database refused this process (its login, its certificate): not this
        # message's problem. A daemon does not start so (check_schema); when it
        # happens during a run, nothing is dead-lettered over it while it lasts.
        return True
    chain = _chain(exc)
    for error in chain:  # the database's own word first
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and len(sqlstate) == 5:
            return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES
    for error in chain:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, OperationalError | InterfaceError | DisconnectionError | OSError):
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: SQLAlchemy's ``orig``, else ``__cause__``."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return chain


def connection_refusal(exc: BaseException) -> str | None:
    """Why the database refused this process's connection, if that is what ``exc``
    is: a login refused (a wrong user or password, no ``pg_hba.conf`` entry), a server
    certificate that is not trusted or not the host's, a failed TLS handshake.

    Configuration errors that no retry mends: a daemon or ``sagactl`` ends on one
    over one line. A database that is merely unreachable is not one of them.
    """
    for error in _chain(exc):
        sqlstate = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("28"):  # invalid authorization
            return f"login refused: {first_line(error)}"
        refused = tls_refusal(error)
        if refused is not None:
            return refused
    return None


def error_text(exc: BaseException) -> str:
    """One line saying what failed: the database's own message where there is one."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {reason(exc)}"


def reason(exc: BaseException) -> str:
    """The first line of what failed: the database's own message where there is one."""
    return first_line(getattr(exc, "orig", None) or exc)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s text, or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
