"""compose.yaml stays valid for `docker compose`.

No Docker here, so the file is loaded by tests/compose_check, a small Go program
on compose-go: the library `docker compose` uses to load, validate (against the
compose-spec schema) and interpolate compose files. The checks run on the
resolved project it prints as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from engine.loader import load_worker

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
CHECKER = ROOT / "tests" / "compose_check"

INFRA = {"postgres", "kafka", "rabbitmq"}
SAGA = {"engine", "inventory", "payment", "shipment"}
CONSOLE_PORT = "8089"
RABBITMQ_URL = "amqp://saga:saga@rabbitmq:5672/"
BROKER_URL = {"kafka": "kafka://kafka:9092", "rabbitmq": RABBITMQ_URL}


def run_checker(
    compose_file: Path, profile: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain (`go`, >= 1.24) is not on PATH: tests/test_compose.py needs it "
            "to validate compose.yaml with compose-go (tests/compose_check)",
            pytrace=False,
        )
    # Hermetic: only what the test sets reaches interpolation; no local .env.
    run_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("COMPOSE_") and k != "SAGA_BROKER_URL"
    }
    run_env["COMPOSE_DISABLE_ENV_FILE"] = "1"
    run_env.update(env or {})
    # The checker is its own Go module, so `go -C` into it; the file path is absolute.
    return subprocess.run(
        [go, "-C", str(CHECKER), "run", ".", "-profile", profile, str(compose_file.resolve())],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=280,
    )


def load(profile: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = run_checker(COMPOSE_FILE, profile, env)
    assert result.returncode == 0, (
        f"compose-go rejected compose.yaml (profile {profile}):\n{result.stderr}"
    )
    project: dict[str, Any] = json.loads(result.stdout)
    return project


@pytest.fixture(scope="module")
def projects() -> dict[str, dict[str, Any]]:
    return {
        "kafka": load("kafka"),
        "rabbitmq": load("rabbitmq", {"SAGA_BROKER_URL": RABBITMQ_URL}),
    }


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_services_per_profile(projects: dict[str, dict[str, Any]], profile: str) -> None:
    services = set(projects[profile]["services"])
    others = {"certs", "postgres", profile, "migrate", "otel-collector", "jaeger", "console"}
    assert services == others | SAGA


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_broker_url_resolves_per_profile(projects: dict[str, dict[str, Any]], profile: str) -> None:
    services = projects[profile]["services"]
    for name in SAGA | {"migrate"}:
        env = services[name]["environment"]
        assert env["SAGA_BROKER_URL"] == BROKER_URL[profile], name
        assert env["SAGA_DATABASE_URL"] == "postgresql://saga:saga@postgres:5432/saga", name


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_infrastructure_has_healthchecks(projects: dict[str, dict[str, Any]], profile: str) -> None:
    services = projects[profile]["services"]
    for name in INFRA & set(services):
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_engine_and_workers_wait_for_migrate_and_database(
    projects: dict[str, dict[str, Any]], profile: str
) -> None:
    services = projects[profile]["services"]
    for name in SAGA:
        deps = services[name]["depends_on"]
        assert deps["migrate"] == {
            "condition": "service_completed_successfully",
            "required": True,
        }, name
        assert deps["postgres"] == {"condition": "service_healthy", "required": True}, name
        assert deps[profile]["condition"] == "service_healthy", name
    migrate = services["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"


def test_the_example_is_configured_and_migrated(projects: dict[str, dict[str, Any]]) -> None:
    """The image does not install the example: its modules are configured by path,
    each worker service names one of SAGA_WORKERS, and migrate runs its history."""
    services = projects["kafka"]["services"]
    assert services["migrate"]["command"] == ["db", "upgrade", "--scripts", "workers/migrations"]
    for name in SAGA - {"engine"}:
        env = services[name]["environment"]
        assert services[name]["command"] == ["worker", name]
        assert load_worker(name, env["SAGA_WORKERS"].split(",")).name == name
    assert "ENV PYTHONPATH=/app/example" in services["engine"]["build"]["dockerfile_inline"]


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_ports_bind_loopback_only(projects: dict[str, dict[str, Any]], profile: str) -> None:
    services = projects[profile]["services"]
    published = {}
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)
            published[port["published"]] = name
    assert published["5432"] == "postgres"
    assert published["16686"] == "jaeger"
    assert published[CONSOLE_PORT] == "console"
    brokers = {"9092", "9094", "9095"} if profile == "kafka" else {"5672", "5671", "15672"}
    assert set(published) - {"5432", "16686", CONSOLE_PORT} == brokers


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_daemons_are_health_checked_and_export_traces(
    projects: dict[str, dict[str, Any]], profile: str
) -> None:
    services = projects[profile]["services"]
    for name in SAGA:
        service = services[name]
        env = service["environment"]
        assert env["SAGA_METRICS_PORT"] == "9464", name
        assert env["OTEL_TRACES_EXPORTER"] == "otlp", name
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
        check = service["healthcheck"]
        assert not check.get("disable"), name
        assert "http://127.0.0.1:9464/readyz" in " ".join(check["test"]), name
    assert services["migrate"]["healthcheck"]["disable"] is True
    config = projects[profile]["configs"]["otel-collector"]["content"]
    assert "endpoint: jaeger:4317" in config


@pytest.mark.parametrize("profile", ["kafka", "rabbitmq"])
def test_console_reads_the_database_and_links_traces_to_jaeger(
    projects: dict[str, dict[str, Any]], profile: str
) -> None:
    """`sagactl console` on every interface of its container, published on the host's
    loopback, read-only, on the compose database once migrated; a trace id links to
    Jaeger's UI as the browser on the host reaches it."""
    services = projects[profile]["services"]
    console = services["console"]
    assert console["command"] == ["console", "--host", "0.0.0.0", "--port", CONSOLE_PORT]
    assert [(p["host_ip"], p["published"], p["target"]) for p in console["ports"]] == [
        ("127.0.0.1", CONSOLE_PORT, int(CONSOLE_PORT))
    ]
    env = console["environment"]
    assert env["SAGA_DATABASE_URL"] == "postgresql://saga:saga@postgres:5432/saga"
    assert env["SAGA_SAGAS"] == services["engine"]["environment"]["SAGA_SAGAS"]
    jaeger_ui = next(p for p in services["jaeger"]["ports"] if p["target"] == 16686)
    assert env["SAGA_CONSOLE_TRACE_URL"] == (
        f"http://127.0.0.1:{jaeger_ui['published']}/trace/{{trace_id}}"
    )
    assert "SAGA_CONSOLE_ACTIONS" not in env
    assert console["depends_on"] == {
        "postgres": {"condition": "service_healthy", "required": True},
        "migrate": {"condition": "service_completed_successfully", "required": True},
    }
    check = console["healthcheck"]
    assert not check.get("disable")
    assert f"http://127.0.0.1:{CONSOLE_PORT}/sagas" in " ".join(check["test"])
    # The image has the console's dependencies: the console extra is part of all.
    assert 'pip install --no-cache-dir ".[all]"' in console["build"]["dockerfile_inline"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "console" in project["optional-dependencies"]["all"][0]


def script_setting(name: str) -> str:
    """A ``NAME=value`` constant of scripts/services (the services without Docker)."""
    found = re.search(rf"^{name}=(\S+)$", (ROOT / "scripts" / "services").read_text(), re.M)
    assert found, f"{name} not in scripts/services"
    return found.group(1)


def test_secured_listeners_match_scripts_services(projects: dict[str, dict[str, Any]]) -> None:
    """The same secured ports, users and test password with and without Docker."""
    password = script_setting("KAFKA_SASL_PASSWORD")
    kafka_project = projects["kafka"]
    kafka = kafka_project["services"]["kafka"]
    ports = {port["published"]: port["target"] for port in kafka["ports"]}
    env = kafka["environment"]
    for name, protocol in (("SECURE", "SASL_SSL"), ("MTLS", "SSL")):
        port = script_setting("KAFKA_SASL_PORT" if protocol == "SASL_SSL" else "KAFKA_SSL_PORT")
        assert ports[port] == int(port)
        assert f"{name}://localhost:{port}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        assert f"{name}:{protocol}" in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    assert set(env["KAFKA_SASL_ENABLED_MECHANISMS"].split(",")) >= {
        "SCRAM-SHA-256",
        "SCRAM-SHA-512",
    }
    assert f"[password={password}]" in " ".join(kafka["command"])
    assert f'user_saga="{password}"' in kafka_project["configs"]["kafka-jaas"]["content"]

    rabbitmq_project = projects["rabbitmq"]
    rabbitmq = rabbitmq_project["services"]["rabbitmq"]
    amqps = script_setting("AMQPS_PORT")
    assert {port["published"]: port["target"] for port in rabbitmq["ports"]}[amqps] == int(amqps)
    tls_conf = rabbitmq_project["configs"]["rabbitmq-tls"]["content"]
    assert f"listeners.ssl.default = {amqps}" in tls_conf
    assert "EXTERNAL" in tls_conf and "ssl_cert_login_from = common_name" in tls_conf
    assert (
        "rabbitmq_auth_mechanism_ssl" in rabbitmq_project["configs"]["rabbitmq-plugins"]["content"]
    )

    assert "ssl=on" in kafka_project["services"]["postgres"]["command"]
    certs = kafka_project["services"]["certs"]
    assert any(v["source"] == str(ROOT / "scripts" / "test-certs") for v in certs["volumes"])
    for project, name in (
        (kafka_project, "postgres"),
        (kafka_project, "kafka"),
        (rabbitmq_project, "rabbitmq"),
    ):
        assert project["services"][name]["depends_on"]["certs"] == {
            "condition": "service_completed_successfully",
            "required": True,
        }, name


def test_invalid_compose_file_is_rejected(tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text()
    anchor = "  postgres:\n    image: postgres:16\n"
    assert anchor in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(anchor, anchor + "    healthcheck_retries: 3\n", 1))

    result = run_checker(broken, "kafka")

    assert result.returncode != 0, result.stdout[:2000]
    assert "healthcheck_retries" in result.stderr
