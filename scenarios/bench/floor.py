"""The floor: the transfer as a hand-written minimal 2PC, with no framework around it.

What any 2PC over these resources must do, and nothing else: psycopg
``tpc_*`` on both databases (prepare and commit in parallel, on a helper
thread made once), one appended decision record, and the STOMP transaction
committed with a receipt over a TCP_NODELAY connection (StompClient sets it).
No state machine, no events, no recovery, no timeouts: it is the yardstick
the coordinator's overhead is measured against (issue: "within 10 % of the
hand-written minimum").

Two decision styles:

- ``fsync`` (the default floor): prepare both -> append + fsync the decision
  -> COMMIT the broker transaction -> COMMIT PREPARED both.
- ``marker``: the coordinator's own protocol done by hand: prepare both ->
  SEND a commit marker and COMMIT the broker transaction (the commit point)
  -> append the decision unsynced -> COMMIT PREPARED both.

Without a broker (``broker=False``) the decision is always the fsync'd record.

``sequential=True`` (``floor-seq``) is the plain hand-written 2PC a team would
write first: each worker thread does the whole transfer on its own
connections, one step after the other (prepare A, prepare B, the broker
transaction with the marker, COMMIT PREPARED on A, then on B), with no helper
thread. The issue's throughput target at concurrency 16 is measured against it.

``at_once=True`` (``floor-at-once``) sends A's work and B's at the same time (B's
on the helper thread), then prepares and commits as ``marker`` does: the
fastest order by hand, which the latency target at concurrency 1 is measured
against. It gives up the order A then B that keeps the work of two databases
from deadlocking across them (docs/design.md §2).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg import errors as pg_errors

from participants.stomp_client import StompClient
from scenarios.config import Settings
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TYPE_HEADER,
    Transfer,
    drain,
)
from scenarios.wiring import open_stomp

#: The floor's own XA format id ("flor"), so that the coordinator's recovery never
#: sees its branches and :func:`roll_back_leftovers` finds exactly them.
FLOOR_FORMAT_ID = 0x666C6F72

#: The floor's markers have their own queue: on the coordinator's, they would
#: slow down its marker sweeps and recovery's browse.
FLOOR_MARKER_QUEUE = "/queue/bench.floor.markers"

Decision = Literal["fsync", "marker"]


@dataclass
class _Lane:
    """What one concurrent transfer uses: a connection to each database and the broker."""

    a: psycopg.Connection[Any]
    b: psycopg.Connection[Any]
    mq: StompClient | None


class Floor:
    """Minimal 2PC transfers; ``run_one`` may be called from up to ``concurrency`` threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int = 1,
        broker: bool = True,
        decision: Decision = "fsync",
        log_path: Path | None = None,
        receipt_timeout: float = 5.0,
        sequential: bool = False,
        at_once: bool = False,
    ) -> None:
        self.name = "floor" if decision == "fsync" else "floor-marker"
        if not broker:
            self.name = "floor-db"
        if sequential:
            self.name = "floor-seq"
        if at_once:
            self.name = "floor-at-once"
        self.sequential = sequential
        self.at_once = at_once
        self.settings = settings
        self.broker = broker
        self.decision: Decision = decision if broker else "fsync"
        self.receipt_timeout = receipt_timeout
        self.log_path = log_path or settings.home / "bench-floor.log"
        self.forced_writes = 0
        self._count_lock = threading.Lock()
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # Phase 1 and 2 on B run here while A's run on the caller's thread.
        self._helper = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="floor")
        self._lanes: queue.LifoQueue[_Lane] = queue.LifoQueue()
        for _ in range(concurrency):
            self._lanes.put(
                _Lane(
                    psycopg.connect(settings.pg_a),
                    psycopg.connect(settings.pg_b),
                    open_stomp(settings, participant="floor") if broker else None,
                )
            )

    def _gtrid(self, transfer: Transfer) -> str:
        return f"floor.{transfer.transfer_id}"

    def run_one(self, transfer: Transfer) -> bool:
        """One transfer; True when committed, False when A's balance refused the debit."""
        lane = self._lanes.get()
        try:
            return self._transfer(lane, transfer)
        finally:
            self._lanes.put(lane)

    def _transfer(self, lane: _Lane, t: Transfer) -> bool:
        gtrid = self._gtrid(t)
        xa = lane.a.xid(FLOOR_FORMAT_ID, gtrid, "a")
        xb = lane.b.xid(FLOOR_FORMAT_ID, gtrid, "b")
        params = {"amount": t.amount, "tid": t.transfer_id}
        lane.a.tpc_begin(xa)
        if self.at_once:
            refused: list[bool] = []

            def debit() -> None:
                try:
                    lane.a.execute(
                        DEBIT_TO, {**params, "account": t.source, "counterparty": t.target}
                    )
                except pg_errors.CheckViolation:
                    refused.append(True)

            def credit() -> None:
                lane.b.tpc_begin(xb)
                lane.b.execute(CREDIT, {**params, "account": t.target})

            self._on_both(debit, credit)
            if refused:
                self._on_both(lane.a.tpc_rollback, lane.b.tpc_rollback)
                return False
        else:
            try:
                lane.a.execute(DEBIT_TO, {**params, "account": t.source, "counterparty": t.target})
            except pg_errors.CheckViolation:
                lane.a.tpc_rollback()
                return False
            lane.b.tpc_begin(xb)
            lane.b.execute(CREDIT, {**params, "account": t.target})
        if lane.mq is not None:
            lane.mq.begin(gtrid)
            headers = {"transfer-id": t.transfer_id, TYPE_HEADER: TRANSFER_COMPLETED}
            lane.mq.send(EVENT_TOPIC, t.body(), headers, transaction=gtrid)

        self._on_both(lane.a.tpc_prepare, lane.b.tpc_prepare)

        record = f"COMMIT {gtrid} a,b{',mq' if lane.mq else ''}\n".encode()
        if lane.mq is None:
            self._append(record, force=True)
        elif self.decision == "fsync":
            self._append(record, force=True)
            lane.mq.commit(gtrid, self.receipt_timeout)
        else:
            lane.mq.send(FLOOR_MARKER_QUEUE, "", {"gtrid": gtrid}, transaction=gtrid)
            lane.mq.commit(gtrid, self.receipt_timeout)
            self._append(record, force=False)

        self._on_both(lane.a.tpc_commit, lane.b.tpc_commit)
        return True

    def _on_both(self, on_a: Callable[[], None], on_b: Callable[[], None]) -> None:
        """A's step and B's: one after the other (floor-seq), or B's on the helper thread."""
        if self.sequential:
            on_a()
            on_b()
            return
        done_b = self._helper.submit(on_b)
        on_a()
        done_b.result()

    def _append(self, record: bytes, *, force: bool) -> None:
        os.write(self._fd, record)
        if force:
            os.fsync(self._fd)
            with self._count_lock:
                self.forced_writes += 1

    def close(self) -> None:
        """Close every connection and the log; leaves nothing prepared (idempotent)."""
        while True:
            try:
                lane = self._lanes.get_nowait()
            except queue.Empty:
                break
            lane.a.close()
            lane.b.close()
            if lane.mq is not None:
                lane.mq.close()
        self._helper.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.decision == "marker":
            drain_markers(self.settings)


def drain_markers(settings: Settings) -> int:
    """Remove the floor's commit markers (nothing recovers the floor: they only pile up)."""
    return drain(settings, FLOOR_MARKER_QUEUE)


def roll_back_leftovers(settings: Settings) -> int:
    """Roll back prepared branches an interrupted floor left; return how many.

    Only while no floor runs: a running floor's branches look the same.
    """
    done = 0
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for xid in conn.tpc_recover():
                if xid.format_id == FLOOR_FORMAT_ID and xid.database == conn.info.dbname:
                    with contextlib.suppress(pg_errors.UndefinedObject):  # finished meanwhile
                        conn.tpc_rollback(xid)
                        done += 1
    return done
