"""The comparison report: ``twopc bench [--quick] [--out DIR]`` over every strategy in the registry.

For each strategy of scenarios.strategies.STRATEGIES, on a freshly reset lab
with the same durability everywhere (fsync and synchronous_commit on, KahaDB
journal synced on every commit, persistent messages):

- client-visible commit latency at concurrency 1 (HDR; repeated runs and
  their spread);
- convergence latency (client commit -> B holds the credit and the consumer
  has taken the message; relays and consumer run as child processes);
- throughput against concurrency (closed loop) and latency against offered
  load (open loop, timed from the intended start);
- cost per transfer: WAL bytes (the WAL insert position of A and B), decision-log
  forced writes, messages;
- anomalies under injected crashes, once everything has converged;
- for 2PC, the latency split by phase (a coordinator doing the same work);
- the further parts of scenarios.bench.parts, each a section of its own.

It writes report.md, report.html, PNG plots, data.json (all figures) and
histograms.hlog (every HDR histogram, HdrHistogram log format); the pages
themselves are drawn by scenarios.bench.report_pages.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.progress import Progress

from scenarios.bench import measure, parts
from scenarios.bench import report_pages as pages
from scenarios.bench.crash_anomalies import crash_anomalies
from scenarios.bench.machine import machine_info
from scenarios.bench.report_plan import ReportPlan
from scenarios.bench.strategy_runs import measure_strategy, phase_split, reset_lab
from scenarios.config import Settings
from scenarios.strategies import STRATEGIES


def registry() -> Mapping[str, Callable[[], Any]]:
    """The strategies to compare, by name: scenarios.strategies.STRATEGIES."""
    return STRATEGIES


# -- anomalies under injected crashes ------------------------------------------------


# -- the machine ---------------------------------------------------------------------------


# -- the whole report ----------------------------------------------------------------------


def run_report(
    settings: Settings,
    *,
    quick: bool,
    out: Path,
    command: str,
    progress: Progress | None = None,
    strategies: Sequence[str] | None = None,
    plan: ReportPlan | None = None,
) -> dict[str, Any]:
    """Measure every strategy, write the report into ``out``; return the data (JSON-able)."""
    plan = plan or ReportPlan.for_mode(quick)
    names = list(strategies or registry())
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "command": command,
        "quick": quick,
        "started": started,
        "started_iso": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "plan": asdict(plan),
        "machine": machine_info(settings),
        "strategies": {},
        "crashes": {},
    }
    results: list[measure.RunResult] = []
    histograms: dict[str, measure.Latencies] = {}
    overall = progress.add_task("strategies", total=len(names) * 2 + 1) if progress else None
    for seed, name in enumerate(names, 1):
        figures, runs, hists = measure_strategy(settings, name, plan, progress, seed)
        data["strategies"][name] = figures
        results += runs
        histograms.update(hists)
        if progress is not None and overall is not None:
            progress.advance(overall)
    if "2pc" in names:
        reset_lab(settings)
        data["phases_2pc"] = phase_split(settings, plan, seed=99)
    if progress is not None and overall is not None:
        progress.advance(overall)
    for seed, name in enumerate(names, 100):
        data["crashes"][name] = crash_anomalies(settings, name, plan, seed)
        if progress is not None and overall is not None:
            progress.advance(overall)
    count, latency_count = plan.consumer_counts
    if count and latency_count:
        from scenarios.bench import consumers

        data["consumers"] = consumers.compare(settings, count=count, latency_count=latency_count)
        reset_lab(settings)
    data["parts"] = {}
    for name in plan.parts:
        data["parts"][name] = parts.part(name).run(settings, quick=quick)
        reset_lab(settings)
    data["verdict"] = pages.verdict(data["strategies"], data["crashes"])
    data["load_after"] = list(os.getloadavg())
    data["seconds"] = time.time() - started
    write_outputs(out, data, results, histograms)
    return data


def write_outputs(
    out: Path,
    data: dict[str, Any],
    results: Sequence[measure.RunResult],
    histograms: Mapping[str, measure.Latencies],
) -> None:
    """report.md, report.html, the PNGs, data.json and histograms.hlog."""
    plots = pages.make_plots(out, data)
    data["plots"] = plots
    parts = pages.sections(data, plots)
    (out / "report.md").write_text(pages.render_markdown(data, parts))
    (out / "report.html").write_text(pages.render_html(data, parts))
    (out / "data.json").write_text(json.dumps(data, indent=2, default=str))
    extra = [
        measure.RunResult(name, "histogram", 1, hist, started_at=data["started"])
        for name, hist in histograms.items()
    ]
    measure.write_histogram_log(
        out / "histograms.hlog", [*results, *extra], comment=data["command"]
    )
