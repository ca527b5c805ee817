"""The consume side: the inbox consumer against the consumer inside a global transaction.

``twopc bench --consumers`` runs both modes of ``twopc consumer`` on the same
lab, one after the other, each from a fresh reset, and measures:

* **latency per message**: one credit command at a time is sent (with a
  receipt) and B is polled every millisecond until its ``transfers`` row is
  visible (committed); the time from the send to that (p50, p99, max);
* **throughput**: ``count`` credit commands are stored on the queue first,
  then the consumer is started; messages per second from its start until B
  holds all of them;
* **WAL bytes per message on B**: ``pg_current_wal_insert_lsn()`` on B before
  and after the throughput phase, the difference divided by ``count`` (what
  the inbox row, or the PREPARE and COMMIT PREPARED records, cost).

Counts are bounded (:data:`MAX_COUNT`, :data:`MAX_LATENCY_COUNT`): this is a
side-by-side reading, not a soak.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg

from coordinator.errors import ConfigurationError
from scenarios.bench import measure
from scenarios.config import Settings
from scenarios.transfer import model as scenario
from scenarios.transfer.results import percentiles
from scenarios.wiring import open_stomp

MODES: tuple[str, ...] = ("inbox", "2pc")
MAX_COUNT = 5_000
MAX_LATENCY_COUNT = 500
ACCOUNTS = 100
WAIT_TIMEOUT = 120.0
#: A point of the batch-size curve stores at most this many batches' worth of messages.
CURVE_BATCHES = 100


class _Running:
    """A consumer of ``mode`` (``inbox``, ``2pc``, ``2pc-asyncio``) on a thread until
    :meth:`stop`; ``options`` go to a 2pc consumer (``batch_size``, ``max_wait``)."""

    def __init__(self, settings: Settings, mode: str, **options: Any) -> None:
        from scenarios.outbox.consumer import Consumer
        from scenarios.outbox.consumer_2pc import TwoPhaseConsumer
        from scenarios.outbox.consumer_2pc_aio import AsyncTwoPhaseConsumer

        self.stop_event = threading.Event()
        self.error: list[BaseException] = []
        runner: Any
        if mode == "inbox":
            runner = Consumer(settings)
        elif mode == "2pc-asyncio":
            runner = AsyncTwoPhaseConsumer(settings, **options)
        else:
            runner = TwoPhaseConsumer(settings, **options)
        self.thread = threading.Thread(target=self._run, args=(runner,), daemon=True)
        self.thread.start()

    def _run(self, runner: Any) -> None:
        try:
            runner.run(self.stop_event)
        except BaseException as exc:  # reported by check()
            self.error.append(exc)

    def check(self) -> None:
        if self.error:
            raise RuntimeError(f"the consumer stopped: {self.error[0]}")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)


def _credits(prefix: str, count: int) -> list[scenario.Transfer]:
    return [
        scenario.Transfer(
            f"{prefix}-{i:06d}",
            scenario.account_id(i % ACCOUNTS),
            scenario.account_id((i * 7) % ACCOUNTS),
            1,
        )
        for i in range(count)
    ]


def _headers(t: scenario.Transfer) -> dict[str, str]:
    return {"transfer-id": t.transfer_id, scenario.TYPE_HEADER: scenario.CREDIT_COMMAND}


def _in_b(conn: psycopg.Connection, prefix: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM transfers WHERE transfer_id LIKE %s", (f"{prefix}-%",)
    ).fetchone()
    return int(row[0]) if row else 0


def _holds(conn: psycopg.Connection, transfer_id: str) -> bool:
    """Does B hold (committed) ``transfer_id``?"""
    query = "SELECT 1 FROM transfers WHERE transfer_id = %s"
    return conn.execute(query, (transfer_id,)).fetchone() is not None


def _wait(condition: Callable[[], bool], check: Callable[[], None], what: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while not condition():
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not reached in {WAIT_TIMEOUT:g} s")
        time.sleep(0.001)


def _wal_lsn(conn: psycopg.Connection) -> str:
    row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    return str(row[0]) if row else "0/0"


def _store_backlog(settings: Settings, prefix: str, count: int) -> None:
    """``count`` credit commands on the queue, in one broker transaction."""
    with open_stomp(settings, participant="bench-broker") as client:
        client.begin("bench-backlog")
        for t in _credits(prefix, count):
            client.send(scenario.CREDIT_QUEUE, t.body(), _headers(t), transaction="bench-backlog")
        client.commit("bench-backlog", 30.0)


def _drain_backlog(
    conn: psycopg.Connection, running: _Running, prefix: str, count: int
) -> tuple[float, int]:
    """Seconds until B holds the backlog ``prefix``, and B's WAL bytes meanwhile."""
    lsn_before = _wal_lsn(conn)
    started = time.perf_counter()
    _wait(lambda: _in_b(conn, prefix) >= count, running.check, "the backlog")
    seconds = time.perf_counter() - started
    row = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (_wal_lsn(conn), lsn_before)).fetchone()
    return seconds, int(row[0]) if row else 0


