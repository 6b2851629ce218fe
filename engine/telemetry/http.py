"""``/healthz``, ``/readyz`` and ``/metrics`` on one port, served from a thread.

A thread (wsgiref + prometheus_client) keeps the endpoints answering even when the
event loop is busy, which is exactly when an operator wants to look; readiness is a
snapshot the event loop refreshes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from engine.errors import ConfigError
from engine.redact import redact

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class Readiness:
    """Named checks, each true or false with a reason; ready when all are true."""

    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        """Record a check; ``detail`` (often an exception's text) is redacted here, so
        no ``/readyz`` body can show a secret."""
        with self._lock:
            self.checks[name] = (ok, redact(detail))

    def report(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        with self._lock:
            items = dict(self.checks)
        body = {k: {"ok": ok, "detail": detail} for k, (ok, detail) in items.items()}
        return bool(items) and all(ok for ok, _ in items.values()), body


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the daemon's own log."""


def _app(readiness: Readiness) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, body = readiness.report()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [json.dumps({"ready": ok, "checks": body}).encode()]
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class TelemetryServer:
    """Started by a daemon with ``--metrics-port``; stopped on exit."""

    def __init__(self, host: str, port: int, readiness: Readiness) -> None:
        try:
            self._server = make_server(
                host, port, _app(readiness), server_class=_Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="saga-telemetry", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a loop that must be running
            self._server.shutdown()
        self._server.server_close()
