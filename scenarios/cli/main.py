"""The ``twopc`` command line: the lab, the coordinator's tools, the scenarios and reports."""

from __future__ import annotations

import json
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from coordinator import __version__
from coordinator.errors import ConfigurationError
from scenarios.cli import bench as cli_bench
from scenarios.cli import doctor as cli_doctor
from scenarios.cli import fanout as cli_fanout
from scenarios.cli import log as cli_log
from scenarios.cli import outbox as cli_outbox
from scenarios.cli import retries as cli_retries
from scenarios.cli import torture as cli_torture
from scenarios.cli.errors import explain
from scenarios.cli.progress import progress_bars, working
from scenarios.config import APIS, home_dir
from scenarios.exit_status import EXIT_IN_DOUBT, EXIT_RUNTIME_ERROR
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


# -- lab ---------------------------------------------------------------------


@main.group()
def lab() -> None:
    """The embedded lab: two PostgreSQL clusters and an ActiveMQ broker on 127.0.0.1."""


def _lab() -> Any:
    from scenarios.lab.services import Lab

    return Lab(home_dir())


def _print_status(statuses: list[Any], as_json: bool) -> None:
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
        statuses = _lab().up()
    _print_status(statuses, as_json)


@lab.command("down")
@click.option("--json", "as_json", is_flag=True, help="Print what was stopped as JSON.")
def lab_down(as_json: bool) -> None:
    """Stop exactly the processes 'up' started."""
    stopped = _lab().down()
    if as_json:
        click.echo(json.dumps({"stopped": list(stopped)}, indent=2))
        return
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def lab_status(as_json: bool) -> None:
    """Each service, its port, pid and state."""
    _print_status(_lab().status(), as_json)


@lab.command("env")
def lab_env() -> None:
    """Shell exports pointing twopc at the lab: eval "$(twopc lab env)"."""
    for name, value in _lab().settings_env().items():
        click.echo(f"export {name}={shlex.quote(value)}")


# -- the coordinator's tools ---------------------------------------------------


def _settings() -> Any:
    from scenarios.cli.settings import load_settings

    return load_settings()


def _print_recovery(items: list[Any], as_json: bool, extra: dict[str, Any]) -> None:
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


@main.command()
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

    report = run_recovery(_settings(), fence_timeout=fence_timeout)
    _print_recovery(
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

    done = recover_dead(_settings(), fence_timeout=fence_timeout)
    if as_json:
        click.echo(json.dumps({"peers": [p.as_dict() for p in done]}, indent=2))
    elif not done:
        console.print("no dead coordinator left anything behind")
    for peer in done if not as_json else []:
        console.rule(f"coordinator {peer.peer}: {peer.seconds:.3f} s")
        if peer.report is None:
            console.print(f"not recovered: {peer.error}")
            continue
        _print_recovery(peer.report.items, False, {"resolved": peer.report.resolved})
    if not all(p.resolved for p in done):
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def indoubt(as_json: bool) -> None:
    """List what is in doubt and what recovery would do; changes nothing.

    Exits 0 when nothing is in doubt and 3 when something is (for a cron job's alert).
    """
    from scenarios.wiring import in_doubt

    items = in_doubt(_settings())
    _print_recovery(
        items,
        as_json,
        {}
        if as_json
        else {"note": "markers were read without fencing: a live coordinator may still commit"},
    )
    if items:
        sys.exit(EXIT_IN_DOUBT)


# -- the transfer scenario -------------------------------------------------------


@main.command()
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
    settings = _settings()
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
                _print_batch(output)

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


def _print_batch(output: dict[str, Any]) -> None:
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


# -- scenarios and the demo ------------------------------------------------------


@main.group()
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


def _run_story(name: str, shown: Console | None) -> dict[str, Any]:
    """Scenario ``name``: its name, whether it kept its promise, its lines (shown on ``shown``)."""
    from scenarios.stories import STORIES

    story = STORIES[name](_settings())
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
        results = _run_stories(names, stop, None if as_json else console)

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


def _run_stories(
    names: list[str], stop: threading.Event, shown: Console | None
) -> list[dict[str, Any]]:
    """Each scenario of ``names`` in turn, until ``stop`` (scenarios.cli.main._run_story)."""
    results: list[dict[str, Any]] = []
    for name in names:
        if stop.is_set():
            break
        results.append(_run_story(name, shown))
    return results


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
    help="End with 'twopc bench --quick' (about two minutes).",
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
            statuses = _lab().up()
        report["lab"] = [s.__dict__ for s in statuses]
        if not as_json:
            _print_status(statuses, False)
        settings = _settings()
        recover_and_reset(settings, accounts=100, balance=10_000)
        shown.print("schema reset: 100 accounts of 10000 in A and in B; the transfer queues empty")
        shown.rule("scenarios")
        results = _run_stories(list(STORIES), stop, shown)
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
                _print_batch(output)
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
