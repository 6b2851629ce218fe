"""``/healthz``, ``/readyz`` and ``/metrics`` on one port, served from a thread.

A thread with its own event loop (``engine.telemetry._server``, bounded in
connections, time and size) keeps the endpoints answering even when the daemon's
event loop is busy, which is exactly when an operator wants to look; readiness is a
snapshot the event loop refreshes.
"""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from engine.errors import ConfigError
from engine.redact import redact
from engine.telemetry._server import (
    HEAD_TIMEOUT,
    BoundedHttpServer,
    Handler,
    Request,
    Response,
)


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


def _routes(readiness: Readiness) -> Handler:
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import choose_encoder, gzip_accepted

    def metrics(request: Request) -> Response:
        """What prometheus_client's own server answers: the format the scraper
        accepts, ``name[]`` filters, gzip when asked for."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        names = request.query.get("name[]")
        body = encoder(REGISTRY.restricted_registry(names) if names else REGISTRY)
        headers: tuple[tuple[str, str], ...] = ()
        if gzip_accepted(request.headers.get("accept-encoding", "")):
            body, headers = gzip.compress(body), (("Content-Encoding", "gzip"),)
        return Response(HTTPStatus.OK, body, content_type, headers)

    def route(request: Request) -> Response:
        if request.path == "/healthz":
            return Response(HTTPStatus.OK, b"ok\n", "text/plain")
        if request.path == "/readyz":
            ok, body = readiness.report()
            return Response(
                HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                json.dumps({"ready": ok, "checks": body}).encode(),
                "application/json",
            )
        if request.path == "/metrics":
            return metrics(request)
        return Response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    return route


class TelemetryServer:
    """Started by a daemon with ``--metrics-port``; stopped on exit."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        *,
        max_connections: int | None = None,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        """``max_connections``: by default :func:`connection_cap`."""
        try:
            self._server = BoundedHttpServer(
                host,
                port,
                _routes(readiness),
                name="saga-telemetry",
                max_connections=max_connections,
                head_timeout=head_timeout,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.port = self._server.port

    @property
    def server(self) -> BoundedHttpServer:
        """The HTTP server underneath (its cap and counters)."""
        return self._server

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        """Close every connection and the socket; joins the server's thread."""
        self._server.stop()
