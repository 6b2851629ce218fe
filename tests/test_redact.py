"""No secret is shown: not by the errors of a bad URL, nor sagactl, a log line,
``/readyz`` or a span; and no log line can be forged with user text."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import Field, SecretStr

from engine import redact as redact_module
from engine.errors import ConfigError
from engine.redact import (
    HIDDEN,
    MIN_SECRET_LENGTH,
    escape_controls,
    redact,
    remember,
)
from engine.settings import Settings
from engine.telemetry.http import Readiness
from engine.telemetry.logs import JsonFormatter, TextFormatter
from engine.telemetry.setup import RedactingExporter
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


# -- known secrets ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _forget_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets a test remembers are process-wide: forget them when it ends, so no
    other test's text is redacted by them."""
    monkeypatch.setattr(redact_module, "_known", redact_module._known)
    monkeypatch.setattr(redact_module, "_known_pattern", redact_module._known_pattern)


def test_a_remembered_secret_is_hidden_wherever_it_appears() -> None:
    remember("Kn0wnSecret-1")
    assert redact("login failed with Kn0wnSecret-1 (see 'Kn0wnSecret-1')") == (
        "login failed with *** (see '***')"
    )
    # As a library may quote it: URL-encoded.
    remember("p@ss word/42!")
    assert redact("url has p%40ss%20word%2F42%21 and p%40ss+word%2F42%21") == (
        "url has *** and ***"
    )


def test_short_secrets_are_hidden_only_inside_urls() -> None:
    remember("saga")  # the development password: hiding it everywhere garbles the log
    remember("x" * (MIN_SECRET_LENGTH - 1))
    assert redact("saga-engine xxxxxxx") == "saga-engine xxxxxxx"
    assert redact("amqp://saga:saga@h/") == "amqp://saga:***@h/"
    remember("y" * MIN_SECRET_LENGTH)
    assert redact("y" * MIN_SECRET_LENGTH) == HIDDEN


def test_secret_url_parameters_are_hidden() -> None:
    text = "postgresql://h/db?sslmode=verify-full&sslpassword=k3y&x=1 kafka://h?sasl_password=pw"
    assert redact(text) == (
        "postgresql://h/db?sslmode=verify-full&sslpassword=***&x=1 kafka://h?sasl_password=***"
    )


def test_remembering_from_many_threads_loses_no_secret() -> None:
    """Copy on write under a lock: concurrent registrations all land, and redact()
    running meanwhile never sees a half-built pattern."""
    secrets = [[f"thread{t:02d}-secret-{i:04d}" for i in range(40)] for t in range(6)]
    errors: list[BaseException] = []

    def register(batch: list[str]) -> None:
        try:
            for s in batch:
                remember(s)
                assert s not in redact(f"value {s}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(b,)) for b in secrets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    everything = " ".join(s for batch in secrets for s in batch)
    assert redact(everything) == " ".join([HIDDEN] * 240)


class _WithSecrets(Settings):
    """A settings class as other modules extend it: new fields typed SecretStr."""

    kafka_sasl_password: SecretStr | None = None
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)


def test_loading_settings_makes_their_secrets_known(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("FromAFile-9876\n")
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql://saga:Db-Pa55word@db/saga")
    monkeypatch.setenv("SAGA_KAFKA_SASL_PASSWORD_FILE", str(key_file))
    monkeypatch.setenv("SAGA_API_KEYS", '{"k1": "SigningKey-0001"}')
    settings = _WithSecrets()
    text = "Db-Pa55word SigningKey-0001 FromAFile-9876 saga"
    assert redact(text) == "*** *** *** saga"
    assert "Db-Pa55word" not in repr(settings)

    settings.model_copy(update={"broker_url": "amqp://u:Flag-Broker-Pw@h/"})
    assert redact("refused Flag-Broker-Pw") == "refused ***"


def test_escape_controls_keeps_one_line_and_inert_text() -> None:
    assert escape_controls("a\nb\r\x1b[31mc\x00\u2028\u202e") == (
        "a\\nb\\r\\x1b[31mc\\x00\\u2028\\u202e"
    )
    assert escape_controls("[/] [link=https://evil.example]x[/link] é") == (
        "[/] [link=https://evil.example]x[/link] é"
    )


# -- where text leaves the process ----------------------------------------------------


def test_readiness_details_are_redacted() -> None:
    readiness = Readiness()
    readiness.set("database", False, f"cannot reach postgresql://saga:{SECRET}@db/x")
    _, body = readiness.report()
    assert SECRET not in json.dumps(body)
    assert "postgresql://saga:***@db/x" in body["database"]["detail"]


def test_exported_spans_are_redacted() -> None:
    remember(SECRET)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(memory)))
    with (
        pytest.raises(ConnectionError),
        provider.get_tracer("test").start_as_current_span(
            "connect", attributes={"db.url": f"amqp://u:{SECRET}@h/", "peer": [SECRET]}
        ) as span,
    ):
        span.add_event("retry", {"why": f"refused {SECRET}"})
        raise ConnectionError(f"cannot log in as u with {SECRET}")
    (exported,) = memory.get_finished_spans()
    shown = json.dumps(
        {
            "attributes": dict(exported.attributes or {}),
            "events": [(e.name, dict(e.attributes or {})) for e in exported.events],
            "status": exported.status.description,
        }
    )
    assert SECRET not in shown
    assert "exception.stacktrace" in shown  # the exception was recorded, redacted
    assert exported.status.description == "ConnectionError: cannot log in as u with ***"


def _record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("saga.test", logging.ERROR, __file__, 1, message, args, exc_info)


def test_log_records_are_redacted_and_text_lines_cannot_be_forged() -> None:
    remember(SECRET)
    forged = "2026-01-01 00:00:00,000 INFO saga.engine: all good"
    try:
        raise RuntimeError(f"cannot reach amqp://u:{SECRET}@h/\n{forged}")
    except RuntimeError as exc:
        caught = exc
    record = _record("handler said %s\r\n%s\x1b[2J", "[/]", forged, exc=caught)
    record.saga_id, record.step, record.trace_id = "s\n1", "charge", None

    text = TextFormatter().format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert SECRET not in text
    assert f"handler said [/]\\r\\n{forged}\\x1b[2J [saga_id=s\\n1 step=charge]" in text
    assert "\\nTraceback (most recent call last):\\n" in text

    line = JsonFormatter().format(record)
    assert "\n" not in line and SECRET not in line
    entry = json.loads(line)
    assert entry["message"] == f"handler said [/]\r\n{forged}\x1b[2J"
    assert "RuntimeError: cannot reach amqp://u:***@h/" in entry["exception"]


def test_a_sagactl_crash_prints_its_traceback_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli.app import _print_redacted

    try:
        raise RuntimeError("cannot use amqp://u:Hunter2secretPW@broker/")
    except RuntimeError as exc:
        _print_redacted(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: cannot use amqp://u:***@broker/" in err
    assert "Hunter2secretPW" not in err


def test_each_signing_secret_is_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAGA_SIGNING_KEYS is one secret setting holding several secrets: each is known."""
    first, second = "a" * 16 + "Hunter2secretPW1" + "b" * 8, "c" * 24 + "Hunter2secretPW2"
    monkeypatch.setenv("SAGA_SIGNING_KEYS", f"k2:{first},k1:{second}")
    Settings()
    assert redact(f"saw {second} and {first}") == "saw *** and ***"
