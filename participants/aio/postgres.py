"""PostgreSQL as an asyncio XA participant: PREPARE TRANSACTION over a small AsyncConnection pool.

The asyncio counterpart of :mod:`participants.postgres`, with the same call
order, commands (BEGIN, PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED sent to
libpq directly), checks of their answers (:mod:`participants.pg_vote`), votes and
errors. Recovery and the background retries use the sync
:class:`~participants.postgres.PostgresResource` on the same database
(:meth:`AsyncPostgresResource.recovery_resource`), in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, LiteralString

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq

from coordinator.errors import (
    CommitRefused,
    DuplicateGtrid,
    ParticipantError,
    ParticipantUnavailable,
    PrepareFailed,
)
from coordinator.protocol import XAResource
from coordinator.states import Vote
from coordinator.xid import Xid
from participants import events as ev
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
from participants.postgres import (
    _WRITE_TAGS,
    PostgresResource,
    _log,
    answer_of,
    describe_dsn,
    gid_of,
)


async def run_command(conn: psycopg.AsyncConnection[Any], command: bytes) -> str:
    """Send ``command`` to libpq directly and wait for its answer: its command tag, or
    the server's error (the asyncio twin of :func:`participants.postgres.run_command`)."""
    conn.pgconn.send_query(command)
    return answer_of(await conn.wait(generators.execute(conn.pgconn)), conn.info.encoding)


async def result_tags(cursor: psycopg.AsyncCursor[Any]) -> list[str]:
    """The command tag of every result of the cursor's last execute, leaving the cursor on
    its first result (the asyncio twin of :func:`participants.postgres.result_tags`)."""
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


