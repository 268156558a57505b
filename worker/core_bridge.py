"""The one module of `worker` that imports `ccfnet_core` (STYLE.md, layering)."""

from __future__ import annotations

import typer


def register_research_commands(app: typer.Typer) -> None:
    """Mount the research commands of ccfnet_core on the service CLI."""
    from ccfnet_core.cli import register

    register(app)
