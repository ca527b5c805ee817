"""The file log against postgres mode (docs/design.md §3): ``twopc bench --decisions``.

Four coordinators make the same transfer, two per mode of TWOPC_DECISIONS:

- ``broker/file``, ``broker/postgres``: A, B and the message; the broker's
  commit marker is the decision in both modes (the file's record is lazy);
- ``db/file``: A and B only; both prepare and the COMMIT record is forced
  (fsync) in the file; ``db/postgres``: only B prepares, and A commits
  one-phase with the decision row (the commit-markable resource).

Measured: latency at concurrency 1 (interleaved shuffled blocks, so that the
noise of a shared machine hits every mode alike, with the per-block p50
ratio's spread), throughput at concurrency 8 (closed loop), and per committed
transaction at concurrency 1 the decision log's forced writes and the WAL
flushes of A and B (``pg_stat_wal.wal_sync``, read after the sessions ended
so that every backend has reported).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import psycopg

from scenarios.bench import measure
from scenarios.bench.contenders import (
    CoordinatorContender,
    TransferSource,
    op_of,
    prepare_lab,
)
from scenarios.config import Settings

#: name -> (with the broker, TWOPC_DECISIONS, coordinator id ("" keeps the default)).
MODES: dict[str, tuple[bool, str, str]] = {
    "broker/file": (True, "file", ""),
    "broker/postgres": (True, "postgres", "bench-mq-pg"),
    "db/file": (False, "file", ""),
    "db/postgres": (False, "postgres", "benchdb-pg"),
}
#: (postgres, file) pairs whose latency ratio is reported.
PAIRS = (("broker/postgres", "broker/file"), ("db/postgres", "db/file"))


def contender(settings: Settings, name: str, concurrency: int) -> CoordinatorContender:
    """The coordinator of mode ``name`` (see MODES), pools sized for ``concurrency``."""
    broker, decisions, ident = MODES[name]
    mode = replace(settings, decisions=decisions, coordinator_id=ident or settings.coordinator_id)
    return CoordinatorContender(
        mode, concurrency=concurrency, broker=broker, name=name, coordinator_id=ident
    )


def wal_syncs(settings: Settings) -> int:
    """WAL flushes A and B have done so far (pg_stat_wal.wal_sync, both clusters)."""
    total = 0
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
            total += int(row[0]) if row else 0
    return total


def costs(settings: Settings, name: str, count: int, source: TransferSource) -> dict[str, Any]:
    """Forced log writes and WAL flushes of A and B per committed transfer, concurrency 1."""
    item = contender(settings, name, 1)
    forced_before = item.forced_writes
    syncs_before = wal_syncs(settings)
    committed = 0
    try:
        for _ in range(count):
            committed += item.run_one(source.next())
        forced = item.forced_writes - forced_before
    finally:
        item.close()  # every backend reports its WAL statistics when its session ends
    time.sleep(0.5)
    syncs = wal_syncs(settings) - syncs_before
    return {
        "committed": committed,
        "forced_log_writes_per_commit": round(forced / committed, 3) if committed else None,
        "wal_flushes_a_b_per_commit": round(syncs / committed, 3) if committed else None,
    }


def compare(
    settings: Settings, *, rounds: int, per_round: int, seconds: float, cost_count: int
) -> dict[str, Any]:
    """Latency (interleaved, concurrency 1), throughput (concurrency 8) and costs by mode."""
    prepare_lab(settings)
    source = TransferSource()
    made = {name: contender(settings, name, 1) for name in MODES}
    try:
        ops = {name: op_of(c, source) for name, c in made.items()}
        measure.interleaved(ops, rounds=1, per_round=3)  # warm-up
        blocks = measure.interleaved_blocks(ops, rounds=rounds, per_round=per_round)
    finally:
        for c in made.values():
            c.close()
    latency = {name: measure.merged(runs).summary() for name, runs in blocks.items()}
    ratios: dict[str, Any] = {}
    for top, bottom in PAIRS:
        per_block = [
            r
            for t, b in zip(blocks[top], blocks[bottom], strict=True)
            if t.latencies.count and b.latencies.count
            if (r := measure.ratio(t.latencies.percentile(50), b.latencies.percentile(50)))
            is not None
        ]
        ratios[f"{top}/{bottom}"] = {
            "p50": measure.ratio(latency[top]["p50"], latency[bottom]["p50"]),
            "p99": measure.ratio(latency[top]["p99"], latency[bottom]["p99"]),
            "per_block_p50": measure.spread(per_block),
        }
    throughput = {}
    for name in MODES:
        item = contender(settings, name, 8)
        try:
            measure.closed_loop(name, op_of(item, source), concurrency=8, count=16)
            run = measure.closed_loop(name, op_of(item, source), concurrency=8, duration=seconds)
        finally:
            item.close()
        throughput[name] = {
            "per_s": round(run.throughput, 1),
            "p50_ms": run.latencies.summary().get("p50"),
            "p99_ms": run.latencies.summary().get("p99"),
        }
    return {
        "latency_ms_concurrency_1": latency,
        "ratios_postgres_over_file": ratios,
        "throughput_concurrency_8": throughput,
        "costs_per_commit": {name: costs(settings, name, cost_count, source) for name in MODES},
    }


def render_markdown(result: dict[str, Any], command: str) -> str:
    """The comparison as a markdown report."""
    lines = [f"# File log against postgres mode\n\n`{command}`\n"]
    lines.append(
        "| mode | p50 ms | p99 ms | tx/s at 8 | forced log writes/commit | WAL flushes A+B/commit |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in MODES:
        lat = result["latency_ms_concurrency_1"][name]
        cost = result["costs_per_commit"][name]
        lines.append(
            f"| {name} | {lat.get('p50')} | {lat.get('p99')} | "
            f"{result['throughput_concurrency_8'][name]['per_s']} | "
            f"{cost['forced_log_writes_per_commit']} | {cost['wal_flushes_a_b_per_commit']} |"
        )
    lines.append("")
    for pair, r in result["ratios_postgres_over_file"].items():
        spread = r["per_block_p50"]
        lines.append(
            f"- {pair}: p50 x{r['p50']}, p99 x{r['p99']}; per-block p50 ratio median "
            f"{spread.get('median')} (min {spread.get('min')}, max {spread.get('max')})"
        )
    return "\n".join(lines) + "\n"
