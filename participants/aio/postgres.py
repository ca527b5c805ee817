"""PostgreSQL as an XA participant: PREPARE TRANSACTION over a small connection pool.

Written once: ``participants/aio/postgres.py`` is the source and
``scripts/unasync.py`` generates ``participants/postgres.py`` from it, so the
asyncio and the thread resources have the same sources of connections,
commands, checks, votes and errors.

The connections come from one of three sources, given as ``AsyncPostgresResource``'s
second argument:

* a libpq connection string: the resource opens its own connections and keeps
  up to ``pool_size`` idle ones, plus one autocommit connection for recovery;
* a ``psycopg_pool.AsyncConnectionPool`` (the application's): every connection,
  the recovery one included, is borrowed from it and given back; the resource
  opens none and keeps none idle, so it never holds more than the pool allows;
* a connection factory (a callable returning a new ``psycopg.AsyncConnection``):
  called wherever the resource would open a connection itself.

The branch's own commands (BEGIN, PREPARE TRANSACTION, COMMIT/ROLLBACK
PREPARED) are composed once per branch and go to libpq directly; their
answers are checked by :mod:`participants.pg_vote` (docs/design.md §2).

Work given to a branch's ``defer`` is not sent at once: it goes out in libpq's
pipeline mode with the branch's next command (its PREPARE TRANSACTION, or its
one-phase COMMIT) or at ``flush``, in one round trip, and its answers are read
before the vote (docs/design.md §2, "Pipelined work"). It is bound by the
server, and a statement deferred often is prepared there
(:mod:`participants.pg_statements`; ``prepare_threshold``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from base64 import b64encode
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, LiteralString, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq

from coordinator.compat import ALock, amatches_api
from coordinator.errors import (
    CommitRefused,
    ConfigurationError,
    DuplicateGtrid,
    InvalidTransition,
    ParticipantError,
    ParticipantUnavailable,
    PrepareFailed,
)
from coordinator.events import get_logger
from coordinator.metrics import PreparedCapacity
from coordinator.protocol import XAResource
from coordinator.states import Vote
from coordinator.xid import Xid
from participants import events as ev
from participants import postgres as sync_postgres
from participants.pg_statements import (
    Deferred,
    Key,
    Prepared,
    convert,
    prepared_on,
)
from participants.pg_vote import (
    branch_ended,
    ended_by,
    foreign_gid,
    foreign_outcome,
    in_progress,
    quote_gid,
    statement_text,
    wrong_commit_answer,
    wrong_prepare_answer,
)

#: Statements ``defer`` refuses: they end (or begin) the branch's transaction, which
#: ``execute`` detects from their answers, while a pipeline would run on past them.
_TRANSACTION_CONTROL = re.compile(
    rb"\s*(COMMIT|END|ROLLBACK|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)


def _log() -> Any:
    # Looked up at each use, so that the application's later structlog set-up applies.
    return get_logger(component="postgres")


T = TypeVar("T")

# Command tags that mean the statement changed data: the branch then needs a
# real prepare. Anything else (SELECT, SHOW, ...) is checked with one query at
# commit time, because a SELECT can call a function that writes.
_WRITE_TAGS = (
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "COPY",
    "CREATE",
    "ALTER",
    "DROP",
    "TRUNCATE",
    "GRANT",
    "REVOKE",
    "COMMENT",
    "LOCK",
)


#: The branch's BEGIN: the first statement of its first pipeline (docs/design.md §2).
BEGIN = b"BEGIN"


def still_open(conn: psycopg.AsyncConnection[Any]) -> bool:
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


def describe_dsn(dsn: str) -> str:
    """host:port/dbname of a connection string, for messages (never the password)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable connection string)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def gid_of(xid: Xid) -> str:
    """The transaction id PostgreSQL knows the branch by: psycopg's (and JDBC's) encoding
    of the Xid, ``<format id>_<base64 gtrid>_<base64 bqual>``, which ``tpc_recover``
    decodes. Built here rather than through ``psycopg.Xid``, which validates and
    allocates on the hot path (tests/test_conformance.py checks the two agree)."""
    gtrid = b64encode(xid.gtrid.encode()).decode()
    bqual = b64encode(xid.bqual.encode()).decode()
    return f"{xid.format_id}_{gtrid}_{bqual}"


def send_command(conn: psycopg.AsyncConnection[Any], command: bytes) -> None:
    """Send ``command`` without waiting for its answer (:func:`receive_answer` waits).

    The branch's own commands (BEGIN, PREPARE TRANSACTION, COMMIT/ROLLBACK
    PREPARED) go to libpq directly: several connections then work at once from
    one thread (or task), with no SQL composition on the hot path.
    """
    conn.pgconn.send_query(command)


def succeeded(results: list[pq.abc.PGresult]) -> bool:
    """The command succeeded (a Parse, or a statement with no rows)."""
    return bool(results) and results[-1].status == pq.ExecStatus.COMMAND_OK


def raise_failed(results: list[pq.abc.PGresult], conn: psycopg.AsyncConnection[Any]) -> None:
    """Raise the first failed result's error as psycopg's (the connection's encoding is
    looked up only then)."""
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise pg_errors.error_from_result(result, encoding=conn.info.encoding)


