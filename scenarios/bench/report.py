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
- for 2PC, the latency split by phase (a coordinator doing the same work).

It writes report.md, report.html, PNG plots, data.json (all figures) and
histograms.hlog (every HDR histogram, HdrHistogram log format); the pages
themselves are drawn by scenarios.bench.report_pages.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from rich.progress import Progress

from coordinator.failpoints import failpoint_env
from coordinator.states import Outcome
from scenarios.bench import measure, overhead
from scenarios.bench import report_pages as pages
from scenarios.config import Settings
from scenarios.transfer import invariants
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.wiring import open_coordinator

ACCOUNTS = 10_000
BALANCE = 1_000_000_000
#: Crash points of the 2PC strategy that the report kills a child process at.
TWO_PC_CRASHES_QUICK = ("after_prepare", "after_broker_commit")
TWO_PC_CRASHES_FULL = (
    "after_prepare",
    "before_broker_commit",
    "after_broker_commit",
    "after_decision",
    "after_commit_prepared",
)


@dataclass(frozen=True)
class ReportPlan:
    """How much of everything the report runs."""

    latency_count: int  # transfers per latency run at concurrency 1
    repeats: int  # latency runs per strategy (their spread is reported)
    concurrencies: tuple[int, ...]
    seconds: float  # each closed-loop throughput point
    rates: tuple[float, ...]  # open-loop offered loads, transfers per second
    open_seconds: float
    crash_transfers: int  # transfers per crash run
    crash_every: int  # the n-th transfer crashes
    two_pc_crashes: tuple[str, ...]
    phase_count: int  # transfers of the 2PC phase-split run
    slices: int = 1  # throughput runs alternate the concurrencies in this many slices
    #: The consume side (scenarios.bench.consumers): messages for the throughput and for
    #: the latency of each consumer mode; (0, 0) leaves the section out.
    consumer_counts: tuple[int, int] = (300, 30)

    @classmethod
    def for_mode(cls, quick: bool) -> ReportPlan:
        if quick:
            return cls(
                latency_count=60,
                repeats=2,
                concurrencies=(1, 2, 4, 8, 16, 32),
                seconds=0.6,
                rates=(100.0, 300.0),
                open_seconds=1.2,
                crash_transfers=30,
                crash_every=5,
                two_pc_crashes=TWO_PC_CRASHES_QUICK,
                phase_count=60,
            )
        return cls(
            latency_count=300,
            repeats=5,
            concurrencies=(1, 2, 4, 8, 16, 32),
            seconds=6.0,
            rates=(50.0, 100.0, 200.0, 300.0, 400.0, 500.0),
            open_seconds=5.0,
            crash_transfers=200,
            crash_every=7,
            two_pc_crashes=TWO_PC_CRASHES_FULL,
            phase_count=400,
            slices=4,
            consumer_counts=(2_000, 200),
        )


def registry() -> Mapping[str, Callable[[], Any]]:
    """The strategies to compare: scenarios.strategies.STRATEGIES."""
    from scenarios.strategies import STRATEGIES

    return STRATEGIES


# -- one strategy's performance ------------------------------------------------------


class _Transfers:
    """Unique transfers for a strategy's runs (scenario.plan is finite; this is not)."""

    def __init__(self, seed: int) -> None:
        self.source = overhead.TransferSource(accounts=ACCOUNTS, seed=seed)

    def op(self, strategy: Any) -> measure.Op:
        def run(_index: int) -> bool:
            outcome, _ = strategy.run_one(self.source.next())
            return bool(outcome is Outcome.COMMITTED)

        return run


def reset_lab(settings: Settings) -> None:
    """Resolve what earlier runs left in doubt, then reset tables, queue and slot."""
    open_coordinator(settings).close()
    scenario.reset(settings, accounts=ACCOUNTS, balance=BALANCE)


