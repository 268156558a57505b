"""Run and inspect the Alembic migrations from Python (``ccfnet db upgrade``, ``ccfnet serve``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

REPO_ROOT = Path(__file__).resolve().parents[2]
UPGRADE_COMMAND = "ccfnet db upgrade"


class SchemaOutdatedError(RuntimeError):
    """The database schema is behind the code; the message names the command that upgrades it."""


def alembic_config() -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def ensure_schema(engine: Engine, *, apply: bool) -> None:
    """Bring the schema to head when ``apply`` (embedded SQLite), else refuse an outdated one."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if apply:
        upgrade(engine)
        return
    raise SchemaOutdatedError(
        f"database schema is at revision {current or 'none'}, the code needs {head}; "
        f"run `{UPGRADE_COMMAND}` (with the same CCFNET_DATABASE_URL) first"
    )
