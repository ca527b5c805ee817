"""One strategy's performance for the report: its transfers measured, its costs, and
the 2PC phase split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from rich.progress import Progress

from coordinator.states import Outcome
from scenarios.bench import contenders, measure, server_costs
from scenarios.bench.contenders import ACCOUNTS, BALANCE
from scenarios.bench.report_plan import ReportPlan
from scenarios.config import Settings
from scenarios.strategies import STRATEGIES
from scenarios.transfer import model as scenario
from scenarios.wiring import open_coordinator


class _Transfers:
    """Unique transfers for a strategy's runs (scenario.plan is finite; this is not)."""

    def __init__(self, seed: int) -> None:
        self.source = contenders.TransferSource(accounts=ACCOUNTS, seed=seed)

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
    strategy: Any = STRATEGIES[name]()  # the figures read what some strategies add
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
        wal_before = server_costs.wal_bytes(settings)
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
        wal_after = server_costs.wal_bytes(settings)
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


def phase_split(settings: Settings, plan: ReportPlan, seed: int) -> dict[str, Any]:
    """Per-phase latency of the 2PC transfer at concurrency 1 and 8 (Transaction.timings)."""
    out: dict[str, Any] = {}
    source = contenders.TransferSource(accounts=ACCOUNTS, seed=seed)
    for concurrency in (1, 8):
        contender = contenders.CoordinatorContender(settings, concurrency=concurrency)
        try:
            op = contenders.op_of(contender, source)
            measure.closed_loop("2pc", op, concurrency=concurrency, count=2 * concurrency)
            contender.split = contenders.PhaseSplit()
            run = measure.closed_loop("2pc", op, concurrency=concurrency, count=plan.phase_count)
        finally:
            contender.close()
        out[str(concurrency)] = {"total": run.latencies.summary(), **contender.split.summary()}
    return out
