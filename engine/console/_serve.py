"""``sagactl console``: the app served by uvicorn on one address."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import uvicorn

from engine.client import SagaClient
from engine.console._app import create_app
from engine.console._settings import ConsoleSettings


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
    client = await SagaClient.connect(settings=settings)
    try:
        app = create_app(settings, client=client)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()
            shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            mode = "actions on" if settings.console_actions else "read-only"
            announce(f"saga-engine console on http://{shown_host}:{bound[1]}/ ({mode})")
        await task
    finally:
        await client.close()
