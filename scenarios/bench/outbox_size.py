"""``twopc bench outbox-size``: the outbox table's size under a long run, with and without
clean-up.

Three arms, one after the other, each on a fresh set of the outbox
component's tables on A (:mod:`outbox.tables`, names of their own, dropped
after) for ``seconds``:

* **no clean-up**: the outbox grows by every message written;
* **relay --retain**: the last-id relay deletes rows relayed more than
  ``retain`` seconds ago (:attr:`outbox.relay.RelayConfig.retain`);
* **twopc outbox clean**: a separate cleaner runs :func:`outbox.clean.clean`
  every ``retain`` seconds with ``--older-than retain``.

In every arm a writer commits messages at a steady rate (``rate`` per second,
in transactions of :data:`PER_TRANSACTION`), one last-id relay publishes them
to a queue of the run's own, and a subscriber drains that queue. Every
:data:`SAMPLE_INTERVAL` seconds the outbox's rows and its size on disk
(``pg_total_relation_size``: heap, indexes and TOAST) are sampled. DELETE
does not give space back to the operating system: autovacuum marks it free
for new rows, so with clean-up the size levels off where it would otherwise
grow with every message.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox import OutboxMessage, Tables
from outbox.clean import clean
from outbox.relay import LastIdRelay, RelayConfig, StompPublisher
from outbox.writer import write
from scenarios.bench.section import Section
from scenarios.config import Settings
from scenarios.wiring import open_stomp

ARMS: tuple[str, ...] = ("no clean-up", "relay --retain", "twopc outbox clean")
PER_TRANSACTION = 10
SAMPLE_INTERVAL = 0.5
BODY = '{"pad": "' + "x" * 200 + '"}'  # a message of about the size of a small event


def _settings_of(quick: bool) -> dict[str, float]:
    if quick:
        return {"seconds": 8.0, "rate": 500.0, "retain": 2.0}
    return {"seconds": 60.0, "rate": 1000.0, "retain": 10.0}


def run(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """Each arm's samples and summary (JSON-able)."""
    params = _settings_of(quick)
    arms = {arm: _run_arm(settings, arm, **params) for arm in ARMS}
    return {"params": params, "per_transaction": PER_TRANSACTION, "arms": arms}


def _run_arm(
    settings: Settings, arm: str, *, seconds: float, rate: float, retain: float
) -> dict[str, Any]:
    run_id = f"bench_{secrets.token_hex(3)}"
    tables = Tables(
        outbox=f"{run_id}_outbox",
        failures=f"{run_id}_failures",
        positions=f"{run_id}_positions",
        inbox=f"{run_id}_inbox",
        channel=f"{run_id}_outbox",
    )
    queue = f"/queue/{run_id}.events"
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        for statement in tables.schema_a():
            conn.execute(statement)
    stop = threading.Event()
    config = RelayConfig(
        batch_size=200,
        poll_interval=0.5,
        retain=retain if arm == "relay --retain" else None,
    )
    relay = LastIdRelay(
        settings.pg_a,
        StompPublisher(lambda: open_stomp(settings, participant="bench-relay")),
        config,
        tables=tables,
    )
    threads: list[threading.Thread] = []
    written = [0]
    drained = [0]
    cleaned = [0]

    def spawn(target: Callable[[], object]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        threads.append(thread)

    spawn(lambda: _drain(settings, queue, stop, drained))
    spawn(lambda: relay.run(stop))
    if arm == "twopc outbox clean":
        spawn(lambda: _clean_every(settings, tables, retain, stop, cleaned))
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    spawn(lambda: _write(settings, tables, queue, rate, started + seconds, stop, written))
    try:
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            while (elapsed := time.monotonic() - started) < seconds:
                row = conn.execute(
                    f"SELECT count(*), pg_total_relation_size('{tables.outbox}') "
                    f"FROM {tables.outbox}"
                ).fetchone()
                if row is not None:
                    samples.append((round(elapsed, 2), int(row[0]), int(row[1])))
                stop.wait(SAMPLE_INTERVAL)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            vacuum = conn.execute(
                "SELECT n_dead_tup, autovacuum_count FROM pg_stat_user_tables WHERE relname = %s",
                (tables.outbox,),
            ).fetchone()
            for table in (tables.outbox, tables.failures, tables.positions):
                conn.execute(f"DROP TABLE IF EXISTS {table}")
    rows = [s[1] for s in samples] or [0]
    sizes = [s[2] for s in samples] or [0]
    return {
        "written": written[0],
        "relayed": relay.stats.sent,
        "drained": drained[0],
        "deleted": relay.stats.cleaned + cleaned[0],
        "final_rows": rows[-1],
        "max_rows": max(rows),
        "final_bytes": sizes[-1],
        "max_bytes": max(sizes),
        "dead_rows": int(vacuum[0]) if vacuum else None,
        "autovacuums": int(vacuum[1]) if vacuum else None,
        "samples": samples,
    }


def _write(
    settings: Settings,
    tables: Tables,
    queue: str,
    rate: float,
    until: float,
    stop: threading.Event,
    written: list[int],
) -> None:
    """Commit ``rate`` messages a second, PER_TRANSACTION at a time, until ``until``."""
    interval = PER_TRANSACTION / rate
    next_at = time.monotonic()
    with psycopg.connect(settings.pg_a) as conn:
        while not stop.is_set() and time.monotonic() < until:
            batch = [
                OutboxMessage(f"m-{written[0] + n}", queue, BODY) for n in range(PER_TRANSACTION)
            ]
            write(conn, batch, tables=tables)
            conn.commit()
            written[0] += PER_TRANSACTION
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))


