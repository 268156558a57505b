"""``ccfnet config show`` (secrets masked) and ``ccfnet config check`` (can we reach what we need)."""

from __future__ import annotations

import json

import typer

from worker.commands.common import load_settings

config_app = typer.Typer(help="Configuration.", no_args_is_help=True)


@config_app.command("show")
def show(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Print the effective settings; secrets are masked."""
    from worker.diagnostics import shown_settings

    shown = shown_settings(load_settings())
    if as_json:
        typer.echo(json.dumps(shown, indent=2, default=str))
        return
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        typer.echo(
            f"{key:<{width}}  {json.dumps(value, default=str) if not isinstance(value, str) else value}"
        )


@config_app.command("check")
def check(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check the database, the broker, the spool folder, the TLS files, the model and each destination; exit 1
    if any fails."""
    from worker.diagnostics import run_checks

    checks = run_checks(load_settings())
    if as_json:
        typer.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            typer.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