def answer_of(results: list[pq.abc.PGresult], conn: psycopg.AsyncConnection[Any]) -> str:
    """The command tag of the last result (what the server did); raise its error as psycopg's."""
    raise_failed(results, conn)
    status = results[-1].command_status if results else None
    return status.decode() if status else ""


async def receive_answer(conn: psycopg.AsyncConnection[Any]) -> str:
    """Wait for the answer to the command sent last: its command tag, or the server's error."""
    return answer_of(await conn.wait(generators.execute(conn.pgconn)), conn)


async def run_command(conn: psycopg.AsyncConnection[Any], command: bytes) -> str:
    """Send ``command`` and wait for its answer (its command tag)."""
    send_command(conn, command)
    return await receive_answer(conn)


async def result_tags(cursor: psycopg.AsyncCursor[Any]) -> list[str]:
    """The command tag of every result of the cursor's last execute (a string of several
    statements has one each), leaving the cursor on its first result, as execute did."""
    tags: list[str] = []
    while True:
        try:
            await cursor.set_result(len(tags))
        except IndexError:
            break
        tags.append(cursor.statusmessage or "")
    if len(tags) > 1:
        await cursor.set_result(0)
    return tags


class AsyncConnectionPoolLike(Protocol):
    """What AsyncPostgresResource uses of a ``psycopg_pool.AsyncConnectionPool``."""

    conninfo: str

    @property
    def kwargs(self) -> dict[str, Any] | None: ...

    async def getconn(self, timeout: float | None = None) -> psycopg.AsyncConnection[Any]: ...

    async def putconn(self, conn: psycopg.AsyncConnection[Any]) -> None: ...


#: Where the resource takes its connections from (see the module docstring).
AsyncConnectionSource = (
    str | AsyncConnectionPoolLike | Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]
)


