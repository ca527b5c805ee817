"""The benchmark: histograms and runners, and tiny real runs of both benchmarks on the lab."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from coordinator.errors import ConfigurationError
from scenarios.bench import measure, overhead, performance_targets, report, side_by_side
from scenarios.bench.overhead_markdown import _side_by_side_cpu
from scenarios.cli.main import main
from tests.browser import open_page

# -- the measuring code, no services -----------------------------------------------------


def test_the_in_flight_figure_is_the_round_with_the_median_ratio() -> None:
    """Of three rounds, the one whose asyncio / threads ratio is the median is reported,
    with every round's commits/s, and the target row shows each round's ratio."""

    def round_of(asyncio: float, threads: float) -> list[dict[str, object]]:
        return [
            {"mode": "threads", "commits_per_second": threads, "rss_per_transaction_kib": 16.0},
            {"mode": "asyncio", "commits_per_second": asyncio, "rss_per_transaction_kib": 1.5},
        ]

    rounds = [round_of(600.0, 600.0), round_of(900.0, 450.0), round_of(800.0, 500.0)]
    chosen = {r["mode"]: r for r in performance_targets.median_round(rounds)}
    assert chosen["asyncio"]["commits_per_second"] == 800.0  # ratios 1.0, 2.0, 1.6
    assert chosen["threads"]["commits_per_second_rounds"] == [600.0, 450.0, 500.0]
    detail = performance_targets._inflight_detail(chosen, 1000)
    assert detail == (
        "1000 in flight: 800.0 / 500.0 commits/s (median of 3 rounds: 1.00, 2.00, 1.60)"
    )


def test_latencies_read_percentiles_back_in_milliseconds() -> None:
    """1..1000 ms recorded: p50 ~500 ms, p99 ~990 ms, max ~1000 ms (3 significant digits)."""
    lat = measure.Latencies("x")
    for ms in range(1, 1001):
        lat.record(ms / 1000)
    summary = lat.summary()
    assert summary["count"] == 1000
    assert summary["p50"] == pytest.approx(500, rel=0.01)
    assert summary["p99"] == pytest.approx(990, rel=0.01)
    assert summary["max"] == pytest.approx(1000, rel=0.01)
    assert measure.Latencies().summary() == {}


def test_open_loop_times_each_operation_from_its_intended_start() -> None:
    """One 200 ms stall on the only worker shows in the operations scheduled behind it."""
    stalled = threading.Event()

    def op(index: int) -> bool:
        if index == 0 and not stalled.is_set():
            stalled.set()
            time.sleep(0.2)
        return True

    result = measure.open_loop("stall", op, rate=100, duration=0.2, workers=1)
    assert result.committed == 20
    # A closed-loop timer would see 19 operations of ~0 ms; from the intended start,
    # the ones queued behind the stall waited up to ~190 ms.
    assert result.latencies.percentile(50) > 50
    assert result.latencies.summary()["max"] >= 190


def test_closed_loop_stops_at_its_count_and_counts_failures() -> None:
    """Every index runs once on the worker threads; False results are failures, not latencies."""
    seen: list[int] = []
    lock = threading.Lock()

    def op(index: int) -> bool:
        with lock:
            seen.append(index)
        return index % 2 == 0

    result = measure.closed_loop("count", op, concurrency=4, count=50)
    assert sorted(seen) == list(range(50))
    assert (result.committed, result.failed, result.latencies.count) == (25, 25, 25)


def test_interleaved_blocks_alternate_and_keep_one_result_per_block() -> None:
    """Blocks of each op alternate (shuffled per round); each block holds its own histogram."""
    order: list[str] = []
    ops = {name: (lambda n: lambda _i: order.append(n) is None)(name) for name in ("a", "b")}
    blocks = measure.interleaved_blocks(ops, rounds=5, per_round=3)
    assert [len(blocks[n]) for n in ("a", "b")] == [5, 5]
    assert all(b.latencies.count == 3 for n in ("a", "b") for b in blocks[n])
    runs = [order[i] for i in range(0, 30, 3)]
    assert sorted(runs[0:2]) == ["a", "b"] and sorted(runs[8:10]) == ["a", "b"]
    merged = measure.merge_blocks("a", blocks["a"])
    assert merged.committed == 15 and merged.latencies.count == 15


def test_histogram_log_lines_decode_to_the_recorded_histograms(tmp_path: Path) -> None:
    """Each tagged line of the log decodes back to a histogram with the run's count."""
    result = measure.closed_loop("decode", lambda _i: True, concurrency=1, count=7)
    path = tmp_path / "h.hlog"
    measure.write_histogram_log(path, [result], comment="test")
    lines = [line for line in path.read_text().splitlines() if line.startswith("Tag=")]
    assert len(lines) == 1 and lines[0].startswith("Tag=decode/closed/c1,")
    decoded = HdrHistogram.decode(lines[0].rsplit(",", 1)[1])
    assert decoded.get_total_count() == 7


