"""``twopc bench polling``: the outbox relay's polling interval, B's lag against A's load.

The status relay (scenarios.outbox.relay) finds pending outbox rows by
polling A, or sleeps on LISTEN until the outbox's insert trigger NOTIFYs at
commit (with a fallback poll). A short interval delivers sooner and asks A
more often, whether or not there is anything to send; LISTEN/NOTIFY is
meant to give the short lag without the queries. Each configuration runs
one relay and the consumer as threads of this process, on a fresh start:

* **idle**: nothing is written for ``idle`` seconds: A's load from the relay
  alone (what a quiet night costs);
* **busy**: the ``outbox-status`` writer makes transfers at a steady
  ``rate`` for ``busy`` seconds, then the run waits until B is credited.

Per configuration:

* **lag**: from the writer's commit (``committed_at``) to the message on the
  broker (``outbox.sent_at``, set by the relay after the broker's receipt
  for the batch), and to B's credit (``inbox.applied_at``); p50 and p99 (ms);
* **A's load**: the relay's queries on A per second, idle and busy (a poll
  is one transaction with one ``SELECT ... FOR UPDATE SKIP LOCKED``; a batch
  found adds one UPDATE), counted by the relay itself; and the CPU time of
  the relay's PostgreSQL backends on A (``/proc/<pid>/schedstat``, when A
  runs on this machine), in ms per second, idle and busy.

Pure polling is the relay with LISTEN turned off (its ``listens`` attribute,
per relay); ``listen`` is the relay as ``twopc relay --mode status`` runs it,
with the fallback poll of :data:`LISTEN_FALLBACK` seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from scenarios.bench.section import Section
from scenarios.config import Settings
from scenarios.lab.procfs import TICKS, stat_fields
from scenarios.outbox.consumer import Consumer
from scenarios.outbox.pipeline import convergence_latencies, wait_converged
from scenarios.outbox.relay import RelayConfig, StatusRelay
from scenarios.strategies import new_strategy
from scenarios.transfer import model as scenario
from scenarios.transfer.results import percentiles

#: The fallback poll of the LISTEN/NOTIFY relay (the relay's own default).
LISTEN_FALLBACK = RelayConfig().poll_interval
ACCOUNTS, BALANCE = 100, 1_000_000


@dataclass(frozen=True)
class Plan:
    """The polling intervals to measure, and how long and how fast each runs."""

    intervals: tuple[float, ...]
    idle: float  # seconds with nothing written
    busy: float  # seconds of writing
    rate: float  # transfers per second while busy


PLANS = {
    False: Plan((0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0), idle=5.0, busy=10.0, rate=10.0),
    True: Plan((0.05, 0.25, 1.0), idle=2.0, busy=3.0, rate=10.0),
}


class CountingRelay(StatusRelay):
    """The status relay, counting its polls (one pump_once is one transaction on A)."""

    def __init__(self, *args: Any, listen: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listens = listen  # False: poll only, never LISTEN
        self.polls = 0
        self.found = 0  # polls that found a batch (one more statement each)

    def pump_once(self) -> int:
        self.polls += 1
        handled = super().pump_once()
        if handled:
            self.found += 1
        return handled

    @property
    def queries(self) -> int:
        return self.polls + self.found


def _cpu_seconds(pid: int) -> float | None:
    """CPU time of ``pid`` in seconds: /proc/<pid>/schedstat (ns), else stat's clock ticks."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = stat_fields(pid)
        if fields is None:
            return None
        return (int(fields[11]) + int(fields[12])) / TICKS


def _backend_cpu(settings: Settings, relay: str) -> float | None:
    """CPU seconds of the relay's backends on A; None when A is not a process of this machine."""
    name = f"twopc relay {relay}"[:63]
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        pids = [
            row[0]
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
            )
        ]
    total = 0.0
    for pid in pids:
        seconds = _cpu_seconds(pid)
        if seconds is None:
            return None
        total += seconds
    return total if pids else None


