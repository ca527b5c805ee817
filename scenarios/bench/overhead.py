"""What twopc's coordinator costs beyond 2PC itself: ``twopc bench --overhead``.

One process, one lab, one run, the same transfer work through:

- ``floor``: the hand-written minimal 2PC (scenarios.bench.floor), decision
  fsync'd; ``floor-marker``: the same by hand with the coordinator's own
  protocol (the broker's COMMIT of a marker is the decision, the log is lazy);
  ``floor-at-once``: ``floor-marker`` sending A's and B's work at the same time;
  ``floor-seq``: the plain sequential 2PC;
- ``coordinator``: twopc (A, B and the broker);
- ``floor-db``, ``coordinator-db`` and ``peer`` (SQLAlchemy's two-phase
  Session): A and B only, where the coordinator forces its decision record;
- ``local-commit`` and ``outbox-commit``: the debit alone in one local
  transaction on A, without and with an outbox row, for scale.

Latency percentiles and CPU per transaction come from an interleaved run at
concurrency 1 (every contender in shuffled blocks, so that the noise of a
shared machine hits all of them alike); the ratios are computed per block too,
which gives their spread. Throughput comes from closed-loop runs at 1, 8 and
32 concurrent transfers, with the decision log's forced writes per commit.
A last run checks the forced writes and messages per transaction by outcome
against the presumed-abort figures (docs/design.md §2). Then
:mod:`scenarios.bench.performance_targets` measures what is left of the
performance targets (the coordinator, ``floor-seq``, the outbox-status
strategy and the outbox that publishes the event too at concurrency 16 side by
side, transactions in flight, the consumers) and puts each target beside its
figure from this one run.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import errors as pg_errors
from rich.progress import Progress

from coordinator.errors import TransactionAborted, TransactionInDoubt
from scenarios.bench import measure, performance_targets
from scenarios.bench.contenders import (
    BALANCE,
    Contender,
    CoordinatorContender,
    PhaseSplit,
    TransferSource,
    contenders,
    op_of,
    prepare_lab,
)
from scenarios.bench.server_costs import service_cpu, wal_bytes
from scenarios.config import Settings
from scenarios.lab.ports import BROKER
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TYPE_HEADER,
    drain_events,
)

# -- contenders: the coordinator ----------------------------------------------------


# -- contenders: the floor, the peer, and local commits ----------------------------


#: Contenders whose throughput is measured at every concurrency (the floors stay at 1
#: in the quick run: their throughput tells the same as the coordinator's).
THROUGHPUT_FULL = (
    "floor",
    "floor-seq",
    "coordinator",
    "floor-db",
    "coordinator-db",
    "peer",
    "local-commit",
    "outbox-commit",
)
THROUGHPUT_QUICK = ("floor-seq", "coordinator", "coordinator-db", "peer", "local-commit")


# -- the plan of a run ---------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of everything to run."""

    rounds: int  # interleaved blocks at concurrency 1
    per_round: int  # transfers per contender per block
    seconds: float  # length of the throughput run at each concurrency
    concurrencies: tuple[int, ...]
    throughput_of: tuple[str, ...]
    outcome_checks: int  # transactions per outcome in the R* check
    slices: int = 1  # the throughput runs alternate concurrencies in this many slices
    # ... and the side-by-side run (16, then CPU at 8) this many rounds of seconds / 2 blocks
    # The measurements beside (scenarios.bench.performance_targets); the defaults are
    # the smallest that give every figure.
    inflight: int = 20  # transactions in flight, threads and asyncio
    consumer_messages: tuple[int, int] = (20, 5)  # the consumers: throughput, latency

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(8, 15, 1.5, (1, 8, 16, 32), THROUGHPUT_QUICK, 10, 3, 200, (200, 20))
        return cls(30, 40, 6.0, (1, 8, 16, 32), THROUGHPUT_FULL, 50, 6, 1_000, (2_000, 200))


# -- the benchmark -------------------------------------------------------------------


def _tick(progress: Progress | None, description: str, total: float) -> tuple[Any, Any]:
    if progress is None:
        return None, None
    task = progress.add_task(description, total=total)
    return task, lambda: progress.advance(task)