def test_spread_and_ratio_summarise_repeated_runs() -> None:
    """spread gives median/min/max/stdev; ratio is None when the denominator is 0."""
    assert measure.spread([3.0, 1.0, 2.0]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "stdev": 1.0,
        "n": 3,
    }
    assert measure.ratio(3.0, 2.0) == 1.5
    assert measure.ratio(1.0, 0.0) is None


def test_side_by_side_ratios_are_ratios_of_the_medians_with_each_rounds_ratio() -> None:
    """The throughput ratios at 16 divide the coordinator's median throughput by each other
    contender's, keep every round's own ratio, and the target rows show both."""
    rounds = [
        {"coordinator": 800.0, "floor-seq": 640.0, "outbox-status": 1000.0},
        {"coordinator": 600.0, "floor-seq": 600.0, "outbox-status": 1200.0},
        {"coordinator": 900.0, "floor-seq": 700.0, "outbox-status": 1100.0},
    ]
    two = [{**rounds[0], "outbox-status": 1000.1}, {**rounds[0], "outbox-status": 1000.2}]
    # the median of two is their mean, 1000.1500000000001 in floating point: shown rounded
    assert side_by_side.summarise(two)["throughput_per_s"]["outbox-status"] == 1000.2
    side = {"rounds": rounds, **side_by_side.summarise(rounds)}
    assert side["throughput_per_s"] == {
        "coordinator": 800.0,
        "floor-seq": 640.0,
        "outbox-status": 1100.0,
    }
    assert side["ratios"]["coordinator/floor-seq"] == {
        "median": 1.25,
        "rounds": [1.25, 1.0, 1.286],
    }
    assert side["ratios"]["coordinator/outbox-status"]["median"] == 0.727
    rows = performance_targets.rows({"ratios": {}}, {"side_by_side_c16": side})
    by_figure = {row["figure"]: row for row in rows}
    outbox = by_figure[performance_targets.OUTBOX_RATIO.figure]
    assert (outbox["measured"], outbox["met"]) == (0.727, True)
    assert outbox["from"] == (
        "800.0 / 1100.0 /s, medians of 3 rounds side by side (each round: 0.80, 0.50, 0.82)"
    )
    sequential = by_figure[performance_targets.SEQUENTIAL.figure]
    assert (sequential["measured"], sequential["met"]) == (1.25, True)