def _wait(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _sent_lags(settings: Settings, committed_at: Mapping[str, float]) -> list[float]:
    """ms from each writer's commit to the relay's record that the broker took the message."""
    with psycopg.connect(settings.pg_a) as conn:
        rows = conn.execute(
            "SELECT transfer_id, extract(epoch FROM sent_at)::float8 FROM outbox "
            "WHERE transfer_id = ANY(%s) AND sent_at IS NOT NULL",
            (list(committed_at),),
        ).fetchall()
    return [max(0.0, (sent - committed_at[tid]) * 1000) for tid, sent in rows]


def measure(
    settings: Settings, label: str, interval: float, *, listen: bool, plan: Plan, seed: int
) -> dict[str, Any]:
    """One configuration: a relay and the consumer, idle then busy; its figures."""
    name = f"polling-{seed}"
    relay = CountingRelay(settings, RelayConfig(poll_interval=interval, name=name), listen=listen)
    consumer = Consumer(settings)
    stop = threading.Event()
    threads = [
        threading.Thread(target=relay.run, args=(stop,), name=name, daemon=True),
        threading.Thread(target=consumer.run, args=(stop,), name=f"{name}-consumer", daemon=True),
    ]
    for thread in threads:
        thread.start()
    strategy = new_strategy("outbox-status")
    try:
        _wait(lambda: relay.polls > 0)
        cpu0, polls0, t0 = _backend_cpu(settings, name), relay.queries, time.monotonic()
        time.sleep(plan.idle)
        cpu1, polls1, t1 = _backend_cpu(settings, name), relay.queries, time.monotonic()
        strategy.prepare(settings, concurrency=1)
        transfers = scenario.plan(
            round(plan.busy * plan.rate), accounts=ACCOUNTS, seed=seed, run_id=f"poll{seed}"
        )
        start = time.monotonic()
        for i, transfer in enumerate(transfers):
            pause = start + i / plan.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            strategy.run_one(transfer)
        committed_at = dict(strategy.committed_at)
        missing = wait_converged(settings, committed_at, timeout=30.0)
        cpu2, polls2, t2 = _backend_cpu(settings, name), relay.queries, time.monotonic()
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        strategy.close()
    sent = percentiles(_sent_lags(settings, committed_at))
    credited = percentiles(list(convergence_latencies(settings, committed_at).values()))

    def per_second(a: float | None, b: float | None, seconds: float, scale: float) -> Any:
        return None if a is None or b is None else round((b - a) * scale / seconds, 2)

    return {
        "label": label,
        "listen": listen,
        "interval_s": interval,
        "transfers": len(committed_at),
        "not_credited": len(missing),
        "sent_ms": {k: round(sent[k], 1) for k in ("p50", "p99")} if sent else {},
        "credited_ms": {k: round(credited[k], 1) for k in ("p50", "p99")} if credited else {},
        "queries_per_s_idle": per_second(polls0, polls1, t1 - t0, 1.0),
        "queries_per_s_busy": per_second(polls1, polls2, t2 - t1, 1.0),
        "backend_cpu_ms_per_s_idle": per_second(cpu0, cpu1, t1 - t0, 1000.0),
        "backend_cpu_ms_per_s_busy": per_second(cpu1, cpu2, t2 - t1, 1000.0),
    }


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """Every interval of the plan, then LISTEN/NOTIFY; A and B reset first."""
    plan = PLANS[quick]
    scenario.reset(settings, accounts=ACCOUNTS, balance=BALANCE)
    configs = [(f"poll {interval:g} s", interval, False) for interval in plan.intervals]
    configs.append((f"LISTEN/NOTIFY (+ poll {LISTEN_FALLBACK:g} s)", LISTEN_FALLBACK, True))
    rows = [
        measure(settings, label, interval, listen=listen, plan=plan, seed=seed)
        for seed, (label, interval, listen) in enumerate(configs, 1)
    ]
    return {
        "idle_s": plan.idle,
        "busy_s": plan.busy,
        "rate_per_s": plan.rate,
        "configurations": rows,
    }


def _pair(figures: Mapping[str, float]) -> str:
    return f"{figures['p50']:g} / {figures['p99']:g}" if figures else "-"


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def sections(result: Mapping[str, Any]) -> list[Section]:
    """One table: a row per polling interval, LISTEN/NOTIFY last."""
    rows = [
        [
            c["label"],
            _pair(c["sent_ms"]),
            _pair(c["credited_ms"]),
            _figure(c["queries_per_s_idle"]),
            _figure(c["queries_per_s_busy"]),
            _figure(c["backend_cpu_ms_per_s_idle"]),
            _figure(c["backend_cpu_ms_per_s_busy"]),
        ]
        for c in result["configurations"]
    ]
    lost = sum(c["not_credited"] for c in result["configurations"])
    note = (
        "One status relay and the consumer per row, as threads of one process. Idle: "
        f"{result['idle_s']:g} s with nothing written. Busy: the outbox-status writer makes "
        f"{result['rate_per_s']:g} transfers a second for {result['busy_s']:g} s, then the run "
        "waits for B. Lag from the writer's commit to the message on the broker (the "
        "relay's sent_at, after the broker's receipt) and to B's credit (inbox.applied_at). "
        "A's load: the relay's statements on A per second (a poll is one SELECT ... FOR "
        "UPDATE SKIP LOCKED; a batch found adds an UPDATE), and the CPU of the relay's "
        "PostgreSQL backends on A in ms per second. Polling rows have LISTEN off; the "
        "LISTEN/NOTIFY row is the relay as 'twopc relay --mode status' runs it."
    )
    if lost:
        note += f" {lost} transfers were not credited within 30 s."
    return [
        Section(
            "The polling interval: B's lag against A's load",
            [
                "relay",
                "to broker p50 / p99 (ms)",
                "to B p50 / p99 (ms)",
                "A queries/s idle",
                "A queries/s busy",
                "A backend CPU ms/s idle",
                "A backend CPU ms/s busy",
            ],
            rows,
            note=note,
        )
    ]
