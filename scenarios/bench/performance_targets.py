"""The performance targets, each with the figure of one ``twopc bench overhead`` run.

The overhead benchmark's own runs give the latency ratio at concurrency 1, the
throughput ratio at concurrency 16 and the Python CPU per transfer; this module
adds the measurements it does not make (the outbox-status strategy at
concurrency 16, transactions in flight under threads and asyncio, the two
consumers) and puts every figure beside its target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from coordinator.states import Outcome
from scenarios.bench import consumers, contenders, measure
from scenarios.bench.inflight import run as inflight_run
from scenarios.config import Settings
from scenarios.strategies import STRATEGIES

T = TypeVar("T")

OUTBOX = "outbox-status"
CONCURRENCY = 16


@dataclass(frozen=True)
class Target:
    """One figure, its bound and its direction."""

    figure: str
    bound: float
    at_most: bool  # True: measured <= bound; False: measured >= bound

    @property
    def text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:g}"

    def met(self, measured: float | None) -> bool | None:
        if measured is None:
            return None
        return measured <= self.bound if self.at_most else measured >= self.bound


CONSUMING = Target("consuming: `--mode 2pc` msg/s / `--mode inbox` msg/s", 0.5, at_most=False)
LATENCY = Target(
    "p50 at concurrency 1: coordinator / floor-at-once (A's and B's work sent at once)",
    1.0,
    at_most=True,
)
SEQUENTIAL = Target(
    "throughput at concurrency 16: coordinator / floor-seq (plain sequential 2PC)",
    1.1,
    at_most=False,
)
OUTBOX_RATIO = Target("throughput at concurrency 16: coordinator / outbox-status", 0.7, False)
INFLIGHT_RATE = Target("commits/s in flight: asyncio / threads", 1.0, at_most=False)
INFLIGHT_MEMORY = Target("RSS per transaction in flight: asyncio / threads", 0.1, True)
PYTHON_CPU = Target("Python CPU ms per committed transfer at concurrency 8", 0.7, True)


def outbox_throughput(settings: Settings, *, seconds: float) -> dict[str, Any]:
    """The outbox-status strategy's transfers at concurrency 16, its relay and consumer
    running in their own processes as deployed (``twopc bench strategies`` does the same)."""
    from scenarios.outbox import pipeline

    strategy: Any = STRATEGIES[OUTBOX]()
    strategy.prepare(settings, concurrency=CONCURRENCY)
    running = pipeline.for_strategy(settings, strategy, processes=True).start()
    source = contenders.TransferSource(seed=22)

    def op(_index: int) -> bool:
        outcome, _ = strategy.run_one(source.next())
        return bool(outcome is Outcome.COMMITTED)

    try:
        measure.closed_loop(OUTBOX, op, concurrency=CONCURRENCY, count=2 * CONCURRENCY)
        run = measure.closed_loop(OUTBOX, op, concurrency=CONCURRENCY, duration=seconds)
    finally:
        running.stop()
        strategy.close()
    return run.as_dict()


#: Rounds of the in-flight measurement. One round runs each mode for about two
#: seconds, so its asyncio / threads ratio swings with whatever else the machine does
#: then (0.99 in one full run, 1.7 to 1.9 alone, the same day); the figure is the
#: median round's.
INFLIGHT_ROUNDS = 3


def _ratio_of_round(results: list[dict[str, Any]]) -> float:
    by_mode = {r["mode"]: r["commits_per_second"] for r in results}
    return measure.ratio(by_mode["asyncio"], by_mode["threads"]) or 0.0


def median_round(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Of rounds of the in-flight modes, the round whose asyncio / threads commits/s ratio
    is the median, each mode's result given every round's commits/s
    (``commits_per_second_rounds``, in the order they ran)."""
    chosen = sorted(rounds, key=_ratio_of_round)[len(rounds) // 2]
    rates: dict[str, list[float]] = {}
    for results in rounds:
        for r in results:
            rates.setdefault(r["mode"], []).append(r["commits_per_second"])
    return [{**r, "commits_per_second_rounds": rates[r["mode"]]} for r in chosen]


def measure_extra(
    settings: Settings, *, seconds: float, inflight: int, consumer_messages: tuple[int, int]
) -> dict[str, Any]:
    """What the overhead benchmark does not measure itself, one after the other: the
    outbox-status strategy for ``seconds``, ``inflight`` transactions in flight (the
    median of :data:`INFLIGHT_ROUNDS` rounds), and the consumers over
    ``consumer_messages`` (throughput, latency) messages."""
    count, latency_count = consumer_messages
    out: dict[str, Any] = {"seconds": {}}
    for key, measurement in (
        ("outbox_status_c16", lambda: outbox_throughput(settings, seconds=seconds)),
        (
            "inflight",
            lambda: median_round([inflight_run(inflight) for _ in range(INFLIGHT_ROUNDS)]),
        ),
        (
            "consumers",
            lambda: consumers.compare(settings, count=count, latency_count=latency_count),
        ),
    ):
        started = time.perf_counter()
        out[key] = measurement()
        out["seconds"][key] = round(time.perf_counter() - started, 1)
    return out


def rows(
    latency: Mapping[str, Any], throughput: Mapping[str, Any], extra: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Every target with its measured figure and whether it is met (None: not measured)."""
    runs = throughput["runs"]
    coordinator = runs.get("coordinator", {})
    c16 = coordinator.get(str(CONCURRENCY), {}).get("throughput_per_s")
    by_mode = {r["mode"]: r for r in extra.get("consumers", [])}
    flight: dict[str, dict[str, Any]] = {r["mode"]: r for r in extra.get("inflight", [])}
    count = next(iter(flight.values()), {}).get("inflight")

    def of(pick: Callable[[], T]) -> T | None:
        try:
            return pick()
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    measured: list[tuple[Target, float | None, str]] = [
        (
            CONSUMING,
            of(
                lambda: measure.ratio(
                    by_mode["2pc"]["throughput_per_s"], by_mode["inbox"]["throughput_per_s"]
                )
            ),
            of(
                lambda: (
                    f"{by_mode['2pc']['throughput_per_s']} / "
                    f"{by_mode['inbox']['throughput_per_s']} msg/s"
                )
            )
            or "",
        ),
        (LATENCY, latency["ratios"].get("coordinator/floor-at-once", {}).get("p50"), ""),
        (
            SEQUENTIAL,
            of(lambda: measure.ratio(c16, runs["floor-seq"][str(CONCURRENCY)]["throughput_per_s"])),
            of(lambda: f"{c16} / {runs['floor-seq'][str(CONCURRENCY)]['throughput_per_s']} /s")
            or "",
        ),
        (
            OUTBOX_RATIO,
            of(lambda: measure.ratio(c16, extra["outbox_status_c16"]["throughput_per_s"])),
            of(lambda: f"{c16} / {extra['outbox_status_c16']['throughput_per_s']} /s") or "",
        ),
        (
            INFLIGHT_RATE,
            of(
                lambda: measure.ratio(
                    flight["asyncio"]["commits_per_second"], flight["threads"]["commits_per_second"]
                )
            ),
            of(lambda: _inflight_detail(flight, count)) or "",
        ),
        (
            INFLIGHT_MEMORY,
            of(
                lambda: measure.ratio(
                    flight["asyncio"]["rss_per_transaction_kib"],
                    flight["threads"]["rss_per_transaction_kib"],
                )
            ),
            of(
                lambda: (
                    f"{flight['asyncio']['rss_per_transaction_kib']} / "
                    f"{flight['threads']['rss_per_transaction_kib']} KiB"
                )
            )
            or "",
        ),
        (
            PYTHON_CPU,
            of(lambda: coordinator["8"]["cpu_ms_per_op_by_process"][measure.PYTHON_CPU]),
            _hand_written_cpu(runs),
        ),
    ]
    return [
        {
            "figure": target.figure,
            "measured": value,
            "target": target.text,
            "met": target.met(value),
            "from": detail,
        }
        for target, value, detail in measured
    ]


def _inflight_detail(flight: Mapping[str, Mapping[str, Any]], count: int | None) -> str:
    """The commits/s behind the in-flight ratio, and every round's when there were several."""
    asyncio, threads = flight["asyncio"], flight["threads"]
    detail = (
        f"{count} in flight: {asyncio['commits_per_second']} / "
        f"{threads['commits_per_second']} commits/s"
    )
    rounds = list(
        zip(
            asyncio.get("commits_per_second_rounds", ()),
            threads.get("commits_per_second_rounds", ()),
            strict=True,
        )
    )
    if len(rounds) > 1:
        ratios = ", ".join(f"{measure.ratio(a, t):.2f}" for a, t in rounds)
        detail += f" (median of {len(rounds)} rounds: {ratios})"
    return detail


#: The hand-written 2PCs whose CPU per transfer is shown beside the coordinator's.
HAND_WRITTEN = ("floor-seq", "floor")


def _hand_written_cpu(runs: Mapping[str, Any]) -> str:
    """The Python CPU per transfer of the hand-written 2PCs at concurrency 8, from the same
    run: what the same transfers cost with no framework (``floor-seq``: the plain
    sequential one; ``floor``: prepares and commits on a helper thread)."""
    found = [
        f"{name} {runs[name]['8']['cpu_ms_per_op_by_process'][measure.PYTHON_CPU]:.3f} ms"
        for name in HAND_WRITTEN
        if measure.PYTHON_CPU in runs.get(name, {}).get("8", {}).get("cpu_ms_per_op_by_process", {})
    ]
    return f"hand-written, same run: {', '.join(found)}" if found else ""
