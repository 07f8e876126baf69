"""The `cegraph` command line.

Every command loads and validates the settings first, so a bad value stops it with a message naming
the setting, before anything connects or writes.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version as package_version
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cegraph.daemon.settings import ConfigError, Settings, load_settings, masked

app = typer.Typer(
    name="cegraph",
    help="Failure-driven continuous improvement for LLM workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as error:
        err.print(f"[bold red]cegraph:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, "" if value is None else str(value)))
    return rows


@app.command()
def config(as_json: JsonFlag = False) -> None:
    """Show the effective settings (secrets masked)."""
    data = masked(settings_or_exit())
    if as_json:
        out.print_json(json.dumps(data))
        return
    table = Table("setting", "value", title="cegraph settings")
    for name, value in _flatten(data):
        table.add_row(name, value)
    out.print(table)


@app.command()
def version() -> None:
    """Print the cegraph version."""
    out.print(package_version("cegraph"))


@app.command()
def run() -> None:
    """Run the daemon: consume traces from Kafka, serve the HTTP API and metrics."""
    settings = settings_or_exit()
    from cegraph.daemon.app import serve

    serve(settings)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
