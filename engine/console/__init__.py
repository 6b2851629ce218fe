"""The web console: sagas, their timelines and dead letters in a browser.

Server-rendered pages (starlette and jinja2, autoescaped, every text redacted and
its control characters escaped like ``sagactl`` prints it), a small stylesheet and
one small script for live updates (server-sent events), all served by the app
itself: no build step, nothing fetched from elsewhere. It reads through
:class:`~engine.client.SagaClient`; operator actions (retry, cancel, dead-letter
replay) only with ``SAGA_CONSOLE_ACTIONS`` on and for an authenticated user, who is
recorded as the actor.

Needs the ``console`` extra (``pip install 'saga-engine[console]'``); the rest of
the engine imports without it. ``sagactl console`` serves it::

    from engine.console import create_app
    app = create_app()  # SAGA_DATABASE_URL, SAGA_CONSOLE_*, ...
"""

from engine.console._app import create_app
from engine.console._serve import serve
from engine.console._settings import ConsoleSettings, load_console_settings

__all__ = ["ConsoleSettings", "create_app", "load_console_settings", "serve"]