def measure_strategy(
    settings: Settings,
    name: str,
    plan: ReportPlan,
    progress: Progress | None,
    seed: int,
) -> tuple[dict[str, Any], list[measure.RunResult], dict[str, measure.Latencies]]:
    """Latency, throughput, open-loop, convergence and cost figures of strategy ``name``."""
    from scenarios.outbox import pipeline

    reset_lab(settings)
    strategy = registry()[name]()
    strategy.prepare(settings, concurrency=max(plan.concurrencies))
    running = None
    if strategy.relay_mode is not None:
        # Relays and the consumer in their own processes, as they would be deployed.
        running = pipeline.for_strategy(settings, strategy, processes=True).start()
    transfers = _Transfers(seed)
    op = transfers.op(strategy)
    steps = plan.repeats + len(plan.concurrencies) + len(plan.rates) + 1
    task = progress.add_task(f"{name}", total=steps) if progress is not None else None

    def step() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    results: list[measure.RunResult] = []
    histograms: dict[str, measure.Latencies] = {}
    out: dict[str, Any] = {"strategy": name, "relay_mode": strategy.relay_mode}
    try:
        measure.closed_loop(name, op, concurrency=1, count=5)  # warm-up
        if running is not None:
            # The relay and consumer processes are starting: measure once they deliver.
            pipeline.wait_converged(settings, set(strategy.committed_at), timeout=60.0)
        strategy.committed_at.clear()
        wal_before = overhead.wal_bytes(settings)
        stats_before = _coordinator_stats(strategy)
        # Client-visible latency at concurrency 1, repeated.
        repeats = []
        for _ in range(plan.repeats):
            repeats.append(measure.closed_loop(name, op, concurrency=1, count=plan.latency_count))
            step()
        results += repeats
        unloaded_ids = set(strategy.committed_at)
        latency = measure.merged(repeats, f"{name}/commit")
        histograms[f"{name}/commit-latency-c1"] = latency
        out["commit_latency_ms"] = latency.summary()
        out["commit_latency_spread"] = {
            key: measure.spread(r.latencies.summary().get(key, 0.0) for r in repeats)
            for key in ("p50", "p99")
        }
        out["commit_latency_cdf"] = latency.cdf(60)
        # Throughput against concurrency, in alternating slices (noise hits all alike).
        slices: dict[int, list[measure.RunResult]] = {c: [] for c in plan.concurrencies}
        order = list(plan.concurrencies)
        for _ in range(plan.slices):
            for concurrency in order:
                slices[concurrency].append(
                    measure.closed_loop(
                        name, op, concurrency=concurrency, duration=plan.seconds / plan.slices
                    )
                )
            order.reverse()
        out["throughput"] = {}
        for concurrency, runs in slices.items():
            run = measure.merge_blocks(name, runs)
            results.append(run)
            out["throughput"][str(concurrency)] = run.as_dict()
            step()
        # Latency against offered load.
        out["open_loop"] = {}
        for rate in plan.rates:
            run = measure.open_loop(
                name, op, rate=rate, duration=plan.open_seconds, workers=max(plan.concurrencies)
            )
            results.append(run)
            out["open_loop"][f"{rate:g}"] = run.as_dict()
            step()
        # Convergence: every committed transfer credited in B through the consumer.
        committed_at = dict(strategy.committed_at)
        if running is not None:
            missing = pipeline.wait_converged(settings, set(committed_at), timeout=120.0)
            lags = pipeline.convergence_latencies(settings, committed_at)
            out["not_converged"] = len(missing)
            for label, ids in (("c1", unloaded_ids), ("all", set(lags))):
                hist = measure.Latencies(f"{name}/convergence-{label}")
                for tid in ids & set(lags):
                    hist.record(lags[tid] / 1000.0)
                histograms[f"{name}/convergence-{label}"] = hist
                out[f"convergence_ms_{label}"] = hist.summary()
            out["convergence_cdf"] = histograms[f"{name}/convergence-c1"].cdf(60)
            if strategy.relay_mode == "batch":
                interval = running.config.poll_interval
                out["convergence_note"] = (
                    f"the batch interval ({interval:g} s): the next run copies it"
                )
        elif hasattr(strategy, "drain") and not getattr(strategy, "synchronous", True):
            # The thread pool: the caller heard "committed" before B's credit and the send.
            strategy.drain(120.0)
            converged_at: dict[str, float] = strategy.converged_at
            out["not_converged"] = len(set(committed_at) - set(converged_at))
            for label, ids in (("c1", unloaded_ids), ("all", set(committed_at))):
                hist = measure.Latencies(f"{name}/convergence-{label}")
                for tid in ids & set(converged_at):
                    hist.record(max(0.0, converged_at[tid] - committed_at[tid]))
                histograms[f"{name}/convergence-{label}"] = hist
                out[f"convergence_ms_{label}"] = hist.summary()
            out["convergence_cdf"] = histograms[f"{name}/convergence-c1"].cdf(60)
            out["convergence_note"] = "the pool's queue: B's credit and the send after the answer"
        else:
            out["not_converged"] = 0
            out["convergence_ms_c1"] = out["convergence_ms_all"] = {}
            out["convergence_note"] = "B is credited inside the client's commit"
        step()
        wal_after = overhead.wal_bytes(settings)
        committed = len(committed_at)
        out["committed"] = committed
        out["cost"] = _costs(
            strategy, stats_before, wal_before, wal_after, committed, settings, running is not None
        )
    finally:
        if running is not None:
            running.stop()
        strategy.close()
        if progress is not None and task is not None:
            progress.remove_task(task)
    return out, results, histograms


