"""`ccfnet retry-exports`: send dead exports again, now, from this process; delivered ones are never re-sent."""

from __future__ import annotations

import json

import typer

from worker.commands.common import EXIT_CONFIG, EXIT_SCHEMA, configure_logging, load_settings

EXIT_NOT_DELIVERED = 1


def retry_exports(
    job: int | None = typer.Option(None, "--job", help="only this job's dead exports"),
    all_dead: bool = typer.Option(False, "--all-dead", help="every dead export"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report"),
) -> None:
    """Revive dead exports (attempts reset) and try each once right away. Exit 1 when one is still not
    delivered; a running service retries those with backoff."""
    from worker.db import repository as repo
    from worker.db.engine import make_engine, make_session_factory
    from worker.db.migrate import SchemaOutdatedError, ensure_schema
    from worker.export.engine import AttemptResult, attempt_exports
    from worker.timeutil import utcnow

    if (job is None) == (not all_dead):
        typer.echo("give exactly one of --job ID or --all-dead", err=True)
        raise typer.Exit(EXIT_CONFIG)
    settings = load_settings()
    configure_logging(settings.log_level)
    engine = make_engine(settings.effective_database_url)
    try:
        try:
            ensure_schema(engine, apply=settings.uses_sqlite)
        except SchemaOutdatedError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(EXIT_SCHEMA) from exc
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            revived = repo.revive_dead_exports(session, job_id=job, now=utcnow())
        tried: dict[int, AttemptResult] = {}
        for export_id in revived:
            if export_id not in tried:  # it may have travelled with an earlier one of the same job
                tried.update((r.export_id, r) for r in attempt_exports(export_id, settings, sessions, utcnow))
        with sessions() as session:
            rows = [
                {"export": e.id, "job": e.job_id, "destination": e.destination, "state": e.state,
                 "attempts": e.attempts, "error": e.last_error}
                for e in repo.exports_by_id(session, revived)
            ]
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({"revived": len(revived), "results": rows}, indent=2))
    else:
        typer.echo(f"{len(revived)} dead export(s) retried")
        for row in rows:
            typer.echo(f"  export {row['export']} (job {row['job']}) to {row['destination']}: {row['state']}"
                       + (f" ({row['error']})" if row["error"] else ""))
    if any(row["state"] != "delivered" for row in rows):
        raise typer.Exit(EXIT_NOT_DELIVERED)


def register(app: typer.Typer) -> None:
    app.command("retry-exports")(retry_exports)
