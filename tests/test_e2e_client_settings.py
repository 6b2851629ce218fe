"""``SagaClient`` from Python reads the same ``SAGA_*`` settings as ``sagactl``.

An application that sets only the environment (here ``SAGA_TOPIC_PREFIX``, the
database and the saga modules) and calls ``SagaClient.connect()`` with no arguments
sends its commands under the deployment's prefix: they reach the workers of an
engine and workers started with that prefix, and the saga completes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.client import SagaClient
from engine.database import create_engine
from engine.states import SagaStatus, StepStatus
from tests.e2e import Cluster, fresh_database, wait_until
from workers import ledger

pytestmark = pytest.mark.integration

ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 1,
    "amount_cents": 500,
    "address": "1 Main Street",
}


async def test_client_takes_the_topic_prefix_from_the_environment(
    broker_url: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fresh_database(postgres_url) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku={"widget": 5}, balances={"alice": 10_000})
        await database.dispose()
        cluster = Cluster(db_url, broker_url, tmp_path)  # a prefix of its own: t<hex>
        assert cluster.prefix != "saga"
        cluster.start_all()
        for name in ("SAGA_DATABASE_URL", "SAGA_TOPIC_PREFIX", "SAGA_SAGAS"):
            monkeypatch.setenv(name, cluster.env[name])

        async with await SagaClient.connect() as client:
            assert client.topology.prefix == cluster.prefix
            saga_id = await client.start("place_order", ORDER)

            async def finished() -> bool:
                cluster.assert_running()
                return (await client.get(saga_id)).status.is_terminal

            assert await wait_until(finished, timeout=120), cluster.logs()
            detail = await client.get(saga_id)
        assert detail.status is SagaStatus.COMPLETED, cluster.logs()
        # Each step's command reached its worker, which replied.
        assert [s.status for s in detail.steps] == [StepStatus.SUCCEEDED] * 3, detail
        exits = cluster.stop_all()
        assert set(exits.values()) == {0}, exits