def _coordinator_stats(strategy: Any) -> dict[str, Any]:
    coordinator = getattr(strategy, "coordinator", None)
    return dict(coordinator.stats()) if coordinator is not None else {}


def _costs(
    strategy: Any,
    stats_before: Mapping[str, Any],
    wal_before: Mapping[str, int],
    wal_after: Mapping[str, int],
    committed: int,
    settings: Settings,
    relayed: bool,
) -> dict[str, Any]:
    """WAL bytes, forced decision-log writes and messages per committed transfer."""
    if not committed:
        return {}
    wal = {db: (wal_after[db] - wal_before[db]) / committed for db in wal_after}
    cost: dict[str, Any] = {
        "wal_bytes_per_transfer": {k: round(v) for k, v in wal.items()},
        "wal_bytes_per_transfer_total": round(sum(wal.values())),
    }
    stats = _coordinator_stats(strategy)
    if stats:
        done = stats["committed"] - stats_before.get("committed", 0)
        forced = stats["forced_log_writes"] - stats_before.get("forced_log_writes", 0)
        business = stats["business_messages"] - stats_before.get("business_messages", 0)
        markers = stats["marker_messages"] - stats_before.get("marker_messages", 0)
        cost["forced_log_writes_per_transfer"] = round(forced / done, 4) if done else None
        cost["messages_per_transfer"] = round((business + markers) / done, 3) if done else None
        cost["messages_note"] = "business message + commit marker"
    else:
        cost["forced_log_writes_per_transfer"] = 0.0
        duplicates = _duplicates_absorbed(settings) if relayed else 0
        cost["messages_per_transfer"] = round(1 + duplicates / committed, 3)
        cost["messages_note"] = (
            "one message; redeliveries absorbed by the inbox counted"
            if relayed
            else "one message, sent after A and B committed"
        )
    return cost


def _duplicates_absorbed(settings: Settings) -> int:
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute("SELECT coalesce(sum(duplicates), 0) FROM inbox").fetchone()
    return int(row[0]) if row else 0


# -- anomalies under injected crashes ------------------------------------------------


def crash_anomalies(settings: Settings, name: str, plan: ReportPlan, seed: int) -> dict[str, Any]:
    """For each crash point of the strategy: transfers, crashes, anomalies after convergence."""
    strategy_type = registry()[name]
    points = plan.two_pc_crashes if name == "2pc" else tuple(strategy_type().crash_points)
    out: dict[str, Any] = {}
    for point in points:
        reset_lab(settings)
        if name == "2pc":
            out[point] = _crash_2pc_child(settings, point, plan)
        else:
            out[point] = _crash_in_process(settings, name, point, plan, seed)
    return out


