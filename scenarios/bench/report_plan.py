"""How much the strategies' report runs, quick or full."""

from __future__ import annotations

from dataclasses import dataclass

from scenarios.bench.parts import names

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
    #: The further parts (scenarios.bench.parts) the report runs, by name; each runs its
    #: quick measurement when the report is quick.
    parts: tuple[str, ...] = ()

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
                parts=names(),
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
            parts=names(),
        )
