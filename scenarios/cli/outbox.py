"""``twopc relay``, ``twopc consumer``, ``twopc outbox ...``: the outbox's processes and tools.

The relay and the consumer are long-lived: they run until SIGTERM or SIGINT,
finish the batch in hand (or roll it back), log what they did and exit 0 (the
consumer prints its counts, dead letters included); a second signal stops
them at once (scenarios.stopping). An error they cannot work
around stops them with one line and exit status 1.
Their logs are structlog events on stderr (``TWOPC_LOG_FORMAT=json`` for JSON
lines, as for every command; level from TWOPC_LOG_LEVEL, INFO by default here).
The ``--log-json`` flag of earlier versions still works, and says so.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from coordinator.errors import ConfigurationError
from scenarios.log_setup import configure as configure_logging
from scenarios.stopping import finish_run, stop_on_signals

console = Console()


class Duration(click.ParamType[float]):
    """A duration: a number of seconds, or with a unit (ms, s, m, h, d)."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        from outbox.clean import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _settings() -> Any:
    from scenarios.cli.settings import load_settings

    return load_settings()


def serve_metrics(settings: Any) -> Any:
    """Serve Prometheus /metrics on TWOPC_METRICS_PORT when it is set (None otherwise)."""
    if settings.metrics_port is None:
        return None
    try:
        from scenarios.metrics import serve
    except ImportError as exc:
        raise ConfigurationError(
            f"TWOPC_METRICS_PORT is set but {exc.name or 'prometheus_client'} is not "
            "installed: pip install 'twopc-coordinator[metrics]'"
        ) from exc
    return serve(settings, settings.metrics_port)


def _configure_logs(log_json: bool) -> None:
    """A worker's logging: INFO unless TWOPC_LOG_LEVEL says otherwise; JSON as TWOPC_LOG_FORMAT."""
    if log_json:
        click.echo("twopc: warning: --log-json is deprecated: set TWOPC_LOG_FORMAT=json", err=True)
    configure_logging(os.environ.get("TWOPC_LOG_LEVEL", "INFO"), json=log_json or None)


@click.command()
@click.option(
    "--mode",
    type=click.Choice(["status", "last-id", "cdc"]),
    required=True,
    help="How sent rows are tracked: a status column, the last id sent, or the WAL (CDC).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Messages per broker commit.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
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
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=None,
    help="Attempts before the failure log [default: TWOPC_OUTBOX_MAX_ATTEMPTS or 5].",
)
@click.option(
    "--backoff",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="First retry delay in seconds [default: TWOPC_OUTBOX_BACKOFF or 0.2].",
)
@click.option("--name", default="", help="The relay's name in the logs.")
@click.option(
    "--retain",
    type=Duration(),
    default=None,
    metavar="DURATION",
    help="Delete outbox rows relayed longer ago than this (30s, 10m, 1h, 7d), in batches, "
    "never past any last-id relay's position [default: keep every row].",
)
@click.option(
    "--position",
    default=None,
    metavar="NAME",
    help="last-id: the name this relay keeps its positions under; a relay of another name "
    "is independent of it (its own positions, every message) [default: last-id, the "
    "strategy's competing relays].",
)
@click.option(
    "--destination",
    default=None,
    metavar="QUEUE",
    help="last-id: publish every message here instead of its row's destination.",
)
@click.option("--log-json", is_flag=True, hidden=True, help="Deprecated: TWOPC_LOG_FORMAT=json.")
def relay(
    mode: str,
    batch_size: int,
    poll_interval: float,
    policy: str | None,
    max_attempts: int | None,
    backoff: float | None,
    name: str,
    retain: float | None,
    position: str | None,
    destination: str | None,
    log_json: bool,
) -> None:
    """Publish what A committed to /queue/transfers.credit, until SIGTERM.

    Last-id relays of one --position name share the outbox's partitions; relays
    of different names each read every message, from their own positions, to
    their own --destination (independent relays, docs/outbox.md).
    """
    from scenarios.outbox.failures import RetrySettings
    from scenarios.outbox.relay import RelayConfig, make_relay

    _configure_logs(log_json)
    retry = RetrySettings.from_env(policy=policy, max_attempts=max_attempts, first_delay=backoff)
    config = RelayConfig(
        batch_size=batch_size,
        poll_interval=poll_interval,
        retry=retry,
        name=name or f"{mode}-{os.getpid()}",
        retain=retain,
    )
    if mode != "last-id" and (position or destination):
        raise click.BadParameter("--position and --destination are last-id options")
    if mode == "cdc" and retain is not None:
        raise click.BadParameter(
            "the CDC relay writes no outbox rows to clean", param_hint="--retain"
        )
    settings = _settings()
    worker = make_relay(
        mode,  # type: ignore[arg-type]
        settings,
        config,
        position=position,
        destination=destination,
    )
    metrics = serve_metrics(settings)
    if metrics is not None:
        metrics.watch_relay(worker)
    try:
        with stop_on_signals() as stop:
            worker.run(stop)
    finally:
        if metrics is not None:
            metrics.close()


