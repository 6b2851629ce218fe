"""Observability: traces, metrics, health endpoints and structured logs.

Nothing is exported unless configured: tracing follows the standard ``OTEL_*``
environment variables, the metrics/health HTTP endpoint needs a port.
"""
