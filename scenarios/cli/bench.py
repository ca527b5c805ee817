"""``twopc bench [strategies|overhead|consumers|inflight|decisions]``: the measurements."""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markdown import Markdown

from coordinator.errors import ConfigurationError
from scenarios.bench.parts import PARTS, names, part
from scenarios.cli.progress import progress_bars, working
from scenarios.stopping import stop_on_signals

DEFAULT_OUT = "twopc-report"

#: What the bench extra installs: module imported -> distribution to install.
BENCH_EXTRA = {"hdrh": "hdrhistogram", "sqlalchemy": "SQLAlchemy", "matplotlib": "matplotlib"}


def require_bench_extra() -> None:
    """ConfigurationError, in one line, when a package of the bench extra is not installed."""
    missing = []
    for module, distribution in BENCH_EXTRA.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise ConfigurationError(
            f"twopc bench needs the bench extra ({', '.join(missing)} missing): "
            "pip install 'twopc-coordinator[bench]'"
        )


def invoked_command() -> str:
    """The command line as the user typed it (``twopc`` and its arguments)."""
    return shlex.join(["twopc", *sys.argv[1:]])


#: The bench modes, in the order ``twopc bench -h`` lists them: name -> what it measures.
MODES = {
    "strategies": "Every transfer strategy compared: latency, convergence, cost, crash behaviour.",
    "overhead": "The coordinator against a hand-written 2PC, SQLAlchemy and local commits.",
    "consumers": "'twopc consumer --mode inbox' against '--mode 2pc': latency per message, "
    "throughput, WAL bytes per message on B.",
    "inflight": "1,000 transactions in flight (200 with --quick): the sync coordinator with a "
    "thread each against the asyncio coordinator with a task each, in one process or two "
    "(RSS, commits/s); decisions where TWOPC_DECISIONS says.",
    "decisions": "TWOPC_DECISIONS=file against postgres, with and without the broker: latency, "
    "throughput, forced log writes and WAL flushes per commit.",
}


F = TypeVar("F", bound=Callable[..., Any])


def _common(command: F) -> F:
    """--quick, --out and --json, shared by 'twopc bench' and each of its subcommands."""
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the results as JSON on stdout."
    )(command)
    command = click.option(
        "--out",
        "out",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_OUT,
        show_default=True,
        help="Folder for the report, plots, raw data and histogram logs.",
    )(command)
    return click.option(
        "--quick",
        is_flag=True,
        help=(
            "A short run: fewer, shorter measurements (the whole report in about five "
            "minutes on a 2-core machine, a subcommand in under two)."
        ),
    )(command)


def _deprecated_flag(name: str) -> Callable[[F], F]:
    return click.option(
        f"--{name}",
        "deprecated_modes",
        flag_value=name,
        multiple=True,
        hidden=True,
        help=f"Deprecated: 'twopc bench {name}'.",
    )


@click.group("bench", invoke_without_command=True)
@_common
@_deprecated_flag("overhead")
@_deprecated_flag("consumers")
@_deprecated_flag("inflight")
@_deprecated_flag("decisions")
@click.pass_context
def bench(
    ctx: click.Context,
    quick: bool,
    out: Path,
    as_json: bool,
    deprecated_modes: tuple[str, ...],
) -> None:
    """Measure: bare, every transfer strategy (as 'twopc bench strategies').

    Runs on the lab (or whatever TWOPC_PG_A/B and TWOPC_STOMP point at) and
    resets the scenario's tables first. Progress goes to stderr (on a
    terminal). SIGTERM or SIGINT: the operations in hand finish, no report is
    written, exit 143/130. The flags --overhead, --consumers, --inflight and
    --decisions of earlier versions still work and say which subcommand
    replaces them.
    """
    modes = list(dict.fromkeys(deprecated_modes))
    if len(modes) > 1:
        flags = " and ".join(f"--{m}" for m in modes)
        raise click.UsageError(f"{flags} are two bench modes: run one subcommand at a time")
    if modes and ctx.invoked_subcommand is not None:
        raise click.UsageError(
            f"--{modes[0]} and the subcommand {ctx.invoked_subcommand!r} name two modes"
        )
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"quick": quick, "out": out, "as_json": as_json}
        return
    mode = modes[0] if modes else "strategies"
    if modes:
        click.echo(f"twopc: warning: --{mode} is deprecated: use 'twopc bench {mode}'", err=True)
    run_mode(mode, quick=quick, out=out, as_json=as_json)


def _subcommand(mode: str) -> None:
    @bench.command(mode, help=MODES[mode])
    @_common
    @click.pass_context
    def command(ctx: click.Context, quick: bool, out: Path, as_json: bool) -> None:
        given = ctx.obj or {}  # 'twopc bench --quick overhead' is 'twopc bench overhead --quick'
        run_mode(
            mode,
            quick=quick or given.get("quick", False),
            out=out if out != Path(DEFAULT_OUT) else given.get("out", out),
            as_json=as_json or given.get("as_json", False),
        )


for _mode in MODES:
    _subcommand(_mode)
for _part in PARTS:
    MODES[_part.name] = _part.help
    _subcommand(_part.name)


