"""Which coordinators are alive, from PostgreSQL: one advisory lock per coordinator id.

docs/design.md §4. A running coordinator holds a session-level advisory lock keyed by
its id on the commit-markable database; the server frees it when that session
dies, so a free lock means its owner is gone. Coordinators that take part
register their id in ``twopc_coordinators``: only registered ids are ever
treated as peers (a coordinator with a file log holds no lock, and its
prepared branches are not anyone else's to decide).

Fencing a peer ends every session whose ``application_name`` is its id, on
every database, and waits until ``pg_stat_activity`` shows none: after that
nothing it sent can still commit.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq

from coordinator.errors import (
    ConfigurationError,
    ParticipantError,
    ParticipantUnavailable,
    TwoPhaseCommitError,
)
from coordinator.events import get_logger
from coordinator.xid import FORMAT_ID, validate_coordinator_id
from participants import events as ev
from participants.pg_schema import create_table
from participants.postgres import PostgresResource

#: The advisory lock's first key: keeps the coordinators' locks apart from the
#: applications' own advisory locks (the second key is hashtext(coordinator id)).
LOCK_CLASS = FORMAT_ID

REGISTRY_DDL = (
    "CREATE TABLE IF NOT EXISTS twopc_coordinators ("
    " coordinator_id text PRIMARY KEY,"
    " joined_at timestamptz NOT NULL DEFAULT now())"
)


class PostgresMembership:
    """This coordinator's liveness lock on ``home``, and the locks of the peers it recovers.

    One autocommit session (with the coordinator's application_name) holds this
    coordinator's lock and, while it recovers one, a peer's. ``databases`` are
    every database the coordinators' sessions may be on (fencing covers them all).
    """

    def __init__(
        self,
        coordinator_id: str,
        home: PostgresResource,
        databases: Sequence[PostgresResource],
    ) -> None:
        self.coordinator_id = validate_coordinator_id(coordinator_id)
        self.home = home
        self.databases = list(databases)
        self._session: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._log = get_logger(component="membership", coordinator=coordinator_id)

    @property
    def participant(self) -> str:
        """The database that holds the locks (the commit-markable one)."""
        return self.home.name

    # -- this coordinator ------------------------------------------------------------

    def join(self, *, fence_timeout: float = 30.0) -> None:
        """Register, take this coordinator's lock and end what an earlier incarnation left.

        Raises ConfigurationError when a live coordinator holds the lock (two
        processes with one id), ParticipantUnavailable when the database is down.
        """
        with self._lock:
            self._open_session()
            session = self._session
            assert session is not None
            self._create_registry(session)
            self._run(
                session,
                "INSERT INTO twopc_coordinators (coordinator_id) VALUES (%s)"
                " ON CONFLICT (coordinator_id) DO UPDATE SET joined_at = now()",
                (self.coordinator_id,),
            )
            if not self._try_lock(session, self.coordinator_id):
                self._drop_session()
                raise ConfigurationError(
                    f"coordinator id {self.coordinator_id!r} is held by a live coordinator "
                    f"(its advisory lock on PostgreSQL {self.home.name!r} is taken): give "
                    "each instance its own TWOPC_COORDINATOR_ID"
                )
        self._log.info(ev.PEER_LOCK_TAKEN, peer=self.coordinator_id)
        # A paused earlier incarnation may still have sessions: end them before recovery.
        self.fence(self.coordinator_id, fence_timeout)

    def holds(self) -> bool:
        """True while the lock session is alive; no round trip (reads what arrived)."""
        with self._lock:
            return self._alive()

    def keep(self) -> bool:
        """Take the lock again if its session was lost; True when it is held."""
        with self._lock:
            if self._alive():
                return True
            self._log.warning(ev.PEER_LOCK_LOST, peer=self.coordinator_id)
            self._drop_session()
            try:
                self._open_session()
                session = self._session
                assert session is not None
                if not self._try_lock(session, self.coordinator_id):
                    self._drop_session()  # a peer holds it: it is fencing and recovering us
                    return False
            except TwoPhaseCommitError:  # the database is down: the next round tries again
                self._drop_session()
                return False
        self._log.info(ev.PEER_LOCK_TAKEN, peer=self.coordinator_id)
        return True

    def leave(self) -> None:
        """Release every lock (the session ends). Never raises."""
        with self._lock:
            self._drop_session()

    # -- peers -------------------------------------------------------------------------

    def peers(self) -> list[str]:
        """The registered coordinator ids other than this one."""
        with self._lock:
            session = self._require_session()
            rows = self._run(
                session,
                "SELECT coordinator_id FROM twopc_coordinators"
                " WHERE coordinator_id <> %s ORDER BY 1",
                (self.coordinator_id,),
            )
        return [str(r[0]) for r in rows]

    def claim(self, peer: str) -> bool:
        """Take ``peer``'s lock; False when it is held (the peer is alive)."""
        with self._lock:
            return self._try_lock(self._require_session(), validate_coordinator_id(peer))

    def release(self, peer: str) -> None:
        """Give ``peer``'s lock back. Never raises (the lock ends with the session anyway)."""
        with self._lock, contextlib.suppress(ParticipantError, AssertionError):
            self._run(
                self._require_session(),
                "SELECT pg_advisory_unlock(%s, hashtext(%s))",
                (LOCK_CLASS, peer),
            )
        self._log.info(ev.PEER_LOCK_RELEASED, peer=peer)

    def fence(self, peer: str, timeout: float) -> None:
        """End every session named ``peer`` on every database; return once none is left.

        This coordinator's own lock session is spared. Raises ParticipantError
        naming the database when sessions are still there after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            session = self._session
            spared = [] if session is None or session.closed else [session.info.backend_pid]
        ended = 0
        for database in self.databases:
            ended += database.end_sessions_named(
                peer, deadline, spared=spared if database is self.home else ()
            )
        self._log.info(ev.PEER_FENCED, peer=peer, sessions_ended=ended)

    # -- internals ---------------------------------------------------------------------

    def _alive(self) -> bool:
        session = self._session
        if session is None or session.closed or session.broken:
            return False
        # A terminated session's server sent an error and closed the socket: reading
        # what arrived (twice: the message, then the end of the stream) tells, at no cost.
        try:
            for _ in range(2):
                session.pgconn.consume_input()
        except psycopg.OperationalError:
            return False
        return bool(session.pgconn.status == pq.ConnStatus.OK)

    def _open_session(self) -> None:
        self._session = self.home.connect(autocommit=True)

    def _drop_session(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._session.close()
            self._session = None

    def _require_session(self) -> psycopg.Connection[Any]:
        if not self._alive():
            raise ParticipantUnavailable(
                f"coordinator {self.coordinator_id!r} does not hold its liveness lock "
                "(its session was lost); it takes it again at the next housekeeping round",
                participant=self.home.name,
            )
        assert self._session is not None
        return self._session

    def _create_registry(self, session: psycopg.Connection[Any]) -> None:
        try:
            create_table(session, REGISTRY_DDL, "twopc_coordinators")
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"cannot create the coordinators' registry: {exc}", participant=self.home.name
            ) from exc

    def _try_lock(self, session: psycopg.Connection[Any], coordinator_id: str) -> bool:
        rows = self._run(
            session,
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))",
            (LOCK_CLASS, coordinator_id),
        )
        return bool(rows and rows[0][0])

    def _run(
        self, session: psycopg.Connection[Any], query: Any, params: Any = None
    ) -> list[tuple[Any, ...]]:
        try:
            cursor = session.execute(query, params)
            return cursor.fetchall() if cursor.description else []
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"membership query failed: {exc}", participant=self.home.name
            ) from exc