def run_latency(
    settings: Settings, plan: Plan, source: TransferSource, progress: Progress | None = None
) -> dict[str, Any]:
    """The interleaved run at concurrency 1: percentiles, ratios with spread, CPU, phases."""
    factories = contenders(settings)
    made: dict[str, Contender] = {}
    try:
        for name, factory in factories.items():
            made[name] = factory(1)
        ops = {name: op_of(c, source) for name, c in made.items()}
        # A short warm-up: connections, caches, the JIT-less but lazy imports.
        measure.interleaved(ops, rounds=1, per_round=3)
        for c in made.values():
            if isinstance(c, CoordinatorContender):
                c.split = PhaseSplit()
        task, tick = _tick(
            progress,
            "latency, concurrency 1 (interleaved)",
            plan.rounds * len(ops) * plan.per_round,
        )
        blocks = measure.interleaved_blocks(
            ops, rounds=plan.rounds, per_round=plan.per_round, tick=tick
        )
        if progress is not None:
            progress.remove_task(task)
        results = {name: measure.merge_blocks(name, bs) for name, bs in blocks.items()}
        phases = {
            name: c.split.summary()
            for name, c in made.items()
            if isinstance(c, CoordinatorContender)
        }
    finally:
        for c in made.values():
            c.close()
    return {
        "contenders": {name: r.as_dict() for name, r in results.items()},
        "ratios": _ratios(blocks),
        "phases": phases,
        "results": results,
    }


#: (numerator, denominator) pairs of the ratios the issue asks for, and two more.
RATIOS = (
    ("coordinator", "floor"),
    ("coordinator", "floor-marker"),
    ("coordinator", "floor-at-once"),
    ("coordinator-db", "peer"),
    ("coordinator-db", "floor-db"),
    ("outbox-commit", "local-commit"),
    ("coordinator", "outbox-commit"),
)


def _ratios(blocks: Mapping[str, list[measure.RunResult]]) -> dict[str, dict[str, Any]]:
    """p50 and p99 ratios of the merged runs, and the spread of the per-block p50 ratio."""
    out: dict[str, dict[str, Any]] = {}
    for top, bottom in RATIOS:
        if top not in blocks or bottom not in blocks:
            continue
        merged_top = measure.merged(blocks[top])
        merged_bottom = measure.merged(blocks[bottom])
        per_block = [
            r
            for t, b in zip(blocks[top], blocks[bottom], strict=True)
            if t.latencies.count and b.latencies.count
            if (r := measure.ratio(t.latencies.percentile(50), b.latencies.percentile(50)))
            is not None
        ]
        out[f"{top}/{bottom}"] = {
            "p50": measure.ratio(merged_top.percentile(50), merged_bottom.percentile(50)),
            "p99": measure.ratio(merged_top.percentile(99), merged_bottom.percentile(99)),
            "p50_added_ms": round(merged_top.percentile(50) - merged_bottom.percentile(50), 3),
            "p99_added_ms": round(merged_top.percentile(99) - merged_bottom.percentile(99), 3),
            "per_block_p50": measure.spread(per_block),
        }
    return out


