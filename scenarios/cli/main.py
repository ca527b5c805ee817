"""The ``twopc`` command: its group (one error line, never a traceback), ``twopc demo``, and
the commands of the other modules of :mod:`scenarios.cli`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from coordinator import __version__
from scenarios.cli import bench as cli_bench
from scenarios.cli import doctor as cli_doctor
from scenarios.cli import fanout as cli_fanout
from scenarios.cli import lab as cli_lab
from scenarios.cli import log as cli_log
from scenarios.cli import outbox as cli_outbox
from scenarios.cli import recovery as cli_recovery
from scenarios.cli import retries as cli_retries
from scenarios.cli import stories as cli_stories
from scenarios.cli import torture as cli_torture
from scenarios.cli import transfer as cli_transfer
from scenarios.cli.errors import explain
from scenarios.cli.lab import open_lab, print_status
from scenarios.cli.progress import progress_bars, working
from scenarios.cli.settings import load_settings
from scenarios.cli.stories import run_stories
from scenarios.cli.transfer import print_batch
from scenarios.exit_status import EXIT_RUNTIME_ERROR
from scenarios.log_setup import configure as configure_logging
from scenarios.stopping import RunStopped, exit_stopped, finish_run, stop_on_signals

console = Console()


class TwopcGroup(click.Group):
    """Turns what a user can cause into one ``twopc: error:`` line, never a traceback.

    A usage error (a wrong option, argument or command) prints the usage, the
    hint to ``-h`` and the line, exit status 2; click's other errors and what
    scenarios.cli.errors recognises as the user's print the line, exit status 1.
    A run that gave up at a checkpoint after SIGTERM or SIGINT says so and exits
    128 + the signal (scenarios.stopping).
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            status = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            _show_usage_error(exc)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"twopc: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("twopc: error: aborted", err=True)
            sys.exit(EXIT_RUNTIME_ERROR)
        sys.exit(status if isinstance(status, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RunStopped as stopped:  # work that gave up at a checkpoint: no summary to print
            exit_stopped(stopped.stop)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            message = explain(exc)
            if message is None:
                raise
            click.echo(f"twopc: error: {message}", err=True)
            sys.exit(EXIT_RUNTIME_ERROR)


def _show_usage_error(exc: click.UsageError) -> None:
    """Click's usage and hint, then the error as the one ``twopc: error:`` line."""
    ctx = exc.ctx
    if ctx is not None:
        hint = ""
        if ctx.command.get_help_option(ctx) is not None:
            hint = f"Try '{ctx.command_path} -h' for help.\n"
        click.echo(f"{ctx.get_usage()}\n{hint}", err=True, color=ctx.color)
    click.echo(f"twopc: error: {exc.format_message()}", err=True)


@click.group(cls=TwopcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="twopc")
def main() -> None:
    """twopc: a durable two-phase-commit coordinator for PostgreSQL and ActiveMQ.

    Logs go to stderr as set by TWOPC_LOG_LEVEL and TWOPC_LOG_FORMAT (json for
    JSON lines), for every command. Shell completion: see docs/configuration.md.
    """
    configure_logging()


@main.command()
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Transfers in the batch.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Concurrent transfers of the batch.",
)
@click.option(
    "--bench/--no-bench",
    default=True,
    show_default=True,
    help="End with 'twopc bench --quick' (about five minutes on a 2-core machine).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the results (lab, scenarios, batch, bench) as one JSON document on stdout; "
    "the narration goes to stderr.",
)
def demo(count: int, concurrency: int, bench: bool, as_json: bool) -> None:
    """Bring the lab up, set up the schema, run the scenarios, a batch and a quick benchmark.

    SIGTERM or SIGINT: the step in hand (a scenario, the transfers in hand of the
    batch) finishes, the summary of what ran prints, exit 143/130.
    """
    from scenarios.stories import STORIES
    from scenarios.strategies import run_transfers
    from scenarios.transfer.model import plan, recover_and_reset

    shown = Console(stderr=True) if as_json else console
    report: dict[str, Any] = {}
    with stop_on_signals() as stop:
        shown.rule("twopc demo: the lab")
        with working("lab up: starting PostgreSQL A and B and ActiveMQ"):
            statuses = open_lab().up()
        report["lab"] = [s.__dict__ for s in statuses]
        if not as_json:
            print_status(statuses, False)
        settings = load_settings()
        recover_and_reset(settings, accounts=100, balance=10_000)
        shown.print("schema reset: 100 accounts of 10000 in A and in B; the transfer queues empty")
        shown.rule("scenarios")
        results = run_stories(list(STORIES), stop, shown)
        report["scenarios"] = results
        output: dict[str, Any] = {}
        if not stop.is_set():
            shown.rule(f"a batch: {count} transfers at concurrency {concurrency}")
            # The batch is checked on its own: stories of other strategies leave transfers
            # whose messages went elsewhere (a topic, a dead-letter queue) or, by design,
            # were lost.
            recover_and_reset(settings, accounts=100, balance=10_000)
            transfers = plan(count, accounts=100, seed=1)
            with progress_bars(transient=True) as progress:
                task = progress.add_task("demo batch (2pc)", total=len(transfers))
                output = run_transfers(
                    settings,
                    "2pc",
                    transfers,
                    concurrency=concurrency,
                    stop=stop,
                    on_done=lambda: progress.advance(task),
                )
            report["batch"] = output
            if not as_json:
                print_batch(output)
        ok = all(r["ok"] for r in results) and output.get("invariants", {}).get("ok", False)
        report["ok"] = ok

        def summary() -> None:
            if stop.is_set():
                report["stopped"] = f"{len(results)} of {len(STORIES)} scenarios run"
            if as_json:
                if not bench or stop.is_set() or not ok:
                    click.echo(json.dumps(report, indent=2, default=str))
                return
            console.rule("summary")
            for story in results:
                console.print(f"  {story['name']:34} {'ok' if story['ok'] else 'FAILED'}")
            if stop.is_set():
                console.print(report["stopped"])
            else:
                console.print("[green]every promise held[/]" if ok else "[red]something failed[/]")

        finish_run(stop, summary, status=0 if ok else 1)
        if bench:
            shown.rule("twopc bench --quick: 2PC against the outbox, CDC and naive dual write")
            out = Path(cli_bench.DEFAULT_OUT)
            report["bench"] = cli_bench.run_mode(
                "strategies", quick=True, out=out, as_json=False, printed=not as_json
            )
            if as_json:
                click.echo(json.dumps(report, indent=2, default=str))


# -- the commands of the other cli modules -------------------------------------

main.add_command(cli_lab.lab)
main.add_command(cli_recovery.recover)
main.add_command(cli_recovery.indoubt)
main.add_command(cli_transfer.transfer)
main.add_command(cli_stories.scenario)
main.add_command(cli_outbox.relay)
main.add_command(cli_outbox.consumer)
main.add_command(cli_fanout.fanout)
main.add_command(cli_outbox.batch)
main.add_command(cli_outbox.outbox)
main.add_command(cli_bench.bench)
main.add_command(cli_torture.torture)
main.add_command(cli_log.log)
main.add_command(cli_doctor.doctor)
main.add_command(cli_retries.retries)
