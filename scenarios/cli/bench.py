"""``twopc bench``: the strategies' comparison report, or the coordinator's overhead benchmark."""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.errors import ConfigurationError
from scenarios.cli.stopping import stop_on_signals

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
            "pip install 'twopc[bench]'"
        )


def invoked_command() -> str:
    """The command line as the user typed it (``twopc`` and its arguments)."""
    return shlex.join(["twopc", *sys.argv[1:]])


def progress_bars() -> Progress:
    """Progress bars on stderr, so that ``--json`` leaves stdout clean."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


@click.command("bench")
@click.option(
    "--overhead",
    is_flag=True,
    help="Measure the coordinator against a hand-written 2PC, SQLAlchemy and local commits.",
)
@click.option("--quick", is_flag=True, help="A short run (under two minutes).")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    show_default=True,
    help="Folder for the report, plots, raw data and histogram logs.",
)
@click.option(
    "--consumers",
    is_flag=True,
    help="Measure 'twopc consumer --mode inbox' against '--mode 2pc': latency per message, "
    "throughput, WAL bytes per message on B.",
)
@click.option(
    "--decisions",
    is_flag=True,
    help="Measure TWOPC_DECISIONS=file against postgres, with and without the broker: "
    "latency, throughput, forced log writes and WAL flushes per commit.",
)
@click.option(
    "--inflight",
    is_flag=True,
    help="Measure 1,000 transactions in flight (200 with --quick): the sync coordinator with "
    "a thread each against the asyncio coordinator with a task each (RSS, commits/s).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def bench(
    overhead: bool,
    quick: bool,
    out: Path,
    consumers: bool,
    decisions: bool,
    inflight: bool,
    as_json: bool,
) -> None:
    """Measure every transfer strategy (or, with --overhead, the coordinator's own cost).

    Runs on the lab (or whatever TWOPC_PG_A/B and TWOPC_STOMP point at) and
    resets the scenario's tables first. Progress goes to stderr. SIGTERM or
    SIGINT: the operations in hand finish, no report is written, exit 143/130.
    """
    from scenarios.cli.settings import load_settings

    require_bench_extra()
    settings = load_settings()
    command = invoked_command()
    out.mkdir(parents=True, exist_ok=True)
    with stop_on_signals():  # a measurement in hand finishes; no report is written
        if decisions:
            result = _run_decisions(
                settings, quick=quick, out=out, command=command, show=not as_json
            )
        elif inflight:
            result = _run_inflight(quick=quick, out=out, command=command, show=not as_json)
        elif consumers:
            result = _run_consumers(
                settings, quick=quick, out=out, command=command, show=not as_json
            )
        elif overhead:
            result = _run_overhead(
                settings, quick=quick, out=out, command=command, show=not as_json
            )
        else:
            from scenarios.bench import report as strategy_report

            with progress_bars() as progress:
                result = strategy_report.run_report(
                    settings, quick=quick, out=out, command=command, progress=progress
                )
            if not as_json:
                Console().print(f"report: {out / 'report.html'} and {out / 'report.md'}")
        if as_json:
            click.echo(json.dumps(result, indent=2, default=str))


def _run_overhead(
    settings: Any, *, quick: bool, out: Path, command: str, show: bool
) -> dict[str, Any]:
    from scenarios.bench import measure, overhead

    with progress_bars() as progress:
        result = overhead.run(settings, quick=quick, progress=progress)
    results = result.pop("_results")
    result["command"] = command
    measure.write_histogram_log(out / "overhead.hlog", results, comment=command)
    (out / "overhead.json").write_text(json.dumps(result, indent=2, default=str))
    markdown = overhead.render_markdown(result, command)
    (out / "overhead.md").write_text(markdown)
    if show:
        console = Console()
        console.print(Markdown(markdown))
        console.print(f"written: {out / 'overhead.md'}, overhead.json, overhead.hlog")
    return result


#: ``--consumers``: (messages for the throughput, messages for the latency), normal and quick.
CONSUMER_COUNTS = {False: (2_000, 200), True: (300, 30)}


def _run_consumers(
    settings: Any, *, quick: bool, out: Path, command: str, show: bool
) -> dict[str, Any]:
    from scenarios.bench import consumers

    count, latency_count = CONSUMER_COUNTS[quick]
    results = consumers.compare(settings, count=count, latency_count=latency_count)
    markdown = consumers.render_markdown(results, command)
    (out / "consumers.md").write_text(markdown)
    result: dict[str, Any] = {"command": command, "consumers": results}
    (out / "consumers.json").write_text(json.dumps(result, indent=2))
    if show:
        console = Console()
        console.print(Markdown(markdown))
        console.print(f"written: {out / 'consumers.md'}, consumers.json")
    return result


#: ``--decisions``: (interleaved rounds, per round, throughput seconds, cost transactions).
DECISIONS_PLAN = {False: (30, 20, 6.0, 300), True: (8, 10, 2.0, 60)}


def _run_decisions(
    settings: Any, *, quick: bool, out: Path, command: str, show: bool
) -> dict[str, Any]:
    from scenarios.bench import decisions

    rounds, per_round, seconds, cost_count = DECISIONS_PLAN[quick]
    result = decisions.compare(
        settings, rounds=rounds, per_round=per_round, seconds=seconds, cost_count=cost_count
    )
    result["command"] = command
    (out / "decisions.json").write_text(json.dumps(result, indent=2))
    markdown = decisions.render_markdown(result, command)
    (out / "decisions.md").write_text(markdown)
    if show:
        console = Console()
        console.print(Markdown(markdown))
        console.print(f"written: {out / 'decisions.md'}, decisions.json")
    return result


#: ``--inflight``: transactions in flight, normal and quick.
INFLIGHT_COUNTS = {False: 1_000, True: 200}


def _run_inflight(*, quick: bool, out: Path, command: str, show: bool) -> dict[str, Any]:
    from scenarios.bench import inflight

    results = inflight.run(INFLIGHT_COUNTS[quick])
    markdown = inflight.render_markdown(results, command)
    (out / "inflight.md").write_text(markdown)
    result: dict[str, Any] = {"command": command, "inflight": results}
    (out / "inflight.json").write_text(json.dumps(result, indent=2))
    if show:
        console = Console()
        console.print(Markdown(markdown))
        console.print(f"written: {out / 'inflight.md'}, inflight.json")
    return result
