"""No URL password is printed: not by the errors of a bad URL, nor by sagactl."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.errors import ConfigError
from engine.redact import redact
from engine.topology import Topology
from engine.transport.factory import transport_from_url

SECRET = "Hunter2secretPW"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("amqp://u:pw@host/", "amqp://u:***@host/"),
        ("postgresql+asyncpg://saga:s@cret@db:5432/x", "postgresql+asyncpg://saga:***@db:5432/x"),
        (
            "see 'kafka://a:b@h:1' and redis://:pw@r/0",
            "see 'kafka://a:***@h:1' and redis://:***@r/0",
        ),
        ("amqp://user@host/ has no password", "amqp://user@host/ has no password"),
        ("no url at all: a:b@c", "no url at all: a:b@c"),
    ],
)
def test_redact_hides_every_url_password(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "url",
    [
        f"redis://u:{SECRET}@127.0.0.1/",  # unsupported scheme
        f"kafka://u:{SECRET}@127.0.0.1:9092",  # kafka takes no credentials
        f"amqp://u:{SECRET}@127.0.0.1:notaport/",  # bad port
        f"amqp://u:{SECRET}@/vhost",  # no host
        f"memory://u:{SECRET}@x",  # memory takes no address
    ],
)
def test_broker_url_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        transport_from_url(url, Topology())
    assert SECRET not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("SAGA_BROKER_URL", f"redis://u:{SECRET}@127.0.0.1/"),
        ("SAGA_DATABASE_URL", f"postgres://u:{SECRET}@127.0.0.1/db"),
    ],
)
def test_sagactl_never_prints_the_password_of_a_bad_url(variable: str, url: str) -> None:
    env = {**os.environ, variable: url}
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "engine"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
