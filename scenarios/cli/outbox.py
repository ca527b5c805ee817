"""``twopc relay``, ``twopc consumer``, ``twopc outbox failed|retry``: the outbox's processes.

The relay and the consumer are long-lived: they run until SIGTERM or SIGINT,
finish the batch in hand (or roll it back), log what they did and exit 0.
Their logs are structlog events on stderr (``--log-json`` for JSON lines;
level from TWOPC_LOG_LEVEL, INFO by default).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from types import FrameType
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from coordinator import events
from scenarios import events as ev
from scenarios.log_setup import configure as configure_logging

console = Console()


def _settings() -> Any:
    from scenarios.config import Settings

    return Settings.load()


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for a clean shutdown."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        events.get_logger(component="cli").info(ev.SHUTDOWN_REQUESTED, signal=signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _configure_logs(log_json: bool) -> None:
    configure_logging(os.environ.get("TWOPC_LOG_LEVEL", "INFO"), json=log_json or None)


@click.command()
@click.option(
    "--mode",
    type=click.Choice(["status", "last-id", "cdc"]),
    required=True,
    help="How sent rows are tracked: a status column, the last id sent, or the WAL (CDC).",
)
@click.option("--batch-size", default=200, show_default=True, help="Messages per broker commit.")
@click.option(
    "--poll-interval",
    default=1.0,
    show_default=True,
    help="Seconds between polls when no NOTIFY wakes the relay.",
)
@click.option(
    "--policy",
    type=click.Choice(["ignore", "retry", "failure-log"]),
    default=None,
    help="When the broker fails: drop, retry forever, or retry then log "
    "[default: TWOPC_OUTBOX_POLICY or failure-log].",
)
@click.option("--max-attempts", type=int, default=None, help="Attempts before the failure log.")
@click.option("--backoff", type=float, default=None, help="First retry delay in seconds.")
@click.option("--name", default="", help="The relay's name in the logs.")
@click.option("--log-json", is_flag=True, help="Log JSON lines.")
def relay(
    mode: str,
    batch_size: int,
    poll_interval: float,
    policy: str | None,
    max_attempts: int | None,
    backoff: float | None,
    name: str,
    log_json: bool,
) -> None:
    """Publish what A committed to /queue/transfers, until SIGTERM."""
    from scenarios.outbox.failures import RetrySettings
    from scenarios.outbox.relay import RelayConfig, make_relay

    _configure_logs(log_json)
    if batch_size < 1 or poll_interval <= 0:
        raise click.BadParameter("--batch-size must be >= 1 and --poll-interval > 0")
    retry = RetrySettings.from_env(policy=policy, max_attempts=max_attempts, first_delay=backoff)
    config = RelayConfig(
        batch_size=batch_size,
        poll_interval=poll_interval,
        retry=retry,
        name=name or f"{mode}-{os.getpid()}",
    )
    stop = _stop_on_signals()
    make_relay(mode, _settings(), config).run(stop)  # type: ignore[arg-type]


@click.command()
@click.option("--prefetch", default=500, show_default=True, help="Unacknowledged messages held.")
@click.option("--batch-size", default=200, show_default=True, help="Messages per B commit.")
@click.option("--log-json", is_flag=True, help="Log JSON lines.")
def consumer(prefetch: int, batch_size: int, log_json: bool) -> None:
    """Credit B from /queue/transfers, exactly once in effect, until SIGTERM."""
    from scenarios.outbox.consumer import Consumer

    _configure_logs(log_json)
    stop = _stop_on_signals()
    Consumer(_settings(), prefetch=prefetch, batch_size=batch_size).run(stop)


@click.group()
def outbox() -> None:
    """The relays' failure log: what could not be sent, and sending it again."""


@outbox.command("failed")
@click.option("--all", "include_resent", is_flag=True, help="Also list what was sent again.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_failed(include_resent: bool, as_json: bool) -> None:
    """List the messages the relays gave up on."""
    from scenarios.outbox.failures import list_failures

    failures = list_failures(_settings().pg_a, include_resent=include_resent)
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in failures], indent=2))
        return
    if not failures:
        console.print("the failure log is empty")
        return
    table = Table(title=f"{len(failures)} messages in the failure log")
    for column in ("transfer id", "relay", "attempts", "failed at", "resent at", "last error"):
        table.add_column(column)
    for f in failures:
        table.add_row(
            f.transfer_id,
            f.source,
            str(f.attempts),
            f.failed_at.strftime("%H:%M:%S"),
            f.resent_at.strftime("%H:%M:%S") if f.resent_at else "-",
            f.last_error[:80],
        )
    console.print(table)


@outbox.command("retry")
@click.argument("transfer_ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_retry(transfer_ids: tuple[str, ...], as_json: bool) -> None:
    """Send the failure log's messages again (all, or the TRANSFER_IDS given)."""
    from scenarios.outbox.failures import retry_failures
    from scenarios.outbox.relay import StompPublisher

    settings = _settings()
    publisher = StompPublisher(settings)
    try:
        report = retry_failures(settings.pg_a, publisher.publish, transfer_ids or None)
    finally:
        publisher.close()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(f"sent again: {len(report.sent)}, still failing: {len(report.failed)}")
        if report.error:
            console.print(f"last error: {report.error}")
    if report.failed:
        raise SystemExit(1)
