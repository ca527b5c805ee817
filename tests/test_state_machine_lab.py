"""The crash state machine of ``test_state_machine``, on the lab's PostgreSQL and ActiveMQ.

The rules, the model and the invariants are those of :class:`CommitUnderCrashes`;
what changes is what they run on:

* each transaction INSERTs its writes into ``sm_rows`` of database a and/or b
  and sends its message to a queue of its own machine; the decision log is a
  file, fsync'd for real;
* a process death (an injected crash at any failpoint, or the machine being
  killed between steps) closes every connection the coordinator opened, as the
  kernel would, and drops the log's files without a flush; a machine failure
  also cuts the log back to what was last fsync'd ("machine"), or to half-way
  between that and its end ("torn");
* faults are the services' own: at a chosen failpoint (or at once) the
  coordinator's PostgreSQL sessions of a or b are terminated by the server
  (``pg_terminate_backend``) or its broker connections are cut, and the
  protocol goes on from there; or the failpoint crashes the process;
* the invariants read ``sm_rows``, ``pg_prepared_xacts``, the queue and the
  marker queue of the running services after every step.

Bounded for CI; ``TWOPC_HYPOTHESIS_PROFILE=long`` runs more and longer examples.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from coordinator import failpoints
from coordinator.log.file import FileDecisionLog
from coordinator.transaction import Transaction
from coordinator.xid import FORMAT_ID
from participants.activemq import ActiveMQ
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.postgres import AsyncPostgresResource
from participants.aio.stomp import AsyncStompClient
from participants.postgres import PostgresResource
from participants.stomp_client import StompClient
from scenarios.config import Settings
from tests.broker_queues import fresh_queue
from tests.conftest import end_sessions, open_stomp_client, stomp_login
from tests.test_state_machine import (
    DIED,
    AsyncAPI,
    CommitUnderCrashes,
    Fault,
    Seen,
    Told,
)

pytestmark = pytest.mark.lab

PROFILES = {
    "default": settings(  # the same examples every run: CI sees the same coverage
        max_examples=20,
        stateful_step_count=15,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "long": settings(
        max_examples=150,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}
PROFILE = os.environ.get("TWOPC_HYPOTHESIS_PROFILE", "default")

TABLE = "sm_rows"
RUN = uuid.uuid4().hex[:6]  # machines of different test runs never share a gtrid
_machines = itertools.count(1)
#: What the machines of this run went through: deaths, cuts, what callers were told.
TALLY: Counter[str] = Counter()
_tally_lock = threading.Lock()

# Where a fault can strike: every failpoint, hit once or twice, as a crash of the process or
# as a service cutting the coordinator's connections right there; or a cut at once.
TARGETS = ("a", "b", "mq")
LAB_FAULTS = st.sampled_from(
    [
        *(Fault("coordinator", name, "raise", hit) for name in failpoints.NAMES for hit in (1, 2)),
        *(
            Fault(target, name, "cut", hit)
            for target in TARGETS
            for name in failpoints.NAMES
            for hit in (1, 2)
        ),
        *(Fault(target, "now", "cut") for target in TARGETS),
    ]
)


class TrackedPostgres(PostgresResource):
    """A PostgresResource that remembers its connections, so they can be killed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[psycopg.Connection[Any]] = []

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        conn = super().connect(autocommit=autocommit)
        self.opened.append(conn)
        return conn

    def terminate_sessions(self) -> int:
        """The server ends every live session of ours (as an admin or a restart would)."""
        return end_sessions(self.dsn, [c.info.backend_pid for c in self.opened if not c.closed])

    def die(self) -> None:
        """The process died: the kernel closes its sockets; the server rolls back what was open."""
        for conn in self.opened:
            conn.close()


