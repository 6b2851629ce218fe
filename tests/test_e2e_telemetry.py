"""One saga, one trace: spans exported for real by the engine and worker processes
over Kafka and RabbitMQ, continuity across an engine SIGKILL, metrics and health."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from engine.database import create_engine
from tests.e2e import Cluster, fresh_database, sagactl, service_url, wait_until
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from workers import ledger
from workers.demo import BALANCES, STOCK

pytestmark = pytest.mark.integration

ORDER = {
    "customer_id": "alice",
    "sku": "widget",
    "quantity": 1,
    "amount_cents": 700,
    "address": "1 Main Street",
}
CONSUMER, PRODUCER = 5, 4  # OTLP SpanKind values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def receiver() -> OtlpReceiver:
    r = OtlpReceiver()
    yield r  # type: ignore[misc]
    r.close()


def traced_cluster(db_url: str, broker: str, tmp_path: Path, receiver: OtlpReceiver) -> Cluster:
    cluster = Cluster(db_url, broker, tmp_path)
    cluster.extra_env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    return cluster


def start_saga(cluster: Cluster, order: dict[str, object]) -> str:
    proc = sagactl(cluster.env, "--json", "start", "place_order", "--input", json.dumps(order))
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["id"])


def show(cluster: Cluster, saga_id: str) -> dict[str, object]:
    proc = sagactl(cluster.env, "--json", "show", saga_id)
    assert proc.returncode == 0, proc.stderr
    detail: dict[str, object] = json.loads(proc.stdout)
    return detail


def assert_one_connected_trace(spans: list[ReceivedSpan], trace_id: str) -> None:
    assert spans, "no spans"
    assert {s.trace_id for s in spans} == {trace_id}
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.kind == CONSUMER:
            parent = by_id.get(s.parent_span_id)
            assert parent is not None, f"{s.service} {s.name} has no parent among the saga's spans"
            if s.service.startswith("saga-worker-"):
                # A participant continues the engine's send span of that very command.
                assert parent.kind == PRODUCER and parent.name == s.name.replace("process", "send")
                assert parent.service in ("saga-engine", "sagactl")
            else:
                # The engine handles a reply as a child of the participant's span.
                assert parent.service.startswith("saga-worker-")


async def test_one_saga_is_one_trace_with_metrics_and_health(
    broker_url: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = traced_cluster(db_url, broker_url, tmp_path, receiver)
        port = free_port()
        for name in ("inventory", "payment", "shipment"):
            cluster.start_worker(name)
        cluster.spawn("engine", "engine", "--metrics-port", str(port))
        try:
            ok = start_saga(cluster, ORDER)
            failing = start_saga(cluster, {**ORDER, "address": "PO Box 7, Nowhere"})

            async def finished() -> bool:
                cluster.assert_running()
                return all(
                    show(cluster, i)["status"] in ("completed", "compensated")
                    for i in (ok, failing)
                )

            assert await wait_until(finished, timeout=60, interval=0.5), cluster.logs()
            for saga_id, expected in ((ok, "completed"), (failing, "compensated")):
                detail = show(cluster, saga_id)
                assert detail["status"] == expected
                trace_id = detail["trace_id"]
                assert isinstance(trace_id, str) and len(trace_id) == 32
                table = sagactl(cluster.env, "show", saga_id)
                assert trace_id in table.stdout

                async def exported(saga_id: str = saga_id, want: int = 9) -> bool:
                    return len(receiver.of_saga(saga_id)) >= want

                assert await wait_until(exported, timeout=20), receiver.of_saga(saga_id)
                spans = receiver.in_trace(trace_id)
                assert_one_connected_trace(spans, trace_id)
                services = {s.service for s in spans}
                assert services == {
                    "sagactl",
                    "saga-engine",
                    "saga-worker-inventory",
                    "saga-worker-payment",
                    "saga-worker-shipment",
                }
                consumers = [s for s in spans if s.kind == CONSUMER]
                system = "kafka" if broker_url.startswith("kafka") else "rabbitmq"
                assert {s.attributes["messaging.system"] for s in consumers} == {system}
                assert all(
                    s.attributes["messaging.message.conversation_id"] == saga_id for s in consumers
                )
            compensations = [
                s
                for s in receiver.of_saga(failing)
                if s.kind == PRODUCER and s.attributes.get("saga.message.kind") == "compensation"
            ]
            assert len(compensations) == 2
            failed_step = next(
                s
                for s in receiver.of_saga(failing)
                if s.service == "saga-engine"
                and s.kind == CONSUMER
                and s.attributes.get("saga.step") == "create_shipment"
            )
            assert all(failed_step.span_id in c.links for c in compensations)

            status, body = http_get(f"http://127.0.0.1:{port}/readyz")
            assert status == 200, body
            assert set(json.loads(body)["checks"]) == {"database", "consumer", "broker"}
            assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200

            async def metrics_caught_up() -> bool:
                text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
                return (
                    metric(text, "saga_sagas", saga_name="place_order", saga_status="completed")
                    == 1
                    and metric(
                        text, "saga_sagas", saga_name="place_order", saga_status="compensated"
                    )
                    == 1
                )

            assert await wait_until(metrics_caught_up, timeout=15)
            text = http_get(f"http://127.0.0.1:{port}/metrics")[1]
            assert metric(text, "saga_completed_total", saga_name="place_order") == 1
            assert metric(text, "saga_compensated_total", saga_name="place_order") == 1
            assert metric(text, "saga_outbox_backlog") == 0
            assert metric(text, "saga_step_duration_seconds_count", saga_step="charge_payment")
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await database.dispose()


async def test_trace_survives_an_engine_sigkill(
    broker_url: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    async with fresh_database(service_url("SAGA_TEST_POSTGRES_URL")) as db_url:
        database = create_engine(db_url)
        await ledger.seed(database, stock_by_sku=STOCK, balances=BALANCES)
        cluster = traced_cluster(db_url, broker_url, tmp_path, receiver)
        cluster.start_worker("inventory")
        cluster.start_worker("payment")
        engine = cluster.start_engine()  # no shipment worker yet: the saga waits there
        try:
            saga_id = start_saga(cluster, ORDER)

            async def waits_at_shipment() -> bool:
                steps = show(cluster, saga_id)["steps"]
                assert isinstance(steps, list)
                return bool(steps[2]["status"] == "dispatched")

            assert await wait_until(waits_at_shipment, timeout=60), cluster.logs()
            trace_id = show(cluster, saga_id)["trace_id"]
            await asyncio.sleep(0.5)  # let the first engine export what it has
            engine.process.send_signal(signal.SIGKILL)
            engine.process.wait(10)
            before = Counter(s.service for s in receiver.in_trace(str(trace_id)))
            cluster.start_engine()
            cluster.start_worker("shipment")

            async def completed() -> bool:
                return show(cluster, saga_id)["status"] == "completed"

            assert await wait_until(completed, timeout=60), cluster.logs()

            async def resumed_spans() -> bool:
                return any(
                    s.service == "saga-engine"
                    and s.attributes.get("saga.step") == "create_shipment"
                    for s in receiver.in_trace(str(trace_id))
                    if s.kind == CONSUMER
                )

            assert await wait_until(resumed_spans, timeout=20)
            after = Counter(s.service for s in receiver.in_trace(str(trace_id)))
            assert after["saga-worker-shipment"] >= 1 and before["saga-worker-shipment"] == 0
            assert after["saga-engine"] > before["saga-engine"]
            assert {s.trace_id for s in receiver.of_saga(saga_id)} == {trace_id}
        finally:
            for d in cluster.daemons:
                if d.process.poll() is None:
                    d.process.kill()
            await database.dispose()