def measure_mode(
    settings: Settings, mode: str, *, count: int, latency_count: int
) -> dict[str, Any]:
    """Latency, throughput and B's WAL bytes per message of the consumer in ``mode``."""
    scenario.recover_and_reset(settings, accounts=ACCOUNTS)
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        # throughput and WAL: the backlog first, then the consumer
        _store_backlog(settings, f"bench-{mode}-t", count)
        running = _Running(settings, mode)
        try:
            seconds, wal_bytes = _drain_backlog(conn, running, f"bench-{mode}-t", count)
            # latency: one message at a time, to an idle consumer
            latencies: list[float] = []
            with open_stomp(settings, participant="bench-broker") as client:
                for t in _credits(f"bench-{mode}-l", latency_count):
                    sent = time.perf_counter()
                    client.send(scenario.CREDIT_QUEUE, t.body(), _headers(t), receipt_timeout=10.0)
                    _wait(partial(_holds, conn, t.transfer_id), running.check, t.transfer_id)
                    latencies.append((time.perf_counter() - sent) * 1000)
        finally:
            running.stop()
    return {
        "mode": mode,
        "count": count,
        "seconds": round(seconds, 3),
        "throughput_per_s": round(count / seconds, 1) if seconds else 0.0,
        "wal_bytes_per_message": round(wal_bytes / count, 1),
        "latency_count": latency_count,
        "latency_ms": {k: round(v, 2) for k, v in percentiles(latencies).items()},
    }


def batch_curve(
    settings: Settings, sizes: tuple[int, ...], *, count: int, mode: str = "2pc"
) -> list[dict[str, Any]]:
    """The 2pc consumer's throughput from a stored backlog of ``count`` commands (at most
    CURVE_BATCHES batches' worth), for each batch size (``--batch-size``, at the default
    ``--max-wait``): where the default comes from."""
    if not 1 <= count <= MAX_COUNT or not sizes or min(sizes) < 1:
        raise ConfigurationError(
            f"consumer batch curve: 1..{MAX_COUNT} messages (not {count}) and batch sizes "
            f">= 1 (not {list(sizes)})"
        )
    points = []
    for size in sizes:
        scenario.recover_and_reset(settings, accounts=ACCOUNTS)
        prefix = f"bench-curve-{size}"
        messages = min(count, CURVE_BATCHES * size)  # small batches are slow: fewer of them
        with psycopg.connect(settings.pg_b, autocommit=True) as conn:
            _store_backlog(settings, prefix, messages)
            running = _Running(settings, mode, batch_size=size)
            try:
                seconds, wal_bytes = _drain_backlog(conn, running, prefix, messages)
            finally:
                running.stop()
        points.append(
            {
                "mode": mode,
                "batch_size": size,
                "count": messages,
                "throughput_per_s": round(messages / seconds, 1) if seconds else 0.0,
                "wal_bytes_per_message": round(wal_bytes / messages, 1),
            }
        )
    scenario.recover_and_reset(settings, accounts=ACCOUNTS)
    return points