@click.command()
@click.option(
    "--mode",
    type=click.Choice(["inbox", "2pc"]),
    default="inbox",
    show_default=True,
    help="inbox: one local B transaction per batch, duplicates absorbed by B's inbox table; "
    "2pc: each message in a global transaction (B's XA branch, the ACK in the broker's).",
)
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Unacknowledged messages held.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Messages per B commit (inbox), per global transaction (2pc) [default: 200].",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(min=0),
    default=None,
    metavar="MS",
    help="With --mode 2pc: milliseconds a batch waits for more messages after its first "
    "[default: 2].",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=None,
    help="Tries at a message that fails transiently before it is dead-lettered "
    "[default: TWOPC_CONSUMER_MAX_ATTEMPTS or 6].",
)
@click.option(
    "--asyncio",
    "use_asyncio",
    is_flag=True,
    help="With --mode 2pc: run on asyncio (AsyncCoordinator, AsyncActiveMQ) instead of threads.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON at the end.")
@click.option("--log-json", is_flag=True, hidden=True, help="Deprecated: TWOPC_LOG_FORMAT=json.")
def consumer(
    mode: str,
    prefetch: int,
    batch_size: int | None,
    max_wait: float | None,
    max_attempts: int | None,
    use_asyncio: bool,
    as_json: bool,
    log_json: bool,
) -> None:
    """Credit B from /queue/transfers.credit, exactly once in effect, until SIGTERM.

    A message it cannot apply goes to /queue/DLQ.transfers.credit ('twopc outbox failed').
    In 2pc mode it first recovers what an earlier 2pc consumer left prepared on B.
    """
    from scenarios.outbox.consumer import (
        DEFAULT_MAX_ATTEMPTS,
        MAX_ATTEMPTS_SETTING,
        Consumer,
        ConsumerFailed,
    )

    _configure_logs(log_json)
    if use_asyncio and mode != "2pc":
        raise click.BadParameter("--asyncio runs the 2pc consumer only", param_hint="--asyncio")
    if max_wait is not None and mode != "2pc":
        raise click.BadParameter(
            "--max-wait applies to --mode 2pc (the inbox consumer takes what has arrived)",
            param_hint="--max-wait",
        )
    if max_attempts is None:
        setting = os.environ.get(MAX_ATTEMPTS_SETTING) or str(DEFAULT_MAX_ATTEMPTS)
        if not setting.isdigit() or int(setting) < 1:
            raise click.BadParameter(
                f"{MAX_ATTEMPTS_SETTING}={setting!r} must be a whole number >= 1",
                param_hint="--max-attempts",
            )
        max_attempts = int(setting)
    settings = _settings()
    worker: Any
    if mode == "2pc":
        from scenarios.outbox.consumer_2pc_batch import DEFAULT_BATCH_SIZE, DEFAULT_MAX_WAIT

        batching: dict[str, Any] = {
            "batch_size": batch_size or DEFAULT_BATCH_SIZE,
            "max_wait": DEFAULT_MAX_WAIT if max_wait is None else max_wait / 1000,
            "prefetch": prefetch,
            "max_attempts": max_attempts,
        }
    if mode == "2pc" and use_asyncio:
        from scenarios.outbox.consumer_2pc_aio import AsyncTwoPhaseConsumer

        worker = AsyncTwoPhaseConsumer(settings, **batching)
    elif mode == "2pc":
        from scenarios.outbox.consumer_2pc import TwoPhaseConsumer

        worker = TwoPhaseConsumer(settings, **batching)
    else:
        worker = Consumer(
            settings, prefetch=prefetch, batch_size=batch_size or 200, max_attempts=max_attempts
        )
    metrics = serve_metrics(settings)
    if metrics is not None:
        metrics.watch_consumer(worker)
    try:
        with stop_on_signals() as stop:
            worker.run(stop)
    except ConsumerFailed as exc:
        _print_consumer_stats(worker.stats.as_dict(), as_json)
        click.echo(f"twopc: error: {exc}", err=True)
        raise SystemExit(1) from None
    finally:
        if metrics is not None:
            metrics.close()
    _print_consumer_stats(worker.stats.as_dict(), as_json)


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds between runs (a transfer reaches B up to this long after A committed it).",
)
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Rows copied per B transaction.",
)
@click.option("--once", is_flag=True, help="Run once (copy everything committed) and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON at the end.")
@click.option("--log-json", is_flag=True, hidden=True, help="Deprecated: TWOPC_LOG_FORMAT=json.")
def batch(interval: float, chunk: int, once: bool, as_json: bool, log_json: bool) -> None:
    """Copy A's committed debits to B as credits, every --interval seconds, until SIGTERM.

    Reads A as the read-only role twopc_batch_reader ('twopc transfer --reset'
    creates it) from the position recorded in B's batch_positions.
    """
    import psycopg

    from scenarios.outbox.batchjob import BATCH_CRASH_SETTING, BatchConfig, BatchFailed, BatchJob

    _configure_logs(log_json)
    job = BatchJob(
        _settings(), BatchConfig(interval=interval, chunk=chunk, name=f"batch-{os.getpid()}")
    )
    try:
        if once:
            job.crashes.arm_from_env(BATCH_CRASH_SETTING)
            try:
                job.run_once()
            finally:
                job.close()
        else:
            with stop_on_signals() as stop:
                job.run(stop)
    except (BatchFailed, psycopg.Error) as exc:
        click.echo(f"twopc: error: {' '.join(str(exc).split())}", err=True)
        raise SystemExit(1) from None
    if as_json:
        click.echo(json.dumps(job.stats.as_dict(), indent=2))
        return
    console.print(", ".join(f"{key} {value}" for key, value in job.stats.as_dict().items()))