def _outbox_row(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """The outbox target's row of the targets, from side-by-side ``rounds``."""
    side = {"rounds": rounds, **side_by_side.summarise(rounds)}
    rows = performance_targets.rows({"ratios": {}}, {"side_by_side_c16": side})
    return next(r for r in rows if r["figure"] == performance_targets.OUTBOX_RATIO.figure)


def test_outbox_row_shows_the_like_for_like_ratio_beside_the_targets_figure() -> None:
    """With outbox-status+event measured, the outbox target keeps its figure (the ratio to
    outbox-status) and its detail adds the ratio to the outbox that publishes the event."""
    rounds = [
        {"coordinator": 800.0, "outbox-status": 1000.0, "outbox-status+event": 900.0},
        {"coordinator": 600.0, "outbox-status": 1200.0, "outbox-status+event": 800.0},
        {"coordinator": 900.0, "outbox-status": 1100.0, "outbox-status+event": 1000.0},
    ]
    outbox = _outbox_row(rounds)
    assert (outbox["measured"], outbox["met"]) == (0.727, True)
    assert outbox["from"] == (
        "800.0 / 1100.0 /s, medians of 3 rounds side by side (each round: 0.80, 0.50, 0.82); "
        "like for like, against outbox-status+event (the event published too): 0.889, "
        "800.0 / 900.0 /s, medians of 3 rounds side by side (each round: 0.89, 0.75, 0.90)"
    )


def test_outbox_row_shows_the_coordinator_without_its_broker_against_outbox_status() -> None:
    """With coordinator-db measured, the outbox target keeps the coordinator's figure and its
    detail adds coordinator-db against outbox-status (neither publishes an event)."""
    rounds = [
        {"coordinator": 800.0, "outbox-status": 1000.0, "coordinator-db": 1000.0},
        {"coordinator": 600.0, "outbox-status": 1200.0, "coordinator-db": 1080.0},
        {"coordinator": 900.0, "outbox-status": 1100.0, "coordinator-db": 1210.0},
    ]
    ratios = side_by_side.summarise(rounds)["ratios"]
    assert ratios["coordinator-db/outbox-status"] == {"median": 0.982, "rounds": [1.0, 0.9, 1.1]}
    assert "outbox-status/coordinator-db" not in ratios
    outbox = _outbox_row(rounds)
    assert (outbox["measured"], outbox["met"]) == (0.727, True)
    assert outbox["from"] == (
        "800.0 / 1100.0 /s, medians of 3 rounds side by side (each round: 0.80, 0.50, 0.82); "
        "like for like without the event, coordinator-db (A and B, no broker) against "
        "outbox-status: 0.982, 1080.0 / 1100.0 /s, medians of 3 rounds side by side "
        "(each round: 1.00, 0.90, 1.10)"
    )


def test_side_by_side_cpu_at_16_is_a_table_of_each_contenders_processes_and_their_sum() -> None:
    """The overhead page shows each side-by-side contender's throughput at 16 and its CPU
    per transfer by process (a process it did not use shows '-'), summed, what the
    whole machine spent besides ('-' unmeasured) and the cores the sum kept busy at that
    throughput; no table without the figures."""
    side = {
        "throughput_per_s": {"coordinator": 980.4, "outbox-status": 1491.2},
        "cpu_ms_per_transfer": {
            "coordinator": {
                "python (twopc)": 0.6,
                "ActiveMQ (STOMP)": 0.4,
                measure.MACHINE_CPU: 1.25,
            },
            "outbox-status": {"python (twopc)": 0.3, "outbox relay": 0.125},
        },
    }
    assert _side_by_side_cpu(side)[-4:] == [
        "| contender | tx/s | python (twopc) | ActiveMQ (STOMP) | outbox relay | all "
        "| elsewhere on the machine | cores busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| coordinator | 980 | 0.600 | 0.400 | - | 1.000 | 0.250 | 0.98 |",
        "| outbox-status | 1491 | 0.300 | - | 0.125 | 0.425 | - | 0.63 |",
    ]
    assert _side_by_side_cpu({}) == []


def test_the_machines_busy_time_counts_this_processs_cpu() -> None:
    """A snapshot holds the whole machine's busy CPU seconds, which grow by at least what
    this process burns (to the clock tick)."""
    cpu = measure.ServiceCpu({})
    before = cpu.snapshot()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    after = cpu.snapshot()
    burnt = after[measure.PYTHON_CPU] - before[measure.PYTHON_CPU]
    assert burnt >= 0.3
    assert after[measure.MACHINE_CPU] - before[measure.MACHINE_CPU] >= burnt - 0.05, (
        before,
        after,
    )


def test_cpu_per_transfer_at_8_is_the_median_of_rounds_beside_floor_seqs() -> None:
    """The Python CPU target takes the coordinator's median CPU per transfer over the rounds
    at 8, by process; its row shows floor-seq's median and every round's pair, and is
    empty in a run without them."""
    python = measure.PYTHON_CPU
    rounds = [
        {"coordinator": {python: 0.9, "ActiveMQ": 0.5}, "floor-seq": {python: 0.8}},
        {"coordinator": {python: 0.6, "ActiveMQ": 0.3}, "floor-seq": {python: 0.7}},
        {"coordinator": {python: 0.7, "ActiveMQ": 0.4}, "floor-seq": {python: 0.9}},
        # a block that committed nothing has no figures
        {"coordinator": {}, "floor-seq": {python: 1.0}},
    ]
    summary = side_by_side.summarise_cpu(rounds)
    assert summary == {
        "coordinator": {python: 0.7, "ActiveMQ": 0.4},
        "floor-seq": {python: 0.85},
    }
    cpu = {"rounds": rounds, "cpu_ms_per_transfer": summary}
    rows = performance_targets.rows({"ratios": {}}, {"cpu_side_by_side_c8": cpu})
    row = next(r for r in rows if r["figure"] == performance_targets.PYTHON_CPU.figure)
    assert (row["measured"], row["met"]) == (0.7, True)
    assert row["from"] == (
        "hand-written, same run: floor-seq 0.850 ms; medians of 4 rounds side by side "
        "(each round, coordinator / floor-seq: 0.900 / 0.800, 0.600 / 0.700, 0.700 / 0.900 ms)"
    )
    # a run without the side-by-side figures has neither
    unmeasured = {r["figure"]: r for r in performance_targets.rows({"ratios": {}}, {})}
    assert unmeasured[performance_targets.PYTHON_CPU.figure] == {
        "figure": performance_targets.PYTHON_CPU.figure,
        "measured": None,
        "target": "<= 0.7",
        "met": None,
        "from": "",
    }


# -- tiny real runs on the lab -------------------------------------------------------------

TINY_OVERHEAD = overhead.Plan(
    rounds=2,
    per_round=4,
    seconds=0.4,
    concurrencies=(1, 8, 16),
    throughput_of=("floor", "floor-seq", "coordinator", "coordinator-db", "peer"),
    outcome_checks=3,
)

TINY_REPORT = report.ReportPlan(
    latency_count=8,
    repeats=2,
    concurrencies=(1, 4),
    seconds=0.3,
    rates=(40.0,),
    open_seconds=0.4,
    crash_transfers=9,
    crash_every=3,
    two_pc_crashes=("after_broker_commit",),
    phase_count=8,
    consumer_counts=(10, 2),
)


@pytest.mark.lab
def test_bench_overhead_writes_measured_figures(
    lab: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twopc bench overhead: every contender measured, R* counts by outcome, files written;
    the events each part of the run sent are drained before the next part starts."""
    monkeypatch.setattr(overhead.Plan, "for_mode", classmethod(lambda cls, quick: TINY_OVERHEAD))
    drained: list[int] = []
    real_drain = overhead.drain_events

    def counted_drain(settings: object) -> int:
        drained.append(real_drain(settings))  # type: ignore[arg-type]
        return drained[-1]

    monkeypatch.setattr(overhead, "drain_events", counted_drain)
    outcome = CliRunner().invoke(main, ["bench", "overhead", "--quick", "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    # After the latency run, then each throughput contender (floor, floor-seq, coordinator
    # send an event per transfer; coordinator-db and peer none), then the outcome costs.
    assert len(drained) == 2 + len(TINY_OVERHEAD.throughput_of), drained
    assert all(n > 0 for n in drained[:4]) and drained[4:6] == [0, 0], drained
    data = json.loads((tmp_path / "overhead.json").read_text())
    contenders = data["latency_c1"]["contenders"]
    assert list(contenders) == [
        "floor",
        "floor-marker",
        "floor-seq",
        "floor-at-once",
        "coordinator",
        "floor-db",
        "coordinator-db",
        "peer",
        "local-commit",
        "outbox-commit",
    ]
    for name, row in contenders.items():
        latency = row["latency_ms"]
        assert latency["count"] == 8 and 0 < latency["p50"] <= latency["max"], name
        assert row["cpu_ms_per_op"] > 0, name
    assert data["latency_c1"]["ratios"]["coordinator/floor"]["p50"] > 0
    assert data["throughput"]["runs"]["coordinator"]["16"]["committed"] > 0
    assert data["throughput"]["runs"]["floor-seq"]["16"]["committed"] > 0
    named = {t["target"] for t in data["targets"]}
    # The performance targets are in their own table only, each measured once (side by side).
    assert not any("Python CPU per committed transfer" in t or "floor-seq" in t for t in named)
    assert any("ActiveMQ CPU per transfer" in t for t in named), named
    by = data["by_outcome"]
    # Presumed abort: one forced write per commit without a broker, none otherwise.
    assert by["coordinator-db"]["commit"]["forced_log_writes_per_tx"] == 1.0
    assert by["coordinator-db"]["abort"]["outcomes"] == {"aborted": 3}
    assert by["coordinator-db"]["abort"]["forced_log_writes_per_tx"] == 0.0
    assert by["coordinator-db"]["read-only"]["forced_log_writes_per_tx"] == 0.0
    assert by["coordinator"]["commit"]["forced_log_writes_per_tx"] == 0.0
    assert by["coordinator"]["commit"]["marker_messages_per_tx"] == 1.0
    assert all(t["measured"] is not None for t in data["targets"])
    rows = data["performance_targets"]
    assert len(rows) == 7 and all(row["measured"] is not None for row in rows), rows
    assert all(row["met"] in (True, False) and row["target"] for row in rows), rows
    cpu = next(row for row in rows if row["figure"].startswith("Python CPU"))
    assert cpu["from"].startswith("hand-written, same run: floor-seq "), cpu
    side_c16 = data["measured_beside"]["side_by_side_c16"]
    assert side_c16["throughput_per_s"]["outbox-status+event"] > 0, side_c16
    outbox = next(row for row in rows if row["figure"] == performance_targets.OUTBOX_RATIO.figure)
    like_for_like = "; like for like, against outbox-status+event (the event published too): "
    assert like_for_like in outbox["from"], outbox
    assert side_c16["throughput_per_s"]["coordinator-db"] > 0, side_c16
    assert side_c16["ratios"]["coordinator-db/outbox-status"]["median"] > 0, side_c16
    assert "; like for like without the event, coordinator-db " in outbox["from"], outbox
    c16_cpu = side_c16["cpu_ms_per_transfer"]
    assert c16_cpu["coordinator"][measure.PYTHON_CPU] > 0, c16_cpu
    assert c16_cpu["outbox-status+event"]["outbox relay"] > 0, c16_cpu
    assert c16_cpu["outbox-status+event"]["outbox consumer"] > 0, c16_cpu
    coordinator_c16 = c16_cpu["coordinator"]
    assert coordinator_c16[measure.MACHINE_CPU] >= coordinator_c16[measure.PYTHON_CPU], c16_cpu
    assert "| all | elsewhere on the machine |" in (tmp_path / "overhead.md").read_text()
    side_cpu = data["measured_beside"]["cpu_side_by_side_c8"]
    assert len(side_cpu["rounds"]) == TINY_OVERHEAD.slices, side_cpu
    assert cpu["measured"] == side_cpu["cpu_ms_per_transfer"]["coordinator"][measure.PYTHON_CPU] > 0
    assert data["latency_c1"]["ratios"]["coordinator/floor-at-once"]["p50"] > 0
    assert "| figure | measured | target | met? |" in (tmp_path / "overhead.md").read_text()
    assert "## Side by side at concurrency 16: CPU ms per transfer by process" in (
        (tmp_path / "overhead.md").read_text()
    )
    assert (tmp_path / "overhead.md").read_text().startswith("# twopc overhead benchmark")
    assert "Tag=coordinator/interleaved/c1," in (tmp_path / "overhead.hlog").read_text()


@pytest.fixture(scope="module")
def tiny_report(lab: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real 'twopc bench' run of 2pc, outbox-status and naive; its output directory."""
    from scenarios.strategies import STRATEGIES

    out = tmp_path_factory.mktemp("report")
    subset = {name: STRATEGIES[name] for name in ("2pc", "outbox-status", "naive")}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(report, "registry", lambda: subset)
        monkeypatch.setattr(
            report.ReportPlan, "for_mode", classmethod(lambda cls, quick: TINY_REPORT)
        )
        outcome = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    return out


@pytest.mark.lab
def test_bench_report_compares_strategies_and_counts_crash_anomalies(tiny_report: Path) -> None:
    """twopc bench: report files with measured latency, convergence, cost; naive breaks, 2PC not."""
    tmp_path = tiny_report
    for name in ("report.md", "report.html", "data.json", "histograms.hlog", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "data.json").read_text())
    assert list(data["strategies"]) == ["2pc", "outbox-status", "naive"]
    for name, figures in data["strategies"].items():
        latency = figures["commit_latency_ms"]
        assert latency["count"] == 16 and 0 < latency["p50"] <= latency["max"], name
        assert figures["cost"]["wal_bytes_per_transfer_total"] > 0, name
    outbox = data["strategies"]["outbox-status"]
    assert outbox["not_converged"] == 0 and outbox["convergence_ms_c1"]["p50"] > 0
    assert data["strategies"]["2pc"]["cost"]["messages_per_transfer"] == 2.0
    assert data["phases_2pc"]["1"]["prepare"]["count"] == 8
    crashes = data["crashes"]
    assert crashes["2pc"]["after_broker_commit"]["anomalies"] == 0
    assert crashes["outbox-status"]["after-commit"]["anomalies"] == 0
    assert sum(p["anomalies"] for p in crashes["naive"].values()) > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "## Verdict" in markdown and "![" in markdown and data["command"] in markdown


@pytest.mark.lab
def test_bench_report_compares_the_inbox_consumer_with_the_2pc_consumer(tiny_report: Path) -> None:
    """twopc bench: the report measures both consumer modes side by side in one section."""
    data = json.loads((tiny_report / "data.json").read_text())
    assert [c["mode"] for c in data["consumers"]] == ["inbox", "2pc"]
    assert all(c["count"] == 10 and c["throughput_per_s"] > 0 for c in data["consumers"])
    markdown = (tiny_report / "report.md").read_text()
    assert "## Consuming: the inbox consumer against the 2pc consumer" in markdown
    assert "| --mode 2pc | 10 |" in markdown


@pytest.mark.lab
def test_report_html_opens_in_headless_chromium(tiny_report: Path) -> None:
    """report.html in headless Chromium: every image loads and the console stays silent."""
    page = open_page(tiny_report / "report.html")
    assert len(page.images) >= 4, page.images
    assert all(width > 0 for _, width in page.images), f"images not loaded: {page.images}"
    assert page.console == [], page.console


@pytest.mark.lab
def test_report_verdict_text_columns_are_left_aligned(tiny_report: Path) -> None:
    """The verdict's text columns are left-aligned in Markdown and in HTML; figures right."""
    markdown = (tiny_report / "report.md").read_text()
    verdict = markdown.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "| finding | behind it |\n| :--- | :--- |" in verdict
    assert "| strategy | n | p50 |" in markdown and "| :--- | ---: | ---: |" in markdown
    page = (tiny_report / "report.html").read_text()
    assert "<th class=text>finding</th><th class=text>behind it</th>" in page
    assert "td.text,th.text{text-align:left}" in page


def test_every_plot_draws_a_strategy_in_one_colour_and_style() -> None:
    """style_of: fixed for known strategies, distinct among them, stable for unknown names."""
    from scenarios.bench.report_pages import STYLES, style_of

    known = ["2pc", "outbox-status", "outbox-last-id", "cdc", "cdc-fanout", "naive"]
    assert len({style_of(name) for name in known}) == len(known)
    assert all(style_of(name) == STYLES[name] for name in known)
    assert style_of("some-future-strategy") == style_of("some-future-strategy")
    code = (
        "from scenarios.bench.report_pages import style_of; print(style_of('some-future-strategy'))"
    )
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == str(style_of("some-future-strategy")), "not stable across runs"


def test_latency_and_convergence_plots_give_a_strategy_the_same_line(tmp_path: Path) -> None:
    """The same strategy has the same colour and line style in the latency and convergence plots."""
    from scenarios.bench import report_pages

    drawn: list[tuple[str, str, str]] = []
    plt = report_pages._pyplot()
    real = plt.Axes.plot

    def spy(ax: object, *args: object, **kwargs: object) -> object:
        drawn.append(
            (str(kwargs.get("label")), str(kwargs.get("color")), str(kwargs.get("linestyle")))
        )
        return real(ax, *args, **kwargs)

    cdf = [[50.0, 1.0], [99.0, 2.0]]
    figures = {
        "commit_latency_cdf": cdf,
        "convergence_cdf": cdf,
        "throughput": {"1": {"throughput_per_s": 10.0}},
        "open_loop": {"5": {"latency_ms": {"p50": 1.0, "p99": 2.0}}},
    }
    data = {"strategies": {"2pc": figures, "outbox-status": figures, "cdc": figures}}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(plt.Axes, "plot", spy)
        report_pages.make_plots(tmp_path, data)
    for name in data["strategies"]:
        looks = {(c, s) for label, c, s in drawn if label.split(" ")[0] == name}
        assert looks == {report_pages.style_of(name)}, (name, looks)


# -- the bench extra ---------------------------------------------------------------------


def test_bench_without_its_extra_says_in_one_line_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """hdrhistogram missing (an ImportError): 'twopc bench' exits 1 with one line naming it."""
    monkeypatch.setitem(sys.modules, "hdrh", None)  # 'import hdrh' now raises ImportError
    out = tmp_path / "report"
    outcome = CliRunner().invoke(main, ["bench", "--quick", "--out", str(out)])
    assert outcome.exit_code == 1
    assert outcome.stderr == (
        "twopc: error: twopc bench needs the bench extra (hdrhistogram missing): "
        "pip install 'twopc-coordinator[bench]'\n"
    )
    assert not out.exists()


def test_the_core_commands_import_nothing_of_the_bench_extra() -> None:
    """The CLI and the modules its core commands use import no hdrh, SQLAlchemy or matplotlib."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import scenarios.cli.main, scenarios.wiring, scenarios.strategies\n"
        "import scenarios.outbox.pipeline, scenarios.stories, scenarios.lab.services\n"
        "import scenarios.torture.runner, scenarios.torture.report\n"
        "for name in ('lab', 'recover', 'indoubt', 'transfer', 'scenario', 'bench', 'torture'):\n"
        "    args = [name, '--help']\n"
        "    assert CliRunner().invoke(scenarios.cli.main.main, args).exit_code == 0, args\n"
        "print(sorted(m for m in ('hdrh', 'sqlalchemy', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.lab
def test_bench_consumers_measures_both_modes_side_by_side(
    lab: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twopc bench consumers: inbox and 2pc measured side by side, the 2pc consumer's
    throughput per batch size (and on asyncio), files written."""
    from scenarios.cli import bench as bench_cli
    from scenarios.outbox.consumer_2pc_batch import DEFAULT_BATCH_SIZE

    monkeypatch.setitem(bench_cli.CONSUMER_COUNTS, True, (20, 3))
    monkeypatch.setitem(bench_cli.CONSUMER_CURVE, True, ((1, 5), 10))
    outcome = CliRunner().invoke(main, ["bench", "consumers", "--quick", "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads((tmp_path / "consumers.json").read_text())
    curve = result["batch_curve"]
    assert [(p["mode"], p["batch_size"]) for p in curve] == [
        ("2pc", 1),
        ("2pc", 5),
        ("2pc-asyncio", DEFAULT_BATCH_SIZE),
    ]
    assert [p["count"] for p in curve] == [10, 10, 10]
    assert all(p["throughput_per_s"] > 0 for p in curve) and result["ratio_2pc_to_inbox"] > 0
    assert len(result["rounds"]) == 1 and result["ratio_of_medians"] == result["ratio_2pc_to_inbox"]
    rows = result["consumers"]
    assert [r["mode"] for r in rows] == ["inbox", "2pc"]
    for row in rows:
        assert row["count"] == 20 and row["throughput_per_s"] > 0, row
        assert row["wal_bytes_per_message"] > 0, row
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["max"], row
    assert "| `--mode 2pc` | 20 |" in (tmp_path / "consumers.md").read_text()


@pytest.mark.lab
def test_bench_decisions_commits_every_transfer_in_each_mode(
    lab: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twopc bench decisions: the four coordinators (with and without the broker, the file
    log and postgres mode) commit every transfer, A's work ended before B's; only the file
    log of a coordinator without the broker forces a write per commit."""
    from scenarios.cli import bench as bench_cli

    monkeypatch.setitem(bench_cli.DECISIONS_PLAN, True, (2, 3, 0.3, 5))
    outcome = CliRunner().invoke(main, ["bench", "decisions", "--quick", "--out", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads((tmp_path / "decisions.json").read_text())
    modes = ["broker/file", "broker/postgres", "db/file", "db/postgres"]
    latency = result["latency_ms_concurrency_1"]
    assert [m for m, row in latency.items() if row["count"] == 6] == modes, latency
    assert all(result["throughput_concurrency_8"][m]["per_s"] > 0 for m in modes), result
    costs = result["costs_per_commit"]
    assert [costs[m]["committed"] for m in modes] == [5, 5, 5, 5], costs
    forced = [costs[m]["forced_log_writes_per_commit"] for m in modes]
    assert forced == [0.0, 0.0, 1.0, 0.0], costs


def test_bench_consumers_refuses_unbounded_counts() -> None:
    """The consumer bench takes bounded counts only, and says which in one line."""
    from scenarios.bench import consumers

    with pytest.raises(ConfigurationError, match=r"1\.\.5000 messages"):
        consumers.compare(None, count=10**6, latency_count=1)  # type: ignore[arg-type]
