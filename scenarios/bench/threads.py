"""``twopc bench threads``: a new thread per task, a fixed thread pool and asyncio tasks, measured.

One burst of ``tasks`` tasks is handed out as fast as the caller can: each
task models a call to another service, :data:`IO_SECONDS` of waiting
(``time.sleep`` / ``asyncio.sleep``) and then a little CPU (summing
:data:`CPU_ITEMS` integers). Three ways to run them:

* **thread per task**: ``threading.Thread(target=task).start()`` for each;
* **fixed pool**: a ``ThreadPoolExecutor`` of :data:`POOL_THREADS` threads,
  started (warmed) before the burst, so its threads exist already, as the
  chapter says of a pool; the burst waits in the pool's queue;
* **asyncio tasks**: ``asyncio.create_task`` for each, on one event loop.

Each mode runs in a fresh process of its own (``python -m
scenarios.bench.threads MODE TASKS``), so their memory does not mix, and
reports:

* the start cost: how long the caller spent handing out one task (creating
  and starting a thread, ``submit``, ``create_task``), p50 and p99;
* the latency: from handing a task out to its end, p50 and p99; the floor is
  the task itself (IO_SECONDS and the CPU piece), the rest is waiting for a
  thread or for the event loop;
* the memory: RSS before the burst, and the peak (``VmHWM`` of
  ``/proc/self/status``) minus it; and the most threads the process had
  (read every :data:`SAMPLE_EVERY` tasks handed out).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from scenarios.bench.section import Section
from scenarios.config import Settings
from scenarios.lab.procfs import status_numbers

MODES = ("thread-per-task", "fixed-pool", "asyncio")
#: The waiting part of each task (a call to another service), in seconds.
IO_SECONDS = 0.2
#: The CPU part of each task: sum(range(CPU_ITEMS)).
CPU_ITEMS = 2_000
#: Threads of the fixed pool.
POOL_THREADS = 16
#: How often (in tasks handed out) the thread count is read during the burst.
SAMPLE_EVERY = 50
#: Tasks in one burst, for a full and a quick run.
TASKS = {False: 1_000, True: 200}


def _status() -> dict[str, int]:
    return status_numbers("self", ("VmRSS", "VmHWM", "Threads"))


def _cpu_piece() -> int:
    return sum(range(CPU_ITEMS))


class _Recorder:
    """Start costs and latencies of one burst, and the most threads seen while it ran."""

    def __init__(self, tasks: int) -> None:
        self.start_s: list[float] = []
        self.latency_s = [0.0] * tasks
        self.peak_threads = 0

    def sample_threads(self, handed_out: int = 0) -> None:
        """Read the thread count (every SAMPLE_EVERY tasks handed out, and at the end)."""
        if handed_out % SAMPLE_EVERY == 0:
            self.peak_threads = max(self.peak_threads, _status()["Threads"])


def run_thread_per_task(tasks: int) -> tuple[_Recorder, float]:
    """A new thread for each task; the burst's wall time."""
    rec = _Recorder(tasks)

    def task(index: int, handed: float) -> None:
        time.sleep(IO_SECONDS)
        _cpu_piece()
        rec.latency_s[index] = time.perf_counter() - handed

    threads = []
    started = time.perf_counter()
    for i in range(tasks):
        handed = time.perf_counter()
        thread = threading.Thread(target=task, args=(i, handed))
        thread.start()
        rec.start_s.append(time.perf_counter() - handed)
        threads.append(thread)
        rec.sample_threads(i)
    rec.sample_threads()
    for thread in threads:
        thread.join()
    return rec, time.perf_counter() - started


def run_fixed_pool(tasks: int) -> tuple[_Recorder, float]:
    """A pool of POOL_THREADS threads, all started before the burst."""
    rec = _Recorder(tasks)
    with ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="bench-pool") as pool:
        warm = threading.Barrier(POOL_THREADS)  # every pool thread exists before the burst
        for warming in [pool.submit(warm.wait) for _ in range(POOL_THREADS)]:
            warming.result()

        def task(index: int, handed: float) -> None:
            time.sleep(IO_SECONDS)
            _cpu_piece()
            rec.latency_s[index] = time.perf_counter() - handed

        futures = []
        started = time.perf_counter()
        for i in range(tasks):
            handed = time.perf_counter()
            futures.append(pool.submit(task, i, handed))
            rec.start_s.append(time.perf_counter() - handed)
            rec.sample_threads(i)
        rec.sample_threads()
        for done in futures:
            done.result()
        seconds = time.perf_counter() - started
    return rec, seconds


