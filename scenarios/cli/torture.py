"""``twopc torture``: the crash torture on the lab, with a progress bar and the result table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from scenarios.cli.progress import progress_bars
from scenarios.cli.settings import load_settings
from scenarios.config import APIS
from scenarios.stopping import RunStop, finish_run, stop_on_signals


@click.command("torture")
@click.option(
    "--schedules",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Random schedules to run after the matrix.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the matrix and the schedules.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option(
    "--matrix/--no-matrix",
    default=True,
    show_default=True,
    help="Run every failpoint as a kill and each fault kind once, first.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Transfers per failpoint schedule (timed faults run at least 150).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Concurrent transfers.",
)
@click.option(
    "--accounts",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Accounts per database (fewer: more lock contention, slower batches).",
)
@click.option(
    "--reset/--no-reset",
    default=True,
    show_default=True,
    help="Recreate the tables and empty the queue first.",
)
@click.option(
    "--peers/--no-peers",
    default=True,
    show_default=True,
    help="With the matrix: schedules of two or three coordinators in postgres mode, the "
    "first killed or paused, recovered by 'twopc recover --dead'.",
)
@click.option(
    "--api",
    type=click.Choice(APIS),
    default="threads",
    show_default=True,
    help="The coordinator every child runs: Coordinator on threads, or AsyncCoordinator "
    "on asyncio (the schedules of several coordinators too, in postgres mode).",
)
@click.option("--fail-fast", is_flag=True, help="Stop at the first schedule that fails.")
@click.option(
    "--results",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append every schedule's result to this file, one JSON object a line.",
)
def torture(
    schedules: int,
    seed: int,
    as_json: bool,
    matrix: bool,
    count: int,
    concurrency: int,
    accounts: int,
    reset: bool,
    peers: bool,
    api: str,
    fail_fast: bool,
    results: Path | None,
) -> None:
    """Crash the 2PC transfer every way we know, recover, check every invariant.

    Runs the matrix (every failpoint a transfer or its recovery passes, as a
    kill; coordinator SIGKILL; PostgreSQL A and B stopped in immediate mode;
    the broker SIGKILLed; connections reset, blackholed and delayed through a
    proxy; the coordinator paused) and SCHEDULES random combinations, each
    followed by 'twopc recover' until resolved and a check of A, B, the queue,
    pg_prepared_xacts, the markers and the decision log. Exit status 1 if any
    invariant failed. Needs the lab ('twopc lab up'); it resets its tables.
    SIGTERM or SIGINT: the schedule in hand runs to its end (recovery and
    checks), the table of the schedules run prints, exit 143/130. With --api
    asyncio the killed child runs the asyncio coordinator.
    """
    from scenarios.torture import schedules as plans
    from scenarios.torture.report import rows, summary
    from scenarios.torture.runner import lab_for

    err = Console(stderr=True)
    settings = load_settings()
    lab = lab_for(settings)
    if lab is None:
        err.print(
            "[yellow]the settings do not point at a running lab: PostgreSQL stops and broker "
            "kills are left out ('twopc lab up' and TWOPC_HOME to include them)[/]"
        )
    plan: list[plans.Schedule] = []
    if matrix:
        plan += plans.matrix(seed, count=count, concurrency=concurrency)
        if peers:
            plan += plans.peer_schedules(seed, count=count, concurrency=concurrency)
    plan += plans.random_schedules(schedules, seed, lab=lab is not None)
    plan = [s for s in plan if lab is not None or not s.fault.needs_lab]
    if not plan:
        raise click.UsageError("nothing to run: give --schedules N or leave --matrix on")

    started = time.monotonic()
    with stop_on_signals() as stop:
        done = _run_plan(
            settings, lab, plan, accounts, reset, api, fail_fast, results, as_json, stop
        )
        seconds = time.monotonic() - started

        def print_report() -> None:
            if as_json:
                click.echo(json.dumps(report, indent=2))
            else:
                _print_table(rows(done, seconds), report)

        report = {"api": api, **summary(done, seconds)}
        if stop.is_set():
            report["stopped"] = f"{stop.describe()} after {len(done)} of {len(plan)} schedules"
        finish_run(stop, print_report, status=0 if report["ok"] else 1)


def _run_plan(
    settings: Any,
    lab: Any,
    plan: list[Any],
    accounts: int,
    reset: bool,
    api: str,
    fail_fast: bool,
    results: Path | None,
    as_json: bool,
    stop: RunStop,
) -> list[Any]:
    """Run the schedules of ``plan`` in order until the end, a failure (fail_fast) or ``stop``.

    A schedule in hand when ``stop`` is set runs to its end (recovery and checks included).
    """
    from scenarios.torture.runner import Torture

    err = Console(stderr=True)
    done: list[Any] = []
    sink = results.open("a") if results is not None else None
    try:
        with (
            Torture(settings, lab=lab, accounts=accounts, reset=reset, api=api) as runner,
            progress_bars(
                TextColumn("[bold]torture[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[failed]} failed  {task.description}"),
                transient=as_json,
            ) as progress,
        ):
            task = progress.add_task("", total=len(plan), failed=0)
            for schedule in plan:
                if stop.is_set():
                    break
                progress.update(task, description=schedule.name)
                result = runner.run(schedule)
                done.append(result)
                if sink is not None:
                    sink.write(json.dumps({"api": api, **result.as_dict()}) + "\n")
                    sink.flush()
                if not result.ok:
                    err.print(f"[red]{schedule.name}[/] ({schedule.describe()}):")
                    for problem in result.problems:
                        err.print(f"  {problem}", highlight=False)
                progress.update(task, advance=1, failed=sum(not r.ok for r in done))
                if fail_fast and not result.ok:
                    break
    finally:
        if sink is not None:
            sink.close()
    return done


def _print_table(table_rows: list[Any], report: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"twopc torture (the coordinator on {report['api']})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for row in table_rows:
        value = row.shown()
        if row.invariant:
            value = f"[red]{value}[/]" if row.failed else f"[green]{value}[/]"
        table.add_row(row.label, value)
    console.print(table)
    for failed in report["failed_schedules"][:20]:
        console.print(f"[red]{failed['name']}[/]: {'; '.join(failed['problems'])}")
    verdict = "[green]every invariant held[/]" if report["ok"] else "[red]invariants VIOLATED[/]"
    console.print(verdict)
