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
- cost per transfer: WAL bytes (pg_stat_wal of A and B), decision-log
  forced writes, messages;
- anomalies under injected crashes, once everything has converged;
- for 2PC, the latency split by phase (a coordinator doing the same work).

It writes report.md, report.html, PNG plots, data.json (all figures) and
histograms.hlog (every HDR histogram, HdrHistogram log format).
"""

from __future__ import annotations

import html
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

from coordinator.states import Outcome
from scenarios import transfer as scenario
from scenarios.bench import measure, overhead
from scenarios.config import Settings
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
            seconds=4.0,
            rates=(50.0, 100.0, 200.0, 300.0, 400.0, 500.0),
            open_seconds=5.0,
            crash_transfers=200,
            crash_every=7,
            two_pc_crashes=TWO_PC_CRASHES_FULL,
            phase_count=400,
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
    from scenarios.strategies import pipeline

    reset_lab(settings)
    strategy = registry()[name]()
    strategy.prepare(settings, concurrency=max(plan.concurrencies))
    running = None
    if strategy.relay_mode is not None:
        # Relays and the consumer in their own processes, as they would be deployed.
        running = pipeline.Pipeline(settings, strategy.relay_mode, processes=True).start()
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
        # Throughput against concurrency.
        out["throughput"] = {}
        for concurrency in plan.concurrencies:
            run = measure.closed_loop(name, op, concurrency=concurrency, duration=plan.seconds)
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
    from scenarios.strategies import pipeline

    strategy = registry()[name]()
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash(point, every=plan.crash_every, action="abandon")
    transfers = scenario.plan(plan.crash_transfers, accounts=ACCOUNTS, seed=seed)
    try:
        batch = scenario.run_batch(transfers, strategy.run_one, concurrency=4)
    finally:
        strategy.close()
    missing: set[str] = set()
    if strategy.relay_mode is not None:
        with pipeline.Pipeline(settings, strategy.relay_mode):
            missing = pipeline.wait_converged(settings, timeout=60.0)
    found = pipeline.anomalies(settings, strategy.relay_mode)
    return {
        "how": f"abandon every {plan.crash_every}th transfer at {point}",
        "transfers": len(transfers),
        "crashed": batch.outcomes["in-doubt"],
        "committed": batch.outcomes["committed"],
        "not_converged": len(missing),
        "anomalies": len(found),
        "examples": found[:5],
    }


def _crash_2pc_child(settings: Settings, point: str, plan: ReportPlan) -> dict[str, Any]:
    """SIGKILL a ``twopc transfer`` child at failpoint ``point``, recover, then count."""
    from scenarios.strategies import pipeline

    env = {
        **os.environ,
        **settings.as_env(),
        "TWOPC_FAILPOINTS": f"{point}=kill@{plan.crash_every}",
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
    found = pipeline.anomalies(settings, None)
    return {
        "how": f"SIGKILL of the coordinator's process at {point} (hit {plan.crash_every}), "
        "then recovery",
        "transfers": plan.crash_transfers,
        "crashed": 1 if child.returncode == -9 else 0,
        "committed": len(scenario.transfer_ids(settings.pg_a)),
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


# -- the verdict ---------------------------------------------------------------------------


def _p(data: Mapping[str, Any], name: str, key: str, field: str) -> float | None:
    value = data.get(name, {}).get(key, {}).get(field)
    return None if value is None else float(value)


def verdict(strategies: Mapping[str, Any], crashes: Mapping[str, Any]) -> list[dict[str, str]]:
    """Plain-language findings, each with the figures behind it."""
    rows: list[dict[str, str]] = []
    base = "outbox-status" if "outbox-status" in strategies else None
    if "2pc" in strategies and base:
        d50 = _diff(strategies, "2pc", base, "p50")
        d99 = _diff(strategies, "2pc", base, "p99")
        if d50 is not None and d99 is not None:
            rows.append(
                {
                    "finding": f"2PC {_adds(d50)} at p50 and {_adds(d99)} at p99 to the "
                    f"client's commit, compared with the outbox's local commit ({base})",
                    "figures": _latency_pair(strategies, "2pc")
                    + f" vs {_latency_pair(strategies, base)}",
                }
            )
    for name in strategies:
        conv = strategies[name].get("convergence_ms_c1") or {}
        if conv:
            rows.append(
                {
                    "finding": f"{name} makes B lag behind the client's commit by "
                    f"{conv['p50']:.1f} ms at p50 and {conv['p99']:.1f} ms at p99 "
                    "(concurrency 1)",
                    "figures": f"under load (all runs): p99 "
                    f"{strategies[name]['convergence_ms_all'].get('p99', 0):.0f} ms, max "
                    f"{strategies[name]['convergence_ms_all'].get('max', 0):.0f} ms",
                }
            )
    if "2pc" in strategies:
        rows.append(
            {
                "finding": "with 2PC, B holds the credit and the message is on the queue when "
                "the commit returns: no lag",
                "figures": "convergence 0 by construction",
            }
        )
    best = {
        name: max((r["throughput_per_s"] for r in d["throughput"].values()), default=0.0)
        for name, d in strategies.items()
    }
    if best:
        rows.append(
            {
                "finding": "peak throughput (closed loop, best concurrency): "
                + ", ".join(f"{n} {v:.0f}/s" for n, v in sorted(best.items(), key=lambda x: -x[1])),
                "figures": "transfers committed per second by the client",
            }
        )
    costs = {n: d.get("cost", {}) for n, d in strategies.items()}
    if costs:
        rows.append(
            {
                "finding": "WAL written per transfer (A + B, relays and consumer included): "
                + ", ".join(
                    f"{n} {c.get('wal_bytes_per_transfer_total', 0) / 1024:.1f} KiB"
                    for n, c in costs.items()
                ),
                "figures": "pg_stat_wal.wal_bytes deltas / committed transfers",
            }
        )
    bad = {n: sum(p["anomalies"] for p in points.values()) for n, points in crashes.items()}
    if bad:
        broken = [f"{n} ({v})" for n, v in bad.items() if v]
        clean = [n for n, v in bad.items() if not v]
        rows.append(
            {
                "finding": "under injected crashes, "
                + (f"transfers left inconsistent: {', '.join(broken)}" if broken else "")
                + ("; " if broken and clean else "")
                + (f"none left inconsistent by {', '.join(clean)}" if clean else ""),
                "figures": "A, B and the queue (or inbox) compared after convergence",
            }
        )
    return rows


def _adds(ms: float) -> str:
    return f"adds {ms:.1f} ms" if ms >= 0 else f"takes {-ms:.1f} ms less"


def _diff(data: Mapping[str, Any], a: str, b: str, key: str) -> float | None:
    x = _p(data, a, "commit_latency_ms", key)
    y = _p(data, b, "commit_latency_ms", key)
    return None if x is None or y is None else x - y


def _latency_pair(data: Mapping[str, Any], name: str) -> str:
    lat = data.get(name, {}).get("commit_latency_ms", {})
    return f"{name} p50 {lat.get('p50', 0):.2f} / p99 {lat.get('p99', 0):.2f} ms"


# -- plots -----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nines_axis(ax: Any) -> None:
    """Percentile axis spaced by 'number of nines' (50, 90, 99, 99.9, ...)."""
    import math

    ticks = [0.0, 50.0, 90.0, 99.0, 99.9, 99.99]
    ax.set_xticks([-math.log10(1 - q / 100) for q in ticks])
    ax.set_xticklabels([f"{q:g}" for q in ticks])
    ax.set_xlabel("percentile")


def _cdf_xy(cdf: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    import math

    xs = [-math.log10(max(1 - q / 100, 1e-6)) for q, _ in cdf]
    return xs, [v for _, v in cdf]


def make_plots(out: Path, data: Mapping[str, Any]) -> dict[str, str]:
    """Write the PNG plots into ``out``; return {plot name: file name}."""
    plt = _pyplot()
    strategies: Mapping[str, Any] = data["strategies"]
    files: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        xs, ys = _cdf_xy(d.get("commit_latency_cdf", []))
        ax.plot(xs, ys, label=name)
    _nines_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("client commit latency (ms, log)")
    ax.set_title("Client-visible commit latency, concurrency 1")
    ax.legend()
    ax.grid(alpha=0.3)
    files["latency"] = _save(fig, out, "latency.png")

    relayed = {n: d for n, d in strategies.items() if d.get("convergence_cdf")}
    if relayed:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, d in relayed.items():
            xs, ys = _cdf_xy(d["convergence_cdf"])
            ax.plot(xs, ys, label=name)
        _nines_axis(ax)
        ax.set_yscale("log")
        ax.set_ylabel("client commit -> B credited (ms, log)")
        ax.set_title("Convergence latency, concurrency 1 (2PC and naive: 0)")
        ax.legend()
        ax.grid(alpha=0.3)
        files["convergence"] = _save(fig, out, "convergence.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        points = sorted((int(c), r["throughput_per_s"]) for c, r in d["throughput"].items())
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("committed transfers / s")
    ax.set_title("Throughput against concurrency (closed loop)")
    ax.legend()
    ax.grid(alpha=0.3)
    files["throughput"] = _save(fig, out, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, d in strategies.items():
        loads = sorted(
            (float(r), row["latency_ms"].get("p99", float("nan")), row["latency_ms"].get("p50"))
            for r, row in d["open_loop"].items()
        )
        line = ax.plot(
            [r for r, _, _ in loads],
            [p99 for _, p99, _ in loads],
            marker="o",
            label=f"{name} p99",
        )
        ax.plot(
            [r for r, _, _ in loads],
            [p50 for _, _, p50 in loads],
            marker=".",
            linestyle="--",
            color=line[0].get_color(),
            label=f"{name} p50",
        )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (transfers / s)")
    ax.set_ylabel("latency from intended start (ms, log)")
    ax.set_title("Latency against offered load (open loop)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    files["open_loop"] = _save(fig, out, "open_loop.png")

    phases = data.get("phases_2pc") or {}
    if phases:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        labels = list(phases)
        left = [0.0] * len(labels)
        for phase in overhead.PHASES:
            widths = [phases[c].get(phase, {}).get("mean", 0.0) for c in labels]
            ax.barh([f"concurrency {c}" for c in labels], widths, left=left, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set_xlabel("mean ms per committed transfer")
        ax.set_title("2PC transfer: where the time goes")
        ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        files["phases"] = _save(fig, out, "phases.png")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(strategies)
    wal_a = [
        strategies[n].get("cost", {}).get("wal_bytes_per_transfer", {}).get("a", 0) for n in names
    ]
    wal_b = [
        strategies[n].get("cost", {}).get("wal_bytes_per_transfer", {}).get("b", 0) for n in names
    ]
    ax.bar(names, wal_a, label="A")
    ax.bar(names, wal_b, bottom=wal_a, label="B")
    ax.set_ylabel("WAL bytes per transfer")
    ax.set_title("Write-ahead log written per transfer")
    ax.legend()
    files["wal"] = _save(fig, out, "wal.png")
    return files


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _pyplot().close(fig)
    return name


# -- rendering -------------------------------------------------------------------------------


@dataclass
class Section:
    """A titled table (and optionally a plot) of the report."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    plot: str | None = None


