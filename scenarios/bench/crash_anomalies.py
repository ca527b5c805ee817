"""The report's anomalies under injected crashes: each strategy's writer killed at its
crash points, and what the invariant checker finds afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from coordinator.failpoints import failpoint_env
from scenarios.bench.contenders import ACCOUNTS
from scenarios.bench.report_plan import ReportPlan
from scenarios.bench.strategy_runs import reset_lab
from scenarios.config import Settings
from scenarios.strategies import STRATEGIES
from scenarios.transfer import invariants
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.wiring import open_coordinator


def crash_anomalies(settings: Settings, name: str, plan: ReportPlan, seed: int) -> dict[str, Any]:
    """For each crash point of the strategy: transfers, crashes, anomalies after convergence."""
    strategy_type = STRATEGIES[name]
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

    strategy = STRATEGIES[name]()
    strategy.prepare(settings, concurrency=4)
    strategy.arm_crash(point, every=plan.crash_every, action="abandon")
    transfers = scenario.plan(plan.crash_transfers, accounts=ACCOUNTS, seed=seed)
    try:
        batch = run_batch(transfers, strategy.run_one, concurrency=4)
        drain = getattr(strategy, "drain", None)
        if drain is not None:  # the pool's queue; thread-sync's retries, done or dead-lettered
            drain(60.0)
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
    if unseen.get("retries_scheduled"):
        how += (
            f"; {unseen['retries_scheduled']} failures retried asynchronously: "
            f"{unseen['retried']} done, {unseen['dead_letters']} dead letters"
        )
    return {
        "how": how,
        "transfers": len(transfers),
        "crashed": batch.outcomes["in-doubt"],
        "committed": batch.outcomes["committed"],
        "not_converged": len(missing),
        "anomalies": len(found),
        "examples": found[:5],
        **{
            k: v
            for k, v in unseen.items()
            if k in ("unseen_errors", "work_dropped", "retried", "dead_letters")
        },
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
