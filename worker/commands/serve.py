"""``ccfnet serve``: the DICOM listener, sweeper and reconciler; ``--embedded`` adds worker threads."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import typer

from worker.commands.common import EXIT_CONFIG, EXIT_SCHEMA, configure_logging, load_settings

DEFAULT_HTTP_PORT = 8080


def serve(
    embedded: bool = typer.Option(
        False, "--embedded", help="SQLite, on-disk broker and Celery worker threads in this one process."
    ),
    port: int | None = typer.Option(None, help="Override CCFNET_PORT."),
    http_port: int | None = typer.Option(
        None, help=f"Override CCFNET_HTTP_PORT (ops page and /metrics; default {DEFAULT_HTTP_PORT}, 0: any free)."
    ),
) -> None:
    """Receive DICOM studies, assemble them into jobs and queue them."""
    from worker.db.migrate import SchemaOutdatedError
    from worker.diagnostics import tls_file_problems
    from worker.service import Service

    settings = load_settings(port=port, http_port=http_port)
    problems = tls_file_problems(settings)
    if problems:  # a missing file would otherwise end start-up in a traceback, and systemd would restart it
        typer.echo(f"invalid configuration: {'; '.join(problems)}", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if settings.http_port is None:
        settings = settings.model_copy(update={"http_port": DEFAULT_HTTP_PORT})
    configure_logging(settings.log_level)
    service = Service(settings, embedded=embedded)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        service.start()
    except SchemaOutdatedError as exc:
        service.stop()
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_SCHEMA) from exc
    try:
        while not stop.wait(1.0):
            pass
    finally:
        service.stop()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
