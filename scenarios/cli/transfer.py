"""``twopc transfer``: the transfer scenario's batches, by any strategy, on threads or asyncio."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console

from coordinator.errors import ConfigurationError
from scenarios.cli import outbox as cli_outbox
from scenarios.cli.errors import explain
from scenarios.cli.progress import progress_bars
from scenarios.cli.settings import load_settings
from scenarios.config import APIS
from scenarios.stopping import finish_run, stop_on_signals

console = Console()


@click.command()
@click.option(
    "--reset",
    "do_reset",
    is_flag=True,
    help="(Re)create the schema and balances and empty the queue.",
)
@click.option(
    "--accounts",
    type=click.IntRange(min=1),
    default=None,
    help="Accounts per database [default: with --reset 100, else the count the last reset "
    "stored; transfers to accounts beyond it abort].",
)
@click.option(
    "--balance",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="Starting balance.",
)
@click.option(
    "--count", type=click.IntRange(min=0), default=0, show_default=True, help="Transfers to run."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Concurrent transfers.",
)
@click.option("--seed", type=int, default=None, help="Seed for accounts and amounts.")
@click.option(
    "--strategy",
    default="2pc",
    show_default=True,
    type=click.Choice(
        [
            "2pc",
            "outbox-status",
            "outbox-last-id",
            "cdc",
            "cdc-fanout",
            "naive",
            "naive-send-first",
            "batch",
            "thread",
            "thread-sync",
        ]
    ),
    help="How the transfer is made atomic (non-2pc: see scenarios.strategies).",
)
@click.option(
    "--api",
    type=click.Choice(APIS),
    default="threads",
    show_default=True,
    help="The coordinator the 2pc strategy runs on: Coordinator with --concurrency threads, "
    "or AsyncCoordinator with --concurrency tasks on one event loop.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Read A, B and the queue back and check the invariants.",
)
@click.option(
    "--no-pipeline",
    is_flag=True,
    help="Only write: start no relay, consumer or batch job here (they run elsewhere: "
    "'twopc relay' and 'twopc consumer', 'twopc fanout', 'twopc batch'); the checks wait "
    "for the convergence they bring about (with --no-check nothing waits for B).",
)
@click.option(
    "--consumer-mode",
    type=click.Choice(["inbox", "2pc"]),
    default="inbox",
    show_default=True,
    help="With --no-pipeline: the mode of the consumer running elsewhere (where B records "
    "what it applied).",
)
@click.option(
    "--converge-timeout",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    help="Seconds the checks wait for B to converge.",
)
def transfer(
    do_reset: bool,
    accounts: int | None,
    balance: int,
    count: int,
    concurrency: int,
    seed: int | None,
    strategy: str,
    api: str,
    as_json: bool,
    check: bool,
    no_pipeline: bool,
    consumer_mode: str,
    converge_timeout: float,
) -> None:
    """Run transfers: debit A, credit B, publish a transfer.completed event — atomically.

    Give --count N, --reset, or both (reset first). A progress bar shows on
    stderr when it is a terminal.
    """
    from scenarios.strategies import RunFailed, run_transfers
    from scenarios.strategies.twopc_aio import require_asyncio_version
    from scenarios.transfer.model import DEFAULT_ACCOUNTS, plan, recover_and_reset
    from scenarios.transfer.results import BatchFailed

    if not count and not do_reset:
        raise click.UsageError("nothing to do: give --count N (transfers to run), --reset, or both")
    if api == "asyncio":
        try:
            require_asyncio_version(strategy)
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from None
    settings = load_settings()
    with stop_on_signals() as stop:
        if do_reset:
            accounts = accounts or DEFAULT_ACCOUNTS
            recover_and_reset(settings, accounts=accounts, balance=balance)
            if not as_json:
                console.print(f"reset: {accounts} accounts of {balance} in A and in B, queue empty")
        output: dict[str, Any] = {"strategy": strategy, "api": api}
        if count and not stop.is_set():
            accounts = _plan_accounts(settings, accounts)
            transfers = plan(count, accounts=accounts, seed=seed)
            metrics = cli_outbox.serve_metrics(settings)  # a long run is watched like a worker
            try:
                with progress_bars(transient=True) as progress:
                    task = progress.add_task(f"transfer ({strategy})", total=len(transfers))
                    output = run_transfers(
                        settings,
                        strategy,
                        transfers,
                        api=api,
                        concurrency=concurrency,
                        check=check,
                        converge_timeout=converge_timeout,
                        pipeline_here=not no_pipeline,
                        consumer=consumer_mode,
                        stop=stop,
                        on_done=lambda: progress.advance(task),
                    )
            except RunFailed as failed:  # the results so far print, then the one line
                output = failed.output
                stop.fail(_explained(failed.__cause__ or failed))
            except BatchFailed as failed:  # a transfer raised: what ran, then the one line
                if failed.result is None:
                    raise
                output = {"strategy": strategy, "api": api, **failed.result.as_dict()}
                stop.fail(_explained(failed))
            finally:
                if metrics is not None:
                    metrics.close()
        if stop.is_set():
            output["error" if stop.error else "stopped"] = stop.describe()

        def summary() -> None:
            if as_json:
                click.echo(json.dumps(output, indent=2))
            elif "committed" in output:
                print_batch(output)

        finish_run(stop, summary)
    if count and output.get("convergence_error"):
        click.echo(f"twopc: error: {output['convergence_error']}", err=True)
        sys.exit(1)
    if count and output.get("invariants") and not output["invariants"]["ok"]:
        sys.exit(1)


def _explained(exc: BaseException) -> str:
    """The one line for ``exc`` (scenarios.cli.errors); a bug is raised again (a traceback)."""
    message = explain(exc)
    if message is None:
        raise exc
    return message


def _plan_accounts(settings: Any, given: int | None) -> int:
    """--accounts if given, else the count the last reset stored (checking A's and B's tables)."""
    from scenarios.transfer.model import stored_accounts

    stored = stored_accounts(settings)
    if given is not None:
        return given
    if stored is None:
        raise ConfigurationError(
            "the schema records no account count (it predates this version); run "
            "'twopc transfer --reset' or give --accounts"
        )
    return stored


def print_batch(output: dict[str, Any]) -> None:
    """A batch's summary: outcomes, latencies, why transfers aborted, the invariants."""
    lat = output.get("latency_ms", {})
    on = " (asyncio)" if output.get("api") == "asyncio" else ""
    console.print(
        f"[bold]{output['strategy']}{on}[/]: {output['committed']} committed, "
        f"{output['aborted']} aborted, {output['in_doubt']} in doubt "
        f"in {output['seconds']:.2f} s ({output['throughput_per_s']}/s)"
    )
    if output.get("heuristic_mixed"):
        console.print(
            f"[red]{output['heuristic_mixed']} heuristic-mixed[/]: a branch's work committed "
            "on its own (see abort reasons)"
        )
    if lat:
        console.print("latency ms: " + ", ".join(f"{k} {v:.2f}" for k, v in lat.items()))
    if output.get("abort_reasons"):
        console.print(f"abort reasons: {output['abort_reasons']}")
    if output.get("stopped"):
        console.print(
            f"{output['stopped']}: the transfers in hand finished, "
            f"{output.get('not_started', 0)} not started"
        )
    if output.get("checks_skipped"):
        console.print(f"checks skipped: {output['checks_skipped']}")
    inv = output.get("invariants")
    if inv:
        verdict = "[green]all hold[/]" if inv["ok"] else "[red]VIOLATED[/]"
        console.print(
            f"invariants {verdict}: money conserved {inv['money_conserved']}, "
            f"atomicity violations {inv['atomicity_violations']}, duplicates "
            f"{inv['duplicate_messages']}, prepared left {len(inv['prepared_left'])}"
        )