def throughput(settings: Settings, mode: str, *, count: int) -> float:
    """Messages per second of the consumer in ``mode`` through a stored backlog of ``count``."""
    scenario.recover_and_reset(settings, accounts=ACCOUNTS)
    prefix = f"bench-{mode}-r"
    with psycopg.connect(settings.pg_b, autocommit=True) as conn:
        _store_backlog(settings, prefix, count)
        running = _Running(settings, mode)
        try:
            seconds, _ = _drain_backlog(conn, running, prefix, count)
        finally:
            running.stop()
    return round(count / seconds, 1) if seconds else 0.0


def interleaved(settings: Settings, *, rounds: int, count: int) -> list[dict[str, float]]:
    """``rounds`` more throughput readings of each mode, one mode after the other in each
    round (so that a change in the machine's load falls on both)."""
    readings = [
        {mode: throughput(settings, mode, count=count) for mode in MODES} for _ in range(rounds)
    ]
    scenario.recover_and_reset(settings, accounts=ACCOUNTS)
    return readings


def ratio_of_medians(readings: list[dict[str, float]]) -> float:
    """The median 2pc msg/s over the median inbox msg/s of interleaved readings."""
    return measure.ratio_of_medians(readings, "2pc", "inbox") or 0.0


def render_rounds(readings: list[dict[str, float]]) -> str:
    """Each round's throughputs and their ratio, and the ratio of the medians."""
    lines = [
        "| round | inbox msg/s | 2pc msg/s | 2pc ÷ inbox |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for index, r in enumerate(readings, 1):
        share = round(r["2pc"] / r["inbox"], 3) if r["inbox"] else 0.0
        lines.append(f"| {index} | {r['inbox']} | {r['2pc']} | {share} |")
    lines += ["", f"Ratio of the medians: **{ratio_of_medians(readings)}**"]
    return "\n".join(lines) + "\n"


def ratio(results: list[dict[str, Any]]) -> float:
    """The 2pc consumer's msg/s over the inbox consumer's (the figure of docs/benchmarks.md)."""
    by_mode = {r["mode"]: r["throughput_per_s"] for r in results}
    inbox = by_mode.get("inbox") or 0.0
    return round(by_mode.get("2pc", 0.0) / inbox, 3) if inbox else 0.0


def compare(settings: Settings, *, count: int, latency_count: int) -> list[dict[str, Any]]:
    """Both consumer modes, measured one after the other on the same lab."""
    if not 1 <= count <= MAX_COUNT or not 1 <= latency_count <= MAX_LATENCY_COUNT:
        raise ConfigurationError(
            f"consumer bench counts: 1..{MAX_COUNT} messages for the throughput (not {count}), "
            f"1..{MAX_LATENCY_COUNT} for the latency (not {latency_count})"
        )
    results = [measure_mode(settings, m, count=count, latency_count=latency_count) for m in MODES]
    scenario.recover_and_reset(settings, accounts=ACCOUNTS)
    return results


def render_markdown(results: list[dict[str, Any]], command: str) -> str:
    """The two modes side by side, as a Markdown table."""
    lines = [
        f"`{command}`",
        "",
        "| consumer | messages | msg/s | WAL bytes/msg on B | latency p50 ms | p99 ms | max ms |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lat = r["latency_ms"]
        lines.append(
            f"| `--mode {r['mode']}` | {r['count']} | {r['throughput_per_s']} | "
            f"{r['wal_bytes_per_message']} | {lat.get('p50', 0)} | {lat.get('p99', 0)} | "
            f"{lat.get('max', 0)} |"
        )
    lines += ["", f"2pc msg/s ÷ inbox msg/s: **{ratio(results)}**"]
    return "\n".join(lines) + "\n"


def render_curve(points: list[dict[str, Any]]) -> str:
    """The 2pc consumer's throughput per batch size, as a Markdown table."""
    lines = [
        "| consumer | --batch-size | messages | msg/s | WAL bytes/msg on B |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        mode = "--mode 2pc --asyncio" if p["mode"] == "2pc-asyncio" else "--mode 2pc"
        lines.append(
            f"| `{mode}` | {p['batch_size']} | {p['count']} | {p['throughput_per_s']} | "
            f"{p['wal_bytes_per_message']} |"
        )
    return "\n".join(lines) + "\n"
