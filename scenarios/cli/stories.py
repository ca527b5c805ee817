"""``twopc scenario``: the scenario scripts, each one transfer told with evidence."""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import click
from rich.console import Console

from scenarios.cli.settings import load_settings
from scenarios.stopping import finish_run, stop_on_signals

console = Console()


@click.group()
def scenario() -> None:
    """Scenario scripts: one transfer each, told with evidence from the real services."""


@scenario.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the scenarios as JSON.")
def scenario_list(as_json: bool) -> None:
    """Name and describe every scenario."""
    from scenarios.stories import STORIES, describe

    if as_json:
        listed = [{"name": name, "description": describe(name)} for name in STORIES]
        click.echo(json.dumps(listed, indent=2))
        return
    for name in STORIES:
        click.echo(f"{name:34} {describe(name)}")


def run_story(name: str, shown: Console | None) -> dict[str, Any]:
    """Scenario ``name``: its name, whether it kept its promise, its lines (shown on ``shown``)."""
    from scenarios.stories import STORIES

    story = STORIES[name](load_settings())
    if shown is not None:
        colour = "green" if story.ok else "red"
        shown.print(f"[bold]{name}[/] [{colour}]{'as promised' if story.ok else 'FAILED'}[/]")
        for line in story.lines:
            shown.print(f"  {line}", highlight=False)
    return {"name": name, "ok": story.ok, "lines": list(story.lines)}


@scenario.command("run")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print each scenario's result as JSON.")
def scenario_run(name: str, as_json: bool) -> None:
    """Run scenario NAME ('all' runs every one).

    SIGTERM or SIGINT: the scenario in hand runs to its end, no other starts,
    exit 143/130.
    """
    from scenarios.stories import STORIES

    names = list(STORIES) if name == "all" else [name]
    unknown = [n for n in names if n not in STORIES]
    if unknown:
        raise click.BadParameter(f"unknown scenario {unknown[0]!r}; see 'twopc scenario list'")
    with stop_on_signals() as stop:
        results = run_stories(names, stop, None if as_json else console)

        def summary() -> None:
            if as_json:
                ran = {"scenarios": results, "ok": all(r["ok"] for r in results)}
                if stop.is_set():
                    ran["stopped"] = f"{len(results)} of {len(names)} scenarios run"
                click.echo(json.dumps(ran, indent=2))
            elif stop.is_set():
                console.print(f"{len(results)} of {len(names)} scenarios run")

        finish_run(stop, summary)
    if not all(r["ok"] for r in results):
        sys.exit(1)


def run_stories(
    names: list[str], stop: threading.Event, shown: Console | None
) -> list[dict[str, Any]]:
    """Each scenario of ``names`` in turn, until ``stop`` (:func:`run_story`)."""
    results: list[dict[str, Any]] = []
    for name in names:
        if stop.is_set():
            break
        results.append(run_story(name, shown))
    return results
