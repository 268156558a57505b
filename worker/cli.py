"""The `ccfnet` command line: parses arguments and delegates; errors become exit codes only here."""

from __future__ import annotations

import typer

from worker.commands import demo as demo_command
from worker.commands import exports as export_commands
from worker.commands import intake as intake_commands
from worker.commands import ops as ops_commands
from worker.core_bridge import register_research_commands

app = typer.Typer(
    name="ccfnet",
    help="CCF-Net lumbar spine MR worker: DICOM intake, analysis, results to PACS, and research tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Research commands (model-info, train, evaluate, predict, phantom) live in ccfnet_core.
register_research_commands(app)

# Service command groups register themselves below, one line each.
intake_commands.register_intake_commands(app)
demo_command.register(app)
export_commands.register(app)
ops_commands.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
