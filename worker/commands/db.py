"""``ccfnet db upgrade`` / ``ccfnet db current``: the schema only changes through a migration."""

from __future__ import annotations

import typer

from worker.commands.common import configure_logging, load_settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply pending migrations (run this before starting listeners on PostgreSQL)."""
    from worker.db import migrate
    from worker.db.engine import make_engine, safe_url

    settings = load_settings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.effective_database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine, revision)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    typer.echo(f"{safe_url(settings.effective_database_url)}: {before or 'empty'} -> {after}")


@db_app.command("current")
def current() -> None:
    """Print the schema revision of the database and of the code."""
    from worker.db import migrate
    from worker.db.engine import make_engine

    settings = load_settings()
    engine = make_engine(settings.effective_database_url)
    try:
        typer.echo(f"database {migrate.current_revision(engine) or 'empty'}, code {migrate.head_revision()}")
    finally:
        engine.dispose()


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
