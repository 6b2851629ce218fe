"""``sagactl console``: the app served by uvicorn on one address."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from engine.client import SagaClient
from engine.console._app import create_app
from engine.console._settings import ConsoleSettings
from engine.errors import ConfigError
from engine.telemetry.logs import configure_logging


async def serve(
    settings: ConsoleSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8089,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve the console until interrupted; ``announce`` is told the URL it listens
    on once it does (with ``port=0``, the port the system chose).

    The client connects first, so a missing database or a saga module that does not
    import is an error here, before anything listens.
    """
    # The server's own records (a request that failed, with its traceback) go
    # through the engine's log handler: redacted, in SAGA_LOG_FORMAT.
    configure_logging("warning", settings.log_format)
    client = await SagaClient.connect(settings=settings)
    mode = "actions on" if settings.console_actions else "read-only"
    try:
        app = create_app(settings, client=client)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="on",
            # Live pages hold a stream open: stop without waiting for them.
            timeout_graceful_shutdown=2,
        )
        listening = _listen(host, port)
        await _Announcing(config, lambda url: announce(f"{url} ({mode})")).serve([listening])
    finally:
        await client.close()


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


class _Announcing(uvicorn.Server):
    """A uvicorn server that tells the URL it listens on once it does."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, then announce where."""
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self._announce(f"saga-engine console on http://{shown}:{port}/")
