"""``ccfnet worker``: a Celery worker for chosen queues (GPU workers take ``inference,batch``)."""

from __future__ import annotations

import logging
import os
import socket

import typer

from worker.commands.common import EXIT_CONFIG, EXIT_SCHEMA, configure_logging, load_settings
from worker.settings import Settings, SettingsError

log = logging.getLogger("worker.commands.worker")
# The queues whose tasks run the model; an export-only worker never loads it.
MODEL_QUEUES = ("inference", "batch")


def _say_model_device(settings: Settings) -> None:
    """Log which checkpoint runs on which device; exit 2 when CCFNET_MODEL_DEVICE asks for one that is not here
    (rather than fail every job once studies arrive)."""
    from worker.diagnostics import model_device
    from worker.inference import model_path

    try:
        device = model_device(settings)
    except SettingsError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    log.info("model %s on %s", model_path(settings), device)


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
        raise typer.Exit(EXIT_CONFIG)
    if set(chosen) & set(MODEL_QUEUES):
        _say_model_device(settings)
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
        try:
            serve_worker_metrics(settings.worker_metrics_port, settings.http_bind)
        except OSError as exc:  # the port is taken, typically by another worker reading the same env file
            typer.echo(f"invalid configuration: CCFNET_WORKER_METRICS_PORT={settings.worker_metrics_port}: cannot "
                       f"listen on {settings.http_bind}: {exc.strerror or exc}", err=True)
            raise typer.Exit(EXIT_CONFIG) from exc
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