def _drain(settings: Settings, queue: str, stop: threading.Event, drained: list[int]) -> None:
    """Take everything off ``queue`` (auto acknowledged), so the broker holds nothing."""
    with open_stomp(settings, participant="bench-drain") as client:
        subscription = client.subscribe(queue, ack="auto", prefetch=1000)
        while not stop.is_set():
            if subscription.get(0.25) is not None:
                drained[0] += 1
        while subscription.get(0.5) is not None:  # what was on its way
            drained[0] += 1


def _clean_every(
    settings: Settings, tables: Tables, every: float, stop: threading.Event, cleaned: list[int]
) -> None:
    """``twopc outbox clean --older-than EVERY`` every EVERY seconds."""
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        while not stop.wait(every):
            cleaned[0] += clean(conn, older_than=every, tables=tables, stop=stop).deleted


def sections(result: dict[str, Any]) -> list[Section]:
    params = result["params"]
    rows = []
    for arm, figures in result["arms"].items():
        rows.append(
            [
                arm,
                str(figures["written"]),
                str(figures["deleted"]),
                str(figures["final_rows"]),
                str(figures["max_rows"]),
                f"{figures['final_bytes'] / 1024:.0f}",
                f"{figures['max_bytes'] / 1024:.0f}",
                str(figures.get("autovacuums", "-")),
            ]
        )
    note = (
        f"Each arm: {params['seconds']:g} s of a writer aiming at {params['rate']:g} "
        f"messages/s ({result['per_transaction']} per transaction, ~{len(BODY)}-byte bodies), "
        f"one last-id relay, the queue drained. Retain / clean interval "
        f"{params['retain']:g} s. Rows: the outbox's row count at the end and at most; "
        "size: pg_total_relation_size (heap and indexes), sampled every 0.5 s. With "
        "clean-up the rows level off at about retain × rate; the size on disk grows until "
        "autovacuum has marked the deleted rows' space free for new ones (DELETE never gives "
        "it back to the operating system), so it levels off only after autovacuum runs "
        "(autovacuums: how often it did during the arm)."
    )
    return [
        Section(
            "Outbox size under a long run",
            [
                "clean-up",
                "written",
                "deleted",
                "rows at end",
                "most rows",
                "KiB at end",
                "most KiB",
                "autovacuums",
            ],
            rows,
            note=note,
        )
    ]