class TrackedActiveMQ(ActiveMQ):
    """An ActiveMQ resource that remembers its STOMP connections, so they can be cut."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[StompClient] = []

    def _connect(self, client_id: str, timeout: float) -> StompClient:
        client = super()._connect(client_id, timeout)
        self.opened.append(client)
        return client

    def _plain_client(self) -> StompClient:
        client = super()._plain_client()
        self.opened.append(client)
        return client

    def terminate_sessions(self) -> int:
        """Every connection of ours is reset, whatever it was doing."""
        live = [client for client in self.opened if client.alive]
        for client in live:
            client.drop()
        return len(live)

    def die(self) -> None:
        self.terminate_sessions()


class TrackedAsyncPostgres(AsyncPostgresResource):
    """An AsyncPostgresResource that remembers its connections, so they can be killed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[psycopg.AsyncConnection[Any]] = []

    async def connect(self, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
        conn = await super().connect(autocommit=autocommit)
        self.opened.append(conn)
        return conn

    def terminate_sessions(self) -> int:
        """The server ends every live session of ours (as an admin or a restart would)."""
        pids = [c.info.backend_pid for c in self.opened if not c.closed]
        return end_sessions(self.dsn, pids)

    def die(self) -> None:
        """The process died: the kernel closes its sockets (recovery's connection too)."""
        for conn in self.opened:
            conn.pgconn.finish()
        self.recovery_resource().close()


class TrackedAsyncActiveMQ(AsyncActiveMQ):
    """An AsyncActiveMQ that remembers its STOMP connections, so they can be cut."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[AsyncStompClient] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _connect(self, client_id: str, timeout: float) -> AsyncStompClient:
        self.loop = asyncio.get_running_loop()
        client = await super()._connect(client_id, timeout)
        self.opened.append(client)
        return client

    def terminate_sessions(self) -> int:
        """Every connection of ours is reset, whatever it was doing (on the loop's thread:
        a failpoint may fire in a worker thread, in recovery or a log write)."""
        live = [client for client in self.opened if client.alive]
        on_loop = self.loop is not None and threading.current_thread() is threading.main_thread()
        for client in live:
            if on_loop or self.loop is None:
                client.drop()
            else:
                self.loop.call_soon_threadsafe(client.drop)
        return len(live)

    def die(self) -> None:
        self.terminate_sessions()


class Disk:
    """The log file's fsyncs: how much of it the last one made durable."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.durable = 0

    def fsync(self, fd: int) -> None:
        info = os.fstat(fd)  # the size before the sync: a lower bound of what it covers
        os.fsync(fd)
        if stat.S_ISREG(info.st_mode):
            self.durable = info.st_size

    def lose_unsynced(self, how: str) -> int:
        """Cut the file as a power loss would (``machine``) or mid-write (``torn``)."""
        size = self.path.stat().st_size
        self.durable = min(self.durable, size)  # opening may have cut a torn record short
        keep = self.durable if how == "machine" else self.durable + (size - self.durable) // 2
        os.truncate(self.path, keep)
        return size - keep


class LabCommitUnderCrashes(CommitUnderCrashes):
    """CommitUnderCrashes with PostgreSQL a and b, ActiveMQ and a decision log file."""

    faults = LAB_FAULTS

    def __init__(self, lab: Settings, directory: Path) -> None:
        self.lab = lab
        coordinator_id = f"sm{RUN}{next(_machines)}"
        self.prefix = coordinator_id + "."
        self.queue = fresh_queue("sm")
        self.marker_queue = fresh_queue("sm.markers")
        self.disk = Disk(directory / f"{coordinator_id}.log")
        self.checkers = {
            "a": psycopg.connect(lab.pg_a, autocommit=True),
            "b": psycopg.connect(lab.pg_b, autocommit=True),
        }
        super().__init__()
        self.log = self._open_log()

    @initialize()
    def first_start(self) -> None:
        """The first coordinator; its first transfer has its broker sessions cut by the
        broker before its COMMIT, so that every run meets that cut whatever it draws.
        Nothing was committed and the coordinator knows it: its caller is told ABORTED."""
        super().first_start()
        self.transfer(1, 1, True, Fault("mq", "before_broker_commit", "cut"))
        assert [entry.told for entry in self.model.values()] == [Told.ABORTED]

    # -- the hooks of CommitUnderCrashes ---------------------------------------------

    def _participants(self) -> tuple[list[Any], Any]:
        resources = [
            TrackedPostgres(name, dsn, pool_size=8)
            for name, dsn in (("a", self.lab.pg_a), ("b", self.lab.pg_b))
        ]
        broker = TrackedActiveMQ(
            self.lab.stomp,
            self.prefix[:-1],
            pool_size=12,
            marker_queue=self.marker_queue,
            acquire_timeout=0.2,
            **stomp_login(),
        )
        return resources, broker

    def _open_log(self) -> FileDecisionLog:
        return FileDecisionLog(self.disk.path, fsync=self.disk.fsync)

    def _guarded(self, step: Any) -> Any:
        result = super()._guarded(step)
        if result is DIED:
            TALLY["crashes injected"] += 1
        return result

    def _bury(self) -> None:
        super()._bury()  # its threads are stopped: nothing uses the connections any more
        self._process_gone()

    def _died(self) -> None:
        super()._died()
        self._process_gone()  # also after a clean close: transactions left open die too

    def _process_gone(self) -> None:
        """The kernel closes the sockets and files of the process that ran the coordinator."""
        for participant in [*self.resources.values(), self.broker]:
            if participant is not None:
                participant.die()
        self.log.abandon()

    def _write(self, tx: Transaction, db: str, op: str) -> None:
        gtrid = op.split("/", 1)[0]
        tx.execute(db, f"INSERT INTO {TABLE} (gtrid, op) VALUES (%s, %s)", (gtrid, op))

    def _reopen_log(self, how: str) -> None:
        self.log.abandon()  # already so, unless the coordinator was closed cleanly
        if how in ("machine", "torn"):
            TALLY[f"log cut ({how})"] += 1
            event(f"log cut by {how}: {self.disk.lose_unsynced(how)} bytes lost")
        self.log = self._open_log()

    def _arm(self, fault: Fault) -> None:
        if fault.action == "raise":
            failpoints.arm(fault.step, "raise", on_hit=fault.times)
        elif fault.step == "now":
            self._terminate(fault.where)
        else:
            cut = functools.partial(self._terminate, fault.where)
            failpoints.arm(fault.step, cut, on_hit=fault.times)

    def _terminate(self, where: str) -> None:
        """The service ``where`` ends this coordinator's connections (whichever process)."""
        participant = self.broker if where == "mq" else self.resources.get(where)
        if participant is not None:
            cut = participant.terminate_sessions()
            # Not hypothesis.event(): this may run on a phase-2 thread, outside the test.
            with _tally_lock:
                TALLY[f"sessions cut ({'broker' if where == 'mq' else 'database'})"] += cut

    def look(self) -> Seen:
        started = time.monotonic()
        seen = self._look()
        with _tally_lock:
            TALLY["look ms"] += round((time.monotonic() - started) * 1000)
            TALLY["looks"] += 1
        return seen

    def _look(self) -> Seen:
        seen = Seen(committed={}, prepared={})
        for db, conn in self.checkers.items():
            # pg_prepared_xacts first: a branch committed in between is then seen twice,
            # never missed.
            seen.prepared[db] = set()
            for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                xid = psycopg.Xid.from_string(gid)
                if xid.format_id == FORMAT_ID and str(xid.gtrid).startswith(self.prefix):
                    assert xid.bqual == db, f"{db} holds a branch of another database: {gid}"
                    seen.prepared[db].add(str(xid.gtrid))
            rows = conn.execute(
                f"SELECT gtrid, op FROM {TABLE} WHERE starts_with(gtrid, %s) ORDER BY op",
                (self.prefix,),
            ).fetchall()
            seen.committed[db] = {}
            for gtrid, op in rows:
                seen.committed[db].setdefault(gtrid, []).append(op)
        with open_stomp_client(self.lab.stomp) as client:
            seen.messages.update(
                m.headers.get("gtrid", "?") for m in client.browse_complete(self.queue)
            )
            seen.markers = {
                m.headers["gtrid"]
                for m in client.browse_complete(self.marker_queue)
                if m.headers.get("gtrid", "").startswith(self.prefix)
            }
        return seen

    def teardown(self) -> None:
        """Resolve what the example left, as the next process would, and check it."""
        TALLY.update(f"told {e.told.value}" for e in self.model.values() if e.told is not None)
        try:
            failpoints.disarm()
            if self.state == "up":
                self._died()
            self._reopen_log("process")
            self._start()
            assert self.coordinator is not None
            for _ in range(5):
                if self.coordinator.recover().resolved:
                    break
            self.check_recovered()
            self.coordinator.close()
            self.coordinator = None
        finally:
            failpoints.disarm()
            if self.coordinator is not None:
                self._bury()
            for conn in self.checkers.values():
                conn.close()


class AsyncLabCommitUnderCrashes(AsyncAPI, LabCommitUnderCrashes):
    """The lab machine against coordinator.aio.AsyncCoordinator and the asyncio participants."""

    def _participants(self) -> tuple[list[Any], Any]:
        resources = [
            TrackedAsyncPostgres(name, dsn, pool_size=8)
            for name, dsn in (("a", self.lab.pg_a), ("b", self.lab.pg_b))
        ]
        broker = TrackedAsyncActiveMQ(
            self.lab.stomp,
            self.prefix[:-1],
            pool_size=12,
            marker_queue=self.marker_queue,
            acquire_timeout=0.2,
            **stomp_login(),
        )
        return resources, broker


@pytest.fixture(scope="module")
def lab_tables(settings: Settings) -> Iterator[Settings]:
    """The table the machine's transactions write to, in both databases."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (gtrid text, op text, PRIMARY KEY (op))"
            )
    yield settings
    failpoints.disarm()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_lab_commits_stay_atomic_under_crashes_and_cut_sessions(
    lab_tables: Settings, tmp_path: Path, api: str
) -> None:
    """On real PostgreSQL and ActiveMQ, every crash and cut session still ends all-or-nothing."""

    class OnThisLab(LabCommitUnderCrashes):
        def __init__(self) -> None:
            super().__init__(lab_tables, tmp_path)

    class OnThisLabAsyncio(AsyncLabCommitUnderCrashes):
        def __init__(self) -> None:
            super().__init__(lab_tables, tmp_path)

    TALLY.clear()
    # Derandomized examples are drawn from a digest of the factory's source: one factory
    # for both APIs, so that they meet the same examples.
    machines = {"sync": OnThisLab, "asyncio": OnThisLabAsyncio}
    run_state_machine_as_test(lambda: machines[api](), settings=PROFILES[PROFILE])
    print(f"lab state machine ({PROFILE}): {dict(sorted(TALLY.items()))}")
    # It went through what it claims to: deaths, both kinds of cut, both outcomes.
    for what in (
        "crashes injected",
        "sessions cut (database)",
        "sessions cut (broker)",
        "told committed",
        "told aborted",
    ):
        assert TALLY[what] > 0, f"no {what} in {dict(TALLY)}"
