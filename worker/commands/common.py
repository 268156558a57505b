"""Shared edges of the service commands: settings from the environment, logging, exit codes."""

from __future__ import annotations

import logging
from typing import Any

import typer

from worker.settings import Settings, SettingsError, get_settings

EXIT_CONFIG = 2
EXIT_SCHEMA = 3


def load_settings(**overrides: Any) -> Settings:
    try:
        return get_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_CONFIG) from exc


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))
