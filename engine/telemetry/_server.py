"""A small HTTP/1.x server whose every resource is bounded, for the health endpoint.

The endpoint must answer while the daemon's event loop is busy, so it runs its own
event loop in a dedicated thread (stdlib asyncio, no framework). It must also survive
whoever can reach its port, and it shares the process's file descriptors with the
database and broker connections, so:

- connections are capped (:func:`connection_cap`); at the cap the connection idle the
  longest (still sending its request, or lingering after its answer) is closed to make
  room, so a flood of idle connections cannot shut a probe out (it waits only for the
  connections queued before it), and the server holds at most the cap of descriptors
  plus its listening socket and its event loop's own;
- the whole request head (request line and headers) must arrive within
  :data:`HEAD_TIMEOUT` and fit in :data:`MAX_HEAD_BYTES`; only GET and HEAD, no bodies;
- one request per connection (``Connection: close``), the answer written within
  :data:`WRITE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import resource
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs

log = logging.getLogger("saga.telemetry")

#: Request line and headers together: a probe or a scrape sends a few hundred bytes.
MAX_HEAD_BYTES = 8192
#: Seconds from a connection's accept to the end of its request head.
HEAD_TIMEOUT = 5.0
#: Seconds to hand over the whole answer.
WRITE_TIMEOUT = 10.0
#: Seconds (and bytes) read and discarded after answering, so that unread input (a
#: refused body) does not turn the close into a reset that loses the answer.
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 65_536
#: Open connections at most, whatever the file-descriptor limit allows.
MAX_CONNECTIONS = 256
#: Never fewer, however low the file-descriptor limit.
MIN_CONNECTIONS = 8
#: Connections the kernel completes before they are accepted (they hold no descriptor
#: of this process; the kernel caps this at ``net.core.somaxconn``). Deep enough that a
#: burst waits its turn instead of being dropped and retried a second later.
BACKLOG = 1024
#: The capacity warning is repeated at most this often (seconds).
WARN_EVERY = 60.0

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(r"/[\x21-\x7e]*")
_VERSION = re.compile(r"HTTP/\d\.\d")


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """``limit``, but at most a quarter of the process's file-descriptor limit
    (``RLIMIT_NOFILE``): the rest stays for the database and broker connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(MIN_CONNECTIONS, min(limit, soft // 4))


@dataclass(frozen=True)
class Request:
    """A parsed request head."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    #: Header names in lower case; repeated headers joined with ", ".
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Response:
    """An answer; ``Content-Length`` and ``Connection: close`` are added on sending."""

    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status.value} {self.status.phrase}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers),
            "Connection: close",
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


Handler = Callable[[Request], Response]


class _Refused(Exception):
    """A request head that gets an error status instead of the handler."""

    def __init__(self, status: HTTPStatus, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(status.phrase)
        self.response = Response(status, f"{status.phrase.lower()}\n".encode(), headers=headers)


def parse_head(head: bytes) -> Request:
    """The request line and headers (without the blank line), strictly: anything
    unusual is refused rather than guessed at."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].removesuffix("\r").split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refused(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    if method not in ("GET", "HEAD"):
        raise _Refused(HTTPStatus.METHOD_NOT_ALLOWED, (("Allow", "GET, HEAD"),))
    if not _TARGET.fullmatch(target):
        raise _Refused(HTTPStatus.BAD_REQUEST)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.removesuffix("\r").partition(":")
        if not colon or not _TOKEN.fullmatch(name):  # also a folded (indented) line
            raise _Refused(HTTPStatus.BAD_REQUEST)
        key, value = name.lower(), value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise _Refused(HTTPStatus.BAD_REQUEST)  # a GET or HEAD has no body here
    path, _, query = target.partition("?")
    return Request(method, path, parse_qs(query), headers)


def _head_end(buffer: bytearray) -> int:
    """Where the request head ends (the blank line), or -1."""
    ends = [i for i in (buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


def listen(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket (IPv4 when the host has an IPv4 address)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = next((info for info in infos if info[0] == socket.AF_INET), infos[0])
    sock = socket.create_server(address, family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class BoundedHttpServer:
    """Serves ``handler`` on ``host:port`` from its own thread and event loop.

    The socket is bound on construction (an ``OSError`` if it cannot be), served from
    :meth:`start` until :meth:`stop`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_connections: int | None = None,
        head_timeout: float = HEAD_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        name: str = "http",
    ) -> None:
        self._listener = listen(host, port)
        self.port: int = self._listener.getsockname()[1]
        self.handler = handler
        self.max_connections = max(2, max_connections or connection_cap())
        self.head_timeout = head_timeout
        self.write_timeout = write_timeout
        #: Connections accepted and closed for room since the start (for tests, logs).
        self.accepted = 0
        self.evicted = 0
        self._open: set[asyncio.Task[None]] = set()
        #: Connections that may be closed for room, oldest first (dicts keep order).
        self._idle: dict[asyncio.Task[None], None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._warned_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._open)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        """Close every connection and the socket; return once the thread has ended."""
        if self._thread.is_alive() and self._loop is not None and self._main is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just ended on its own
                self._loop.call_soon_threadsafe(self._main.cancel)
            self._thread.join()
        self._listener.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        self._ready.set()
        try:
            await self._accept()
        except asyncio.CancelledError:
            pass
        finally:
            tasks = list(self._open)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self) -> None:
        """Accept while there is room; at the cap, close the connection idle longest."""
        loop = asyncio.get_running_loop()
        room = asyncio.Semaphore(self.max_connections)
        while True:
            await room.acquire()
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of descriptors after all, or a reset in the queue
                room.release()
                self._warn("health endpoint: cannot accept a connection: %s", exc.strerror)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                room.release()
                raise
            self.accepted += 1
            task = loop.create_task(self._connection(conn))
            # Not in the task's own finally: a task cancelled before it first ran
            # never enters it, and its socket and place would be lost.
            task.add_done_callback(functools.partial(self._closed, conn, room))
            self._open.add(task)
            self._idle[task] = None
            if room.locked():
                self._make_room(spare=task)

    def _make_room(self, spare: asyncio.Task[None]) -> None:
        oldest = next((t for t in self._idle if t is not spare), None)
        if oldest is None:
            return  # every connection is being answered: the next waits in the backlog
        del self._idle[oldest]
        oldest.cancel()
        self.evicted += 1
        self._warn(
            "health endpoint at its cap of %d connections: closing the longest idle",
            self.max_connections,
        )

    def _warn(self, message: str, *args: object) -> None:
        """A warning, but each at most once per :data:`WARN_EVERY`: a flood of
        connections must not become a flood of log lines."""
        now = time.monotonic()
        if now - self._warned_at.get(message, -WARN_EVERY) >= WARN_EVERY:
            self._warned_at[message] = now
            log.warning(message, *args)

    async def _connection(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        # The client went away or was too slow: nothing to answer.
        with contextlib.suppress(OSError, TimeoutError):
            await self._exchange(conn, task)

    def _closed(
        self, conn: socket.socket, room: asyncio.Semaphore, task: asyncio.Task[None]
    ) -> None:
        """A connection's task ended (answered, timed out, closed for room, stopped)."""
        self._idle.pop(task, None)
        self._open.discard(task)
        conn.close()
        room.release()

    async def _exchange(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        head_only = False
        try:
            async with asyncio.timeout(self.head_timeout):
                head = await self._read_head(conn)
            if head is None:
                return
            request = parse_head(head)
            head_only = request.method == "HEAD"
            response = self._answer(request)
        except _Refused as refused:
            response = refused.response
        self._idle.pop(task, None)
        async with asyncio.timeout(self.write_timeout):
            await loop.sock_sendall(conn, response.encode(head_only=head_only))
        conn.shutdown(socket.SHUT_WR)
        self._idle[task] = None
        async with asyncio.timeout(LINGER_TIMEOUT):
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await loop.sock_recv(conn, 4096)
                if not chunk:
                    break
                drained += len(chunk)

    async def _read_head(self, conn: socket.socket) -> bytes | None:
        """The request head up to its blank line; None if the client closed first."""
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        while True:
            chunk = await loop.sock_recv(conn, MAX_HEAD_BYTES + 4 - len(buffer))
            if not chunk:
                return None
            buffer += chunk
            end = _head_end(buffer)
            if end >= 0:
                return bytes(buffer[:end])
            if len(buffer) >= MAX_HEAD_BYTES + 4:
                raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    def _answer(self, request: Request) -> Response:
        try:
            return self.handler(request)
        except Exception:
            log.exception("health endpoint: %s %s failed", request.method, request.path)
            return Response(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal server error\n")
