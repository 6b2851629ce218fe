"""The health and metrics endpoint holds up against whoever can reach its port (issue
10): idle and half-sent connections are capped and timed out, requests are parsed
strictly, and ``/readyz`` keeps answering with 1,000 idle connections open, in this
process and in a daemon under a low file-descriptor limit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from engine.telemetry._server import MAX_HEAD_BYTES, connection_cap
from engine.telemetry.http import Readiness, TelemetryServer
from tests.e2e import sagactl

IDLE = 1000


def exchange(port: int, request: bytes, *, timeout: float = 10) -> bytes:
    """Send ``request`` raw and read the answer to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def get(port: int, path: str) -> tuple[int, bytes] | None:
    """One ``GET path``: its status and body, or None if the connection failed."""
    try:
        answer = exchange(port, f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode(), timeout=2)
    except OSError:
        return None
    if not answer:
        return None
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def answered_within(port: int, path: str, seconds: float) -> tuple[int, bytes]:
    """The status and body of ``GET path``, retried until it answers or ``seconds``
    pass (a refused, reset or unanswered connection counts as no answer)."""
    deadline = time.monotonic() + seconds
    while (answer := get(port, path)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"GET {path} got no answer within {seconds}s")
    return answer


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {seconds}s")
        time.sleep(0.01)


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections: half send nothing, half half a request head."""
    with ExitStack() as stack:
        conns = []
        for i in range(count):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i % 2:
                conn.sendall(b"GET /readyz HTTP/1.1\r\nHost: t\r\n")
            conns.append(conn)
        yield conns


@pytest.fixture
def endpoint() -> Iterator[tuple[TelemetryServer, Readiness]]:
    readiness = Readiness()
    readiness.set("database", True)
    server = TelemetryServer("127.0.0.1", 0, readiness)
    server.start()
    yield server, readiness
    server.stop()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"HEAD /healthz HTTP/1.0\r\n\r\n", b"200"),
        (b"POST /readyz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"405"),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"400"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /healthz HTTP/1.1\r\n folded: header\r\n\r\n", b"400"),
        (b"not http at all\r\n\r\n", b"400"),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", b"431"),
    ],
)
def test_requests_are_parsed_strictly(
    endpoint: tuple[TelemetryServer, Readiness], request_bytes: bytes, status: bytes
) -> None:
    answer = exchange(endpoint[0].port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == status, answer
    assert b"\r\nConnection: close" in head
    if status == b"405":
        assert b"\r\nAllow: GET, HEAD" in head
    if request_bytes.startswith(b"HEAD"):
        assert b"Content-Length: 3" in head and body == b""


def test_a_silent_connection_is_closed_after_the_head_timeout() -> None:
    server = TelemetryServer("127.0.0.1", 0, Readiness(), head_timeout=0.5)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"GET /readyz HTTP/1.1\r\n")
            began = time.monotonic()
            assert conn.recv(100) == b""  # closed, with no answer to half a head
            assert time.monotonic() - began < 5
    finally:
        server.stop()
    assert not server.server.connections


def test_readyz_answers_with_a_thousand_idle_connections_open() -> None:
    readiness = Readiness()
    readiness.set("database", True)
    # Idle connections never time out here: only closing them for room makes room.
    server = TelemetryServer("127.0.0.1", 0, readiness, head_timeout=60)
    cap = server.server.max_connections
    assert cap == connection_cap() and cap < IDLE
    server.start()
    threads, fds = threading.active_count(), open_fds()  # the server's loop included
    try:
        with idle_connections(server.port, IDLE):
            wait_for(lambda: server.server.accepted >= IDLE, 30, "all connections accepted")
            status, body = answered_within(server.port, "/readyz", 5)
            assert status == 200 and json.loads(body)["ready"] is True
            status, body = answered_within(server.port, "/metrics", 5)
            assert status == 200 and b"python_info" in body
            # Bounded: one thread, not one per connection, and the server's descriptors
            # (those of this process beyond the client's own 1,000) within the cap.
            assert threading.active_count() <= threads
            assert server.server.connections <= cap
            assert open_fds() - fds - IDLE <= cap
            assert server.server.evicted >= IDLE - cap
        # Every connection the clients closed is closed: none lost on the way.
        wait_for(lambda: server.server.connections == 0, 30, "all connections closed")
    finally:
        server.stop()
    assert open_fds() < fds  # its loop and listening socket are closed too


def test_connections_closed_for_room_before_they_ran_give_their_place_back() -> None:
    """A burst accepted before any of its connections ran: closing one for room must
    still free its place (once, the server stopped accepting for good)."""
    server = TelemetryServer("127.0.0.1", 0, Readiness(), max_connections=2, head_timeout=60)
    with idle_connections(server.port, 10):  # queued before the server runs
        server.start()
        try:
            assert answered_within(server.port, "/healthz", 5) == (200, b"ok\n")
        finally:
            server.stop()


def test_a_daemon_under_a_low_descriptor_limit_keeps_answering(tmp_path: Path) -> None:
    """``ulimit -n 256``: the endpoint takes at most a quarter of the descriptors, so
    1,000 idle connections leave the daemon its database and broker sockets."""
    env = {**os.environ, "SAGA_DATABASE_URL": f"sqlite:///{tmp_path / 'saga.db'}"}
    assert sagactl(env, "db", "upgrade").returncode == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "engine.log").open("wb")
    command = [sys.executable, "-m", "engine.cli", "engine", "--broker-url", "memory://"]
    daemon = subprocess.Popen(
        ["sh", "-c", 'ulimit -n 256 && exec "$@"', "sh", *command, "--metrics-port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: (get(port, "/readyz") or (0,))[0] == 200, 60, "ready")
        fds = open_fds(daemon.pid)
        with idle_connections(port, IDLE):
            status, body = answered_within(port, "/readyz", 5)
            assert status == 200, body  # the database check still gets its descriptor
            assert daemon.poll() is None
            assert open_fds(daemon.pid) - fds <= 256 // 4
    finally:
        daemon.terminate()
        code = daemon.wait(timeout=30)
        log.close()
    output = (tmp_path / "engine.log").read_text()
    assert code == 0, output
    assert "Too many open files" not in output
