"""Measuring: HDR latency histograms, closed- and open-loop runners, interleaved runs, spread.

Latencies go into an HDR histogram (microseconds, 3 significant digits, up
to 60 s) and are read back in milliseconds at p50, p90, p99, p99.9 and max.

- :func:`closed_loop` runs an operation on N threads back to back (the next
  one starts when the previous returns): throughput against concurrency.
- :func:`open_loop` starts operations at a fixed rate and measures each one
  from its *intended* start, so that a stall delays and shows in every
  operation scheduled behind it instead of silently lowering the offered load
  (the "coordinated omission" of closed-loop load generators).
- :func:`interleaved` runs several operations at concurrency 1 in alternating
  shuffled blocks, so that noise from a shared machine hits all of them alike;
  it is the fair way to compute a ratio between two of them.

An operation is a callable taking the operation's index and returning True
when it committed; only committed operations are recorded in the histogram.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hdrh.histogram import HdrHistogram

from scenarios.lab import procfs
from scenarios.stopping import checkpoint, stop_requested

#: One unit of work: called with its index, returns True when it committed.
Op = Callable[[int], bool]
#: Called after each operation (progress bars).
Tick = Callable[[], None]

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)
_LOWEST_US = 1
_HIGHEST_US = 60_000_000


class Latencies:
    """An HDR histogram of latencies: recorded in microseconds, read in milliseconds."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.histogram = HdrHistogram(_LOWEST_US, _HIGHEST_US, 3)
        self._lock = threading.Lock()

    def record(self, seconds: float) -> None:
        """Add one latency (seconds); values beyond the range are clamped to it."""
        micros = min(max(int(seconds * 1_000_000), _LOWEST_US), _HIGHEST_US)
        with self._lock:
            self.histogram.record_value(micros)

    def add(self, other: Latencies) -> None:
        """Merge ``other`` into this histogram."""
        with self._lock:
            self.histogram.add(other.histogram)

    @property
    def count(self) -> int:
        return int(self.histogram.get_total_count())

    def percentile(self, q: float) -> float:
        """The latency at percentile ``q`` (0-100), in milliseconds."""
        return float(self.histogram.get_value_at_percentile(q)) / 1000.0

    def summary(self) -> dict[str, float]:
        """count, p50, p90, p99, p99.9, max and mean in milliseconds (empty when no value)."""
        if not self.count:
            return {}
        out: dict[str, float] = {"count": self.count}
        for label, q in PERCENTILES:
            out[label] = round(self.percentile(q), 3)
        out["max"] = round(float(self.histogram.get_max_value()) / 1000.0, 3)
        out["mean"] = round(float(self.histogram.get_mean_value()) / 1000.0, 3)
        return out

    def encoded(self) -> str:
        """The histogram in HdrHistogram's compressed base64 form."""
        return str(self.histogram.encode().decode("ascii"))

    def cdf(self, points: int = 200) -> list[tuple[float, float]]:
        """(percentile, milliseconds) pairs for a percentile plot, log-spaced towards 100."""
        if not self.count:
            return []
        out = []
        for i in range(points):
            # 0, 90, 99, 99.9, ... evenly spaced in "number of nines".
            nines = 5.0 * i / (points - 1)
            q = 100.0 * (1.0 - 10.0 ** (-nines))
            out.append((q, self.percentile(q)))
        return out


@dataclass
class RunResult:
    """What one run of one operation produced."""

    name: str
    mode: str  # "closed", "open" or "interleaved"
    concurrency: int
    latencies: Latencies
    seconds: float = 0.0
    committed: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0  # process CPU time spent during the run (all threads)
    offered_rate: float | None = None  # open loop: operations started per second
    missed: int = 0  # open loop: operations never started before the hard stop
    started_at: float = field(default_factory=time.time)

    @property
    def throughput(self) -> float:
        """Committed operations per second of wall-clock time."""
        return self.committed / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_op(self) -> float:
        done = self.committed + self.failed
        return 1000.0 * self.cpu_seconds / done if done else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "offered_rate": self.offered_rate,
            "seconds": round(self.seconds, 3),
            "committed": self.committed,
            "failed": self.failed,
            "missed": self.missed,
            "throughput_per_s": round(self.throughput, 1),
            "cpu_ms_per_op": round(self.cpu_ms_per_op, 3),
            "latency_ms": self.latencies.summary(),
        }


def _stop_rule(count: int | None, duration: float | None) -> tuple[int, float]:
    if count is None and duration is None:
        raise ValueError("give a count, a duration, or both")
    return (count if count is not None else math.inf), (  # type: ignore[return-value]
        duration if duration is not None else math.inf
    )


