"""Benchmark harness: saga-engine (Kafka or RabbitMQ + PostgreSQL) against Temporal.

Run it with ``bench/run`` (installs what it needs) or ``python -m bench --help``.
Nothing here is imported by the engine; the engine is measured as users run it, as
separate ``sagactl`` processes.
"""
