"""`ccfnet retry-exports`: send dead exports again, now, from this process; delivered ones are never re-sent."""

from __future__ import annotations

import json

import typer


def retry_exports(
    job: int | None = typer.Option(None, "--job", help="only this job's dead exports"),
    all_dead: bool = typer.Option(False, "--all-dead", help="every dead export"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Revive dead exports (attempts reset) and try each once right away."""
    from worker.db import repository as repo
    from worker.db.engine import make_engine, make_session_factory
    from worker.export.engine import attempt_export
    from worker.settings import SettingsError, get_settings
    from worker.timeutil import utcnow

    if (job is None) == (not all_dead):
        typer.secho("error: give exactly one of --job ID or --all-dead", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        settings = get_settings()
    except SettingsError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    engine = make_engine(settings.effective_database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as session:
            revived = repo.revive_dead_exports(session, job_id=job, now=utcnow())
        results = [attempt_export(export_id, settings, sessions, utcnow) for export_id in revived]
    finally:
        engine.dispose()
    rows = [{"export": r.export_id, "state": r.state, "error": r.error} for r in results]
    if as_json:
        typer.echo(json.dumps({"revived": len(revived), "results": rows}, indent=2))
    else:
        typer.echo(f"{len(revived)} dead export(s) retried")
        for row in rows:
            typer.echo(f"  export {row['export']}: {row['state']}" + (f" ({row['error']})" if row["error"] else ""))
    if any(r.state != "delivered" for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("retry-exports")(retry_exports)
