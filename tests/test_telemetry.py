"""Telemetry building blocks: propagation, spans, endpoints, log context."""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from engine.errors import ConfigError
from engine.messages import Envelope, MessageKind, Outcome
from engine.model import OutboxMessage
from engine.redact import escape_controls
from engine.telemetry import setup
from engine.telemetry.http import Readiness, TelemetryServer
from engine.telemetry.logs import (
    LIBRARIES,
    JsonFormatter,
    SagaContextFilter,
    configure_logging,
    saga_context,
    started,
)
from engine.telemetry.tracing import (
    extract,
    inject,
    process_span,
    span_context_of,
    trace_id,
    trace_outgoing,
    tracer,
)
from engine.worker.worker import Registration, Worker
from tests.helpers import EXAMPLE_WORKERS, EmbeddedSystem
from workers import payment

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    # The global provider can be set once per process; tests use their own tracer.
    trace._TRACER_PROVIDER = _PROVIDER  # type: ignore[attr-defined]
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def command(**headers: str) -> Envelope:
    return Envelope(
        saga_id="saga-1",
        saga_name="place_order",
        saga_version=1,
        step="charge_payment",
        kind=MessageKind.COMMAND,
        name="charge_payment",
        attempt=2,
        headers=headers,
    )


def test_inject_extract_round_trip(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("root") as root:
        headers = inject({"x-other": "kept"})
    assert headers["x-other"] == "kept"
    assert headers["traceparent"].split("-")[1] == trace_id(root)
    ctx = span_context_of(headers)
    assert ctx is not None and ctx.span_id == root.get_span_context().span_id
    assert span_context_of({}) is None
    assert trace.get_current_span(extract({})).get_span_context().is_valid is False


def test_send_spans_carry_context_and_links(spans: InMemorySpanExporter) -> None:
    cause = None
    with tracer().start_as_current_span("cause") as failed:
        cause = failed.get_span_context()
    with tracer().start_as_current_span("handle") as handling:
        out = trace_outgoing(
            [OutboxMessage("saga.commands.payment", "saga-1", command())],
            system="kafka",
            links=[cause],
        )
    send = next(s for s in spans.get_finished_spans() if s.name == "send saga.commands.payment")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == handling.get_span_context().span_id
    assert [link.context.span_id for link in send.links] == [cause.span_id]
    attrs = dict(send.attributes or {})
    assert attrs["messaging.system"] == "kafka"
    assert attrs["messaging.operation.name"] == "send"
    assert attrs["messaging.destination.name"] == "saga.commands.payment"
    assert attrs["messaging.message.conversation_id"] == "saga-1"
    assert attrs["messaging.kafka.message.key"] == "saga-1"
    assert attrs["saga.step"] == "charge_payment"
    header_ctx = span_context_of(out[0].envelope.headers)
    assert header_ctx is not None and header_ctx.span_id == send.context.span_id


def test_process_span_continues_the_senders_trace(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("sender") as sender:
        headers = inject({})
    envelope = command(**headers).reply(Outcome.SUCCESS)
    with process_span(
        envelope, system="rabbitmq", destination="saga.replies", group="engine"
    ) as span:
        inner = trace_id()
    assert inner == trace_id(sender)
    finished = next(s for s in spans.get_finished_spans() if s.name == "process saga.replies")
    assert finished.kind is SpanKind.CONSUMER
    assert finished.parent is not None
    assert finished.parent.span_id == sender.get_span_context().span_id
    attrs = dict(finished.attributes or {})
    assert attrs["messaging.rabbitmq.destination.routing_key"] == "saga.replies"
    assert attrs["messaging.consumer.group.name"] == "engine"
    assert attrs["saga.outcome"] == "success"
    assert span.get_span_context().trace_id == sender.get_span_context().trace_id


def test_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkinish")
    with pytest.raises(ConfigError, match="unknown OTEL_TRACES_EXPORTER 'zipkinish'"):
        setup.configure_tracing("test")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="http/protobuf"):
        setup.configure_tracing("test")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_ready_and_metrics_endpoints() -> None:
    readiness = Readiness()
    server = TelemetryServer("127.0.0.1", 0, readiness)
    server.start()
    try:
        assert get(server.port, "/healthz") == (200, "ok\n")
        status, body = get(server.port, "/readyz")
        assert status == 503 and json.loads(body)["ready"] is False
        readiness.set("database", True)
        readiness.set("broker", False, "connection refused")
        status, body = get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["checks"]["broker"] == {
            "ok": False,
            "detail": "connection refused",
        }
        readiness.set("broker", True)
        assert get(server.port, "/readyz")[0] == 200
        status, body = get(server.port, "/metrics")
        assert status == 200 and "python_info" in body
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_port_in_use_is_a_config_error() -> None:
    first = TelemetryServer("127.0.0.1", 0, Readiness())
    try:
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1"):
            TelemetryServer("127.0.0.1", first.port, Readiness())
    finally:
        first.stop()


def test_json_log_lines_carry_saga_step_and_trace(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("saga.worker", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    with tracer().start_as_current_span("work") as span, saga_context("saga-9", "charge"):
        SagaContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello x"
    assert line["saga_id"] == "saga-9"
    assert line["step"] == "charge"
    assert line["trace_id"] == trace_id(span)
    outside = logging.LogRecord("saga", logging.INFO, __file__, 1, "bare", (), None)
    SagaContextFilter().filter(outside)
    assert "saga_id" not in json.loads(JsonFormatter().format(outside))


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """configure_logging changes process-wide loggers (and the excepthook): put them
    back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in LIBRARIES}
    hook = sys.excepthook
    yield
    sys.excepthook = hook
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_library_lines_wait_for_the_daemon_to_start(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", starting=True)
    logging.getLogger("alembic.runtime.plugins").info("setup plugin x")
    logging.getLogger("aiokafka").error("Unable connect to broker")
    logging.getLogger("saga.daemon").info("our own line")
    assert [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines()] == [
        "INFO saga.daemon: our own line"
    ]
    started()  # up: what the libraries warned about while it started is shown now
    logging.getLogger("aio_pika.robust_connection").info("reconnecting")
    logging.getLogger("aiormq.connection").warning("connection lost")
    assert [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines()] == [
        "ERROR aiokafka: Unable connect to broker",
        "WARNING aiormq.connection: connection lost",
    ]


def test_debug_level_shows_the_libraries_from_the_start(
    restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", starting=True)
    logging.getLogger("alembic.runtime.plugins").info("setup plugin x")
    assert "INFO alembic.runtime.plugins: setup plugin x" in capsys.readouterr().err


def test_otlp_exporter_reaches_the_test_receiver() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource

    from tests.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver()
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "probe"}))
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        )
        with provider.get_tracer("t").start_as_current_span(
            "hello", attributes={"saga.id": "s-1"}
        ) as span:
            expected = trace_id(span)
        provider.shutdown()
        (got,) = receiver.of_saga("s-1")
        assert (got.service, got.name, got.trace_id) == ("probe", "hello", expected)
    finally:
        receiver.close()


#: User text that would forge a log line, drive a terminal and inject rich markup.
FORGED_LINE = "2026-01-01 00:00:00,000 INFO saga.engine: all good"
EVIL = f"[/] [link=https://evil.example]x[/link]\n{FORGED_LINE}\x1b[2J\r"
#: How every text log record begins (asctime, level).
RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def evil_payment(calls: list[str]) -> Worker:
    """The payment participant, its charge handler logging the customer (user input)
    and failing with an error that quotes it, as participant code does."""
    worker = Worker(payment.worker.name)
    for key, reg in payment.worker.handlers.items():
        if reg.name == "charge_payment":

            async def handler(command: Any, context: Any) -> Any:
                calls.append(command.customer_id)
                logging.getLogger("shop.payment").warning("charging %s", command.customer_id)
                raise RuntimeError(f"card service refused {command.customer_id}")

            reg = Registration(reg.name, reg.kind, reg.model, handler)
        worker.handlers[key] = reg
    return worker


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_user_text_in_the_logs_is_shown_literally_never_as_a_forged_line(
    fmt: str, restored_logging: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A saga input, a handler error and an operator reason full of markup, newlines
    and ESC: every record stays one line, the text is there escaped, never acted on."""
    configure_logging("info", fmt)
    calls: list[str] = []
    workers = {**EXAMPLE_WORKERS, "payment": evil_payment(calls)}
    async with EmbeddedSystem(tmp_path / "evil.db", workers=workers) as system:
        saga_id = await system.start_order(customer_id=EVIL)

        async def charged() -> bool:
            return bool(calls)

        await system.wait_for(charged, 15, "the charge handler to run")
        await system.client.cancel(saga_id, actor="ops", reason=EVIL)
        await system.wait_status(saga_id, lambda d: d.status.is_terminal, 15, "compensation")

    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\x1b" not in err and "\r" not in err
    if fmt == "text":
        assert all(RECORD_START.match(line) for line in lines), err
        assert not any(line.startswith(FORGED_LINE) for line in lines)
        assert f"WARNING shop.payment: charging {escape_controls(EVIL)}" in err
    else:
        entries = [json.loads(line) for line in lines]
        assert f"charging {EVIL}" in [e["message"] for e in entries]
    assert len(lines) >= 2  # the handler's line and the worker's about the failure
