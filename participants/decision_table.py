"""PostgreSQL as the commit-markable resource: the decision table ``twopc_decisions``.

docs/design.md §3. A row ``(gtrid)`` means COMMIT. The driver inserts it inside the
participant's own branch (:meth:`PostgresDecisionTable.mark`) and commits that
branch one-phase after the others prepared, so the row and the participant's
work commit together or not at all. The INSERT returns the backend pid that
carries it, so that a commit with no answer can be settled by ending exactly
that session (:meth:`PostgresDecisionTable.settle`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Collection
from typing import Any, LiteralString, cast

import psycopg

from coordinator.errors import ParticipantError, ParticipantUnavailable
from coordinator.protocol import AsyncXABranch, XABranch
from participants.aio.pg_branch import AsyncPostgresBranch
from participants.pg_branch import PostgresBranch
from participants.pg_schema import create_table
from participants.postgres import PostgresResource

DECISIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS twopc_decisions ("
    " gtrid text PRIMARY KEY,"
    " decided_at timestamptz NOT NULL DEFAULT now())"
)

#: How many carrier pids are remembered for settle() (one per recent decision).
_CARRIERS_KEPT = 10_000


#: The decision row, written inside the carrying branch; the pid names its session.
MARK_QUERY: LiteralString = (
    "INSERT INTO twopc_decisions (gtrid) VALUES (%s) RETURNING pg_backend_pid()"
)


class PostgresDecisionTable:
    """The decision rows in database ``resource``: a coordinator's
    :class:`~coordinator.protocol.DecisionHolder`."""

    def __init__(self, resource: PostgresResource) -> None:
        self.resource = resource
        self._session: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._carriers: dict[str, int] = {}  # gtrid -> backend pid of its decision row

    @property
    def participant(self) -> str:
        return self.resource.name

    def create(self) -> None:
        """Create the table if it is missing. Raises ParticipantUnavailable."""
        with self._lock:
            try:
                self._open_session()
            except psycopg.Error as exc:
                raise ParticipantUnavailable(
                    f"cannot create the decision table: {exc}", participant=self.participant
                ) from exc

    def mark(self, branch: XABranch, gtrid: str) -> None:
        """INSERT ``gtrid``'s row inside ``branch`` and keep the session's pid for settle().

        ``branch`` is the holder's own participant's, a PostgreSQL branch: it takes the
        row by ``carry_decision``, also once the caller ended the branch's work
        (``Transaction.end_work``, which never prepares this branch early)."""
        row = cast(PostgresBranch, branch).carry_decision(MARK_QUERY, (gtrid,)).fetchone()
        self._marked(gtrid, int(row[0]) if row else 0)

    async def amark(self, branch: AsyncXABranch, gtrid: str) -> None:
        """:meth:`mark` inside an asyncio branch."""
        carrier = cast(AsyncPostgresBranch, branch)
        row = await (await carrier.carry_decision(MARK_QUERY, (gtrid,))).fetchone()
        self._marked(gtrid, int(row[0]) if row else 0)

    def _marked(self, gtrid: str, backend_pid: int) -> None:
        with self._lock:
            if len(self._carriers) >= _CARRIERS_KEPT:
                self._carriers.pop(next(iter(self._carriers)))
            self._carriers[gtrid] = backend_pid

    def decided(self, gtrid_prefix: str) -> set[str]:
        pattern = gtrid_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._run("SELECT gtrid FROM twopc_decisions WHERE gtrid LIKE %s", (pattern,))
        return {str(r[0]) for r in rows if str(r[0]).startswith(gtrid_prefix)}

    def settle(self, gtrid: str, timeout: float) -> None:
        with self._lock:
            pid = self._carriers.pop(gtrid, None)
        if not pid:
            return  # no row was written on a session of ours: nothing in flight
        deadline = time.monotonic() + timeout
        name = self.resource.application_name
        while True:
            rows = self._run(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid = %s AND application_name IS NOT DISTINCT FROM %s",
                (pid, name),
            )
            if not rows:
                return
            if time.monotonic() > deadline:
                raise ParticipantError(
                    f"the session (pid {pid}) that carried the decision row of {gtrid} is "
                    f"still open after {timeout:g} s; the outcome stays unknown: run "
                    "'twopc recover' once it is gone",
                    participant=self.participant,
                    gtrid=gtrid,
                )
            time.sleep(0.05)

    def forget(self, gtrids: Collection[str]) -> int:
        rows = self._run(
            "WITH gone AS (DELETE FROM twopc_decisions WHERE gtrid = ANY(%s) RETURNING 1)"
            " SELECT count(*) FROM gone",
            (list(gtrids),),
        )
        with self._lock:
            for gtrid in gtrids:
                self._carriers.pop(gtrid, None)
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            if self._session is not None:
                self._session.close()
            self._session = None

    def _run(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        """One statement on the table's own autocommit session (opened again if lost).

        Only reads and the deletion of ended transactions' rows run here: a decision
        row is never written on this session (a zombie could write it after fencing).
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    cursor = self._open_session().execute(query, params)
                    return cursor.fetchall() if cursor.description else []
                except psycopg.OperationalError as exc:
                    session = self._session
                    if session is not None and session.broken and attempt == 1:
                        session.close()  # a kept session the server ended: once more
                        continue
                    raise ParticipantUnavailable(
                        f"decision table query failed: {exc}", participant=self.participant
                    ) from exc
                except psycopg.Error as exc:
                    raise ParticipantUnavailable(
                        f"decision table query failed: {exc}", participant=self.participant
                    ) from exc
        raise AssertionError("unreachable")

    def _open_session(self) -> psycopg.Connection[Any]:
        """The kept session, opened (and the table created, if missing) when there is none."""
        if self._session is None or self._session.closed:
            session = self.resource.connect(autocommit=True)
            try:
                create_table(session, DECISIONS_DDL, "twopc_decisions")
            except BaseException:
                session.close()
                raise
            self._session = session
        return self._session
