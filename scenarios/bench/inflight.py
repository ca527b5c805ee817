"""``twopc bench --inflight``: 1,000 transactions in flight, threads against asyncio tasks.

Each of ``inflight`` workers begins a global transaction and then waits, as
work that waits on the network does (a call to another service), until all
of them are in flight at once; then each writes one row to database A and
one to B and sends one message, and commits (two prepared branches, the
broker's marker as the commit point). The lab's PostgreSQL allows 200
connections and 200 prepared transactions per database, and the broker pool
at most 64 sessions, so the writing and committing part runs behind a gate of
``gate`` workers at a time, with participant pools of that size: the
thousand transactions are open together, the databases see at most ``gate``.

* **threads**: the sync :class:`~coordinator.Coordinator`, one thread per
  transaction (``threading.Thread``), the gate a ``threading.Semaphore``;
* **asyncio**: :class:`~coordinator.aio.AsyncCoordinator`, one task per
  transaction, the gate an ``asyncio.Semaphore``;
* **asyncio-2**: the same in-flight count and gate split over two processes,
  each an asyncio coordinator with its own coordinator id (its own gtrids,
  client-ids, marker queue and decision log): one event loop per core. Both
  release their transactions together (a barrier of files); commits per
  second are counted from the first release to the last commit, memory and
  threads summed.

Each coordinator keeps its decisions where TWOPC_DECISIONS says: in a file of its own
(``file``), or (``postgres``) as decision rows in database A, holding a liveness lock
there, as coordinators that can recover each other do.

Each mode runs in a fresh process of its own (so their memory does not mix),
and reports the process's RSS before the workers start and when all of them
are in flight (``/proc/self/status`` VmRSS), its peak (VmHWM), its thread
count in flight, and the commits per second from the release to the last
commit.

RSS moves by whole pages, and what a worker frees goes back to the allocator,
not always to the system, so its figure per transaction carries some noise.
Beside it, each mode reports the Python heap one transaction in flight holds,
exactly (``tracemalloc``): after the measured run, the same workers begin
their transactions again with tracing on, the bytes still allocated once all
are in flight are read, and each then rolls back. Tracing is off while RSS is
read (it costs memory of its own), and a thread's stack is not on the heap:
for threads the heap figure is the Python objects only.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

from coordinator.aio import AsyncCoordinator
from coordinator.coordinator import Coordinator
from coordinator.states import Outcome
from scenarios.config import Settings
from scenarios.lab.procfs import status_numbers
from scenarios.transfer.model import drain
from scenarios.wiring import async_participants, broker, databases, decision_log

MODES = ("threads", "asyncio", "asyncio-2")
#: The processes of the asyncio-2 mode.
PROCESSES = 2
#: How long one of them waits for the other to have its transactions in flight.
BARRIER_SECONDS = 120.0
TABLE = "bench_inflight"
QUEUE = "/queue/twopc.bench.inflight"
SCHEMA = f"CREATE TABLE IF NOT EXISTS {TABLE} (gtrid text PRIMARY KEY, side text NOT NULL)"


def _status() -> dict[str, int]:
    return status_numbers("self", ("VmRSS", "VmHWM", "Threads"))


def _decisions(settings: Settings, cid: str, log_path: Path) -> dict[str, Any]:
    """Where coordinator ``cid`` keeps its decisions, as TWOPC_DECISIONS says: its own file
    ``log_path``, or (postgres) the decision table and a liveness lock of its own; as
    keyword arguments of the coordinator."""
    mine = replace(settings, coordinator_id=cid)
    log, holder, membership = decision_log(mine, databases(mine, pool_size=0), log_path=log_path)
    return {
        "log": log,
        "decision_holder": holder,
        "membership": membership,
        "peer_interval": None,  # the bench's coordinators do not look after each other
    }


def run_threads(settings: Settings, inflight: int, gate: int, home: Path) -> dict[str, Any]:
    cid = f"bi{int(time.time()) % 100000}t"  # the bench's own gtrid prefix and client-ids
    coordinator = Coordinator(
        cid,
        resources=databases(replace(settings, coordinator_id=cid), pool_size=gate),
        broker=broker(settings, pool_size=gate, coordinator_id=cid),
        max_workers=gate,
        housekeeping_interval=None,
        **_decisions(settings, cid, home / "threads.log"),
    )
    with coordinator.transaction() as tx:
        tx.execute("a", SCHEMA)
        tx.execute("b", SCHEMA)
    before = _status()
    outcomes: list[Outcome] = []
    errors: list[str] = []
    release = threading.Event()
    threads = _begin_threads(coordinator, inflight, gate, release, outcomes, errors)
    in_flight = _status()
    started = time.perf_counter()
    release.set()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    result = _result("threads", inflight, gate, before, in_flight, seconds, outcomes, errors)
    release = threading.Event()
    gc.collect()
    tracemalloc.start()
    try:
        threads = _begin_threads(coordinator, inflight, 0, release, [], errors)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    release.set()
    for thread in threads:
        thread.join()
    coordinator.close()
    return {**result, **_heap_figure(held, inflight, errors)}


def _begin_threads(
    coordinator: Coordinator,
    inflight: int,
    gate: int,
    release: threading.Event,
    outcomes: list[Outcome],
    errors: list[str],
) -> list[threading.Thread]:
    """Start ``inflight`` workers; return once each has begun its transaction. On
    ``release`` each does its work behind a gate of ``gate`` and commits, or with
    ``gate`` 0 (the traced pass) rolls back."""
    admitted = threading.Semaphore(gate)
    begun = threading.Semaphore(0)

    def worker() -> None:
        try:
            tx = coordinator.begin()
            begun.release()
            release.wait()
            if not gate:
                tx.rollback("the traced pass ends")
                return
            with admitted:
                tx.execute("a", f"INSERT INTO {TABLE} VALUES (%s, 'a')", (tx.gtrid,))
                tx.execute("b", f"INSERT INTO {TABLE} VALUES (%s, 'b')", (tx.gtrid,))
                tx.send(QUEUE, tx.gtrid, {"gtrid": tx.gtrid})
                outcomes.append(tx.commit())
        except Exception as exc:  # counted and reported: no worker dies silently
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, name=f"tx-{i}") for i in range(inflight)]
    for thread in threads:
        thread.start()
    for _ in range(inflight):
        begun.acquire()
    return threads


def _heap_figure(held: int, inflight: int, errors: list[str]) -> dict[str, Any]:
    """The traced pass's figure: Python heap bytes held per transaction in flight (and the
    errors of both passes)."""
    return {
        "heap_per_transaction_kib": round(held / inflight / 1024, 2),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def _run_asyncio(
    settings: Settings,
    inflight: int,
    gate: int,
    home: Path,
    barrier: Path | None = None,
    part: int = 0,
) -> dict[str, Any]:
    cid = f"bi{int(time.time()) % 100000}a{part}"
    resources, mq = async_participants(settings, cid, pool_size=gate)
    coordinator = AsyncCoordinator(
        cid,
        resources=resources,
        broker=mq,
        housekeeping_interval=None,
        **_decisions(settings, cid, home / f"asyncio-{part}.log"),
    )
    await coordinator.start()
    async with coordinator.transaction() as tx:
        await tx.execute("a", SCHEMA)
        await tx.execute("b", SCHEMA)
    before = _status()
    outcomes: list[Outcome] = []
    errors: list[str] = []
    release = asyncio.Event()
    tasks = await _begin_tasks(coordinator, inflight, gate, release, outcomes, errors)
    in_flight = _status()
    if barrier is not None:
        await _all_ready(barrier, part)
    started_at = time.time()
    started = time.perf_counter()
    release.set()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    ended_at = time.time()
    result = _result("asyncio", inflight, gate, before, in_flight, seconds, outcomes, errors)
    release = asyncio.Event()
    gc.collect()
    tracemalloc.start()
    try:
        tasks = await _begin_tasks(coordinator, inflight, 0, release, [], errors)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    release.set()
    await asyncio.gather(*tasks)
    await coordinator.close()
    heap = _heap_figure(held, inflight, errors)
    return {**result, **heap, "started_at": started_at, "ended_at": ended_at}


async def _begin_tasks(
    coordinator: AsyncCoordinator,
    inflight: int,
    gate: int,
    release: asyncio.Event,
    outcomes: list[Outcome],
    errors: list[str],
) -> list[asyncio.Task[None]]:
    """Start ``inflight`` workers; return once each has begun its transaction. On
    ``release`` each does its work behind a gate of ``gate`` and commits, or with
    ``gate`` 0 (the traced pass) rolls back."""
    admitted = asyncio.Semaphore(gate)
    begun = 0
    all_begun = asyncio.Event()

    async def worker() -> None:
        nonlocal begun
        try:
            tx = coordinator.begin()
            begun += 1
            if begun == inflight:
                all_begun.set()
            await release.wait()
            if not gate:
                await tx.rollback("the traced pass ends")
                return
            async with admitted:
                await tx.execute("a", f"INSERT INTO {TABLE} VALUES (%s, 'a')", (tx.gtrid,))
                await tx.execute("b", f"INSERT INTO {TABLE} VALUES (%s, 'b')", (tx.gtrid,))
                await tx.send(QUEUE, tx.gtrid, {"gtrid": tx.gtrid})
                outcomes.append(await tx.commit())
        except Exception as exc:  # counted and reported: no worker dies silently
            errors.append(f"{type(exc).__name__}: {exc}")

    tasks = [asyncio.create_task(worker(), name=f"tx-{i}") for i in range(inflight)]
    await all_begun.wait()
    return tasks


async def _all_ready(barrier: Path, part: int) -> None:
    """Say this process has every transaction in flight; wait until every process has (a
    process that failed before never will: give up after ``BARRIER_SECONDS``)."""
    (barrier / f"ready-{part}").touch()
    deadline = time.monotonic() + BARRIER_SECONDS
    while len(list(barrier.glob("ready-*"))) < PROCESSES:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"asyncio-2: the other process did not have its transactions in flight "
                f"within {BARRIER_SECONDS:.0f} s"
            )
        await asyncio.sleep(0.001)


def _result(
    mode: str,
    inflight: int,
    gate: int,
    before: dict[str, int],
    in_flight: dict[str, int],
    seconds: float,
    outcomes: list[Outcome],
    errors: list[str],
) -> dict[str, Any]:
    committed = sum(o is Outcome.COMMITTED for o in outcomes)
    return {
        "mode": mode,
        "inflight": inflight,
        "gate": gate,
        "rss_before_mib": round(before["VmRSS"] / 1024, 1),
        "rss_in_flight_mib": round(in_flight["VmRSS"] / 1024, 1),
        "rss_per_transaction_kib": round((in_flight["VmRSS"] - before["VmRSS"]) / inflight, 1),
        "rss_peak_mib": round(_status()["VmHWM"] / 1024, 1),
        "threads_in_flight": in_flight["Threads"],
        "committed": committed,
        "other_outcomes": len(outcomes) - committed,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(seconds, 3),
        "commits_per_second": round(committed / seconds, 1) if seconds else 0.0,
    }


def run_mode(
    mode: str, inflight: int, gate: int, barrier: str | None = None, part: int = 0
) -> dict[str, Any]:
    """One mode in this process (the child's side); ``barrier``: a folder where the
    processes of the asyncio-2 mode meet before they release their transactions."""
    settings = Settings.load()
    with tempfile.TemporaryDirectory(prefix="twopc-inflight-") as home:
        if mode == "threads":
            result = run_threads(settings, inflight, gate, Path(home))
        else:
            shared = Path(barrier) if barrier else None
            result = asyncio.run(_run_asyncio(settings, inflight, gate, Path(home), shared, part))
    return {**result, "decisions": settings.decisions}


def _child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "scenarios.bench.inflight", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _answers(mode: str, children: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Each child's result, once all have ended; every failed child's error if any failed."""
    ended = [child.communicate() for child in children]
    failed = [
        err.strip()[-2000:]
        for child, (_, err) in zip(children, ended, strict=True)
        if child.returncode
    ]
    if failed:
        raise RuntimeError(f"the {mode} run failed: " + "\n".join(failed))
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in ended]


