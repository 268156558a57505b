"""Settings, migrations (PostgreSQL and SQLite from the same files) and the thin commands."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from intake_support import RedisSpace, pg_url, redis_space  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from worker.cli import app
from worker.db import migrate
from worker.db.engine import make_engine
from worker.db.models import Base
from worker.settings import SettingsError, get_settings


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


@pytest.mark.services
def test_postgres_upgrade_downgrade_upgrade_matches_the_models(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        migrate.downgrade(engine, "base")
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
    assert _diff(pg_url) == []


def test_sqlite_migrations_match_the_models_and_embedded_start_applies_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    engine = make_engine(url)
    migrate.ensure_schema(engine, apply=True)
    migrate.downgrade(engine, "base")
    migrate.upgrade(engine)
    engine.dispose()
    assert _diff(url) == []


def test_outdated_schema_is_refused_with_the_command_named(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with pytest.raises(migrate.SchemaOutdatedError, match="ccfnet db upgrade"):
        migrate.ensure_schema(engine, apply=False)
    engine.dispose()


def test_settings_parse_lists_and_name_the_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCFNET_ALLOWED_CALLING_AETS", "MR1, ROUTER")
    monkeypatch.setenv("CCFNET_ALLOWED_PEER_ADDRESSES", "10.1.0.0/16,192.168.1.7")
    s = get_settings(_env_file=None)
    assert s.allowed_calling_aets == ["MR1", "ROUTER"]
    assert [str(n) for n in s.allowed_peer_addresses] == ["10.1.0.0/16", "192.168.1.7/32"]
    monkeypatch.setenv("CCFNET_PORT", "not-a-port")
    with pytest.raises(SettingsError, match="CCFNET_PORT"):
        get_settings(_env_file=None)
    monkeypatch.setenv("CCFNET_PORT", "104")
    monkeypatch.setenv("CCFNET_AE_TITLE", "WAY_TOO_LONG_AE_TITLE")
    with pytest.raises(SettingsError, match="CCFNET_AE_TITLE"):
        get_settings(_env_file=None)


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCFNET_DATABASE_URL", "postgresql://ccfnet:hunter2@db.example:5432/ccfnet")
    monkeypatch.setenv("CCFNET_BROKER_URL", "redis://:sekrit@redis.example:6379/0")
    monkeypatch.setenv(
        "CCFNET_DESTINATIONS",
        json.dumps(
            [{"kind": "dicomweb", "name": "pacs", "url": "https://pacs.example/dicom-web", "token": "tok123"}]
        ),
    )
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "sekrit" not in result.output and "tok123" not in result.output
    shown = json.loads(result.output)
    assert shown["CCFNET_DATABASE_URL"].startswith("postgresql") and "***" in shown["CCFNET_DATABASE_URL"]
    assert shown["CCFNET_DESTINATIONS"][0]["token"] == "**********"


def test_config_bad_value_exits_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCFNET_STUDY_QUIET_SECONDS", "-5")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "CCFNET_STUDY_QUIET_SECONDS" in result.output


def test_path_variables_set_but_empty_count_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Read as paths, "" would be "." (the current folder): the spool, model and TLS files would silently be
    the working directory."""
    monkeypatch.chdir(tmp_path)
    for name in ("DATA_DIR", "SPOOL_DIR", "MODEL_PATH", "TLS_CERT", "TLS_KEY", "TLS_CA"):
        monkeypatch.setenv(f"CCFNET_{name}", "")
    monkeypatch.setenv("CCFNET_SPOOL_DIR", "  ")
    destinations = [
        {"kind": "dicom", "name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104,
         "tls_ca": "", "tls_cert": "", "tls_key": ""},
        {"kind": "dicomweb", "name": "web", "url": "https://pacs.example/dicom-web", "tls_ca": ""},
    ]
    monkeypatch.setenv("CCFNET_DESTINATIONS", json.dumps(destinations))
    s = get_settings(_env_file=None)
    assert (s.data_dir, s.spool_dir, s.spool_path) == (Path("var"), None, Path("var") / "spool")
    assert (s.model_path, s.tls_cert, s.tls_key, s.tls_ca, s.tls_enabled) == (None, None, None, None, False)
    assert [(d.tls_ca, getattr(d, "tls_cert", None), getattr(d, "tls_key", None)) for d in s.destinations] == [
        (None, None, None), (None, None, None),
    ]
    shown = CliRunner().invoke(app, ["config", "show", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["(effective spool)"] == str(Path("var") / "spool")


@pytest.mark.services
def test_config_check_against_the_real_services(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    pg_url: str,
    redis_space: RedisSpace,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CCFNET_DATABASE_URL", pg_url)
    monkeypatch.setenv("CCFNET_BROKER_URL", redis_space.url)
    monkeypatch.setenv("CCFNET_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CCFNET_MIN_FREE_DISK_MB", "1")
    monkeypatch.setenv(
        "CCFNET_DESTINATIONS",
        json.dumps([{"kind": "dicom", "name": "nowhere", "ae_title": "X", "host": "127.0.0.1", "port": 9}]),
    )
    runner = CliRunner()
    result = runner.invoke(app, ["config", "check", "--json"])
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert result.exit_code == 1  # the schema is not there yet and the destination does not answer
    assert not checks["database"]["ok"] and "ccfnet db upgrade" in checks["database"]["detail"]
    assert checks["broker"]["ok"] and checks["spool"]["ok"]
    assert not checks["destination nowhere"]["ok"]
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    monkeypatch.setenv("CCFNET_DESTINATIONS", "[]")
    result = runner.invoke(app, ["config", "check"])
    assert result.exit_code == 0, result.output
