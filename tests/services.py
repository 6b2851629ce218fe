"""Access to the real services (``scripts/services up``) for the broker tests.

A missing service URL skips the test with instructions on a developer machine and
fails it in CI (``CI=true``), so CI can never go green without the real brokers.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

SETUP = 'run `scripts/services up` and `eval "$(scripts/services env)"`'


#: The real brokers, by the variable that holds each one's URL.
BROKERS = {"kafka": "SAGA_TEST_KAFKA_URL", "rabbitmq": "SAGA_TEST_AMQP_URL"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI) because a real service is missing."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the real services are required)")
    pytest.skip(reason)


def service_url(variable: str) -> str:
    """The URL in ``variable`` (e.g. SAGA_TEST_KAFKA_URL), or skip/fail with a hint."""
    value = os.environ.get(variable, "").strip()
    if not value:
        unavailable(f"{variable} is not set: {SETUP}")
    return value


def rabbitmqctl() -> list[str]:
    """The rabbitmqctl command (``SAGA_TEST_RABBITMQCTL`` may name e.g. a docker exec)."""
    configured = os.environ.get("SAGA_TEST_RABBITMQCTL", "").strip()
    if configured:
        return shlex.split(configured)
    if shutil.which("rabbitmqctl") is None:
        unavailable(
            "rabbitmqctl is not on PATH: run the tests where `scripts/services up` "
            "installed RabbitMQ, or set SAGA_TEST_RABBITMQCTL"
        )
    return ["rabbitmqctl"]


async def run(command: list[str], timeout: float = 120.0) -> str:
    """Run a command (from /, as the services script does); fail the test on error."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{shlex.join(command)} did not finish within {timeout:g}s")
    text = out.decode(errors="replace")
    if process.returncode != 0:
        pytest.fail(f"{shlex.join(command)} exited {process.returncode}: {text}")
    return text


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung broker."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


#: RabbitMQ's message size limit lowered by :func:`rabbit_message_limit` (1 MiB, as
#: Kafka's), so a test sends megabytes over it instead of RabbitMQ's 128 MiB default.
RABBIT_TEST_MESSAGE_LIMIT = 1024 * 1024


@asynccontextmanager
async def rabbit_message_limit(size: int = RABBIT_TEST_MESSAGE_LIMIT) -> AsyncIterator[int]:
    """Lower RabbitMQ's ``max_message_size`` while the block runs, then restore it.

    The broker reads it when a channel opens, so only channels opened inside the block
    (connect after entering) are limited; other tests' messages are far smaller.
    """
    ctl = rabbitmqctl()
    found = await run([*ctl, "eval", "application:get_env(rabbit, max_message_size)."])
    digits = "".join(c for c in found if c.isdigit())
    previous = int(digits) if found.strip().startswith("{ok,") and digits else 128 * 1024 * 1024
    await run([*ctl, "eval", f"application:set_env(rabbit, max_message_size, {size})."])
    try:
        yield size
    finally:
        await run([*ctl, "eval", f"application:set_env(rabbit, max_message_size, {previous})."])
