"""``ccfnet worker``: a Celery worker for chosen queues (GPU workers take ``inference,batch``)."""

from __future__ import annotations

import os
import socket

import typer

from worker.commands.common import EXIT_SCHEMA, configure_logging, load_settings


def worker(
    queues: str = typer.Option(
        "inference,batch", "--queues", "-Q", help="Comma-separated queues to consume."
    ),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Parallel jobs in this worker."),
    pool: str = typer.Option("prefork", help="Celery pool: prefork, threads or solo."),
) -> None:
    """Consume jobs from the broker and run them."""
    from worker.db.engine import make_engine
    from worker.db.migrate import SchemaOutdatedError, ensure_schema
    from worker.queue.celery_app import QUEUES, make_celery

    settings = load_settings()
    configure_logging(settings.log_level)
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if unknown or not chosen:
        typer.echo(f"unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}", err=True)
        raise typer.Exit(2)
    engine = make_engine(settings.effective_database_url)
    try:
        ensure_schema(engine, apply=settings.uses_sqlite)
    except SchemaOutdatedError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_SCHEMA) from exc
    finally:
        engine.dispose()
    if settings.worker_metrics_port is not None:
        from worker.ops.metrics import MULTIPROC_ENV, serve_worker_metrics

        if pool == "prefork" and not os.environ.get(MULTIPROC_ENV):
            typer.echo(f"warning: set {MULTIPROC_ENV} so /metrics sums the prefork children", err=True)
        serve_worker_metrics(settings.worker_metrics_port)
    app = make_celery(settings)
    app.set_default()  # the threads and solo pools look tasks up in the default app
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(chosen),
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            f"{'-'.join(chosen)}@{socket.gethostname()}-{os.getpid()}",
            "--loglevel",
            settings.log_level,
            "--without-mingle",
            "--without-gossip",
        ]
    )


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
