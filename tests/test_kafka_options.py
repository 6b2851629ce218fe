"""The ``SAGA_KAFKA_*`` settings: read like every setting, checked together before
anything connects, each mistake one ConfigError line that names the setting and never
a secret."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from engine.errors import ConfigError
from engine.settings import Settings
from engine.topology import Topology
from engine.transport.factory import transport_from_url
from engine.transport.kafka import KafkaTransport, _refusal
from engine.transport.kafka_options import KafkaOptions
from tests.test_daemon import env_for, fails_in_one_line

PASSWORD = "Hunter2secretPW"
KEY_PASSWORD = "k3ypassw0rd"
SCRAM = {
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "saga",
    "sasl_password": SecretStr(PASSWORD),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate with its key, the same key encrypted, another key,
    and a file that is no PEM at all."""
    folder = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
    openssl("req", "-x509", *ec, "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
            "-days", "2", "-subj", "/CN=saga-test")  # fmt: skip
    openssl("ec", "-in", "key.pem", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
            "-out", "encrypted.pem")  # fmt: skip
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "other.pem")
    (folder / "junk.txt").write_text("not a certificate\n")
    return folder


def test_the_defaults_are_a_plain_broker_with_the_brokers_replication() -> None:
    options = Settings().kafka
    assert options == KafkaOptions()
    options.check()
    assert options.ssl_context() is None
    assert options.security_protocol == "PLAINTEXT"
    assert options.partitions == 4
    assert options.replication_factor is None  # the broker's default.replication.factor
    assert options.min_insync_replicas is None
    assert options.create_topics


