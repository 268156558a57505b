"""Registration of the intake commands (serve, worker, db, config) on the ``ccfnet`` app."""

from __future__ import annotations

import typer

from worker.commands import config, db, serve, worker


def register_intake_commands(app: typer.Typer) -> None:
    serve.register(app)
    worker.register(app)
    db.register(app)
    config.register(app)
