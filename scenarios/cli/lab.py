"""``twopc lab``: the embedded lab's services, up, down, their status and their settings."""

from __future__ import annotations

import json
import shlex
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from scenarios.cli.progress import working
from scenarios.config import home_dir

console = Console()


@click.group()
def lab() -> None:
    """The embedded lab: two PostgreSQL clusters and an ActiveMQ broker on 127.0.0.1."""


def open_lab() -> Any:
    """The lab of TWOPC_HOME (imported when a command needs it)."""
    from scenarios.lab.services import Lab

    return Lab(home_dir())


def print_status(statuses: list[Any], as_json: bool) -> None:
    """Each service of the lab, as a table or as JSON."""
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
    with working("lab up: starting PostgreSQL A and B and ActiveMQ"):
        statuses = open_lab().up()
    print_status(statuses, as_json)


@lab.command("down")
@click.option("--json", "as_json", is_flag=True, help="Print what was stopped as JSON.")
def lab_down(as_json: bool) -> None:
    """Stop exactly the processes 'up' started."""
    stopped = open_lab().down()
    if as_json:
        click.echo(json.dumps({"stopped": list(stopped)}, indent=2))
        return
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def lab_status(as_json: bool) -> None:
    """Each service, its port, pid and state."""
    print_status(open_lab().status(), as_json)


@lab.command("env")
def lab_env() -> None:
    """Shell exports pointing twopc at the lab: eval "$(twopc lab env)"."""
    for name, value in open_lab().settings_env().items():
        click.echo(f"export {name}={shlex.quote(value)}")