def run_throughput(
    settings: Settings, plan: Plan, source: TransferSource, progress: Progress | None = None
) -> dict[str, Any]:
    """Closed-loop runs at each concurrency: throughput, latency, CPU, forced writes.

    One contender (pools sized for the highest concurrency) per name; its
    concurrencies alternate in ``plan.slices`` shuffled slices of
    ``plan.seconds / plan.slices``, so that a burst of load from elsewhere on a
    shared machine does not land on one concurrency only and fake a scaling ratio.
    """
    factories = contenders(settings)
    cpu = service_cpu(settings)
    rng = random.Random(7)
    top = max(plan.concurrencies)
    task, _ = _tick(
        progress,
        "throughput, concurrency " + "/".join(map(str, plan.concurrencies)),
        len(plan.throughput_of) * plan.slices * len(plan.concurrencies),
    )
    table: dict[str, dict[str, Any]] = {}
    results: list[measure.RunResult] = []
    for name in plan.throughput_of:
        contender = factories[name](top)
        slices: dict[int, list[measure.RunResult]] = {c: [] for c in plan.concurrencies}
        forced = dict.fromkeys(plan.concurrencies, 0)
        cpu_used: dict[int, dict[str, float]] = {c: {} for c in plan.concurrencies}
        try:
            # Warm every connection of the pools before the clock starts.
            measure.closed_loop(name, op_of(contender, source), concurrency=top, count=2 * top)
            for _ in range(plan.slices):
                order = list(plan.concurrencies)
                rng.shuffle(order)
                for concurrency in order:
                    forced_before = getattr(contender, "forced_writes", 0)
                    cpu_before = cpu.snapshot()
                    run = measure.closed_loop(
                        name,
                        op_of(contender, source),
                        concurrency=concurrency,
                        duration=plan.seconds / plan.slices,
                    )
                    cpu_after = cpu.snapshot()
                    forced[concurrency] += getattr(contender, "forced_writes", 0) - forced_before
                    for key, value in cpu_after.items():
                        used = cpu_used[concurrency]
                        used[key] = used.get(key, 0.0) + value - cpu_before[key]
                    slices[concurrency].append(run)
                    if progress is not None:
                        progress.advance(task)
        finally:
            contender.close()
            # Each contender finds the broker as the first did: its events drained.
            drain_events(settings)
        for concurrency, runs in slices.items():
            result = measure.merge_blocks(name, runs)
            row = result.as_dict()
            row["cpu_ms_per_op_by_process"] = measure.ServiceCpu.per_op_ms(
                dict.fromkeys(cpu_used[concurrency], 0.0), cpu_used[concurrency], result.committed
            )
            if isinstance(contender, CoordinatorContender):
                row["forced_log_writes_per_commit"] = (
                    round(forced[concurrency] / result.committed, 4) if result.committed else None
                )
            table.setdefault(name, {})[str(concurrency)] = row
            results.append(result)
    if progress is not None:
        progress.remove_task(task)
    scaling = {
        name: measure.ratio(
            by_c.get(str(top), {}).get("throughput_per_s", 0.0),
            by_c.get(str(min(plan.concurrencies)), {}).get("throughput_per_s", 0.0),
        )
        for name, by_c in table.items()
    }
    return {"runs": table, "scaling_max_over_1": scaling, "results": results}


# -- forced writes and messages by outcome (the R* check) ---------------------------


