"""The coordinator's tools: ``twopc recover`` (and ``--dead``) and ``twopc indoubt``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from scenarios.cli.settings import load_settings
from scenarios.exit_status import EXIT_IN_DOUBT

console = Console()


def print_recovery(items: list[Any], as_json: bool, extra: dict[str, Any]) -> None:
    """What recovery found and did (or would do), as a table or as JSON, then ``extra``."""
    if as_json:
        click.echo(json.dumps({**extra, "transactions": [i.as_dict() for i in items]}, indent=2))
        return
    if not items:
        console.print("nothing in doubt")
    else:
        table = Table()
        for column in (
            "gtrid",
            "age",
            "prepared in",
            "COMMIT logged",
            "marker",
            "decision",
            "done",
        ):
            table.add_column(column)
        for item in items:
            d = item.as_dict()
            age = "-" if d["age_seconds"] is None else f"{d['age_seconds']:.1f}s"
            table.add_row(
                d["gtrid"],
                age,
                ",".join(d["prepared_in"]) or "-",
                "yes" if d["logged_commit"] else "no",
                "yes" if d["marker"] else "no",
                d["decision"],
                "; ".join(d["done"]) or (d["error"] or "-"),
            )
        console.print(table)
    for key, value in extra.items():
        console.print(f"{key}: {value}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--fence-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for a dead coordinator's broker sessions to be released.",
)
@click.option(
    "--dead",
    is_flag=True,
    help="Recover the other coordinators that died (TWOPC_DECISIONS=postgres): those whose "
    "liveness lock is free but that left prepared branches, markers or decision rows.",
)
def recover(as_json: bool, fence_timeout: float, dead: bool) -> None:
    """Resolve every in-doubt transaction of this coordinator and say what was done.

    With --dead, fence and recover dead peers instead (from any machine: nothing of
    theirs but PostgreSQL and the broker is needed).
    """
    if dead:
        _recover_dead(as_json, fence_timeout)
        return
    from scenarios.wiring import recover as run_recovery

    report = run_recovery(load_settings(), fence_timeout=fence_timeout)
    print_recovery(
        report.items,
        as_json,
        {
            "fenced": report.fenced,
            "seconds": round(report.seconds, 3),
            "orphan_markers_removed": report.orphan_markers_removed,
            "resolved": report.resolved,
        },
    )
    if not report.resolved:
        sys.exit(1)


def _recover_dead(as_json: bool, fence_timeout: float) -> None:
    from scenarios.wiring import recover_dead

    done = recover_dead(load_settings(), fence_timeout=fence_timeout)
    if as_json:
        click.echo(json.dumps({"peers": [p.as_dict() for p in done]}, indent=2))
    elif not done:
        console.print("no dead coordinator left anything behind")
    for peer in done if not as_json else []:
        console.rule(f"coordinator {peer.peer}: {peer.seconds:.3f} s")
        if peer.report is None:
            console.print(f"not recovered: {peer.error}")
            continue
        print_recovery(peer.report.items, False, {"resolved": peer.report.resolved})
    if not all(p.resolved for p in done):
        sys.exit(1)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def indoubt(as_json: bool) -> None:
    """List what is in doubt and what recovery would do; changes nothing.

    Exits 0 when nothing is in doubt and 3 when something is (for a cron job's alert).
    """
    from scenarios.wiring import in_doubt

    items = in_doubt(load_settings())
    print_recovery(
        items,
        as_json,
        {}
        if as_json
        else {"note": "markers were read without fencing: a live coordinator may still commit"},
    )
    if items:
        sys.exit(EXIT_IN_DOUBT)
