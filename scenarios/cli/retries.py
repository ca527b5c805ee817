"""``twopc retries``: thread-sync's recorded retries, run to the end and listed.

A ``thread-sync`` process records in A every piece of work that failed on
the caller's thread, and its retrier runs it again
(scenarios.strategies.thread_retry). A process that died leaves its rows
``pending``; this command runs them as a new ``thread-sync`` process would,
waits until each is done or dead (at most ``--wait`` seconds), and lists
what is left: the dead letters, and anything still pending.
"""

from __future__ import annotations

import json
from collections import Counter

import click
from rich.console import Console
from rich.table import Table


@click.command()
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the pending retries to finish (0: only list).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def retries(wait: float, as_json: bool) -> None:
    """Run thread-sync's pending retries, then list the dead letters and what is still pending."""
    from scenarios.cli.settings import load_settings
    from scenarios.strategies.thread import ThreadSyncStrategy
    from scenarios.strategies.thread_retry import list_retries

    settings = load_settings()
    stats: dict[str, int] = {}
    if wait > 0:
        strategy = ThreadSyncStrategy()
        strategy.prepare(settings, concurrency=1)
        try:
            strategy.drain(wait)
            stats = strategy.stats()
        finally:
            strategy.close()
    rows = list_retries(settings.pg_a)
    counts = Counter(row.status for row in rows)
    left = [row for row in rows if row.status != "done"]
    if as_json:
        out = {
            "resumed": stats.get("retries_resumed", 0),
            "retried_now": stats.get("retried", 0),
            "dead_now": stats.get("dead_letters", 0),
            "counts": {status: counts[status] for status in ("pending", "done", "dead")},
            "not_done": [row.as_dict() for row in left],
        }
        click.echo(json.dumps(out, indent=2))
        return
    console = Console()
    console.print(
        f"credit_retries: {counts['done']} done, {counts['dead']} dead, "
        f"{counts['pending']} pending"
        + (f" ({stats.get('retried', 0)} retried just now)" if stats else "")
    )
    if left:
        table = Table("transfer", "status", "attempts", "last error", "updated")
        for row in left:
            table.add_row(
                row.transfer_id, row.status, str(row.attempts), row.last_error, row.updated_at
            )
        console.print(table)