async def _run_asyncio(tasks: int) -> tuple[_Recorder, float]:
    rec = _Recorder(tasks)

    async def task(index: int, handed: float) -> None:
        await asyncio.sleep(IO_SECONDS)
        _cpu_piece()
        rec.latency_s[index] = time.perf_counter() - handed

    running = []
    started = time.perf_counter()
    for i in range(tasks):
        handed = time.perf_counter()
        running.append(asyncio.create_task(task(i, handed)))
        rec.start_s.append(time.perf_counter() - handed)
        rec.sample_threads(i)
    rec.sample_threads()
    await asyncio.gather(*running)
    return rec, time.perf_counter() - started


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(mode: str, tasks: int) -> dict[str, Any]:
    """One mode in this process (the child's side); its figures."""
    before = _status()
    if mode == "thread-per-task":
        rec, seconds = run_thread_per_task(tasks)
    elif mode == "fixed-pool":
        rec, seconds = run_fixed_pool(tasks)
    elif mode == "asyncio":
        rec, seconds = asyncio.run(_run_asyncio(tasks))
    else:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    after = _status()
    floor = min(rec.latency_s)
    return {
        "mode": mode,
        "tasks": tasks,
        "threads_at_peak": rec.peak_threads,
        "threads_added": rec.peak_threads - before["Threads"],
        "start_us": {
            "p50": round(_quantile(rec.start_s, 0.5) * 1e6, 1),
            "p99": round(_quantile(rec.start_s, 0.99) * 1e6, 1),
        },
        "latency_ms": {
            "min": round(floor * 1000, 1),
            "p50": round(_quantile(rec.latency_s, 0.5) * 1000, 1),
            "p99": round(_quantile(rec.latency_s, 0.99) * 1000, 1),
        },
        "seconds": round(seconds, 3),
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1),
        "done": sum(1 for latency in rec.latency_s if latency > 0),
    }


def run(settings: Settings | None = None, *, quick: bool) -> dict[str, Any]:
    """Every mode, each in a fresh process; no lab needed (``settings`` is unused)."""
    tasks = TASKS[quick]
    modes = []
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, "-m", "scenarios.bench.threads", mode, str(tasks)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench threads: the {mode} run failed: {done.stderr[-2000:]}")
        modes.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "tasks": tasks,
        "io_ms": IO_SECONDS * 1000,
        "cpu_items": CPU_ITEMS,
        "pool_threads": POOL_THREADS,
        "modes": modes,
    }


def sections(result: Mapping[str, Any]) -> list[Section]:
    """One table: a row per mode."""
    rows = [
        [
            m["mode"],
            f"{m['threads_at_peak']:,}",
            f"{m['start_us']['p50']:g} / {m['start_us']['p99']:g}",
            f"{m['latency_ms']['p50']:g} / {m['latency_ms']['p99']:g}",
            f"{m['seconds']:g}",
            f"{m['rss_growth_mib']:g}",
        ]
        for m in result["modes"]
    ]
    note = (
        f"One burst of {result['tasks']:,} tasks, handed out back to back; each task waits "
        f"{result['io_ms']:g} ms (a sleep standing for a call to another service) and then "
        f"sums {result['cpu_items']:,} integers. The fixed pool has {result['pool_threads']} "
        "threads, started before the burst. Each mode runs in a fresh process. Start: "
        "the caller's time to hand out one task (create and start a thread, submit to "
        "the pool, create a task). Latency: from handing a task out to its end; the "
        f"task alone takes about {result['io_ms']:g} ms, the rest is waiting for a thread "
        "or the event loop. Threads at peak: the process's threads, read every "
        f"{SAMPLE_EVERY} tasks handed out. Memory: peak RSS (VmHWM) minus RSS before the burst."
    )
    return [
        Section(
            "Threads: a new thread per task, a fixed pool, asyncio tasks",
            [
                "mode",
                "threads at peak",
                "start p50 / p99 (µs)",
                "latency p50 / p99 (ms)",
                "burst (s)",
                "peak RSS growth (MiB)",
            ],
            rows,
            note=note,
        )
    ]


if __name__ == "__main__":
    print(json.dumps(run_mode(sys.argv[1], int(sys.argv[2]))))
