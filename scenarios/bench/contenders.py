"""The contenders of the benchmarks: ways to run the transfer work, measured alike.

The coordinator (with the broker, or A and B only), the hand-written floors, SQLAlchemy's
two-phase peer and local commits; the transfers they make, and the lab's reset before a run.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import errors as pg_errors

from coordinator.coordinator import Coordinator
from coordinator.errors import ParticipantError, TransactionAborted, TransactionInDoubt
from coordinator.log import DecisionLog
from coordinator.transaction import Transaction
from coordinator.xid import gtrid_prefix
from participants.pg_branch import PostgresBranch
from scenarios.bench import floor, measure, peer
from scenarios.bench.floor import Floor
from scenarios.bench.peer import Peer
from scenarios.config import Settings
from scenarios.transfer import model as scenario
from scenarios.transfer.model import (
    CREDIT,
    DEBIT_TO,
    EVENT_TOPIC,
    TRANSFER_COMPLETED,
    TYPE_HEADER,
    Transfer,
)
from scenarios.wiring import databases, decision_log, open_coordinator

#: The coordinator id of the two-database coordinator (its own log and gtrids).
DB_ONLY_COORDINATOR = "benchdb"
#: Phases of Transaction.timings, in protocol order; "work" is the rest of the total.
PHASES = ("work", "prepare", "commit_point", "decision_log", "phase2")

#: The lab's accounts and their balances in every benchmark: ample, no transfer is refused.
ACCOUNTS = 10_000
BALANCE = 1_000_000_000


class Contender(Protocol):
    """One way to run the transfer work in the benchmark."""

    name: str

    def run_one(self, t: Transfer) -> bool: ...

    def close(self) -> None: ...


class TransferSource:
    """Endless unique transfers between random accounts (thread-safe)."""

    def __init__(self, *, accounts: int = ACCOUNTS, seed: int = 1) -> None:
        self.accounts = accounts
        self.run_id = scenario.new_run_id()
        self._rng = random.Random(seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> Transfer:
        with self._lock:
            n = next(self._ids)
            source, target = self._rng.randrange(self.accounts), self._rng.randrange(self.accounts)
            amount = self._rng.randint(1, 100)
        return Transfer(
            f"{self.run_id}-{n:07d}",
            scenario.account_id(source),
            scenario.account_id(target),
            amount,
        )


@dataclass
class PhaseSplit:
    """Per-phase latencies of committed 2PC transactions (Transaction.timings).

    Recording only keeps the figures (a list append, safe across threads under
    the GIL); the histograms are built when asked, so that the measurement
    adds next to nothing to the coordinator's own time per transaction.
    """

    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def record(self, tx: Transaction, total: float) -> None:
        self.samples.append((total, tx.timings))

    @property
    def phases(self) -> dict[str, measure.Latencies]:
        out = {p: measure.Latencies(p) for p in PHASES}
        for total, timings in list(self.samples):
            out["work"].record(max(total - sum(timings.values()), 0.0))
            for phase in PHASES[1:]:
                if phase in timings:
                    out[phase].record(timings[phase])
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: lat.summary() for name, lat in self.phases.items() if lat.count}


class CoordinatorContender:
    """twopc's coordinator making the transfer: A, B and the message, or A and B only."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int,
        broker: bool = True,
        name: str | None = None,
        coordinator_id: str = "",
        pipelined: bool = True,
    ) -> None:
        self.broker = broker
        self.pipelined = pipelined  # False: the work by execute, waiting for each answer
        self.name = name or ("coordinator" if broker else "coordinator-db")
        self.split = PhaseSplit()
        self.by_outcome: dict[str, dict[str, int]] = {}
        if broker:
            self.coordinator = open_coordinator(settings, sessions=max(concurrency, 1))
        else:
            self.coordinator = db_only_coordinator(
                settings, concurrency=concurrency, coordinator_id=coordinator_id
            )
        self.prefix = gtrid_prefix(self.coordinator.coordinator_id)
        self._lock = threading.Lock()

    def run_one(self, t: Transfer) -> bool:
        start = time.perf_counter()
        tx = self.coordinator.begin(self.prefix + t.transfer_id)
        params = {"amount": t.amount, "tid": t.transfer_id}
        try:
            with tx:
                debit = {**params, "account": t.source, "counterparty": t.target}
                try:
                    if self.pipelined:
                        # BEGIN and the debit in one round trip, then A's answer; with other
                        # transfers in flight A's PREPARE goes with them (end_work). An
                        # overdraft raises PrepareFailed: the transfer is rolled back.
                        a = tx.branch("a")
                        assert isinstance(a, PostgresBranch)
                        a.defer(DEBIT_TO, debit)
                        tx.end_work("a")
                    else:
                        tx.branch("a").execute(DEBIT_TO, debit)
                except pg_errors.CheckViolation:
                    pass  # executed: the branch votes NO at prepare
                else:
                    # BEGIN and B's credit go out with B's PREPARE, after A's answer.
                    if self.pipelined:
                        b = tx.branch("b")
                        assert isinstance(b, PostgresBranch)
                        b.defer(CREDIT, {**params, "account": t.target})
                    else:
                        tx.execute("b", CREDIT, {**params, "account": t.target})
                    if self.broker:
                        tx.send(
                            EVENT_TOPIC,
                            t.body(),
                            {"transfer-id": t.transfer_id, TYPE_HEADER: TRANSFER_COMPLETED},
                        )
        except (TransactionAborted, TransactionInDoubt, ParticipantError):
            return False
        self.split.record(tx, time.perf_counter() - start)
        return True

    @property
    def forced_writes(self) -> int:
        return int(self.coordinator.log.forced_writes)

    def close(self) -> None:
        self.coordinator.close()