def test_the_settings_come_from_the_environment_and_files(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("SAGA_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")  # as written anywhere
    monkeypatch.setenv("SAGA_KAFKA_SASL_MECHANISM", "scram-sha-256")
    monkeypatch.setenv("SAGA_KAFKA_SASL_USERNAME", "saga")
    monkeypatch.setenv("SAGA_KAFKA_SASL_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("SAGA_KAFKA_SSL_CAFILE", str(pki / "cert.pem"))
    monkeypatch.setenv("SAGA_KAFKA_REPLICATION_FACTOR", "3")
    monkeypatch.setenv("SAGA_KAFKA_MIN_INSYNC_REPLICAS", "2")
    monkeypatch.setenv("SAGA_KAFKA_PARTITIONS", "12")
    monkeypatch.setenv("SAGA_KAFKA_CREATE_TOPICS", "false")
    settings = Settings()
    options = settings.kafka
    assert options.security_protocol == "SASL_SSL"
    assert options.sasl_mechanism == "SCRAM-SHA-256"
    assert options.sasl_password is not None
    assert options.sasl_password.get_secret_value() == PASSWORD
    assert (options.replication_factor, options.min_insync_replicas) == (3, 2)
    assert options.partitions == 12
    assert not options.create_topics
    assert PASSWORD not in repr(settings) and PASSWORD not in repr(options)
    transport = transport_from_url("kafka://localhost:9094", Topology(), kafka=options)
    assert isinstance(transport, KafkaTransport)
    assert PASSWORD not in repr(transport.options)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SAGA_KAFKA_SECURITY_PROTOCOL", "TLS", "SAGA_KAFKA_SECURITY_PROTOCOL: Input should be"),
        ("SAGA_KAFKA_SASL_MECHANISM", "GSSAPI", "SAGA_KAFKA_SASL_MECHANISM: Input should be"),
        ("SAGA_KAFKA_REPLICATION_FACTOR", "0", "SAGA_KAFKA_REPLICATION_FACTOR: Input should be"),
        ("SAGA_KAFKA_PARTITIONS", "0", "SAGA_KAFKA_PARTITIONS: Input should be"),
    ],
)
def test_a_bad_value_names_its_setting(
    variable: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.cli.app import _bad_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert message in _bad_settings(caught.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"security_protocol": "SASL_SSL"},
            "SAGA_KAFKA_SECURITY_PROTOCOL is SASL_SSL, which needs SAGA_KAFKA_SASL_MECHANISM "
            "and SAGA_KAFKA_SASL_USERNAME and SAGA_KAFKA_SASL_PASSWORD "
            "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
        ),
        (
            {**SCRAM, "sasl_password": SecretStr("")},
            "SAGA_KAFKA_SECURITY_PROTOCOL is SASL_SSL, which needs SAGA_KAFKA_SASL_PASSWORD",
        ),
        (
            {"sasl_username": "saga"},
            "SAGA_KAFKA_SASL_USERNAME is set but SAGA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT, "
            "which does not authenticate: use SASL_SSL",
        ),
        (
            {"ssl_cafile": "/etc/ca.pem"},
            "SAGA_KAFKA_SSL_CAFILE is set but SAGA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT, "
            "which does not use TLS: use SSL or SASL_SSL",
        ),
        (
            {**SCRAM, "security_protocol": "SASL_PLAINTEXT", "ssl_check_hostname": False},
            "SAGA_KAFKA_SSL_CHECK_HOSTNAME is set but SAGA_KAFKA_SECURITY_PROTOCOL is "
            "SASL_PLAINTEXT, which does not use TLS: use SSL or SASL_SSL",
        ),
        (
            {"security_protocol": "SSL", "ssl_keyfile": "/etc/key.pem"},
            "SAGA_KAFKA_SSL_KEYFILE is set without SAGA_KAFKA_SSL_CERTFILE",
        ),
        (
            {"replication_factor": 2, "min_insync_replicas": 3},
            "SAGA_KAFKA_MIN_INSYNC_REPLICAS=3 is above SAGA_KAFKA_REPLICATION_FACTOR=2: "
            "no write could ever be acknowledged",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_one_line(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        transport_from_url("kafka://localhost:9094", Topology(), kafka=KafkaOptions(**options))  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert PASSWORD not in str(caught.value)


def test_unusable_certificate_files_are_one_line(pki: Path) -> None:
    def problem(**files: object) -> str:
        options = KafkaOptions(security_protocol="SSL", **files)  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as caught:
            transport_from_url("kafka://localhost:9094", Topology(), kafka=options)
        assert KEY_PASSWORD not in str(caught.value)
        return str(caught.value)

    missing, cert = str(pki / "missing.pem"), str(pki / "cert.pem")
    for field in ("ssl_cafile", "ssl_certfile"):
        assert problem(**{field: missing}) == (
            f"SAGA_KAFKA_{field.upper()}: cannot read {missing!r}: No such file or directory"
        )
    assert problem(ssl_certfile=cert, ssl_keyfile=missing) == (
        f"SAGA_KAFKA_SSL_KEYFILE: cannot read {missing!r}: No such file or directory"
    )
    for not_pem in ("junk.txt", "key.pem"):
        assert problem(ssl_cafile=str(pki / not_pem)) == (
            f"SAGA_KAFKA_SSL_CAFILE: {str(pki / not_pem)!r} holds no PEM certificate"
        )
    other = str(pki / "other.pem")
    assert problem(ssl_certfile=cert, ssl_keyfile=other) == (
        f"SAGA_KAFKA_SSL_KEYFILE: {other!r} does not match the certificate"
    )
    encrypted = str(pki / "encrypted.pem")
    for password in (None, SecretStr("wrong")):  # never a prompt on the terminal
        assert problem(ssl_certfile=cert, ssl_keyfile=encrypted, ssl_key_password=password) == (
            f"SAGA_KAFKA_SSL_KEYFILE: {encrypted!r} is not a PEM certificate and key, or "
            "SAGA_KAFKA_SSL_KEY_PASSWORD is wrong or missing"
        )


def test_the_tls_context_verifies_the_broker_and_holds_the_client_certificate(
    pki: Path,
) -> None:
    options = KafkaOptions(
        **{**SCRAM, "security_protocol": "SASL_SSL"},  # type: ignore[arg-type]
        ssl_cafile=str(pki / "cert.pem"),
        ssl_certfile=str(pki / "cert.pem"),
        ssl_keyfile=str(pki / "encrypted.pem"),
        ssl_key_password=SecretStr(KEY_PASSWORD),
    )
    options.check()
    context = options.ssl_context()
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1  # only the CA given, not the system's
    unchecked = KafkaOptions(security_protocol="SSL", ssl_check_hostname=False).ssl_context()
    assert unchecked is not None
    assert unchecked.verify_mode is ssl.CERT_REQUIRED  # the chain is still verified
    assert not unchecked.check_hostname


def test_kafka_urls_take_no_credentials_or_options() -> None:
    for url in (
        f"kafka://saga:{PASSWORD}@localhost:9094",
        f"kafka://localhost:9094?sasl_password={PASSWORD}",
        f"kafka://localhost:9094/?security_protocol=SASL_SSL&password={PASSWORD}",
    ):
        with pytest.raises(ConfigError) as caught:
            transport_from_url(url, Topology())
        message = str(caught.value)
        assert "kafka:// takes no credentials or options; set SAGA_KAFKA_SECURITY_PROTOCOL" in (
            message
        )
        assert PASSWORD not in message


def test_topics_get_the_configured_partitions_replication_and_min_insync() -> None:
    plain = KafkaTransport("localhost:9092")._new_topic("t")
    assert (plain.num_partitions, plain.replication_factor) == (4, -1)  # -1: the broker's
    assert plain.topic_configs == {}
    options = KafkaOptions(partitions=6, replication_factor=3, min_insync_replicas=2)
    topic = KafkaTransport("localhost:9092", options=options)._new_topic("t")
    assert (topic.num_partitions, topic.replication_factor) == (6, 3)
    assert topic.topic_configs == {"min.insync.replicas": "2"}


def test_refusals_for_good_are_told_from_an_unreachable_broker() -> None:
    options = KafkaOptions(**SCRAM)  # type: ignore[arg-type]
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 20, "unable to get local issuer certificate"
    assert _refusal(untrusted, "localhost:9094", options) == (
        "Kafka at localhost:9094: its TLS certificate is not trusted by the system's CAs "
        "(set SAGA_KAFKA_SSL_CAFILE): unable to get local issuer certificate"
    )
    wrong_name = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrong_name.verify_code, wrong_name.verify_message = 64, "IP address mismatch"
    assert _refusal(wrong_name, "127.0.0.1:9094", options) == (
        "Kafka at 127.0.0.1:9094: its TLS certificate is not valid for '127.0.0.1': "
        "connect by a name the certificate holds"
    )
    assert _refusal(ssl.SSLEOFError(8, "EOF"), "localhost:9094", options) is None
    assert _refusal(ConnectionRefusedError(111, "refused"), "localhost:9094", options) is None


def test_the_daemons_refuse_such_settings_in_one_line_before_connecting(tmp_path: Path) -> None:
    """Before the database or the broker is touched (nothing listens on port 1)."""
    sasl = env_for(
        tmp_path / "unused.db",
        SAGA_BROKER_URL="kafka://127.0.0.1:1",
        SAGA_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        SAGA_KAFKA_SASL_USERNAME="saga",
    )
    line = fails_in_one_line(sasl, "worker", "payment")
    assert line == (
        "sagactl: error: SAGA_KAFKA_SECURITY_PROTOCOL is SASL_SSL, which needs "
        "SAGA_KAFKA_SASL_MECHANISM and SAGA_KAFKA_SASL_PASSWORD "
        "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
    )
    in_url = env_for(tmp_path / "unused.db", SAGA_BROKER_URL=f"kafka://saga:{PASSWORD}@k:9094")
    line = fails_in_one_line(in_url, "engine")
    assert "kafka:// takes no credentials or options; set SAGA_KAFKA_SECURITY_PROTOCOL" in line
    assert PASSWORD not in line