def _crash_in_process(
    settings: Settings, name: str, point: str, plan: ReportPlan, seed: int
) -> dict[str, Any]:
    """The writer abandons every n-th transfer at ``point``; then relays converge; count."""
    from scenarios.outbox import pipeline

    strategy = registry()[name]()
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash(point, every=plan.crash_every, action="abandon")
    transfers = scenario.plan(plan.crash_transfers, accounts=ACCOUNTS, seed=seed)
    try:
        batch = run_batch(transfers, strategy.run_one, concurrency=4)
    finally:
        strategy.close()  # the thread pool runs what is still queued first
    unseen = strategy.stats()  # the thread pool's errors nobody heard of, work dropped
    missing: set[str] = set()
    if strategy.relay_mode is not None:
        with pipeline.for_strategy(settings, strategy):
            missing = pipeline.wait_converged(settings, timeout=60.0)
    found = invariants.anomalies(settings, strategy.relay_mode)
    how = f"abandon every {plan.crash_every}th transfer at {point}"
    if unseen.get("unseen_errors"):
        how += f"; {unseen['unseen_errors']} errors in the pool never reached the caller"
    if unseen.get("work_dropped"):
        how += f"; {unseen['work_dropped']} queued transfers died with the process"
    return {
        "how": how,
        "transfers": len(transfers),
        "crashed": batch.outcomes["in-doubt"],
        "committed": batch.outcomes["committed"],
        "not_converged": len(missing),
        "anomalies": len(found),
        "examples": found[:5],
        **{k: v for k, v in unseen.items() if k in ("unseen_errors", "work_dropped")},
    }


def _crash_2pc_child(settings: Settings, point: str, plan: ReportPlan) -> dict[str, Any]:
    """SIGKILL a ``twopc transfer`` child at failpoint ``point``, recover, then count."""

    env = {
        **os.environ,
        **settings.as_env(),
        **failpoint_env(f"{point}=kill@{plan.crash_every}"),
    }
    command = [
        sys.executable,
        "-m",
        "scenarios.cli",
        "transfer",
        "--count",
        str(plan.crash_transfers),
        "--concurrency",
        "4",
        "--accounts",
        str(ACCOUNTS),
        "--no-check",
        "--json",
    ]
    child = subprocess.run(command, env=env, capture_output=True, timeout=120, check=False)
    coordinator = open_coordinator(settings)  # recovery resolves what the kill left
    recovery = coordinator.last_recovery
    coordinator.close()
    found = invariants.anomalies(settings, None)
    return {
        "how": f"SIGKILL of the coordinator's process at {point} (hit {plan.crash_every}), "
        "then recovery",
        "transfers": plan.crash_transfers,
        "crashed": 1 if child.returncode == -9 else 0,
        "committed": len(invariants.transfer_amounts(settings.pg_a)),
        "recovered_in_doubt": len(getattr(recovery, "items", []) or []),
        "not_converged": 0,
        "anomalies": len(found),
        "examples": found[:5],
    }


# -- the 2PC phase split ---------------------------------------------------------------


def phase_split(settings: Settings, plan: ReportPlan, seed: int) -> dict[str, Any]:
    """Per-phase latency of the 2PC transfer at concurrency 1 and 8 (Transaction.timings)."""
    out: dict[str, Any] = {}
    source = overhead.TransferSource(accounts=ACCOUNTS, seed=seed)
    for concurrency in (1, 8):
        contender = overhead.CoordinatorContender(settings, concurrency=concurrency)
        try:
            op = overhead.op_of(contender, source)
            measure.closed_loop("2pc", op, concurrency=concurrency, count=2 * concurrency)
            contender.split = overhead.PhaseSplit()
            run = measure.closed_loop("2pc", op, concurrency=concurrency, count=plan.phase_count)
        finally:
            contender.close()
        out[str(concurrency)] = {"total": run.latencies.summary(), **contender.split.summary()}
    return out


# -- the machine ---------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_output(args: Sequence[str]) -> str:
    if shutil.which(args[0]) is None:
        return "unknown"
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine_info(settings: Settings) -> dict[str, Any]:
    """The machine, the versions and the durability settings the figures were measured with."""
    with psycopg.connect(settings.pg_a) as conn:
        pg = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {
            p: _version(p)
            for p in ("psycopg", "stomp.py", "SQLAlchemy", "hdrhistogram", "matplotlib", "twopc")
        },
        "postgresql": pg,
        "activemq": _command_output(["dpkg-query", "-W", "-f", "${Version}", "activemq"]),
        "activemq_journal": "KahaDB journalDiskSyncStrategy=always (the lab's setting)",
        "git_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "load_average": list(os.getloadavg()),
    }


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
