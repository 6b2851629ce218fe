"""Fixtures of the fault-injection suite; the harness itself is ``harness.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.harness import BROKERS, Broker, BrokerControl, broker_param


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> Broker:
    """Each scenario runs once on Kafka and once on RabbitMQ."""
    return broker_param(request.param)


@pytest.fixture
def broker_control(broker: Broker) -> Iterator[BrokerControl]:
    """Stop/start the real broker; restored by ``scripts/services up`` in any case."""
    control = BrokerControl(broker)
    try:
        yield control
    finally:
        control.restore()
