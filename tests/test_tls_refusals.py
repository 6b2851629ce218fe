"""A secured PostgreSQL or RabbitMQ that refuses us (a wrong password, a certificate
from a CA we do not trust, a host name the certificate is not for) ends ``sagactl
engine``, ``sagactl worker`` and ``sagactl`` commands with one clear line and exit
status 1 within seconds: no traceback, no retrying forever, never the password."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from engine.database import create_engine, upgrade
from tests.tls import Secured, with_host

pytestmark = pytest.mark.integration

#: A password that appears nowhere else, so its absence from the output means something.
WRONG_PASSWORD = "Wr0ng-Secret-PW"
#: Seconds a refusal may take to end a command (each starts a Python interpreter).
PROMPT = 15.0

CASES = ("wrong password", "untrusted CA", "wrong hostname")


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def refused_url(secured: Secured, service: str, case: str) -> str:
    if service == "postgresql":
        if case == "wrong password":
            return with_password(secured.postgres("verify-full"), WRONG_PASSWORD)
        if case == "untrusted CA":
            return secured.postgres("verify-full", ca=secured.other_ca)
        return with_host(secured.postgres("verify-full"), "127.0.0.1")
    if case == "wrong password":
        return with_password(secured.amqps(), WRONG_PASSWORD)
    if case == "untrusted CA":
        return secured.amqps(ca=secured.other_ca)
    return with_host(secured.amqps(), "127.0.0.1")


#: What the one line must say, per case.
SAYS = {
    ("postgresql", "wrong password"): ".pem: login refused: password authentication failed",
    ("postgresql", "untrusted CA"): ".pem: TLS certificate refused: ",
    ("postgresql", "wrong hostname"): "TLS certificate refused: IP address mismatch, certificate",
    ("rabbitmq", "wrong password"): "RabbitMQ at localhost:5671: login refused: ACCESS_REFUSED",
    ("rabbitmq", "untrusted CA"): "RabbitMQ at localhost:5671: TLS certificate refused: ",
    ("rabbitmq", "wrong hostname"): "RabbitMQ at 127.0.0.1:5671: TLS certificate refused: IP",
}


@pytest.fixture(scope="module")
def secured() -> Secured:
    return Secured.from_env()


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    """A migrated database, for the broker's cases."""
    url = f"sqlite:///{tmp_path / 'saga.db'}"
    database = create_engine(url)
    await upgrade(database)
    await database.dispose()
    return url


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("service", ["postgresql", "rabbitmq"])
def test_a_refused_connection_ends_with_one_line(
    service: str, case: str, secured: Secured, sqlite_url: str
) -> None:
    url = refused_url(secured, service, case)
    env = {
        **os.environ,
        "SAGA_DATABASE_URL": url if service == "postgresql" else sqlite_url,
        "SAGA_BROKER_URL": url if service == "rabbitmq" else "memory://",
        "SAGA_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "SAGA_SAGAS": "sagas.order",
    }
    commands = [["engine"], ["worker", "payment"]]
    if service == "postgresql":  # sagactl's own commands use only the database
        commands.append(["list"])
    for command in commands:
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "engine.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - began
        shown = f"sagactl {' '.join(command)} ({service}, {case}):\n{done.stderr}{done.stdout}"
        assert done.returncode == 1, shown
        assert took < PROMPT, f"took {took:.1f}s: {shown}"
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sagactl: error: "), shown
        assert SAYS[service, case] in lines[0], shown
        assert "Traceback" not in done.stderr + done.stdout, shown
        assert WRONG_PASSWORD not in done.stderr + done.stdout, shown
        assert "saga:saga@" not in done.stderr + done.stdout, shown