def closed_loop(
    name: str,
    op: Op,
    *,
    concurrency: int,
    count: int | None = None,
    duration: float | None = None,
    tick: Tick | None = None,
) -> RunResult:
    """Run ``op`` back to back on ``concurrency`` threads until ``count`` ops or ``duration`` s."""
    limit, seconds = _stop_rule(count, duration)
    result = RunResult(name, "closed", concurrency, Latencies(name))
    lock = threading.Lock()
    next_index = 0
    errors: list[BaseException] = []
    started = time.perf_counter()
    deadline = started + seconds

    def worker() -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= limit or time.perf_counter() >= deadline or errors:
                    return
                if stop_requested():  # SIGTERM/SIGINT: the op in hand finished
                    return
                index = next_index
                next_index += 1
            if not _measure(op, index, time.perf_counter(), result, lock, errors, tick):
                return

    cpu = time.process_time()
    _run_threads(worker, concurrency, name)
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu
    if errors:
        raise errors[0]
    return result


def _measure(
    op: Op,
    index: int,
    start: float,
    result: Any,
    lock: threading.Lock,
    errors: list[BaseException],
    tick: Tick | None,
) -> bool:
    """Run ``op(index)`` and record its latency from ``start``; False if it raised."""
    try:
        ok = op(index)
    except BaseException as exc:
        with lock:
            errors.append(exc)
        return False
    end = time.perf_counter()
    if ok:
        result.latencies.record(end - start)
    with lock:
        if ok:
            result.committed += 1
        else:
            result.failed += 1
    if tick is not None:
        tick()
    return True


def open_loop(
    name: str,
    op: Op,
    *,
    rate: float,
    duration: float,
    workers: int = 32,
    tick: Tick | None = None,
    hard_stop_factor: float = 3.0,
) -> RunResult:
    """Start ``op`` ``rate`` times a second for ``duration`` s, each timed from its intended start.

    ``workers`` threads serve the schedule; when they are all busy, the next
    operation starts late and its latency includes the wait. Operations not
    started by ``hard_stop_factor`` x ``duration`` are counted as missed.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    total = max(1, int(rate * duration))
    result = RunResult(name, "open", workers, Latencies(name), offered_rate=rate)
    lock = threading.Lock()
    next_index = 0
    errors: list[BaseException] = []
    interval = 1.0 / rate
    started = time.perf_counter()
    hard_stop = started + duration * hard_stop_factor

    def worker() -> None:
        nonlocal next_index
        while True:
            with lock:
                if next_index >= total or errors or stop_requested():
                    return
                index = next_index
                next_index += 1
            intended = started + index * interval
            now = time.perf_counter()
            if now >= hard_stop:
                with lock:
                    result.missed += 1
                continue
            if intended > now:
                time.sleep(intended - now)
            if not _measure(op, index, intended, result, lock, errors, tick):
                return

    cpu = time.process_time()
    _run_threads(worker, workers, name)
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu
    if errors:
        raise errors[0]
    return result


def interleaved_blocks(
    ops: Mapping[str, Op],
    *,
    rounds: int,
    per_round: int,
    seed: int = 0,
    tick: Tick | None = None,
) -> dict[str, list[RunResult]]:
    """Run every op at concurrency 1 in ``rounds`` blocks of ``per_round``, in shuffled order.

    Returns one RunResult per block and op, so that a ratio between two ops
    can be computed block by block (its spread tells signal from noise). Each
    operation's CPU time is the process's CPU time across the call (the helper
    threads it uses included), so ``cpu_ms_per_op`` is its own cost.
    """
    rng = random.Random(seed)
    blocks: dict[str, list[RunResult]] = {name: [] for name in ops}
    counters = dict.fromkeys(ops, 0)
    names = list(ops)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            op = ops[name]
            result = RunResult(name, "interleaved", 1, Latencies(name))
            for _ in range(per_round):
                cpu = time.process_time()
                begin = time.perf_counter()
                ok = op(counters[name])
                end = time.perf_counter()
                result.cpu_seconds += time.process_time() - cpu
                result.seconds += end - begin
                counters[name] += 1
                if ok:
                    result.committed += 1
                    result.latencies.record(end - begin)
                else:
                    result.failed += 1
                if tick is not None:
                    tick()
            blocks[name].append(result)
    return blocks


def merge_blocks(name: str, blocks: Sequence[RunResult]) -> RunResult:
    """One RunResult adding up ``blocks`` (their histograms, counts and times)."""
    total = RunResult(
        name,
        blocks[0].mode if blocks else "interleaved",
        blocks[0].concurrency if blocks else 1,
        merged(blocks, name),
    )
    if blocks:
        total.started_at = blocks[0].started_at
    for block in blocks:
        total.seconds += block.seconds
        total.committed += block.committed
        total.failed += block.failed
        total.cpu_seconds += block.cpu_seconds
    return total


def interleaved(
    ops: Mapping[str, Op],
    *,
    rounds: int,
    per_round: int,
    seed: int = 0,
    tick: Tick | None = None,
) -> dict[str, RunResult]:
    """:func:`interleaved_blocks` with each op's blocks merged into one RunResult."""
    blocks = interleaved_blocks(ops, rounds=rounds, per_round=per_round, seed=seed, tick=tick)
    return {name: merge_blocks(name, runs) for name, runs in blocks.items()}


