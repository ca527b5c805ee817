"""The overhead benchmark's result as Markdown (``twopc bench --overhead``'s overhead.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from scenarios.bench import measure
from scenarios.bench.contenders import PHASES


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: Mapping[str, Any], command: str) -> str:
    """The overhead benchmark's figures as a Markdown page."""
    lat = result["latency_c1"]
    lines = [
        "# twopc overhead benchmark",
        "",
        f"Command: `{command}` ({result['seconds']} s; load average before "
        f"{_fmt(result['load_average']['before'][0])}, after "
        f"{_fmt(result['load_average']['after'][0])} on {os.cpu_count()} cores).",
        *_performance_targets(result.get("performance_targets", [])),
        *_side_by_side_cpu(result.get("measured_beside", {}).get("side_by_side_c16", {})),
        "",
        "## Latency at concurrency 1 (interleaved blocks), ms",
        "",
        "| contender | n | p50 | p90 | p99 | p99.9 | max | CPU ms/tx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in lat["contenders"].items():
        ms = row["latency_ms"]
        lines.append(
            f"| {name} | {ms.get('count', 0)} | "
            + " | ".join(_fmt(ms.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max"))
            + f" | {_fmt(row['cpu_ms_per_op'])} |"
        )
    lines += [
        "",
        "## Ratios at concurrency 1",
        "",
        "| ratio | p50 | p99 | added at p50 (ms) | per-block p50 ratio: median [min-max] |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, r in lat["ratios"].items():
        pb = r["per_block_p50"]
        lines.append(
            f"| {name} | {_fmt(r['p50'])} | {_fmt(r['p99'])} | {_fmt(r['p50_added_ms'])} | "
            f"{_fmt(pb.get('median'))} [{_fmt(pb.get('min'))}-{_fmt(pb.get('max'))}] |"
        )
    lines += ["", "## 2PC phases of the coordinator (p50 / p99, ms)", ""]
    lines += ["| coordinator | " + " | ".join(PHASES) + " |"]
    lines += ["| --- |" + " ---: |" * len(PHASES)]
    for name, phases in lat["phases"].items():
        cells = [
            f"{_fmt(phases.get(p, {}).get('p50'))} / {_fmt(phases.get(p, {}).get('p99'))}"
            for p in PHASES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Throughput (closed loop)",
        "",
        "| contender | concurrency | tx/s | p50 ms | p99 ms | forced log writes/commit | "
        "CPU ms/tx by process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, by_c in result["throughput"]["runs"].items():
        for c, row in by_c.items():
            cpu = ", ".join(
                f"{k} {v:.2f}" for k, v in row.get("cpu_ms_per_op_by_process", {}).items()
            )
            lines.append(
                f"| {name} | {c} | {_fmt(row['throughput_per_s'], 0)} | "
                f"{_fmt(row['latency_ms'].get('p50'))} | {_fmt(row['latency_ms'].get('p99'))} | "
                f"{_fmt(row.get('forced_log_writes_per_commit'), 3)} | {cpu} |"
            )
    lines += [
        "",
        "## Forced decision-log writes and messages per transaction, by outcome (concurrency 1)",
        "",
        "| coordinator | outcome | forced writes/tx | business msgs/tx | marker msgs/tx |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, kinds in result["by_outcome"].items():
        for kind, row in kinds.items():
            lines.append(
                f"| {name} | {kind} | {_fmt(row['forced_log_writes_per_tx'], 3)} | "
                f"{_fmt(row['business_messages_per_tx'])} | {_fmt(row['marker_messages_per_tx'])} |"
            )
    lines += _against_sequential(result["throughput"]["runs"])
    lines += ["", "## Targets", "", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], 3)} | {met} |")
    return "\n".join(lines) + "\n"


def _performance_targets(rows: list[Mapping[str, Any]]) -> list[str]:
    """The performance targets, each with its figure from this run."""
    if not rows:
        return []
    lines = [
        "",
        "## Performance targets",
        "",
        "| figure | measured | target | met? | from |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        lines.append(
            f"| {row['figure']} | {_fmt(row['measured'], 3)} | {row['target']} | {met} | "
            f"{row['from']} |"
        )
    return lines


def _side_by_side_cpu(side: Mapping[str, Any]) -> list[str]:
    """Each side-by-side contender's throughput at 16 and the CPU per transfer each process
    spent, with their sum (what a transfer costs the lab), what the machine's CPUs
    spent besides (the machine's median less that sum): the kernel's work charged to no
    process, and whatever else ran on the machine meanwhile, and the cores the lab kept
    busy (that sum times the throughput). A contender's throughput is its cores busy over
    its CPU per transfer: the two columns say whether it is slower because each transfer
    costs more or because it leaves the machine idle while its transfers wait."""
    by_name: Mapping[str, Mapping[str, float]] = side.get("cpu_ms_per_transfer", {})
    if not by_name:
        return []
    named = dict.fromkeys(p for costs in by_name.values() for p in costs)
    processes = [p for p in named if p != measure.MACHINE_CPU]
    lines = [
        "",
        "## Side by side at concurrency 16: CPU ms per transfer by process (medians of the rounds)",
        "",
        "| contender | tx/s | "
        + " | ".join(processes)
        + " | all | elsewhere on the machine | cores busy |",
        "| --- | ---: |" + " ---: |" * (len(processes) + 3),
    ]
    for name, costs in by_name.items():
        cells = [_fmt(costs.get(p), 3) for p in processes]
        lab = sum(costs.get(p, 0.0) for p in processes)
        machine = costs.get(measure.MACHINE_CPU)
        throughput = side["throughput_per_s"].get(name)
        busy = None if throughput is None else lab * throughput / 1000
        lines.append(
            f"| {name} | {_fmt(throughput, 0)} | "
            + " | ".join(cells)
            + f" | {_fmt(lab, 3)} | {_fmt(None if machine is None else machine - lab, 3)} | "
            f"{_fmt(busy, 2)} |"
        )
    return lines


def _against_sequential(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Throughput of the coordinator against the plain sequential 2PC at each concurrency,
    with the CPU each process spends per transfer (the machine's ceiling on 2 cores)."""
    plain, ours = runs.get("floor-seq", {}), runs.get("coordinator", {})
    shared = [c for c in ours if c in plain]
    if not shared:
        return []
    lines = [
        "",
        "## The coordinator against a plain sequential 2PC (floor-seq)",
        "",
        "| concurrency | floor-seq tx/s | coordinator tx/s | ratio | "
        "CPU ms/tx floor-seq | CPU ms/tx coordinator |",
        "| ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in shared:
        ratio = measure.ratio(ours[c]["throughput_per_s"], plain[c]["throughput_per_s"])
        cpu = [
            ", ".join(f"{k} {v:.2f}" for k, v in row.get("cpu_ms_per_op_by_process", {}).items())
            for row in (plain[c], ours[c])
        ]
        lines.append(
            f"| {c} | {_fmt(plain[c]['throughput_per_s'], 0)} | "
            f"{_fmt(ours[c]['throughput_per_s'], 0)} | {_fmt(ratio)} | {cpu[0]} | {cpu[1]} |"
        )
    return lines
