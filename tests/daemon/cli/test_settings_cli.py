"""Settings load from the environment, bad values stop the CLI naming the setting, secrets stay masked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_runner import run_cli

from cegraph.daemon.settings import ConfigError, load_settings, settings_markdown

CEGRAPH = str(Path(sys.executable).parent / "cegraph")
ROOT = Path(__file__).resolve().parents[3]


def test_config_json_shows_the_environment_value(tmp_path):
    result = run_cli("config", "--json", env={"CEGRAPH_KAFKA__BOOTSTRAP_SERVERS": "h:1"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kafka"]["bootstrap_servers"] == "h:1"


def test_secrets_are_masked(tmp_path):
    env = {"CEGRAPH_HTTP__TOKEN": "s3cret-token", "CEGRAPH_PUBLISHER__SIGNING_KEY": "k3y-material"}
    for args in (("config", "--json"), ("config",)):
        result = run_cli(*args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "s3cret-token" not in result.stdout and "k3y-material" not in result.stdout
        assert "**********" in result.stdout


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("CEGRAPH_KAFKA__GROUP_ID=from-dotenv\n")
    result = run_cli("config", "--json", cwd=tmp_path)
    assert json.loads(result.stdout)["kafka"]["group_id"] == "from-dotenv"


@pytest.mark.parametrize(
    ("variable", "value", "rule"),
    [
        ("CEGRAPH_STORE__PATH", "/nonexistent/dir/x.duckdb", "does not exist"),
        ("CEGRAPH_KAFKA__BOOTSTRAP_SERVERS", "no-port", "host:port"),
        ("CEGRAPH_INGEST__BATCH_SIZE", "0", "greater than or equal to 1"),
        ("CEGRAPH_INGEST__ENCODING", "avro", "otlp_proto"),
        ("CEGRAPH_HTTP__PORT", "70000", "less than or equal to 65535"),
        ("CEGRAPH_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "needs sasl_mechanism"),
        ("CEGRAPH_KAFKA__BOOTSTRAP_SERVER", "h:1", "not a known setting"),
        ("CEGRAPH_STORE__MEMORY_LIMIT", "lots", "should match pattern"),
        ("CEGRAPH_STAGES", "ingest,learn", "learn"),
    ],
)
def test_run_refuses_a_bad_value_naming_the_setting(tmp_path, variable, value, rule):
    result = run_cli("run", env={variable: value}, cwd=tmp_path)
    assert result.returncode == 2
    assert variable.split("__")[0] in result.stderr
    assert rule in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_load_settings_reports_every_broken_setting(monkeypatch):
    monkeypatch.setenv("CEGRAPH_INGEST__MAX_TEXT_CHARS", "-1")
    monkeypatch.setenv("CEGRAPH_DETECTOR__MASS_THRESHOLD", "2")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "CEGRAPH_INGEST__MAX_TEXT_CHARS" in str(raised.value)
    assert "CEGRAPH_DETECTOR__MASS_THRESHOLD" in str(raised.value)


def test_version_matches_the_package():
    from importlib.metadata import version

    result = run_cli("version")
    assert result.stdout.strip() == version("cegraph")


def test_the_configuration_page_table_matches_the_model():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert settings_markdown() in page, "regenerate with `make readme-settings`"
