"""The performance targets, each with the figure of one ``twopc bench overhead`` run.

The overhead benchmark's own runs give the latency ratio at concurrency 1;
this module adds the measurements it does not make (the coordinator against
``floor-seq`` and the outbox-status strategy at concurrency 16, the outbox that
publishes the coordinator's event too beside them, shown but not a target, and the
coordinator's and ``floor-seq``'s CPU per transfer at 8, side by side in
:mod:`scenarios.bench.side_by_side`; transactions in flight under threads and
asyncio; the two consumers) and puts every figure beside its target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from scenarios.bench import consumers, measure, side_by_side
from scenarios.bench.inflight import run as inflight_run
from scenarios.config import Settings

T = TypeVar("T")


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
    settings: Settings,
    *,
    rounds: int,
    seconds: float,
    inflight: int,
    consumer_messages: tuple[int, int],
) -> dict[str, Any]:
    """What the overhead benchmark does not measure itself, one after the other: the
    side_by_side contenders at concurrency 16 and the coordinator's and ``floor-seq``'s
    CPU per transfer at 8, side by side (``rounds`` rounds of a ``seconds``
    block each; ``side_by_side_c16`` and ``cpu_side_by_side_c8``), ``inflight``
    transactions in flight (the median of :data:`INFLIGHT_ROUNDS` rounds), and the
    consumers over ``consumer_messages`` (throughput, latency) messages."""
    count, latency_count = consumer_messages
    out: dict[str, Any] = {"seconds": {}}
    for key, measurement in (
        (
            "side_by_side",
            lambda: side_by_side.run(settings, rounds=rounds, seconds=seconds),
        ),
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
    side = out.pop("side_by_side")
    out["side_by_side_c16"], out["cpu_side_by_side_c8"] = side["throughput_c16"], side["cpu_c8"]
    return out


def rows(latency: Mapping[str, Any], extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured figure and whether it is met (None: not measured)."""
    side = extra.get("side_by_side_c16", {})
    cpu = extra.get("cpu_side_by_side_c8", {})
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
            of(lambda: side["ratios"][f"coordinator/{side_by_side.FLOOR_SEQ}"]["median"]),
            of(lambda: _side_by_side_detail(side, side_by_side.FLOOR_SEQ)) or "",
        ),
        (
            OUTBOX_RATIO,
            of(lambda: side["ratios"][f"coordinator/{side_by_side.OUTBOX}"]["median"]),
            of(lambda: _outbox_detail(side)) or "",
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
            of(lambda: cpu["cpu_ms_per_transfer"][side_by_side.COORDINATOR][measure.PYTHON_CPU]),
            of(lambda: _cpu_detail(cpu)) or "",
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


def _side_by_side_detail(
    side: Mapping[str, Any], other: str, ours: str = side_by_side.COORDINATOR
) -> str:
    """The median throughputs behind a side-by-side ratio, and every round's ratio."""
    tput = side["throughput_per_s"]
    rounds = ", ".join(f"{r:.2f}" for r in side["ratios"][f"{ours}/{other}"]["rounds"])
    return (
        f"{tput[ours]} / {tput[other]} /s, medians of {len(side['rounds'])} rounds "
        f"side by side (each round: {rounds})"
    )


#: The like-for-like ratios shown beside the outbox target's figure (not targets), each as
#: (ours, theirs, what the clause calls it).
LIKE_FOR_LIKE = (
    (
        side_by_side.COORDINATOR,
        side_by_side.OUTBOX_EVENT,
        f"like for like, against {side_by_side.OUTBOX_EVENT} (the event published too)",
    ),
    (
        side_by_side.COORDINATOR_DB,
        side_by_side.OUTBOX,
        f"like for like without the event, {side_by_side.COORDINATOR_DB} (A and B, no "
        f"broker) against {side_by_side.OUTBOX}",
    ),
)


def _outbox_detail(side: Mapping[str, Any]) -> str:
    """The outbox ratio's detail, and beside it each ratio of :data:`LIKE_FOR_LIKE` the run
    measured: the coordinator against outbox-status publishing its event too, and the
    coordinator without its broker branch against outbox-status, neither of which
    publishes an event."""
    detail = _side_by_side_detail(side, side_by_side.OUTBOX)
    for ours, theirs, called in LIKE_FOR_LIKE:
        ratio = side["ratios"].get(f"{ours}/{theirs}")
        if ratio is not None:
            detail += (
                f"; {called}: {ratio['median']:.3f}, {_side_by_side_detail(side, theirs, ours)}"
            )
    return detail


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


def _cpu_detail(cpu: Mapping[str, Any]) -> str:
    """The hand-written 2PC's Python CPU per transfer measured beside the coordinator's,
    and every round's pair."""
    python = measure.PYTHON_CPU
    coordinator, floor_seq = side_by_side.COORDINATOR, side_by_side.FLOOR_SEQ
    pairs = ", ".join(
        f"{r[coordinator][python]:.3f} / {r[floor_seq][python]:.3f}"
        for r in cpu["rounds"]
        if python in r[coordinator] and python in r[floor_seq]
    )
    return (
        f"hand-written, same run: {floor_seq} "
        f"{cpu['cpu_ms_per_transfer'][floor_seq][python]:.3f} ms; medians of "
        f"{len(cpu['rounds'])} rounds side by side (each round, coordinator / {floor_seq}: "
        f"{pairs} ms)"
    )
