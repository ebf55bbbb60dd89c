"""The `attrib` command line: keys, configuration errors, and the README's run command (`attrib demo`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import tenant_for_key
from service.db.session import session_scope
from service.settings import ConfigurationError, Settings
from tests.service.test_embedded_serve import free_port


def attrib(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRIB_")}
    env["ATTRIB_DATA_DIR"] = str(data_dir)
    return env


def test_keys_create_prints_a_working_key(tmp_path: Path) -> None:
    result = attrib("keys", "create", "--tenant", "acme", env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert secret.startswith("atk_")
    settings = Settings(data_dir=tmp_path)
    with session_scope(settings.resolved_database_url) as session:
        tenant = tenant_for_key(session, secret)
        assert tenant is not None and tenant.name == "acme"


def test_only_one_of_database_and_broker_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        Settings(data_dir=tmp_path, database_url="sqlite:///x.db")
    env = {**clean_env(tmp_path), "ATTRIB_BROKER_URL": "redis://127.0.0.1:6379/0"}
    result = attrib("migrate", env=env)
    assert result.returncode != 0
    assert "ATTRIB_DATABASE_URL" in result.stderr


@pytest.mark.e2e
def test_demo_prints_helpful_and_harmful_examples(tmp_path: Path) -> None:
    result = attrib("demo", "--port", str(free_port()), env=clean_env(tmp_path / "data"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("most helpful") == 3 and result.stdout.count("most harmful") == 3
    assert "/docs" in result.stderr
    # how to look at the results afterwards, and the server's own first words: where the key is, how to export it
    assert "attrib demo --keep" in result.stderr and "/ui/attributions/attr_" in result.stderr
    assert f'ATTRIB_API_KEY="$(cat {(tmp_path / "data" / "api-key").resolve()})"' in result.stderr
    assert "superuser" not in result.stderr  # Celery's warning, when the tests run as root
