"""Exporters from the standard ``OTEL_*`` environment variables.

``OTEL_TRACES_EXPORTER`` is read as the OpenTelemetry spec defines it (``otlp``,
``console``, ``none``; comma-separated), defaulting to ``none`` so a daemon exports
nothing unless asked. OTLP endpoint, headers and protocol settings are read by the
OTLP exporter itself (``OTEL_EXPORTER_OTLP_*``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Link, Status

from engine.errors import ConfigError
from engine.redact import redact


class RedactingExporter(SpanExporter):
    """Hands spans on with every text in them redacted (``engine.redact``).

    A span records the exception that ended it (message and stack trace), its status
    description and attributes: any of them may quote a URL or a secret. This is where
    spans leave the process, so no exporter sees them unredacted.
    """

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([redacted_span(s) for s in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def redacted_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of ``span`` whose name, attributes, events, links and status are redacted."""
    status = span.status
    if status.description:
        status = Status(status.status_code, redact(status.description))
    return ReadableSpan(
        name=redact(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_redacted(span.attributes),
        events=[Event(e.name, _redacted(e.attributes), e.timestamp) for e in span.events],
        links=[Link(link.context, _redacted(link.attributes)) for link in span.links],
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _redacted(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    def value(v: Any) -> Any:
        if isinstance(v, str):
            return redact(v)
        if isinstance(v, tuple | list):
            return tuple(redact(x) if isinstance(x, str) else x for x in v)
        return v

    return {k: value(v) for k, v in (attributes or {}).items()}


def _exporters(names: str) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            )
            if protocol != "http/protobuf":
                raise ConfigError(f"OTLP protocol {protocol!r} is not supported; use http/protobuf")
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                raise ConfigError(
                    "OTEL_TRACES_EXPORTER=otlp needs saga-engine[observability]"
                ) from None
            exporters.append(OTLPSpanExporter())
        else:
            raise ConfigError(f"unknown OTEL_TRACES_EXPORTER {name!r}: use otlp, console or none")
    return exporters


def configure_tracing(default_service_name: str) -> TracerProvider | None:
    """Install the SDK tracer provider for a daemon or the CLI.

    It is installed even with no exporter: sagas then still get real trace ids (stored
    on the saga row, printed by ``sagactl show``) and propagate them, they are just
    not sent anywhere. Returns the provider (shut it down on exit to flush), or None
    when ``OTEL_SDK_DISABLED=true``.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporters = _exporters(os.environ.get("OTEL_TRACES_EXPORTER", "none"))
    service = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(RedactingExporter(exporter)))
    trace.set_tracer_provider(provider)
    return provider


def configure_metrics(default_service_name: str) -> None:
    """Route the OpenTelemetry instruments to the Prometheus registry ``/metrics`` serves."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        raise ConfigError("--metrics-port needs saga-engine[observability]") from None
    service = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    metrics.set_meter_provider(
        MeterProvider(
            resource=Resource.create({SERVICE_NAME: service}),
            metric_readers=[PrometheusMetricReader()],
        )
    )