def _run_threads(target: Callable[[], None], count: int, name: str) -> None:
    threads = [
        threading.Thread(target=target, name=f"bench-{name}-{i}", daemon=True) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    checkpoint()  # stopped: give the measurement up, its operations are done


# -- repeated runs -------------------------------------------------------------------


def spread(values: Iterable[float]) -> dict[str, float]:
    """median, min, max and (sample) standard deviation of repeated measurements."""
    data = sorted(values)
    if not data:
        return {}
    return {
        "median": round(statistics.median(data), 3),
        "min": round(data[0], 3),
        "max": round(data[-1], 3),
        "stdev": round(statistics.stdev(data), 3) if len(data) > 1 else 0.0,
        "n": len(data),
    }


def merged(results: Sequence[RunResult], name: str | None = None) -> Latencies:
    """One histogram holding every latency of ``results``."""
    total = Latencies(name or (results[0].name if results else ""))
    for result in results:
        total.add(result.latencies)
    return total


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator rounded to 3 places, or None when undefined."""
    if not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return round(numerator / denominator, 3)


def ratio_of_medians(
    readings: Sequence[Mapping[str, float]], numerator: str, denominator: str
) -> float | None:
    """The median of ``numerator`` over the median of ``denominator`` across interleaved
    readings (one mapping of figures per round), as :func:`ratio` gives it."""
    return ratio(
        statistics.median(r[numerator] for r in readings),
        statistics.median(r[denominator] for r in readings),
    )


# -- histogram logs ------------------------------------------------------------------


def write_histogram_log(path: Path, results: Iterable[RunResult], *, comment: str = "") -> None:
    """One tagged interval line per run, in HdrHistogram's log format 1.3 (values in ms)."""
    with path.open("w") as out:
        _write_log(out, results, comment)


def _write_log(out: TextIO, results: Iterable[RunResult], comment: str) -> None:
    out.write("#[Histogram log format version 1.3]\n")
    if comment:
        out.write(f"#{comment}\n")
    out.write("#[values in microseconds; max column in milliseconds]\n")
    out.write('"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"\n')
    for r in results:
        if not r.latencies.count:
            continue
        tag = f"{r.name}/{r.mode}/c{r.concurrency}"
        if r.offered_rate is not None:
            tag += f"/r{r.offered_rate:g}"
        tag = "".join(ch if ch.isalnum() or ch in "-_./" else "_" for ch in tag)
        max_ms = r.latencies.histogram.get_max_value() / 1000.0
        out.write(
            f"Tag={tag},{r.started_at:.3f},{r.seconds:.3f},{max_ms:.3f},{r.latencies.encoded()}\n"
        )


# -- CPU of the services -------------------------------------------------------------


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by ``root``, its live descendants and the children it reaped."""
    children: dict[int, list[int]] = {}
    own: dict[int, float] = {}
    for pid in procfs.pids():
        fields = procfs.stat_fields(pid)
        if fields is None:
            continue
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(pid)
        # utime, stime (fields 14, 15 of stat; 0-based 11, 12 after the name)
        own[pid] = (int(fields[11]) + int(fields[12])) / procfs.TICKS
        if pid == root:
            own[pid] += (int(fields[13]) + int(fields[14])) / procfs.TICKS  # cutime, cstime
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += own.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


#: The name under which ServiceCpu counts this process's own CPU.
PYTHON_CPU = "python (twopc)"
#: The name under which ServiceCpu counts the busy time of every CPU of the machine:
#: the named processes, the kernel's work charged to none of them, and whatever else
#: runs on the machine (other tenants of a shared one).
MACHINE_CPU = "the whole machine"


class ServiceCpu:
    """CPU seconds of named process trees (the lab's services), of this process, and of
    the whole machine (:data:`MACHINE_CPU`, not one of the processes: never add it to
    their sum)."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)

    def snapshot(self) -> dict[str, float]:
        out = {PYTHON_CPU: time.process_time()}
        for name, pid in self.roots.items():
            out[name] = tree_cpu_seconds(pid)
        out[MACHINE_CPU] = procfs.busy_seconds()
        return out

    @staticmethod
    def per_op_ms(
        before: Mapping[str, float], after: Mapping[str, float], ops: int
    ) -> dict[str, float]:
        """Milliseconds of CPU per operation of each tree between two snapshots."""
        if not ops:
            return {}
        return {name: round(1000.0 * (after[name] - before[name]) / ops, 3) for name in before}