class AsyncPostgresResource:
    """One PostgreSQL database taking part in global transactions (an AsyncXAResource)."""

    def __init__(
        self,
        name: str,
        dsn: AsyncConnectionSource,
        *,
        setting: str | None = None,
        pool_size: int = 40,
        connect_timeout: float = 5.0,
        application_name: str | None = None,
        prepare_threshold: int | None = 5,
    ) -> None:
        self._name = name
        self._pool: AsyncConnectionPoolLike | None = None
        self._factory: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]] | None = None
        if isinstance(dsn, str):
            self.dsn = dsn
        elif hasattr(dsn, "getconn") and hasattr(dsn, "putconn"):
            if not amatches_api(dsn.getconn):
                raise ConfigurationError(
                    f"PostgreSQL {name!r}: {type(dsn).__name__} is a pool of the other API; "
                    "AsyncPostgresResource takes a psycopg_pool.AsyncConnectionPool"
                )
            self._pool = dsn  # type: ignore[assignment]
            self.dsn = str(getattr(dsn, "conninfo", ""))
        elif callable(dsn):
            self._factory = dsn
            self.dsn = ""
        else:
            raise ConfigurationError(
                f"PostgreSQL {name!r}: expected a connection string, a "
                "psycopg_pool.AsyncConnectionPool or a connection factory, "
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
        self._idle: list[psycopg.AsyncConnection[Any]] = []  # the last released on top
        self._checked = False
        self._admin: psycopg.AsyncConnection[Any] | None = None
        self._admin_lock = ALock()
        self._closed = False  # connections released after close() are closed, not kept

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"AsyncPostgresResource({self._name!r}, {describe_dsn(self.dsn)})"

    # -- connections: the one place that opens them ---------------------------

    async def connect(self, *, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
        """A new connection; the first one checks that the server can prepare."""
        try:
            conn = await psycopg.AsyncConnection.connect(
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
            await self._check_server(conn)
        return conn

    async def _check_server(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cursor = await conn.execute("SELECT current_setting('max_prepared_transactions')::int")
        row = await cursor.fetchone()
        await conn.rollback()
        if row is None or row[0] == 0:
            await conn.close()
            raise ConfigurationError(
                f"PostgreSQL {self._name!r} at {describe_dsn(self.dsn)} has "
                "max_prepared_transactions = 0, so it cannot PREPARE TRANSACTION and cannot "
                "take part in two-phase commit. Set max_prepared_transactions (at least the "
                "number of concurrent transactions, e.g. 100) in postgresql.conf and restart it"
            )
        self._checked = True

    async def _given(self, *, autocommit: bool) -> psycopg.AsyncConnection[Any]:
        """A connection from the application's pool or factory, checked like connect()'s."""
        where = "the connection pool" if self._pool is not None else "the connection factory"
        try:
            if self._pool is not None:
                conn = await self._pool.getconn()
            else:
                assert self._factory is not None
                conn = await self._factory()
        except psycopg.OperationalError as exc:  # psycopg_pool.PoolTimeout included
            raise ParticipantUnavailable(
                f"cannot get a connection to PostgreSQL from {where}: "
                f"{str(exc).strip() or type(exc).__name__}",
                participant=self._name,
            ) from exc
        try:
            if conn.autocommit != autocommit:
                await conn.set_autocommit(autocommit)
            if not self._checked:
                await self._check_server(conn)
        except BaseException:
            await self._release(conn)
            raise
        return conn

    async def _acquire(self, xid: Xid) -> psycopg.AsyncConnection[Any]:
        """A connection for ``xid``'s branch: a kept one whose session the server ended
        meanwhile is closed and the next one taken (its BEGIN goes with the branch's
        first statements, too late to find that out then)."""
        while True:
            if self._pool is not None:
                conn = await self._given(autocommit=False)  # the pool's may have gone stale
            else:
                try:
                    conn = self._idle.pop()
                except IndexError:
                    if self._factory is not None:
                        return await self._given(autocommit=False)
                    return await self.connect()
            idle = conn.pgconn.transaction_status == pq.TransactionStatus.IDLE  # not closed
            if idle and still_open(conn):
                return conn
            if idle:
                _log().info(ev.PG_POOLED_LOST, participant=self._name, gtrid=xid.gtrid)
            await conn.close()
            if self._pool is not None:
                await self._release(conn)  # the pool replaces a closed one

    def prepared_statements(self, conn: psycopg.AsyncConnection[Any]) -> Prepared | None:
        """The record of the statements branches prepared on ``conn``; None where they
        prepare none: a connection of the application's pool, whose reset (DISCARD ALL)
        the resource would not see, or one whose ``prepare_threshold`` is None."""
        return None if self._pool is not None else prepared_on(conn)

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        healthy = conn.pgconn.transaction_status == pq.TransactionStatus.IDLE  # not closed
        if self._pool is not None:  # back to the application's pool, as it lent it
            if healthy:
                await conn.set_autocommit(bool((self._pool.kwargs or {}).get("autocommit", False)))
            await self._pool.putconn(conn)  # the pool replaces a closed or broken one
            return
        if healthy and not self._closed and len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            await conn.close()

    async def _on_admin(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run ``work`` on the one autocommit connection recovery uses for this database.

        That connection is kept between calls, so the server may have ended it
        meanwhile (a restart, an administrator): if a kept connection turns out
        lost, ``work`` runs once more on a new one. ``work`` is idempotent (list,
        COMMIT PREPARED or ROLLBACK PREPARED by gid), so a repeat is harmless.
        """
        if self._pool is not None:  # borrowed for this call only: no connection is kept
            for attempt in (1, 2):
                borrowed = await self._given(autocommit=True)
                try:
                    return await work(borrowed)
                except psycopg.OperationalError:
                    if not borrowed.broken or attempt == 2:
                        raise
                    _log().info(ev.PG_ADMIN_RECONNECT, participant=self._name)
                finally:
                    await self._release(borrowed)
        async with self._admin_lock:
            while True:
                kept = self._admin is not None and not self._admin.closed
                if not kept:
                    if self._factory is not None:
                        self._admin = await self._given(autocommit=True)
                    else:
                        self._admin = await self.connect(autocommit=True)
                conn = self._admin
                assert conn is not None
                try:
                    return await work(conn)
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise  # a statement failed; the connection itself is fine
                    await conn.close()
                    self._admin = None
                    if not kept:
                        raise
                    _log().info(ev.PG_ADMIN_RECONNECT, participant=self._name)

    # -- XAResource ------------------------------------------------------------

    async def begin(self, xid: Xid) -> AsyncPostgresBranch:
        """The branch on a connection; its BEGIN is not sent yet: it goes first in the
        branch's first pipeline (docs/design.md §2, "Pipelined work")."""
        return AsyncPostgresBranch(self, await self._acquire(xid), xid)

    async def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        """This database's prepared branches with ``format_id`` and the prefix -> prepared at."""

        async def listing(conn: psycopg.AsyncConnection[Any]) -> tuple[list[psycopg.Xid], str]:
            return await conn.tpc_recover(), conn.info.dbname

        try:
            found, dbname = await self._on_admin(listing)
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

    async def prepared_capacity(self) -> PreparedCapacity:
        """The server's ``max_prepared_transactions``, the prepared transactions it holds
        (of any format, in any database) and its clock, for metrics."""

        async def reading(conn: psycopg.AsyncConnection[Any]) -> Any:
            cursor = await conn.execute(
                "SELECT current_setting('max_prepared_transactions')::int,"
                " (SELECT count(*) FROM pg_prepared_xacts)::int, clock_timestamp()"
            )
            return await cursor.fetchone()

        try:
            max_prepared, prepared, now = await self._on_admin(reading)
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"cannot read max_prepared_transactions: {exc}", participant=self._name
            ) from exc
        return PreparedCapacity(max_prepared, prepared, now)

    async def _finish_recovered(self, xid: Xid, action: str) -> bool:
        async def finish(conn: psycopg.AsyncConnection[Any]) -> None:
            pg_xid = conn.xid(xid.format_id, xid.gtrid, xid.bqual)
            if action == "commit":
                await conn.tpc_commit(pg_xid)
            else:
                await conn.tpc_rollback(pg_xid)

        try:
            await self._on_admin(finish)
        except pg_errors.UndefinedObject:  # 42704: no prepared transaction with that gid
            return False
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"{action.upper()} PREPARED failed: {exc}", participant=self._name, gtrid=xid.gtrid
            ) from exc
        return True

    async def commit_recovered(self, xid: Xid) -> bool:
        return await self._finish_recovered(xid, "commit")

    async def rollback_recovered(self, xid: Xid) -> bool:
        return await self._finish_recovered(xid, "rollback")

    async def close(self) -> None:
        """Close the idle connections; those in use are closed when released."""
        self._closed = True
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            await conn.close()
        async with self._admin_lock:
            if self._admin is not None:
                await self._admin.close()
                self._admin = None
        # unasync: asyncio only
        if self._recovery_view is not None:
            await asyncio.to_thread(self._recovery_view.close)
        # unasync: end

    # unasync: asyncio only
    _recovery_view: sync_postgres.PostgresResource | _LoopRecovery | None = None

    def recovery_resource(self) -> XAResource:
        """The same database as a synchronous XAResource, for recovery and the backlog,
        which call it in a worker thread (always the same object).

        From a connection string it is a :class:`~participants.postgres.PostgresResource`
        with its own recovery connection, as the sync resource has. From a pool or a
        factory, whose connections belong to the event loop, its calls run this
        resource's own on the loop, so every connection still comes from them: ask for
        it on the loop (the AsyncCoordinator does when it starts), and call it from
        worker threads while the loop runs.
        """
        if self._recovery_view is None:
            if self._pool is None and self._factory is None:
                self._recovery_view = sync_postgres.PostgresResource(
                    self._name,
                    self.dsn,
                    setting=self.setting,
                    pool_size=0,
                    connect_timeout=self.connect_timeout,
                    application_name=self.application_name,
                )
            else:
                self._recovery_view = _LoopRecovery(self, asyncio.get_running_loop())
        return self._recovery_view

    # unasync: end


class _WorkFailed(Exception):
    """A deferred statement sent with a command failed: the command did not run."""

    def __init__(self, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.error = error


class AsyncPostgresBranch:
    """One branch: a pooled connection inside a transaction that will be prepared as ``xid``.

    ``send_prepare`` and ``send_commit_prepared`` only send the command; the
    next ``prepare`` / ``commit_prepared`` waits for its answer. The driver sends
    to every branch first and then waits, so that all of them prepare (and
    commit) at once, on one thread (or task).
    """

    def __init__(
        self, resource: AsyncPostgresResource, conn: psycopg.AsyncConnection[Any], xid: Xid
    ) -> None:
        self.resource = resource
        self.conn = conn
        self._xid = xid
        gid = gid_of(xid).encode()
        self._prepare_command = b"PREPARE TRANSACTION '" + gid + b"'"
        self._commit_command = b"COMMIT PREPARED '" + gid + b"'"
        self._rollback_command = b"ROLLBACK PREPARED '" + gid + b"'"
        self._in_flight: bytes | None = None  # a command sent, its answer not yet read
        self._send_error: psycopg.Error | None = None
        self._deferred: list[bytes | Deferred] = [BEGIN]  # BEGIN, then defer()'s, not sent yet
        # What was sent in pipeline mode, its answers unread: per answer, the key of a
        # statement prepared there (its Parse's answer) or None (a statement's).
        self._pipelined: list[Key | None] = []
        self._statements = resource.prepared_statements(conn)
        self._wrote = False
        self._prepared = False
        self._maybe_prepared = False  # PREPARE was sent: the server may hold the branch
        self._finished = False
        self._work_done = False  # end_work(): the branch takes no more work
        self.failure: BaseException | None = None
        self._ended: ParticipantError | None = None  # the work ended the transaction

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def xid(self) -> Xid:
        return self._xid

    async def execute(
        self, query: LiteralString | Any, params: Any = None
    ) -> psycopg.AsyncCursor[Any]:
        """Run one statement in the branch; a failure makes the branch vote NO.

        Work that ended the branch's transaction (COMMIT, ROLLBACK, PREPARE
        TRANSACTION) raises :func:`~participants.pg_vote.branch_ended`'s error, and
        so does every later call: nothing runs outside the branch.
        """
        self._check_takes_work()
        if self._deferred:
            await self.flush()  # in order: the deferred statements ran before this one
        try:
            cursor = await self.conn.execute(query, params)
        except psycopg.Error as exc:
            self.failure = exc
            self._raise_if_lost(exc)
            raise  # the caller's SQL failed: theirs to handle; the branch will vote NO
        tag = cursor.statusmessage or ""
        status = self.conn.pgconn.transaction_status
        if not in_progress(tag, status):
            tags = await result_tags(cursor)
            kind = ended_by(tags, status, statement_text(query, self.conn))
            if kind is not None:
                raise await self._end(kind, query)
        if not self._wrote and tag.startswith(_WRITE_TAGS):
            self._wrote = True
        return cursor

    # -- work sent without waiting for each answer (docs/design.md §2) ---------------

    def defer(self, query: LiteralString | Any, params: Any = None) -> None:
        """Queue one statement whose result the caller does not need: it is sent, in
        libpq's pipeline mode, with the branch's next command (its PREPARE TRANSACTION
        or one-phase COMMIT), with the next :meth:`execute`, or at :meth:`flush`, and
        nothing waits for its answer until then.

        Its parameters are converted here, as ``Cursor.execute`` converts them (a
        wrong call raises psycopg's error at once), and bound by the server; a
        statement deferred often is prepared on the server (docs/design.md §2,
        "Prepared statements"). A failure of the statement shows when its answer
        is read: at :meth:`flush` or :meth:`execute` it is raised, at prepare the
        branch votes NO naming it. One statement per call; transaction control
        (COMMIT, ROLLBACK, BEGIN, PREPARE TRANSACTION) is refused: run it with
        :meth:`execute`.
        """
        self._check_takes_work()
        statement = convert(self.conn, query, params)
        if _TRANSACTION_CONTROL.match(statement.query):
            word = statement.query.split(None, 1)[0].decode(errors="replace").upper()
            raise InvalidTransition(
                f"PostgreSQL {self.name!r}, transaction {self._xid.gtrid}: defer() takes the "
                f"branch's work, not transaction control ({word}); run it with execute()"
            )
        self._deferred.append(statement)

    async def flush(self) -> None:
        """Send the deferred statements now (one round trip) and wait for their answers;
        raise the first one's error (the branch then votes NO).

        A caller working on several branches flushes one before the next branch's
        work, so that each branch's locks are taken in the order of the branches
        (docs/design.md §2: work on two databases at once can deadlock).
        """
        self._check_takes_work()
        self._begun_on_conn()
        if not self._deferred:
            return
        try:
            self._send_pipeline(None)
            await self._read_pipeline()
        except psycopg.Error as exc:
            self.failure = self.failure or exc
            self._raise_if_lost(exc)
            raise  # the caller's SQL failed: theirs to handle; the branch will vote NO

    async def prepare_now(self) -> None:
        """End the branch's work and prepare it now: the deferred statements and its
        PREPARE TRANSACTION go in one round trip, and the vote is read here. Phase 1
        then waits for the other branches only (docs/design.md §2, "Prepared early").

        For work done one branch after the other: A's work and A's PREPARE in one
        round trip, then B's, where :meth:`flush` costs A one round trip more. A NO
        vote raises :class:`~coordinator.errors.PrepareFailed` naming the participant
        and the gtrid (the work's own error, e.g. a CheckViolation, as its cause), and
        the transaction then rolls back. The branch takes no more work. Held locks
        stay held while it is prepared; a crash before the commit point leaves it to
        recovery, which rolls it back (presumed abort). A branch that must carry the
        coordinator's decision row (TWOPC_DECISIONS=postgres with no broker in the
        transaction) cannot take it once prepared: that transaction rolls back.
        """
        self._check_takes_work()
        try:
            await self.prepare()
        except BaseException as exc:
            self.failure = self.failure or exc
            raise
        finally:
            self._work_done = True  # a NO vote too: the branch is rolled back

    async def end_work(self, *, prepare: bool) -> None:
        """End the branch's work: with ``prepare``, :meth:`prepare_now`; without, the
        deferred statements go now (:meth:`flush`) and the PREPARE waits for phase 1,
        where it runs beside the other branches'. Either way the branch takes no more
        work, and a failure of its work raises :class:`~coordinator.errors.PrepareFailed`
        naming the participant and the gtrid, the server's error as its cause (the
        branch votes NO). :meth:`coordinator.aio.transaction.AsyncTransaction.end_work`
        chooses ``prepare`` (docs/design.md §2, "Ending the work: now or at phase 1").
        Work that failed before (an ``execute`` whose error the caller caught) raises
        here too, as :meth:`prepare` would.
        """
        if prepare:
            await self.prepare_now()
            return
        try:
            await self.flush()
        except psycopg.Error as exc:
            raise self._no_vote(exc) from exc
        finally:
            self._work_done = True
        if self.failure is not None or self._in_error():
            raise self._no_vote(self.failure) from self.failure

    def _no_vote(self, failure: BaseException | None) -> PrepareFailed:
        """The NO vote of a branch whose work failed (``failure``, or None: the server
        says its transaction is aborted), naming the participant and the gtrid."""
        reason = failure or "the transaction is in an aborted state"
        return PrepareFailed(
            f"voted NO: the branch's work failed: {reason}",
            participant=self.name,
            gtrid=self._xid.gtrid,
        )

    def _check_takes_work(self) -> None:
        """Refuse work after the branch's transaction ended, or after its work was ended
        (end_work) or it was prepared (prepare_now)."""
        if self._ended is not None:
            raise self._ended
        if self._work_done or self._maybe_prepared or self._prepared:
            raise InvalidTransition(
                f"PostgreSQL {self.name!r}, transaction {self._xid.gtrid}: the branch's work "
                "was ended (end_work() or prepare_now()) and it takes no more work"
            )

    def _raise_if_lost(self, exc: psycopg.Error) -> None:
        """The work failed because the session is gone (not because of its SQL): raise
        :class:`~coordinator.errors.ParticipantUnavailable` from ``exc``."""
        if self.conn.closed or self.conn.broken:
            raise ParticipantUnavailable(
                f"the session was lost during the work: {exc}",
                participant=self.name,
                gtrid=self._xid.gtrid,
            ) from exc

    def _begun_on_conn(self) -> None:
        """Work run on :attr:`conn` itself (an ORM's) made psycopg begin the transaction:
        the BEGIN still queued is then not needed, and the branch is not empty.

        Without this a branch whose only work went through ``conn`` would count as
        read-only and be released unprepared, its work rolled back, or its failure
        (an aborted transaction) never voted NO."""
        if self._deferred[:1] == [BEGIN] and self.conn.pgconn.transaction_status in (
            pq.TransactionStatus.INTRANS,
            pq.TransactionStatus.INERROR,
        ):
            del self._deferred[0]

    def _send_pipeline(self, command: bytes | None) -> None:
        """Send the deferred statements, then ``command`` if given, then a Sync, in
        libpq's pipeline mode, without waiting for any answer."""
        self._begun_on_conn()
        statements, self._deferred = self._deferred, []
        pgconn = self.conn.pgconn
        pgconn.enter_pipeline_mode()
        sent: list[Key | None] = []
        try:
            for statement in statements:
                if isinstance(statement, bytes):
                    pgconn.send_query_params(statement, None)
                else:
                    self._send_deferred(statement, sent)
                sent.append(None)
            if command is not None:
                pgconn.send_query_params(command, None)
            pgconn.pipeline_sync()
        except BaseException:
            if self._statements is not None:
                self._statements.forget()  # a Parse recorded may not have gone out
            raise
        self._pipelined = sent

    def _send_deferred(self, statement: Deferred, sent: list[Key | None]) -> None:
        """Send a deferred statement: by its name if it is prepared on the connection,
        after its Parse if it is due to be (that answer's key added to ``sent``), else
        unnamed, as ``Cursor.execute`` sends it."""
        pgconn = self.conn.pgconn
        key = statement.key
        name, parse = (None, False) if self._statements is None else self._statements.name_for(key)
        if name is None:
            pgconn.send_query_params(
                statement.query,
                statement.params,
                param_types=statement.types,
                param_formats=statement.formats,
            )
            return
        if parse:
            pgconn.send_prepare(name, statement.query, param_types=statement.types)
            sent.append(key)
        pgconn.send_query_prepared(name, statement.params, param_formats=statement.formats)

    async def _read_pipeline(self) -> list[pq.abc.PGresult]:
        """Read the answers to the pipeline sent last: the work's (the first error is
        kept as the branch's failure and raised), then the command's results, if a
        command went with it, then the Sync's."""
        sent, self._pipelined = self._pipelined, []
        command = self._in_flight is not None
        pgconn = self.conn.pgconn
        try:
            if pgconn.flush():  # the Sync flushed all unless the socket was full
                await self.conn.wait(generators.send(pgconn))
            work = [await self.conn.wait(generators.fetch_many(pgconn)) for _ in sent]
            answer = await self.conn.wait(generators.fetch_many(pgconn)) if command else []
            await self.conn.wait(generators.fetch_many(pgconn))  # the Sync's
            pgconn.exit_pipeline_mode()
        except psycopg.Error as exc:
            self.failure = self.failure or exc
            if self._statements is not None:
                self._statements.forget()  # which Parse ran is unknown
            raise
        if self._statements is not None:
            for parsed, results in zip(sent, work, strict=True):
                if parsed is not None and not succeeded(results):
                    self._statements.failed(parsed)  # it failed, or an error skipped it
        for parsed, results in zip(sent, work, strict=True):
            try:
                raise_failed(results, self.conn)
            except psycopg.Error as error:
                self.failure = error
                unknown = isinstance(error, pg_errors.InvalidSqlStatementName)  # 26000
                if unknown and self._statements is not None:
                    self._statements.forget()  # the work dropped them (DEALLOCATE ALL)
                raise
            if parsed is not None:
                continue  # a Parse's answer: not the work's
            tag = results[-1].command_status if results else None
            if tag and not self._wrote and tag.decode().startswith(_WRITE_TAGS):
                self._wrote = True
        return answer

    async def _end(self, kind: str, query: Any) -> ParticipantError:
        """The work ended the branch's transaction with ``kind``: the branch is broken.

        A PREPARE TRANSACTION of the work's own left its work prepared under another
        gid, which recovery never sees: it is rolled back here, by that gid.
        """
        foreign = None
        if kind == "PREPARE TRANSACTION":
            gid = foreign_gid(statement_text(query, self.conn))
            error = None
            if gid is not None:
                try:
                    await run_command(self.conn, b"ROLLBACK PREPARED " + quote_gid(gid))
                except psycopg.Error as exc:
                    error = str(exc).strip()
            foreign = foreign_outcome(gid, error, describe_dsn(self.resource.dsn))
        self._ended = branch_ended(
            kind, participant=self.name, gtrid=self._xid.gtrid, foreign=foreign
        )
        self.failure = self._ended
        _log().warning(
            ev.PG_BRANCH_ENDED,
            participant=self.name,
            gtrid=self._xid.gtrid,
            statement=kind,
            error=self._ended.detail,
        )
        return self._ended

    async def read_only(self) -> bool:
        if self._prepared:
            return False  # prepared early: it holds a prepared transaction
        self._begun_on_conn()
        if self._wrote or self.failure is not None:
            return False
        if self._deferred:
            # Nothing sent yet is read-only; deferred work is prepared unread (asking would
            # cost the round trip that deferring saves).
            return self._deferred == [BEGIN]
        if self.conn.pgconn.transaction_status != pq.TransactionStatus.INTRANS:
            return False  # ended outside execute: prepare reads what the server says
        # SELECT can call functions that write: ask the server whether an xid exists.
        cursor = await self.conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL")
        row = await cursor.fetchone()
        return bool(row and row[0])

    def _in_error(self) -> bool:
        return self.conn.pgconn.transaction_status == pq.TransactionStatus.INERROR

    # -- commands sent now, answered later ---------------------------------------------

    def _send(self, command: bytes) -> None:
        """Send ``command`` (after the deferred work, in one pipeline); a failure to send
        is kept for the wait that follows."""
        if self._in_flight is not None or self._send_error is not None:
            return
        try:
            if self._deferred:
                self._send_pipeline(command)
            else:
                send_command(self.conn, command)
        except psycopg.Error as exc:
            self._send_error = exc
            return
        self._in_flight = command

    async def _run(self, command: bytes) -> str:
        """Wait for ``command`` if it was sent already, else send it and wait: its tag.

        Deferred work sent with it is read first: its failure raises
        :class:`_WorkFailed`, and the command was not run."""
        if self._in_flight is None and self._send_error is None:
            self._send(command)
        if self._send_error is not None:
            error, self._send_error = self._send_error, None
            raise error
        if self._in_flight != command:
            return await run_command(self.conn, command)
        if self.conn.pgconn.pipeline_status == pq.PipelineStatus.OFF:
            self._in_flight = None
            return await receive_answer(self.conn)
        try:
            answer = await self._read_pipeline()
        except psycopg.Error as exc:
            self._in_flight = None
            if self.conn.closed or self.conn.broken:
                raise
            raise _WorkFailed(exc) from exc
        self._in_flight = None
        return answer_of(answer, self.conn)

    def _wrong_prepare_answer(self, tag: str) -> PrepareFailed | None:
        return wrong_prepare_answer(
            tag, self.conn.pgconn.transaction_status, participant=self.name, gtrid=self._xid.gtrid
        )

    # -- phase 1 -----------------------------------------------------------------------

    def send_prepare(self) -> None:
        """Send PREPARE TRANSACTION now; :meth:`prepare` reads the vote."""
        if self._prepared:
            return  # prepared early (prepare_now)
        if self.failure is None and not self._in_error():
            self._maybe_prepared = True
            self._send(self._prepare_command)

    async def prepare(self) -> Vote:
        if self._prepared:
            return Vote.YES  # prepared early (prepare_now): its vote was read then
        gtrid = self._xid.gtrid
        if self.failure is not None or self._in_error():
            await self.rollback()
            raise self._no_vote(self.failure) from self.failure
        self._maybe_prepared = True
        try:
            tag = await self._run(self._prepare_command)
        except _WorkFailed as failed:  # PREPARE was skipped: the transaction is aborted
            self._maybe_prepared = False
            await self.rollback()
            raise self._no_vote(failed.error) from failed.error
        except psycopg.Error as exc:
            await self._after_failed_prepare()
            if isinstance(exc, pg_errors.DuplicateObject):  # 42710: gid already in use
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is already prepared in PostgreSQL {self.name!r}; "
                    "use a new gtrid, or run 'twopc recover' if it was left by a crash"
                ) from exc
            raise PrepareFailed(
                f"PREPARE TRANSACTION failed: {exc}", participant=self.name, gtrid=gtrid
            ) from exc
        wrong = self._wrong_prepare_answer(tag)
        if wrong is not None:  # nothing is prepared under the branch's gid
            self._maybe_prepared = False
            self.failure = wrong
            await self.rollback()
            raise wrong
        self._prepared = True
        return Vote.YES

    async def _after_failed_prepare(self) -> None:
        """PREPARE raised. On a live session the server has rolled the transaction back;
        on a lost one it may have prepared it first, and rollback() resolves it by xid."""
        if self.conn.closed or self.conn.broken:
            await self.rollback()
            return
        self._maybe_prepared = False
        self._finished = True

    async def commit_one_phase(self) -> None:
        if self._prepared:  # prepared early (prepare_now): the only writer commits it
            await self.commit_prepared()
            return
        self._begun_on_conn()
        if self._deferred == [BEGIN]:  # nothing was sent: nothing to commit
            self._deferred.clear()
            self._finished = True
            return
        before = self.conn.pgconn.transaction_status
        if self._deferred[:1] == [BEGIN]:
            before = pq.TransactionStatus.INTRANS  # BEGIN goes with the COMMIT
        try:
            # Outside a transaction PostgreSQL answers COMMIT with a WARNING: not sent.
            ended = before == pq.TransactionStatus.IDLE
            tag = "" if ended else await self._run(b"COMMIT")
        except _WorkFailed as failed:  # COMMIT was skipped: the transaction is aborted
            await self.rollback()
            raise CommitRefused(
                f"one-phase COMMIT refused: the branch's work failed: {failed.error}",
                participant=self.name,
                gtrid=self._xid.gtrid,
            ) from failed.error
        except psycopg.Error as exc:
            if not (self.conn.closed or self.conn.broken):  # the server answered: rolled back
                self._finished = True
                await self.conn.close()  # psycopg may still believe it is in a tpc transaction
                raise CommitRefused(
                    f"one-phase COMMIT refused: {exc}", participant=self.name, gtrid=self._xid.gtrid
                ) from exc
            raise ParticipantError(
                f"one-phase COMMIT failed: {exc}", participant=self.name, gtrid=self._xid.gtrid
            ) from exc
        refused = wrong_commit_answer(
            tag,
            before,
            self.conn.pgconn.transaction_status,
            participant=self.name,
            gtrid=self._xid.gtrid,
        )
        if refused is not None:
            await self.rollback()
            raise refused
        self._finished = True

    # -- phase 2 -----------------------------------------------------------------------

    def send_commit_prepared(self) -> None:
        """Send COMMIT PREPARED now; :meth:`commit_prepared` reads the answer."""
        if not (self.conn.closed or self.conn.broken):
            self._send(self._commit_command)

    async def commit_prepared(self) -> None:
        """COMMIT PREPARED, on this connection or, if it broke, on a fresh one."""
        if self.conn.closed or self.conn.broken:
            self._in_flight = self._send_error = None
            if not await self.resource.commit_recovered(self._xid):
                raise ParticipantError(
                    "COMMIT PREPARED found no prepared branch",
                    participant=self.name,
                    gtrid=self._xid.gtrid,
                )
            self._finished = True
            return
        try:
            await self._run(self._commit_command)
        except pg_errors.UndefinedObject as exc:
            raise ParticipantError(
                "COMMIT PREPARED found no prepared branch",
                participant=self.name,
                gtrid=self._xid.gtrid,
            ) from exc
        except psycopg.Error as exc:
            raise ParticipantUnavailable(
                f"COMMIT PREPARED failed: {exc}", participant=self.name, gtrid=self._xid.gtrid
            ) from exc
        self._finished = True

    @property
    def left_prepared(self) -> bool:
        """True when a rollback could not reach a branch that may be prepared."""
        return self._maybe_prepared and not self._finished

    async def _read_in_flight(self) -> None:
        """Read the answer to a command sent and never waited for (an interrupted sequence)."""
        self._deferred.clear()  # never sent: nothing of it ran
        command = self._in_flight
        self._send_error = None
        if command is None and not self._pipelined:
            return
        if self.conn.closed or self.conn.broken:
            self._in_flight, self._pipelined = None, []
            return
        try:
            if self.conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
                tag = answer_of(await self._read_pipeline(), self.conn)
            else:
                tag = await receive_answer(self.conn)
        except psycopg.Error:
            return  # a failed PREPARE rolled the transaction back; a failed COMMIT left it
        finally:
            self._in_flight, self._pipelined = None, []
        if command == self._prepare_command:
            self._prepared = self._wrong_prepare_answer(tag) is None
        elif command == self._commit_command:
            self._finished = True

    async def rollback(self) -> None:
        await self._read_in_flight()
        if self._finished:
            return
        if not (self.conn.closed or self.conn.broken):
            try:
                if self._prepared:
                    await run_command(self.conn, self._rollback_command)
                else:
                    await self.conn.rollback()
            except psycopg.Error as exc:
                if not (self.conn.closed or self.conn.broken):
                    self._warn_rollback(exc)
                    return
            else:
                self._finished = True
                return
        # The session is gone. An active branch died with it; a prepared one lives on
        # in the server and is rolled back by xid on another connection.
        if not self._maybe_prepared:
            self._finished = True
            return
        try:
            await self.resource.rollback_recovered(self._xid)
        except ParticipantError as exc:
            self._warn_rollback(exc)  # left_prepared stays True: the coordinator retries
            return
        self._finished = True

    def _warn_rollback(self, exc: Exception) -> None:
        _log().warning(
            ev.PG_ROLLBACK_FAILED,
            participant=self.name,
            gtrid=self._xid.gtrid,
            error=str(exc),
            prepared=self._maybe_prepared,
        )

    async def cancel(self) -> None:
        """Cancel the statement running now (the timeout watchdog; from another thread in a
        thread coordinator)."""
        with contextlib.suppress(psycopg.Error):
            await self.conn.cancel_safe(timeout=2.0)

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            if not self._finished and not self._prepared:
                await self.rollback()
            if self._prepared and not self._finished:
                # Phase 2 was deferred to recovery: the prepared transaction lives on
                # in the server without this session, which is simply closed.
                await self.conn.close()
                await self.resource._release(self.conn)  # a pool's slot is given back
            else:
                await self.resource._release(self.conn)


# unasync: asyncio only
class _LoopRecovery:
    """An AsyncPostgresResource over a pool or a factory, seen by recovery and the backlog
    (a sync XAResource). Called in a worker thread while the event loop runs: each call
    runs the resource's own on the loop, on a connection from the pool or factory."""

    def __init__(self, resource: AsyncPostgresResource, loop: asyncio.AbstractEventLoop) -> None:
        self._resource = resource
        self._loop = loop

    @property
    def name(self) -> str:
        return self._resource.name

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:  # waiting here would stop the loop that must run it
            coro.close()
            raise InvalidTransition(
                f"recovery's view of PostgreSQL {self.name!r} is called from a worker "
                "thread; on the event loop, await the AsyncPostgresResource itself"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def begin(self, xid: Xid) -> Any:
        raise InvalidTransition(
            f"cannot begin {xid.gtrid} on recovery's view of PostgreSQL {self.name!r}: "
            "branches begin on the AsyncPostgresResource"
        )

    def recover(self, format_id: int, gtrid_prefix: str) -> dict[Xid, datetime | None]:
        return self._on_loop(self._resource.recover(format_id, gtrid_prefix))

    def prepared_capacity(self) -> PreparedCapacity:
        return self._on_loop(self._resource.prepared_capacity())

    def commit_recovered(self, xid: Xid) -> bool:
        return self._on_loop(self._resource.commit_recovered(xid))

    def rollback_recovered(self, xid: Xid) -> bool:
        return self._on_loop(self._resource.rollback_recovered(xid))

    def close(self) -> None:
        """Nothing of its own to close: the AsyncPostgresResource closes its connections."""


# unasync: end
