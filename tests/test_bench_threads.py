"""The thread-pool measurements: 'twopc bench threads' (no lab needed)."""

from __future__ import annotations

from scenarios.bench import parts, threads


def test_each_mode_runs_every_task_of_its_burst() -> None:
    """A small burst in each mode: every task ran, and the figures have their shape."""
    for mode in threads.MODES:
        figures = threads.run_mode(mode, 20)
        assert figures["done"] == 20
        assert figures["latency_ms"]["min"] >= threads.IO_SECONDS * 1000
        assert figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
        assert figures["start_us"]["p50"] <= figures["start_us"]["p99"]


def test_only_the_thread_per_task_mode_grows_a_thread_per_task() -> None:
    """Threads added: some per task, at most the pool's size, none for asyncio tasks."""
    per_task = threads.run_mode("thread-per-task", 40)
    pool = threads.run_mode("fixed-pool", 40)
    tasks = threads.run_mode("asyncio", 40)
    assert per_task["threads_added"] > 0
    assert pool["threads_added"] <= threads.POOL_THREADS
    # <= 0: a thread of the pool just shut down may still be exiting when the count is taken
    # (the benchmark runs each mode in a process of its own; this test runs them in one)
    assert tasks["threads_added"] <= 0


def test_the_part_renders_a_row_per_mode() -> None:
    """'twopc bench threads' is a report part whose section has a row per mode."""
    result = {
        "tasks": 2,
        "io_ms": 50.0,
        "cpu_items": 2000,
        "pool_threads": 16,
        "modes": [threads.run_mode(mode, 2) for mode in threads.MODES],
    }
    (section,) = parts.part("threads").sections(result)
    assert [row[0] for row in section.rows] == list(threads.MODES)
    assert "50 ms" in section.note
