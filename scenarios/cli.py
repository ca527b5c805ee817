"""The ``twopc`` command line: the lab, the coordinator's tools, the scenarios and reports."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from coordinator.errors import TwoPhaseCommitError
from scenarios.config import home_dir

console = Console()


class TwopcGroup(click.Group):
    """Turns twopc's own errors into one clear line and exit status 2, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TwoPhaseCommitError as exc:
            click.echo(f"twopc: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=TwopcGroup)
def main() -> None:
    """twopc: a durable two-phase-commit coordinator for PostgreSQL and ActiveMQ."""


# -- lab ---------------------------------------------------------------------


@main.group()
def lab() -> None:
    """The embedded lab: two PostgreSQL clusters and an ActiveMQ broker on 127.0.0.1."""


def _lab() -> Any:
    from scenarios.lab import Lab

    return Lab(home_dir())


def _print_status(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([s.__dict__ for s in statuses], indent=2))
        return
    table = Table(title=f"twopc lab ({home_dir()})")
    for column in ("service", "port", "pid", "state"):
        table.add_column(column)
    for s in statuses:
        colour = "green" if s.state == "up" else "red"
        table.add_row(s.label, str(s.port), str(s.pid or "-"), f"[{colour}]{s.state}[/]")
    console.print(table)


@lab.command("up")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def lab_up(as_json: bool) -> None:
    """Start what is not running and wait until every service answers (idempotent)."""
    _print_status(_lab().up(), as_json)


@lab.command("down")
def lab_down() -> None:
    """Stop exactly the processes 'up' started."""
    stopped = _lab().down()
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def lab_status(as_json: bool) -> None:
    """Each service, its port, pid and state."""
    _print_status(_lab().status(), as_json)


@lab.command("env")
def lab_env() -> None:
    """Shell exports pointing twopc at the lab: eval "$(twopc lab env)"."""
    for name, value in _lab().settings_env().items():
        click.echo(f"export {name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