def _split(inflight: int, gate: int) -> dict[str, Any]:
    """The asyncio-2 mode: two processes with half the transactions and gate each."""
    with tempfile.TemporaryDirectory(prefix="twopc-inflight-barrier-") as barrier:
        children = [
            _child("asyncio", str(inflight // PROCESSES), str(gate // PROCESSES), barrier, str(i))
            for i in range(PROCESSES)
        ]
        parts = _answers("asyncio-2", children)
    seconds = max(p["ended_at"] for p in parts) - min(p["started_at"] for p in parts)
    committed = sum(p["committed"] for p in parts)
    errors = [p["first_error"] for p in parts if p["first_error"]]
    total = {key: sum(p[key] for p in parts) for key in ("rss_before_mib", "rss_in_flight_mib")}
    return {
        "mode": "asyncio-2",
        "decisions": parts[0]["decisions"],
        "inflight": sum(p["inflight"] for p in parts),
        "gate": sum(p["gate"] for p in parts),
        **{key: round(value, 1) for key, value in total.items()},
        "rss_per_transaction_kib": round(
            1024 * (total["rss_in_flight_mib"] - total["rss_before_mib"]) / inflight, 1
        ),
        "heap_per_transaction_kib": round(
            sum(p["heap_per_transaction_kib"] * p["inflight"] for p in parts) / inflight, 2
        ),
        "rss_peak_mib": round(sum(p["rss_peak_mib"] for p in parts), 1),
        "threads_in_flight": sum(p["threads_in_flight"] for p in parts),
        "committed": committed,
        "other_outcomes": sum(p["other_outcomes"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "first_error": errors[0] if errors else None,
        "seconds": round(seconds, 3),
        "commits_per_second": round(committed / seconds, 1) if seconds else 0.0,
    }


def run(inflight: int = 1000, gate: int = 48) -> list[dict[str, Any]]:
    """Every mode, each in fresh processes of its own; their results.

    Nothing reads the messages the transactions send: they are dropped once every mode
    has run (or failed). Left on the broker, scattered among the other messages, they
    keep the journal files of its store alive: runs add up until the lab broker's 4 GB
    store is full, and it stops every producer."""
    results = []
    try:
        for mode in MODES:
            if mode == "asyncio-2":
                results.append(_split(inflight, gate))
            else:
                results.extend(_answers(mode, [_child(mode, str(inflight), str(gate))]))
    finally:
        drain(Settings.load(), QUEUE)
    return results


#: Where the coordinators kept their decisions (TWOPC_DECISIONS), in the table's words.
_KEPT = {
    "file": "in a file of each coordinator's own",
    "postgres": "in PostgreSQL (TWOPC_DECISIONS=postgres: each coordinator its decision rows "
    "and liveness lock)",
}


def render_markdown(results: list[dict[str, Any]], command: str) -> str:
    """The side-by-side table."""
    lines = [
        f"## {results[0]['inflight']:,} transactions in flight: threads against asyncio tasks",
        "",
        f"`{command}`: every transaction open at once, then A, B and one message each "
        f"behind a gate of {results[0]['gate']} (participant pools of that size); "
        "asyncio-2 splits both over two processes, each its own coordinator. "
        f"Decisions {_KEPT[results[0].get('decisions', 'file')]}. "
        "Heap per transaction: the Python heap one holds in flight (tracemalloc, in a "
        "second pass that rolls back; a thread's stack is not on it).",
        "",
        "| mode | RSS before | RSS in flight | per transaction | heap per transaction "
        "| peak RSS | threads | committed | commits/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['rss_before_mib']} MiB | {r['rss_in_flight_mib']} MiB "
            f"| {r['rss_per_transaction_kib']} KiB | {r['heap_per_transaction_kib']} KiB "
            f"| {r['rss_peak_mib']} MiB "
            f"| {r['threads_in_flight']} | {r['committed']} | {r['commits_per_second']} |"
        )
    failed = [r for r in results if r["errors"] or r["other_outcomes"]]
    for r in failed:
        lines.append(
            f"\n{r['mode']}: {r['errors']} errors, {r['other_outcomes']} not committed "
            f"(first: {r['first_error']})"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    barrier, part = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, 0)
    print(json.dumps(run_mode(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), barrier, part)))
