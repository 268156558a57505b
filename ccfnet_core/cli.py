"""Research commands: model-info, train, evaluate, predict, phantom. Thin: parse, delegate, exit code."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the research commands to a Typer app (the `ccfnet` CLI mounts them)."""