class AsyncPostgresResource:
    """One PostgreSQL database taking part in global transactions (an AsyncXAResource)."""

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        setting: str | None = None,
        pool_size: int = 40,
        connect_timeout: float = 5.0,
    ) -> None:
        self._name = name
        self.dsn = dsn
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        # The sync resource on the same database: recovery's connection, and the one
        # place that words connection failures and checks max_prepared_transactions.
        self._sync = PostgresResource(
            name, dsn, setting=setting, pool_size=0, connect_timeout=connect_timeout
        )
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._checked = False
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"AsyncPostgresResource({self._name!r}, {describe_dsn(self.dsn)})"

    def recovery_resource(self) -> XAResource:
        return self._sync

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if not self._checked:
            # The first connection checks that the server can prepare, as the sync one does.
            await asyncio.to_thread(lambda: self._sync.connect().close())
            self._checked = True
        try:
            return await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=int(self.connect_timeout)
            )
        except psycopg.OperationalError as exc:
            raise ParticipantUnavailable(
                f"cannot reach PostgreSQL at {describe_dsn(self.dsn)}: {exc}. "
                f"Start the lab with 'twopc lab up' or check {self._sync.setting}",
                participant=self._name,
            ) from exc

    async def _acquire(self) -> tuple[psycopg.AsyncConnection[Any], bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE:
                return conn, True
            await conn.close()
        return await self._connect(), False

    async def _release(self, conn: psycopg.AsyncConnection[Any]) -> None:
        healthy = not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE
        if healthy and not self._closed and len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            await conn.close()

    async def begin(self, xid: Xid) -> AsyncPostgresBranch:
        while True:
            conn, kept = await self._acquire()
            try:
                await run_command(conn, b"BEGIN")
            except psycopg.Error as exc:
                lost = conn.broken
                await conn.close()
                if kept and lost:
                    _log().info(ev.PG_POOLED_LOST, participant=self._name, gtrid=xid.gtrid)
                    continue
                raise ParticipantUnavailable(
                    f"cannot begin the branch: {exc}", participant=self._name, gtrid=xid.gtrid
                ) from exc
            return AsyncPostgresBranch(self, conn, xid)

    async def commit_recovered(self, xid: Xid) -> bool:
        """COMMIT PREPARED by xid on recovery's connection (in a worker thread)."""
        return await asyncio.to_thread(self._sync.commit_recovered, xid)

    async def rollback_recovered(self, xid: Xid) -> bool:
        """ROLLBACK PREPARED by xid on recovery's connection (in a worker thread)."""
        return await asyncio.to_thread(self._sync.rollback_recovered, xid)

    async def close(self) -> None:
        """Close the idle connections; those in use are closed when released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()
        await asyncio.to_thread(self._sync.close)


class AsyncPostgresBranch:
    """One branch: a pooled AsyncConnection inside a transaction that will be prepared as
    ``xid``."""

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
        self._wrote = False
        self._prepared = False
        self._maybe_prepared = False  # PREPARE was sent: the server may hold the branch
        self._finished = False
        self.failure: BaseException | None = None
        self._ended: ParticipantError | None = None  # the work ended the transaction

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def xid(self) -> Xid:
        return self._xid

    def _lost(self) -> bool:
        return self.conn.closed or self.conn.broken

    async def execute(
        self, query: LiteralString | Any, params: Any = None
    ) -> psycopg.AsyncCursor[Any]:
        """Run one statement in the branch; a failure makes the branch vote NO.

        Work that ended the branch's transaction breaks it, as in the sync branch.
        """
        if self._ended is not None:
            raise self._ended
        try:
            cursor = await self.conn.execute(query, params)
        except psycopg.Error as exc:
            self.failure = exc
            if self._lost():
                raise ParticipantUnavailable(
                    f"the session was lost during the work: {exc}",
                    participant=self.name,
                    gtrid=self._xid.gtrid,
                ) from exc
            raise
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

    async def _end(self, kind: str, query: Any) -> ParticipantError:
        """The work ended the branch's transaction with ``kind``: the branch is broken (a
        PREPARE TRANSACTION of the work's own is rolled back by its gid)."""
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
        if self._wrote or self.failure is not None:
            return False
        if self.conn.pgconn.transaction_status != pq.TransactionStatus.INTRANS:
            return False  # ended outside execute: prepare reads what the server says
        cursor = await self.conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL")
        row = await cursor.fetchone()
        return bool(row and row[0])

    def send_prepare(self) -> None:
        """Nothing to send ahead: the driver awaits every branch's prepare at once."""

    def send_commit_prepared(self) -> None:
        """Nothing to send ahead: the driver awaits every branch's commit at once."""

    async def prepare(self) -> Vote:
        gtrid = self._xid.gtrid
        in_error = self.conn.info.transaction_status == pq.TransactionStatus.INERROR
        if self.failure is not None or in_error:
            reason = self.failure or "the transaction is in an aborted state"
            await self.rollback()
            raise PrepareFailed(
                f"voted NO: the branch's work failed: {reason}", participant=self.name, gtrid=gtrid
            )
        self._maybe_prepared = True
        try:
            tag = await run_command(self.conn, self._prepare_command)
        except psycopg.Error as exc:
            if self._lost():
                await self.rollback()
            else:  # the server answered: it rolled the transaction back
                self._maybe_prepared = False
                self._finished = True
            if isinstance(exc, pg_errors.DuplicateObject):
                raise DuplicateGtrid(
                    f"gtrid {gtrid} is already prepared in PostgreSQL {self.name!r}; "
                    "use a new gtrid, or run 'twopc recover' if it was left by a crash"
                ) from exc
            raise PrepareFailed(
                f"PREPARE TRANSACTION failed: {exc}", participant=self.name, gtrid=gtrid
            ) from exc
        wrong = wrong_prepare_answer(
            tag, self.conn.pgconn.transaction_status, participant=self.name, gtrid=gtrid
        )
        if wrong is not None:  # nothing is prepared under the branch's gid
            self._maybe_prepared = False
            self.failure = wrong
            await self.rollback()
            raise wrong
        self._prepared = True
        return Vote.YES

    async def commit_one_phase(self) -> None:
        before = self.conn.pgconn.transaction_status
        try:
            # Outside a transaction PostgreSQL answers COMMIT with a WARNING: not sent.
            ended = before == pq.TransactionStatus.IDLE
            tag = "" if ended else await run_command(self.conn, b"COMMIT")
        except psycopg.Error as exc:
            if not self._lost():  # the server answered: rolled back
                self._finished = True
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

    async def commit_prepared(self) -> None:
        """COMMIT PREPARED, on this connection or, if it broke, by xid on another."""
        if self._lost():
            if not await self.resource.commit_recovered(self._xid):
                raise ParticipantError(
                    "COMMIT PREPARED found no prepared branch",
                    participant=self.name,
                    gtrid=self._xid.gtrid,
                )
            self._finished = True
            return
        try:
            await run_command(self.conn, self._commit_command)
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
        return self._maybe_prepared and not self._finished

    async def rollback(self) -> None:
        if self._finished:
            return
        if not self._lost():
            try:
                if self._prepared:
                    await run_command(self.conn, self._rollback_command)
                else:
                    await self.conn.rollback()
            except psycopg.Error as exc:
                if not self._lost():
                    self._warn_rollback(exc)
                    return
            else:
                self._finished = True
                return
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
        """Cancel the statement running now (the timeout watchdog)."""
        with contextlib.suppress(psycopg.Error):
            await self.conn.cancel_safe(timeout=2.0)

    async def release(self) -> None:
        with contextlib.suppress(Exception):
            if not self._finished and not self._prepared:
                await self.rollback()
            if self._prepared and not self._finished:
                await self.conn.close()  # phase 2 deferred: the prepared branch lives on
            else:
                await self.resource._release(self.conn)