def _print_consumer_stats(stats: dict[str, int], as_json: bool = False) -> None:
    """A consumer's counts at its end: one line (and what to run for dead letters), or JSON."""
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    console.print(", ".join(f"{key.replace('_', ' ')} {value}" for key, value in stats.items()))
    if stats.get("dead_lettered"):
        console.print(
            "'twopc outbox failed' lists the dead letters; 'twopc outbox requeue' "
            "sends them back once the cause is fixed"
        )


@click.group()
def outbox() -> None:
    """What did not get through: the relays' failure log and the consumer's dead letters."""


@outbox.command("failed")
@click.option("--all", "include_resent", is_flag=True, help="Also list what was sent again.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_failed(include_resent: bool, as_json: bool) -> None:
    """List the messages the relays gave up on, and those the consumer dead-lettered."""
    from scenarios.outbox.failures import list_failures

    settings = _settings()
    failures = list_failures(settings.pg_a, include_resent=include_resent)
    letters, unreachable = _dead_letters(settings)
    if as_json:
        out: dict[str, Any] = {
            "failure_log": [f.as_dict() for f in failures],
            "dead_letters": None if letters is None else [d.as_dict() for d in letters],
        }
        if unreachable:
            out["dead_letters_error"] = unreachable
        click.echo(json.dumps(out, indent=2))
        return
    _print_failures(failures)
    _print_dead_letters(letters, unreachable)


def _dead_letters(settings: Any) -> tuple[list[Any] | None, str]:
    """The dead letters of /queue/transfers.credit, or None and why the broker could not say."""
    from coordinator.errors import ParticipantError
    from scenarios.outbox.deadletter import list_dead_letters
    from scenarios.transfer.model import CREDIT_QUEUE as QUEUE
    from scenarios.wiring import open_stomp

    try:
        with open_stomp(settings, participant="dead-letters") as client:
            return list_dead_letters(client, QUEUE), ""
    except ParticipantError as exc:  # the failure log is worth showing without the broker
        return None, str(exc)


def _print_dead_letters(letters: list[Any] | None, unreachable: str) -> None:
    from scenarios.outbox.deadletter import dead_letter_queue
    from scenarios.transfer.model import CREDIT_QUEUE as QUEUE

    dlq = dead_letter_queue(QUEUE)
    if letters is None:
        console.print(f"{dlq}: cannot be read ({unreachable})")
        return
    if not letters:
        console.print(f"{dlq} is empty")
        return
    table = Table(title=f"{len(letters)} messages in {dlq}")
    table.add_column("transfer id", no_wrap=True)
    table.add_column("type")
    table.add_column("dead-lettered at (UTC)")
    table.add_column("tries")
    table.add_column("reason", min_width=30)
    for d in letters:
        table.add_row(
            d.transfer_id or "-",
            d.kind or "-",
            d.dead_lettered_at[:19].replace("T", " "),
            str(d.attempts),
            d.reason[:100],
        )
    console.print(table)
    console.print("'twopc outbox requeue' sends them back once the cause is fixed")


def _print_failures(failures: list[Any]) -> None:
    if not failures:
        console.print("the failure log is empty")
        return
    table = Table(title=f"{len(failures)} messages in the failure log")
    for column in ("transfer id", "relay", "attempts", "failed at", "resent at", "last error"):
        table.add_column(column)
    for f in failures:
        table.add_row(
            f.key,
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
    """Send the failure log's messages again (all, or the TRANSFER_IDS given).

    SIGTERM or SIGINT: the batch in hand is sent (or not) and recorded, no other
    is taken, the counts print, exit 143/130.
    """
    from scenarios.outbox.failures import retry_failures
    from scenarios.outbox.relay import StompPublisher

    settings = _settings()
    publisher = StompPublisher(settings)
    with stop_on_signals() as stop:
        try:
            report = retry_failures(
                settings.pg_a, publisher.publish, transfer_ids or None, stop=stop
            )
        finally:
            publisher.close()

        def summary() -> None:
            if as_json:
                click.echo(json.dumps(report.as_dict(), indent=2))
                return
            console.print(f"sent again: {len(report.sent)}, still failing: {len(report.failed)}")
            if report.error:
                console.print(f"last error: {report.error}")

        finish_run(stop, summary, status=1 if report.failed else 0)


@outbox.command("requeue")
@click.option(
    "--id",
    "transfer_ids",
    multiple=True,
    metavar="TRANSFER_ID",
    help="Requeue only this transfer's dead letter (repeatable); default: all.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_requeue(transfer_ids: tuple[str, ...], as_json: bool) -> None:
    """Send dead letters back to the queue they came from, once their cause is fixed.

    Each is taken off /queue/DLQ.transfers.credit and sent back in one broker
    transaction. Exit status 1 if a TRANSFER_ID given has no dead letter.
    """
    from scenarios.outbox.deadletter import requeue
    from scenarios.transfer.model import CREDIT_QUEUE as QUEUE
    from scenarios.wiring import open_stomp

    settings = _settings()
    with open_stomp(settings, participant="requeue") as client:
        report = requeue(client, QUEUE, transfer_ids or None)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console.print(f"requeued {len(report.requeued)} dead letters to {QUEUE}")
        if report.not_found:
            console.print(f"no dead letter for: {', '.join(report.not_found)}")
    if report.not_found:
        raise SystemExit(1)


@outbox.command("clean")
@click.option(
    "--older-than",
    type=Duration(),
    default="0s",
    show_default=True,
    metavar="DURATION",
    help="Keep rows relayed (or, last-id, written) less than this long ago (30s, 10m, 1h, 7d).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows per DELETE (each batch is its own short transaction).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def outbox_clean(older_than: float, batch: int, as_json: bool) -> None:
    """Delete relayed outbox rows on A, in batches.

    A status relay's rows go once sent, failed (the failure log keeps them) or
    ignored; a last-id row once every last-id relay's position has passed it,
    so the lowest position bounds what is deleted. Pending rows and rows a
    relay has yet to send stay. SIGTERM or SIGINT stops after the batch in hand.
    """
    import psycopg

    from outbox.clean import clean
    from scenarios.transfer.schema import TABLES

    settings = _settings()
    with stop_on_signals() as stop, psycopg.connect(settings.pg_a, autocommit=True) as conn:
        report = clean(conn, older_than=older_than, batch_size=batch, tables=TABLES, stop=stop)
        row = conn.execute(f"SELECT count(*) FROM {TABLES.outbox}").fetchone()
        left = int(row[0]) if row else 0

        def summary() -> None:
            if as_json:
                click.echo(json.dumps({**report.as_dict(), "rows_left": left}, indent=2))
                return
            console.print(
                f"deleted {report.deleted} relayed outbox rows in {report.batches} batches; "
                f"{left} rows left"
            )

        finish_run(stop, summary)