def db_only_coordinator(
    settings: Settings, *, concurrency: int, coordinator_id: str = ""
) -> Coordinator:
    """A coordinator over A and B with no broker. With the file log (TWOPC_DECISIONS=file)
    its decision record is forced (fsync); in postgres mode its decision is a row in A."""
    settings = dataclasses.replace(settings, coordinator_id=coordinator_id or DB_ONLY_COORDINATOR)
    resources = databases(settings, pool_size=concurrency + 8)
    log: DecisionLog | None = None
    try:
        log, holder, membership = decision_log(
            settings, resources, log_path=settings.home / "bench-db-decisions.log"
        )
        return Coordinator(
            settings.coordinator_id,
            log,
            resources,
            None,
            max_workers=max(concurrency, 4),
            membership=membership,
            decision_holder=holder,
        )
    except BaseException:
        for resource in resources:
            resource.close()
        if log is not None:
            log.close()
        raise


class _Adapter:
    """A Floor or a Peer as a Contender."""

    def __init__(self, inner: Floor | Peer) -> None:
        self.inner = inner
        self.name = inner.name

    def run_one(self, t: Transfer) -> bool:
        return self.inner.run_one(t)

    def close(self) -> None:
        self.inner.close()


class LocalCommit:
    """The debit alone in one local transaction on A; with ``outbox``, plus an outbox row."""

    def __init__(self, settings: Settings, *, concurrency: int, outbox: bool = False) -> None:
        self.name = "outbox-commit" if outbox else "local-commit"
        self.outbox = outbox
        self._pool: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        for _ in range(concurrency):
            self._pool.put(psycopg.connect(settings.pg_a))

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._pool.get()
        try:
            yield conn
        finally:
            self._pool.put(conn)

    def run_one(self, t: Transfer) -> bool:
        with self._connection() as conn:
            try:
                conn.execute(
                    DEBIT_TO,
                    {
                        "amount": t.amount,
                        "account": t.source,
                        "tid": t.transfer_id,
                        "counterparty": t.target,
                    },
                )
                if self.outbox:
                    conn.execute(
                        "INSERT INTO outbox (transfer_id, destination, body, status) "
                        "VALUES (%s, %s, %s, 'pending')",
                        (t.transfer_id, scenario.CREDIT_QUEUE, t.body()),
                    )
            except pg_errors.CheckViolation:
                conn.rollback()
                return False
            conn.commit()
        return True

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return


Factory = Callable[[int], Contender]


def contenders(settings: Settings) -> dict[str, Factory]:
    """Every contender of the overhead benchmark: name -> factory(concurrency)."""
    return {
        "floor": lambda c: _Adapter(Floor(settings, concurrency=c)),
        "floor-marker": lambda c: _Adapter(Floor(settings, concurrency=c, decision="marker")),
        "floor-seq": lambda c: _Adapter(
            Floor(settings, concurrency=c, decision="marker", sequential=True)
        ),
        "floor-at-once": lambda c: _Adapter(
            Floor(settings, concurrency=c, decision="marker", at_once=True)
        ),
        "coordinator": lambda c: CoordinatorContender(settings, concurrency=c),
        "floor-db": lambda c: _Adapter(Floor(settings, concurrency=c, broker=False)),
        "coordinator-db": lambda c: CoordinatorContender(settings, concurrency=c, broker=False),
        "peer": lambda c: _Adapter(Peer(settings, concurrency=c)),
        "local-commit": lambda c: LocalCommit(settings, concurrency=c),
        "outbox-commit": lambda c: LocalCommit(settings, concurrency=c, outbox=True),
    }


def prepare_lab(settings: Settings, *, accounts: int = ACCOUNTS) -> None:
    """Resolve leftovers of earlier runs, then reset the tables with ample balances."""
    open_coordinator(settings).close()  # recovery of the main coordinator
    db_only_coordinator(settings, concurrency=1).close()  # ... and of the benchmark's own
    floor.roll_back_leftovers(settings)  # ... and what an interrupted run left prepared
    floor.drain_markers(settings)
    peer.roll_back_leftovers(settings)
    scenario.reset(settings, accounts=accounts, balance=BALANCE)


def op_of(contender: Contender, source: TransferSource) -> measure.Op:
    """The contender's transfer of the next transfer of ``source``, as a measure.Op."""
    return lambda _i: contender.run_one(source.next())