def run_mode(
    mode: str, *, quick: bool, out: Path, as_json: bool, printed: bool = True
) -> dict[str, Any]:
    """Run bench ``mode`` (a key of MODES) and write its files to ``out``.

    The result is printed (as JSON with ``as_json``) unless ``printed`` is False.
    """
    from scenarios.cli.settings import load_settings

    require_bench_extra()
    settings = load_settings()
    command = invoked_command()
    out.mkdir(parents=True, exist_ok=True)
    with stop_on_signals():  # a measurement in hand finishes; no report is written
        if mode == "decisions":
            with working("bench decisions: file against postgres"):
                result = _run_decisions(settings, quick=quick, out=out, command=command)
        elif mode == "inflight":
            with working("bench inflight: threads against tasks"):
                result = _run_inflight(quick=quick, out=out, command=command)
        elif mode == "consumers":
            with working("bench consumers: inbox against 2pc"):
                result = _run_consumers(settings, quick=quick, out=out, command=command)
        elif mode == "overhead":
            result = _run_overhead(settings, quick=quick, out=out, command=command)
        elif mode in names():
            with working(f"bench {mode}"):
                result = _run_part(settings, mode, quick=quick, out=out, command=command)
        else:
            from scenarios.bench import report as strategy_report

            with progress_bars() as progress:
                result = strategy_report.run_report(
                    settings, quick=quick, out=out, command=command, progress=progress
                )
        if not printed:
            pass
        elif as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        elif mode == "strategies":
            Console().print(f"report: {out / 'report.html'} and {out / 'report.md'}")
        else:
            console = Console()
            console.print(Markdown((out / f"{mode}.md").read_text()))
            console.print(f"written: {out / (mode + '.md')}, {mode}.json")
    return result


def _run_overhead(settings: Any, *, quick: bool, out: Path, command: str) -> dict[str, Any]:
    from scenarios.bench import measure, overhead, overhead_markdown

    with progress_bars() as progress:
        result = overhead.run(settings, quick=quick, progress=progress)
    results = result.pop("_results")
    result["command"] = command
    measure.write_histogram_log(out / "overhead.hlog", results, comment=command)
    (out / "overhead.json").write_text(json.dumps(result, indent=2, default=str))
    markdown = overhead_markdown.render_markdown(result, command)
    (out / "overhead.md").write_text(markdown)
    return result


def _run_part(settings: Any, name: str, *, quick: bool, out: Path, command: str) -> dict[str, Any]:
    """A further part of the report (scenarios.bench.parts), run alone."""
    from scenarios.bench.report_pages import part_markdown

    result = part(name).run(settings, quick=quick)
    result["command"] = command
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(part_markdown(name, result, command))
    return result


#: ``--consumers``: (messages for the throughput, messages for the latency), normal and quick.
CONSUMER_COUNTS = {False: (2_000, 200), True: (300, 30)}
#: ``--consumers``: the 2pc consumer's batch sizes measured (messages each), normal and quick.
CONSUMER_CURVE = {False: ((1, 10, 50, 100, 200, 500), 2_000), True: ((10,), 300)}
#: ``--consumers``: interleaved throughput rounds after the first (normal and quick).
CONSUMER_ROUNDS = {False: 2, True: 0}


def _run_consumers(settings: Any, *, quick: bool, out: Path, command: str) -> dict[str, Any]:
    from scenarios.bench import consumers
    from scenarios.outbox.consumer_2pc_batch import DEFAULT_BATCH_SIZE

    count, latency_count = CONSUMER_COUNTS[quick]
    results = consumers.compare(settings, count=count, latency_count=latency_count)
    by_mode = {r["mode"]: r["throughput_per_s"] for r in results}
    more = consumers.interleaved(settings, rounds=CONSUMER_ROUNDS[quick], count=count)
    readings = [by_mode, *more]
    sizes, curve_count = CONSUMER_CURVE[quick]
    curve = consumers.batch_curve(settings, sizes, count=curve_count)
    curve += consumers.batch_curve(
        settings, (DEFAULT_BATCH_SIZE,), count=curve_count, mode="2pc-asyncio"
    )
    markdown = (
        consumers.render_markdown(results, command)
        + "\nThroughput, interleaved rounds (the first is the table above's):\n\n"
        + consumers.render_rounds(readings)
        + "\nThe 2pc consumer's throughput by batch size (a stored backlog, the default "
        + "--max-wait):\n\n"
        + consumers.render_curve(curve)
    )
    (out / "consumers.md").write_text(markdown)
    result: dict[str, Any] = {
        "command": command,
        "consumers": results,
        "ratio_2pc_to_inbox": consumers.ratio(results),
        "rounds": readings,
        "ratio_of_medians": consumers.ratio_of_medians(readings),
        "batch_curve": curve,
    }
    (out / "consumers.json").write_text(json.dumps(result, indent=2))
    return result


#: ``--decisions``: (interleaved rounds, per round, throughput seconds, cost transactions).
DECISIONS_PLAN = {False: (30, 20, 6.0, 300), True: (8, 10, 2.0, 60)}


def _run_decisions(settings: Any, *, quick: bool, out: Path, command: str) -> dict[str, Any]:
    from scenarios.bench import decisions

    rounds, per_round, seconds, cost_count = DECISIONS_PLAN[quick]
    result = decisions.compare(
        settings, rounds=rounds, per_round=per_round, seconds=seconds, cost_count=cost_count
    )
    result["command"] = command
    (out / "decisions.json").write_text(json.dumps(result, indent=2))
    markdown = decisions.render_markdown(result, command)
    (out / "decisions.md").write_text(markdown)
    return result


#: ``--inflight``: transactions in flight, normal and quick.
INFLIGHT_COUNTS = {False: 1_000, True: 200}


def _run_inflight(*, quick: bool, out: Path, command: str) -> dict[str, Any]:
    from scenarios.bench import inflight

    results = inflight.run(INFLIGHT_COUNTS[quick])
    markdown = inflight.render_markdown(results, command)
    (out / "inflight.md").write_text(markdown)
    result: dict[str, Any] = {"command": command, "inflight": results}
    (out / "inflight.json").write_text(json.dumps(result, indent=2))
    return result
