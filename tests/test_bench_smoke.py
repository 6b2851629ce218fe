"""The benchmark harness keeps working: the saga-engine half of ``--quick`` with a
handful of sagas, over Kafka and RabbitMQ.

Nothing here is timed: performance is what the benchmark reports, never what a test
asserts. Needs psutil (in the ``test`` extra) besides the real services.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import service_url

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SAGAS = 10  # one of them (every tenth) fails at the last step in the failing run


def test_quick_saga_engine_half_runs(tmp_path: Path) -> None:
    for variable in ("SAGA_TEST_POSTGRES_URL", "SAGA_TEST_KAFKA_URL", "SAGA_TEST_AMQP_URL"):
        service_url(variable)
    out = tmp_path / "result.json"
    args = ["--quick", "--systems", "kafka,rabbitmq", "--sagas", str(SAGAS)]
    args += ["--idle-samples", "3", "--open-seconds", "2", "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    result = json.loads(out.read_text())
    assert result["machine"]["cores_logical"] >= 1
    for broker in ("kafka", "rabbitmq"):
        system = result["systems"][broker]
        assert "error" not in system, system
        (run,) = system["runs"]
        assert run["saturation"]["outcomes"] == {"completed": SAGAS, "unfinished": 0}
        assert run["fail10"]["outcomes"] == {"completed": 9, "compensated": 1, "unfinished": 0}
        assert run["idle"]["latency"]["n"] == 3
        assert run["half_rate"]["outcomes"]["unfinished"] == 0
        cpu = run["saturation"]["cpu_ms_per_saga"]
        assert {"engine", "inventory", "payment", "shipment", "postgres", broker} <= set(cpu)
        assert run["peak_mib"]["engine"] > 0
    assert "Order saga" in done.stdout
