# Generated from participants/aio/postgres.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""PostgreSQL as an XA participant: PREPARE TRANSACTION over a small connection pool.

Written once: ``participants/aio/postgres.py`` is the source and
``scripts/unasync.py`` generates ``participants/postgres.py`` from it, so the
asyncio and the thread resources have the same sources of connections,
commands, checks, votes and errors.

The connections come from one of three sources, given as ``PostgresResource``'s
second argument:

* a libpq connection string: the resource opens its own connections and keeps
  up to ``pool_size`` idle ones, plus one autocommit connection for recovery;
* a ``psycopg_pool.ConnectionPool`` (the application's): every connection,
  the recovery one included, is borrowed from it and given back; the resource
  opens none and keeps none idle, so it never holds more than the pool allows;
* a connection factory (a callable returning a new ``psycopg.Connection``):
  called wherever the resource would open a connection itself.

A branch (:class:`~participants.aio.pg_branch.PostgresBranch`, its pipelined
work and its votes) takes a connection from here and gives it back; the commands
it sends libpq itself are in :mod:`participants.aio.pg_commands`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq

from coordinator.compat import Lock, matches_api, sleep
from coordinator.errors import (
    ConfigurationError,
    ParticipantError,
    ParticipantUnavailable,
)
from coordinator.metrics import PreparedCapacity
from coordinator.xid import Xid
from participants import events as ev
from participants.pg_branch import PostgresBranch
from participants.pg_commands import describe_dsn, log
from participants.pg_session import ServerSession
from participants.pg_statements import Prepared, prepared_on

T = TypeVar("T")

#: Ends the sessions named %s, but those in %s and the one asking, and only the busy client
#: sessions if %s: (pid, ended) per session.
_END_SESSIONS = (
    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE application_name = %s AND pid <> pg_backend_pid() AND pid <> ALL(%s::int[])"
    " AND (NOT %s OR (backend_type = 'client backend' AND state IS DISTINCT FROM 'idle'))"
)
#: Ends the client session of backend pid %s named %s in this database, unless it is the one
#: asking: (pid, ended), or no row once it is gone.
_END_BACKEND = (
    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE pid = %s AND application_name = %s AND pid <> pg_backend_pid()"
    " AND datname = current_database() AND backend_type = 'client backend'"
)
#: How long a branch waits for the server's side of its lost session to end (seconds).
LOST_SESSION_TIMEOUT = 10.0


def still_open(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection's server side is still there, read without waiting.

    A session the server ended while the connection sat idle (a restart, an
    administrator, a fencing peer) has sent its FATAL error and closed the socket:
    reading what arrived finds the end of the stream. Nothing is sent.
    """
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()  # the error the server sent, if it did
        pgconn.is_busy()  # parses it
        pgconn.consume_input()  # then the end of the stream
    except psycopg.OperationalError:
        return False
    return pgconn.status == pq.ConnStatus.OK


class ConnectionPoolLike(Protocol):
    """What PostgresResource uses of a ``psycopg_pool.ConnectionPool``."""

    conninfo: str

    @property
    def kwargs(self) -> dict[str, Any] | None: ...

    def getconn(self, timeout: float | None = None) -> psycopg.Connection[Any]: ...

    def putconn(self, conn: psycopg.Connection[Any]) -> None: ...


#: Where the resource takes its connections from (see the module docstring).
ConnectionSource = str | ConnectionPoolLike | Callable[[], psycopg.Connection[Any]]


class PostgresResource:
    """One PostgreSQL database taking part in global transactions (an XAResource)."""

    def __init__(
        self,
        name: str,
        dsn: ConnectionSource,
        *,
        setting: str | None = None,
        pool_size: int = 40,
        connect_timeout: float = 5.0,
        application_name: str | None = None,
        prepare_threshold: int | None = 5,
    ) -> None:
        self._name = name
        self._pool: ConnectionPoolLike | None = None
        self._factory: Callable[[], psycopg.Connection[Any]] | None = None
        if isinstance(dsn, str):
            self.dsn = dsn
        elif hasattr(dsn, "getconn") and hasattr(dsn, "putconn"):
            if not matches_api(dsn.getconn):
                raise ConfigurationError(
                    f"PostgreSQL {name!r}: {type(dsn).__name__} is a pool of the other API; "
                    "PostgresResource takes a psycopg_pool.ConnectionPool"
                )
            self._pool = dsn  # type: ignore[assignment]
            self.dsn = str(getattr(dsn, "conninfo", ""))
        elif callable(dsn):
            self._factory = dsn
            self.dsn = ""
        else:
            raise ConfigurationError(
                f"PostgreSQL {name!r}: expected a connection string, a "
                "psycopg_pool.ConnectionPool or a connection factory, "
                f"got {type(dsn).__name__}"
            )
        # Every session says whose it is (the coordinator id), so that a peer can end
        # them all when it fences this coordinator (docs/design.md §4).
        self.application_name = application_name
        self.setting = setting or f"TWOPC_PG_{name.upper()}"
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        # psycopg's setting, for the connections opened here: the uses of a deferred
        # statement on a connection before it is prepared on the server; None: never
        # (behind PgBouncer in transaction mode, say). docs/design.md §2.
        self.prepare_threshold = prepare_threshold
        self._idle: list[psycopg.Connection[Any]] = []  # the last released on top
        self._checked = False
        self._admin: psycopg.Connection[Any] | None = None
        self._admin_lock = Lock()
        self._closed = False  # connections released after close() are closed, not kept

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"PostgresResource({self._name!r}, {describe_dsn(self.dsn)})"

    # -- connections: the one place that opens them ---------------------------

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A new connection; the first one checks that the server can prepare."""
        try:
            conn = psycopg.Connection.connect(
                self.dsn,
                autocommit=autocommit,
                connect_timeout=int(self.connect_timeout),
                application_name=self.application_name,  # None: libpq's default
                prepare_threshold=self.prepare_threshold,
            )
        except psycopg.OperationalError as exc:
            raise ParticipantUnavailable(
                f"cannot reach PostgreSQL at {describe_dsn(self.dsn)}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}. "
                f"Start the lab with 'twopc lab up' or check {self.setting}",
                participant=self._name,
            ) from exc
        if not self._checked:
            self._check_server(conn)
        return conn

    def _check_server(self, conn: psycopg.Connection[Any]) -> None:
        cursor = conn.execute("SELECT current_setting('max_prepared_transactions')::int")
        row = cursor.fetchone()
        conn.rollback()
        if row is None or row[0] == 0:
            conn.close()
            raise ConfigurationError(
                f"PostgreSQL {self._name!r} at {describe_dsn(self.dsn)} has "
                "max_prepared_transactions = 0, so it cannot PREPARE TRANSACTION and cannot "
                "take part in two-phase commit. Set max_prepared_transactions (at least the "
                "number of concurrent transactions, e.g. 100) in postgresql.conf and restart it"
            )
        self._checked = True

    def _given(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        """A connection from the application's pool or factory, checked like connect()'s."""
        where = "the connection pool" if self._pool is not None else "the connection factory"
        try:
            if self._pool is not None:
                conn = self._pool.getconn()
            else:
                assert self._factory is not None
                conn = self._factory()
        except psycopg.OperationalError as exc:  # psycopg_pool.PoolTimeout included
            raise ParticipantUnavailable(
                f"cannot get a connection to PostgreSQL from {where}: "
                f"{str(exc).strip() or type(exc).__name__}",
                participant=self._name,
            ) from exc
        try:
            if conn.autocommit != autocommit:
                conn.set_autocommit(autocommit)
            if not self._checked:
                self._check_server(conn)
        except BaseException:
            self._release(conn)
            raise
        return conn

    def _acquire(self, xid: Xid) -> psycopg.Connection[Any]:
        """A connection for ``xid``'s branch: a kept one whose session the server ended
        meanwhile is closed and the next one taken (its BEGIN goes with the branch's
        first statements, too late to find that out then)."""
        while True:
            if self._pool is not None:
                conn = self._given(autocommit=False)  # the pool's may have gone stale
            else:
                try:
                    conn = self._idle.pop()
                except IndexError:
                    if self._factory is not None:
                        return self._given(autocommit=False)
                    return self.connect()
            idle = conn.pgconn.transaction_status == pq.TransactionStatus.IDLE  # not closed
            if idle and still_open(conn):
                return conn
            if idle:
                log().info(ev.PG_POOLED_LOST, participant=self._name, gtrid=xid.gtrid)
            conn.close()
            if self._pool is not None:
                self._release(conn)  # the pool replaces a closed one

    def prepared_statements(self, conn: psycopg.Connection[Any]) -> Prepared | None:
        """The record of the statements branches prepared on ``conn``; None where they
        prepare none: a connection of the application's pool, whose reset (DISCARD ALL)
        the resource would not see, or one whose ``prepare_threshold`` is None."""
        return None if self._pool is not None else prepared_on(conn)

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        healthy = conn.pgconn.transaction_status == pq.TransactionStatus.IDLE  # not closed
        if self._pool is not None:  # back to the application's pool, as it lent it
            if healthy:
                conn.set_autocommit(bool((self._pool.kwargs or {}).get("autocommit", False)))
            self._pool.putconn(conn)  # the pool replaces a closed or broken one
            return
        if healthy and not self._closed and len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            conn.close()

    def _on_admin(self, work: Callable[[psycopg.Connection[Any]], T], *, keep: bool = True) -> T:
        """Run ``work`` on the one autocommit connection recovery uses for this database.

        That connection is kept between calls, so the server may have ended it
        meanwhile (a restart, an administrator): if a kept connection turns out
        lost, ``work`` runs once more on a new one. ``work`` is idempotent (list,
        COMMIT PREPARED or ROLLBACK PREPARED by gid), so a repeat is harmless.
        Without ``keep``, when none is kept, ``work`` runs on a connection opened for
        this call only (a resource that keeps no idle session, as the membership's).
        """
        if not keep and self._pool is None:
            with self._admin_lock:
                if self._admin is None or self._admin.closed:
                    once = self._open_admin()
                    try:
                        return work(once)
                    finally:
                        once.close()
        if self._pool is not None:  # borrowed for this call only: no connection is kept
            for attempt in (1, 2):
                borrowed = self._given(autocommit=True)
                try:
                    return work(borrowed)
                except psycopg.OperationalError:
                    if not borrowed.broken or attempt == 2:
                        raise
                    log().info(ev.PG_ADMIN_RECONNECT, participant=self._name)
                finally:
                    self._release(borrowed)
        with self._admin_lock:
            while True:
                kept = self._admin is not None and not self._admin.closed
                if not kept:
                    self._admin = self._open_admin()
                conn = self._admin
                assert conn is not None
                try:
                    return work(conn)
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise  # a statement failed; the connection itself is fine
                    conn.close()
                    self._admin = None
                    if not kept:
                        raise
                    log().info(ev.PG_ADMIN_RECONNECT, participant=self._name)

    def _open_admin(self) -> psycopg.Connection[Any]:
        """A new autocommit connection for recovery's work: from the factory, if given."""
        if self._factory is not None:
            return self._given(autocommit=True)
        return self.connect(autocommit=True)

    # -- XAResource ------------------------------------------------------------

    def begin(self, xid: Xid) -> PostgresBranch:
        """The branch on a connection; its BEGIN is not sent yet: it goes first in the
        branch's first pipeline (docs/design.md §2, "Pipelined work")."""
        return PostgresBranch(self, self._acquire(xid), xid)

    def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        """This database's prepared branches with ``format_id`` and the prefix -> prepared at."""

        def listing(conn: psycopg.Connection[Any]) -> tuple[list[psycopg.Xid], str]:
            return conn.tpc_recover(), conn.info.dbname

        try:
            found, dbname = self._on_admin(listing)
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"cannot list prepared transactions: {exc}", participant=self._name
            ) from exc
        result: dict[Xid, datetime | None] = {}
        for x in found:
            if x.format_id != format_id or not x.gtrid.startswith(gtrid_prefix):
                continue
            if x.database not in (None, dbname):
                continue  # prepared in another database of the same server
            result[Xid(x.format_id, x.gtrid, x.bqual or "")] = x.prepared
        return result

    def end_sessions_named(
        self,
        application_name: str,
        deadline: float,
        *,
        spared: Sequence[int] = (),
        busy_only: bool = False,
    ) -> int:
        """End this database's sessions named ``application_name`` (``pg_terminate_backend``;
        but ``spared`` and the one asking) and wait until ``pg_stat_activity`` shows none;
        return how many were ended. With ``busy_only``, only the busy ones: a query running
        or waiting, or a transaction open.

        Fencing a dead peer ends all of its sessions (docs/design.md §4). Recovery ends
        the busy ones of its own coordinator before it lists the prepared branches (§5,
        "Work a dead process left running"): a process of it that died may have left work
        that still runs, a PREPARE behind it, once a lock it waits for is freed, while an
        idle session does nothing more, and this process's own are idle while it
        recovers. Raises ParticipantError naming the database when some are still there
        at ``deadline`` (``time.monotonic()``).
        """
        coordinator = f"coordinator {application_name!r}"
        return self._end_until_gone(
            _END_SESSIONS,
            (application_name, list(spared), busy_only),
            deadline,
            cannot=f"cannot end the sessions of {coordinator}",
            still=lambda n: (
                f"{n} sessions of {coordinator} are still {'busy' if busy_only else 'open'} "
                f"on PostgreSQL {self._name!r} after fencing; nothing of theirs was decided: "
                "run the recovery again ('twopc recover', or 'twopc recover --dead' for a "
                "dead peer)"
            ),
        )

    def end_lost_session(self, session: ServerSession, xid: Xid) -> None:
        """End the server's side of branch ``xid``'s session, which its coordinator lost
        (``session``: its backend pid and name), and wait until ``pg_stat_activity`` no
        longer shows it.

        The server runs what it received whether or not the client is still there: work
        that waits for a row lock runs once the lock is freed, and a PREPARE sent behind
        it then prepares the branch, after the coordinator rolled it back by its gid and
        found nothing (docs/design.md §2, "A PREPARE behind work that waits"). Once that
        session has ended, the branch is prepared now or never. Raises ParticipantError
        naming the database and the gtrid when it cannot be ended in
        :data:`LOST_SESSION_TIMEOUT`: the rollback by gid waits for the next attempt.
        """
        self._end_until_gone(
            _END_BACKEND,
            (session.pid, session.application_name),
            time.monotonic() + LOST_SESSION_TIMEOUT,
            cannot=f"cannot end the lost session (backend pid {session.pid})",
            still=lambda _: (
                f"the lost session (backend pid {session.pid}) is still there on PostgreSQL "
                f"{self._name!r}: its PREPARE may still run; the rollback is tried again"
            ),
            gtrid=xid.gtrid,
        )

    def _end_until_gone(
        self,
        query: str,
        params: tuple[Any, ...],
        deadline: float,
        *,
        cannot: str,
        still: Callable[[int], str],
        gtrid: str | None = None,
    ) -> int:
        """Run ``query`` (``pg_terminate_backend`` on the sessions it finds, a row (pid,
        ended) each) until it finds none; return how many it ended. ``cannot`` and
        ``still(n)`` say what failed, the server unreachable or ``n`` sessions left at
        ``deadline`` (``time.monotonic()``)."""

        def ending(conn: psycopg.Connection[Any]) -> list[Any]:
            cursor = conn.execute(query, params)
            return cursor.fetchall()

        ended = 0
        while True:
            try:
                rows = self._on_admin(ending, keep=False)
            except psycopg.Error as exc:
                raise ParticipantUnavailable(
                    f"{cannot}: {exc}", participant=self._name, gtrid=gtrid
                ) from exc
            if not rows:
                return ended
            ended += sum(1 for _, killed in rows if killed)
            if time.monotonic() > deadline:
                raise ParticipantError(still(len(rows)), participant=self._name, gtrid=gtrid)
            sleep(0.05)

    def prepared_capacity(self) -> PreparedCapacity:
        """The server's ``max_prepared_transactions``, the prepared transactions it holds
        (of any format, in any database) and its clock, for metrics."""

        def reading(conn: psycopg.Connection[Any]) -> Any:
            cursor = conn.execute(
                "SELECT current_setting('max_prepared_transactions')::int,"
                " (SELECT count(*) FROM pg_prepared_xacts)::int, clock_timestamp()"
            )
            return cursor.fetchone()

        try:
            max_prepared, prepared, now = self._on_admin(reading)
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"cannot read max_prepared_transactions: {exc}", participant=self._name
            ) from exc
        return PreparedCapacity(max_prepared, prepared, now)

    def _finish_recovered(self, xid: Xid, action: str) -> bool:
        def finish(conn: psycopg.Connection[Any]) -> None:
            pg_xid = conn.xid(xid.format_id, xid.gtrid, xid.bqual)
            if action == "commit":
                conn.tpc_commit(pg_xid)
            else:
                conn.tpc_rollback(pg_xid)

        try:
            self._on_admin(finish)
        except pg_errors.UndefinedObject:  # 42704: no prepared transaction with that gid
            return False
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"{action.upper()} PREPARED failed: {exc}", participant=self._name, gtrid=xid.gtrid
            ) from exc
        return True

    def commit_recovered(self, xid: Xid) -> bool:
        return self._finish_recovered(xid, "commit")

    def rollback_recovered(self, xid: Xid) -> bool:
        return self._finish_recovered(xid, "rollback")

    def close(self) -> None:
        """Close the idle connections; those in use are closed when released."""
        self._closed = True
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            conn.close()
        with self._admin_lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None