def _f(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def sections(data: Mapping[str, Any], plots: Mapping[str, str]) -> list[Section]:
    """The report's sections, rendered alike to Markdown and HTML."""
    strategies: Mapping[str, Any] = data["strategies"]
    out = [
        Section(
            "Verdict",
            ["finding", "behind it"],
            [[v["finding"], v["figures"]] for v in data["verdict"]],
        )
    ]
    rows = []
    for name, d in strategies.items():
        lat, spread = d["commit_latency_ms"], d["commit_latency_spread"]
        rows.append(
            [name, _f(lat.get("count"))]
            + [_f(lat.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")]
            + [
                f"{_f(spread['p50'].get('min'))}-{_f(spread['p50'].get('max'))}",
                f"{_f(spread['p99'].get('min'))}-{_f(spread['p99'].get('max'))}",
            ]
        )
    out.append(
        Section(
            "Client-visible commit latency at concurrency 1 (ms)",
            ["strategy", "n", "p50", "p90", "p99", "p99.9", "max", "p50 range", "p99 range"],
            rows,
            note=f"{data['plan']['repeats']} runs of {data['plan']['latency_count']} transfers "
            "each; the ranges are the lowest and highest of the runs' own percentiles.",
            plot=plots.get("latency"),
        )
    )
    rows = []
    for name, d in strategies.items():
        c1, every = d.get("convergence_ms_c1") or {}, d.get("convergence_ms_all") or {}
        if not c1:
            rows.append([name, "0", "0", "0", "0", "0", d.get("convergence_note", "")])
            continue
        rows.append(
            [name]
            + [_f(c1.get(k)) for k in ("p50", "p99", "max")]
            + [_f(every.get(k)) for k in ("p99", "max")]
            + [f"{d['not_converged']} not converged"]
        )
    out.append(
        Section(
            "Convergence latency (ms): client commit -> B credited, message consumed",
            ["strategy", "p50 (c=1)", "p99 (c=1)", "max (c=1)", "p99 (all runs)", "max (all)", ""],
            rows,
            note="'all runs' includes the throughput and open-loop runs, where relays lag "
            "behind bursts. Relays and consumer run as separate processes.",
            plot=plots.get("convergence"),
        )
    )
    concurrencies = data["plan"]["concurrencies"]
    out.append(
        Section(
            "Throughput against concurrency (committed transfers/s, closed loop)",
            ["strategy", *[str(c) for c in concurrencies], "p99 ms at max"],
            [
                [name]
                + [_f(d["throughput"][str(c)]["throughput_per_s"], 0) for c in concurrencies]
                + [_f(d["throughput"][str(max(concurrencies))]["latency_ms"].get("p99"))]
                for name, d in strategies.items()
            ],
            note=f"{data['plan']['seconds']} s per point.",
            plot=plots.get("throughput"),
        )
    )
    rates = data["plan"]["rates"]
    out.append(
        Section(
            "Latency against offered load (open loop): p50 / p99 ms, achieved/s",
            ["strategy", *[f"{r:g}/s" for r in rates]],
            [
                [name]
                + [
                    f"{_f(d['open_loop'][f'{r:g}']['latency_ms'].get('p50'))} / "
                    f"{_f(d['open_loop'][f'{r:g}']['latency_ms'].get('p99'))}, "
                    f"{_f(d['open_loop'][f'{r:g}']['throughput_per_s'], 0)}"
                    for r in rates
                ]
                for name, d in strategies.items()
            ],
            note="Each latency is measured from the transfer's intended start, so a stall "
            "shows in every transfer scheduled behind it.",
            plot=plots.get("open_loop"),
        )
    )
    phases = data.get("phases_2pc") or {}
    if phases:
        out.append(
            Section(
                "2PC latency by phase (p50 / p99 ms)",
                ["concurrency", "total", *overhead.PHASES],
                [
                    [c, f"{_f(p['total'].get('p50'))} / {_f(p['total'].get('p99'))}"]
                    + [
                        f"{_f(p.get(ph, {}).get('p50'))} / {_f(p.get(ph, {}).get('p99'))}"
                        for ph in overhead.PHASES
                    ]
                    for c, p in phases.items()
                ],
                note="work: the SQL and the SENDs; prepare: PREPARE TRANSACTION on A and B in "
                "parallel; commit_point: the marker and the broker's COMMIT receipt; "
                "decision_log: the (lazy) COMMIT record; phase2: COMMIT PREPARED in parallel.",
                plot=plots.get("phases"),
            )
        )
    out.append(
        Section(
            "Cost per transfer",
            ["strategy", "WAL A (bytes)", "WAL B (bytes)", "forced log writes", "messages", ""],
            [
                [
                    name,
                    _f(d["cost"].get("wal_bytes_per_transfer", {}).get("a")),
                    _f(d["cost"].get("wal_bytes_per_transfer", {}).get("b")),
                    _f(d["cost"].get("forced_log_writes_per_transfer"), 4),
                    _f(d["cost"].get("messages_per_transfer"), 3),
                    d["cost"].get("messages_note", ""),
                ]
                for name, d in strategies.items()
                if d.get("cost")
            ],
            note="WAL from pg_stat_wal over the whole measurement of the strategy (relays' "
            "and consumer's writes included, checkpoints' full-page images too).",
            plot=plots.get("wal"),
        )
    )
    crash_rows = []
    for name, points in data["crashes"].items():
        for point, c in points.items():
            crash_rows.append(
                [
                    name,
                    point,
                    c["how"],
                    _f(c["transfers"]),
                    _f(c["crashed"]),
                    _f(c["not_converged"]),
                    _f(c["anomalies"]),
                    ", ".join(c["examples"][:3]),
                ]
            )
    out.append(
        Section(
            "Anomalies under injected crashes (after recovery and convergence)",
            [
                "strategy",
                "crash point",
                "how",
                "transfers",
                "crashed",
                "not converged",
                "anomalies",
                "examples",
            ],
            crash_rows,
            note="An anomaly is a transfer whose debit in A, credit in B and message "
            "(queue, or the consumer's inbox) disagree, or money not conserved ('money').",
        )
    )
    machine = data["machine"]
    out.append(
        Section(
            "Machine and versions",
            ["what", "value"],
            [
                ["CPU", f"{machine['cpu']} ({machine['cores']} cores), {machine['memory']}"],
                ["OS / Python", f"{machine['os']} / Python {machine['python']}"],
                ["PostgreSQL", ", ".join(f"{k} {v}" for k, v in machine["postgresql"].items())],
                ["ActiveMQ", f"{machine['activemq']}; {machine['activemq_journal']}"],
                ["packages", ", ".join(f"{k} {v}" for k, v in machine["packages"].items())],
                ["git commit", machine["git_commit"]],
                [
                    "load average (1 min) before / after",
                    f"{machine['load_average'][0]:.2f} / {data['load_after'][0]:.2f}",
                ],
            ],
            note="The machine is shared: a load average above the core count means other "
            "work ran during the measurement; compare the spread columns before trusting "
            "a small difference.",
        )
    )
    return out


def render_markdown(data: Mapping[str, Any], parts: Sequence[Section]) -> str:
    lines = [
        "# twopc: 2PC against the outbox, CDC and the naive dual write",
        "",
        f"Command: `{data['command']}` — {data['started_iso']}, {data['seconds']:.0f} s"
        + (" (quick run: few samples, wide spread)" if data["quick"] else ""),
        "",
        "Raw data: [data.json](data.json), HDR histograms: [histograms.hlog](histograms.hlog).",
    ]
    for part in parts:
        lines += ["", f"## {part.title}", ""]
        lines.append("| " + " | ".join(part.headers) + " |")
        lines.append("|" + " --- |" * len(part.headers))
        for row in part.rows:
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        if part.note:
            lines += ["", part.note]
        if part.plot:
            lines += ["", f"![{part.title}]({part.plot})"]
    return "\n".join(lines) + "\n"


def render_html(data: Mapping[str, Any], parts: Sequence[Section]) -> str:
    e = html.escape
    body = [
        "<h1>twopc: 2PC against the outbox, CDC and the naive dual write</h1>",
        f"<p>Command: <code>{e(data['command'])}</code> — {e(data['started_iso'])}, "
        f"{data['seconds']:.0f} s{' (quick run)' if data['quick'] else ''}</p>",
        '<p>Raw data: <a href="data.json">data.json</a>, HDR histograms: '
        '<a href="histograms.hlog">histograms.hlog</a></p>',
    ]
    for part in parts:
        body.append(f"<h2>{e(part.title)}</h2>")
        body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in part.headers) + "</tr>")
        for row in part.rows:
            body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
        body.append("</table>")
        if part.note:
            body.append(f"<p class=note>{e(part.note)}</p>")
        if part.plot:
            body.append(f'<img src="{e(part.plot)}" alt="{e(part.title)}">')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .5em;text-align:right}td:first-child,th:first-child{text-align:left}"
        ".note{color:#555;font-size:.9em}img{max-width:100%}"
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>twopc report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


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
    data["verdict"] = verdict(data["strategies"], data["crashes"])
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
    plots = make_plots(out, data)
    data["plots"] = plots
    parts = sections(data, plots)
    (out / "report.md").write_text(render_markdown(data, parts))
    (out / "report.html").write_text(render_html(data, parts))
    (out / "data.json").write_text(json.dumps(data, indent=2, default=str))
    extra = [
        measure.RunResult(name, "histogram", 1, hist, started_at=data["started"])
        for name, hist in histograms.items()
    ]
    measure.write_histogram_log(
        out / "histograms.hlog", [*results, *extra], comment=data["command"]
    )
