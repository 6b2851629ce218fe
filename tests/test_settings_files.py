"""Every setting may come from a file (``SAGA_<NAME>_FILE``), as Docker and Kubernetes
secrets are mounted; a bad file or a double source is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli.app import cli
from engine.errors import ConfigError
from engine.settings import Settings

SECRET = "postgresql://u:Hunter2secretPW@db.example/saga"


def test_a_setting_comes_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "url"
    secret.write_text(SECRET + "\n")
    monkeypatch.delenv("SAGA_DATABASE_URL", raising=False)
    monkeypatch.setenv("SAGA_DATABASE_URL_FILE", str(secret))
    monkeypatch.setenv("SAGA_PRUNE_BATCH_FILE", str(_write(tmp_path / "batch", "250")))
    settings = Settings()
    assert settings.database_url == SECRET  # the trailing newline is not part of it
    assert settings.prune_batch == 250  # validated like the variable itself


def test_a_flag_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL_FILE", str(_write(tmp_path / "url", SECRET)))
    assert Settings(database_url="sqlite:///x.db").database_url == "sqlite:///x.db"


def test_both_sources_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL", "sqlite:///x.db")
    monkeypatch.setenv("SAGA_DATABASE_URL_FILE", str(_write(tmp_path / "url", SECRET)))
    with pytest.raises(ConfigError, match="SAGA_DATABASE_URL or SAGA_DATABASE_URL_FILE"):
        Settings()


def test_an_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGA_DATABASE_URL", raising=False)
    monkeypatch.setenv("SAGA_DATABASE_URL_FILE", str(tmp_path / "missing"))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert "SAGA_DATABASE_URL_FILE: cannot read" in result.output
    assert "Traceback" not in result.output


def test_a_bad_value_from_a_file_is_not_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGA_PRUNE_BATCH_FILE", str(_write(tmp_path / "b", "Hunter2secretPW")))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 1
    assert "SAGA_PRUNE_BATCH" in result.output
    assert "Hunter2secretPW" not in result.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