def run_outcome_costs(
    settings: Settings, plan: Plan, source: TransferSource
) -> dict[str, dict[str, dict[str, float]]]:
    """Forced log writes and messages per transaction, by outcome, with and without broker.

    commit: the transfer. abort: B credited and the message sent, then A's debit
    breaks its CHECK, so A votes NO. read-only: a SELECT on A and on B.
    Expected (presumed abort, docs/design.md §2): with the broker 0 forced writes for
    every outcome (the marker is the decision); without it 1 per commit, 0 per
    abort and per read-only transaction (at concurrency 1: no group commit).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for broker in (True, False):
        contender = CoordinatorContender(settings, concurrency=1, broker=broker)
        try:
            out[contender.name] = {
                kind: _outcome_cost(contender, kind, plan.outcome_checks, source, broker)
                for kind in ("commit", "abort", "read-only")
            }
        finally:
            contender.close()
    return out


def _outcome_cost(
    contender: CoordinatorContender, kind: str, n: int, source: TransferSource, broker: bool
) -> dict[str, float]:
    coordinator = contender.coordinator
    forced_before = contender.forced_writes
    business = markers = 0
    outcomes: dict[str, int] = {}
    for _ in range(n):
        t = source.next()
        tx = coordinator.begin(contender.prefix + t.transfer_id)
        params = {"amount": t.amount, "tid": t.transfer_id}
        try:
            with tx:
                if kind == "read-only":
                    tx.execute("a", "SELECT balance FROM accounts WHERE id = %s", (t.source,))
                    tx.execute("b", "SELECT balance FROM accounts WHERE id = %s", (t.target,))
                else:
                    tx.execute("b", CREDIT, {**params, "account": t.target})
                    if broker:
                        tx.send(
                            EVENT_TOPIC,
                            t.body(),
                            {"transfer-id": t.transfer_id, TYPE_HEADER: TRANSFER_COMPLETED},
                        )
                    amount = BALANCE * 10 if kind == "abort" else t.amount
                    with contextlib.suppress(pg_errors.CheckViolation):  # A votes NO
                        tx.branch("a").execute(
                            DEBIT_TO,
                            {
                                **params,
                                "amount": amount,
                                "account": t.source,
                                "counterparty": t.target,
                            },
                        )
        except (TransactionAborted, TransactionInDoubt):
            pass
        outcome = tx.outcome.value if tx.outcome is not None else "none"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if tx.outcome is not None and tx.outcome.value == "committed":
            business += tx.messages_sent
            markers += int(tx.marker_sent)
    forced = contender.forced_writes - forced_before
    return {
        "transactions": n,
        "outcomes": outcomes,  # type: ignore[dict-item]
        "forced_log_writes_per_tx": round(forced / n, 3),
        "business_messages_per_tx": round(business / n, 3),
        "marker_messages_per_tx": round(markers / n, 3),
    }


# -- the whole benchmark --------------------------------------------------------------


def run(
    settings: Settings,
    *,
    quick: bool,
    progress: Progress | None = None,
    plan: Plan | None = None,
) -> dict[str, Any]:
    """The overhead benchmark; returns a JSON-able dict (RunResults under "_results")."""
    plan = plan or Plan.for_mode(quick)
    started = time.time()
    load_before = os.getloadavg()
    prepare_lab(settings)
    source = TransferSource()
    wal_before = wal_bytes(settings)
    latency = run_latency(settings, plan, source, progress)
    drain_events(settings)
    throughput = run_throughput(settings, plan, source, progress)
    outcome_costs = run_outcome_costs(settings, plan, source)
    wal_after = wal_bytes(settings)
    drain_events(settings)
    extra = performance_targets.measure_extra(
        settings,
        rounds=plan.slices,
        seconds=plan.seconds / 2,
        inflight=plan.inflight,
        consumer_messages=plan.consumer_messages,
    )
    results = [*latency.pop("results").values(), *throughput.pop("results")]
    return {
        "benchmark": "overhead",
        "quick": quick,
        "plan": plan.__dict__,
        "started": started,
        "seconds": round(time.time() - started, 1),
        "latency_c1": latency,
        "throughput": throughput,
        "by_outcome": outcome_costs,
        "targets": targets(latency, throughput),
        "performance_targets": performance_targets.rows(latency, extra),
        "measured_beside": extra,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "wal_bytes_total": {k: wal_after[k] - wal_before[k] for k in wal_after},
        "_results": results,
    }


BROKER_CPU = BROKER.label  # ServiceCpu names each service's CPU by its label


def targets(latency: Mapping[str, Any], throughput: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The coordinator's cost targets, each with the measured figure and whether it is met.

    The performance targets (its throughput against ``floor-seq`` at 16, its Python CPU
    per transfer at 8, ...) are not repeated here: :mod:`scenarios.bench.performance_targets`
    puts each beside its figure, measured side by side."""
    ratios = latency["ratios"]
    runs = throughput["runs"]
    out: list[dict[str, Any]] = []

    def add(target: str, figure: float | None, ok: bool | None) -> None:
        out.append({"target": target, "measured": figure, "met": ok})

    floor = ratios.get("coordinator/floor", {}).get("p50")
    add("p50 at concurrency 1: coordinator <= 1.00 x floor", floor, _le(floor, 1.00))
    marker = ratios.get("coordinator/floor-marker", {}).get("p50")
    add("(stricter) coordinator <= 1.00 x floor-marker at p50", marker, _le(marker, 1.00))
    coordinator = runs.get("coordinator", {})
    at8 = coordinator.get("8", {}).get("cpu_ms_per_op_by_process", {})
    floor_at8 = runs.get("floor", {}).get("8", {}).get("cpu_ms_per_op_by_process", {})
    if at8 and floor_at8 and BROKER_CPU in at8 and BROKER_CPU in floor_at8:
        broker = measure.ratio(at8[BROKER_CPU], floor_at8[BROKER_CPU])
        add(
            "ActiveMQ CPU per transfer at concurrency 8 <= 1.00 x floor's", broker, _le(broker, 1.0)
        )
    peer = ratios.get("coordinator-db/peer", {}).get("p50")
    add("p50 two-database work: coordinator-db <= peer (SQLAlchemy)", peer, _le(peer, 1.0))
    for name in ("coordinator", "coordinator-db"):
        by_c = runs.get(name, {})
        top = max((int(c) for c in by_c), default=0)
        if not top:
            continue
        forced = by_c[str(top)].get("forced_log_writes_per_commit")
        add(
            f"{name}: forced decision-log writes per commit at concurrency {top} <= 0.25",
            forced,
            _le(forced, 0.25),
        )
        scale = measure.ratio(
            by_c[str(top)]["throughput_per_s"], by_c.get("1", {}).get("throughput_per_s", 0.0)
        )
        add(
            f"{name}: throughput at concurrency {top} >= 4 x concurrency 1",
            scale,
            None if scale is None else scale >= 4.0,
        )
    return out


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound
