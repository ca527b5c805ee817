"""``twopc fanout``: one consumer of the transfer events, on its own queue of the virtual topic.

``twopc transfer --strategy cdc-fanout`` runs the whole fan-out in one process
(the CDC relay, the credit command's consumer and the audit, notification and
slow event consumers) and reports each one's lag; this command runs one event
consumer apart, until SIGTERM or SIGINT, e.g. to kill it and start it again: it
resumes from its queue. B's credit is a command with one receiver: 'twopc consumer'.
"""

from __future__ import annotations

import click

from scenarios.cli.outbox import _configure_logs, _print_consumer_stats, _settings
from scenarios.stopping import stop_on_signals


@click.command()
@click.option(
    "--consumer",
    "name",
    required=True,
    help="slow (a slow audit log) or any other name but credit and ledger (an audit log: "
    "audit, notification); it reads the events on /queue/Consumer.<name>.VirtualTopic.transfers.",
)
@click.option(
    "--delay",
    type=click.FloatRange(0, 60),
    default=None,
    help="Seconds the slow consumer waits before each message "
    "[default: TWOPC_FANOUT_SLOW_DELAY or 0.02].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON at the end.")
@click.option("--log-json", is_flag=True, hidden=True, help="Deprecated: TWOPC_LOG_FORMAT=json.")
def fanout(name: str, delay: float | None, as_json: bool, log_json: bool) -> None:
    """Consume the transfer events as consumer NAME, idempotently, until SIGTERM."""
    from scenarios.outbox.consumer import ConsumerFailed
    from scenarios.outbox.fanout import ensure_queues, make_consumer

    _configure_logs(log_json)
    settings = _settings()
    worker = make_consumer(settings, name, delay=delay)
    ensure_queues(settings, [name])
    try:
        with stop_on_signals() as stop:
            worker.run(stop)
    except ConsumerFailed as exc:
        _print_consumer_stats(worker.stats.as_dict(), as_json)
        click.echo(f"twopc: error: {exc}", err=True)
        raise SystemExit(1) from None
    _print_consumer_stats(worker.stats.as_dict(), as_json)
