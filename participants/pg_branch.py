# Generated from participants/aio/pg_branch.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""A PostgreSQL branch: one connection inside a transaction prepared under the branch's Xid.

Work given to a branch's ``defer`` is not sent at once: it goes out in libpq's
pipeline mode with the branch's next command (its PREPARE TRANSACTION, or its
one-phase COMMIT) or at ``flush``, in one round trip, and its answers are read
before the vote (docs/design.md §2, "Pipelined work"). It is bound by the
server, and a statement deferred often is prepared there
(:mod:`participants.pg_statements`; ``prepare_threshold``). The answers to the
branch's commands are checked by :mod:`participants.pg_vote`.

A branch takes its connection from the resource it was begun on (seen here as
:class:`BranchHome`: what the branch needs of it) and gives it back there
when it is released.

Written once, for asyncio: ``participants/aio/pg_branch.py`` is the source and
``scripts/unasync.py`` generates ``participants/pg_branch.py`` from it.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, LiteralString, Protocol

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq

from coordinator.errors import (
    CommitRefused,
    DuplicateGtrid,
    InvalidTransition,
    ParticipantError,
    ParticipantUnavailable,
    PrepareFailed,
    WrongRowCount,
)
from coordinator.states import Vote
from coordinator.xid import Xid
from participants import events as ev
from participants.pg_commands import (
    answer_of,
    describe_dsn,
    gid_of,
    log,
    raise_failed,
    receive_answer,
    result_tags,
    run_command,
    send_command,
    succeeded,
)
from participants.pg_session import ServerSession
from participants.pg_statements import (
    Deferred,
    Key,
    Prepared,
    convert,
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


class BranchHome(Protocol):
    """What a branch needs of the resource it was begun on (PostgresResource)."""

    dsn: str

    @property
    def name(self) -> str: ...

    def prepared_statements(self, conn: psycopg.Connection[Any]) -> Prepared | None: ...

    def commit_recovered(self, xid: Xid) -> bool: ...

    def rollback_recovered(self, xid: Xid) -> bool: ...

    def end_lost_session(self, session: ServerSession, xid: Xid) -> None: ...

    def _release(self, conn: psycopg.Connection[Any]) -> None: ...


class _WorkFailed(Exception):
    """The deferred work sent with a command failed. An error of its SQL skipped the
    command; a wrong row count (``defer(..., rows=)``) did not, and ``ran`` is then the
    command's answer."""

    def __init__(
        self, error: psycopg.Error | WrongRowCount, ran: list[pq.abc.PGresult] | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.ran = ran


class PostgresBranch:
    """One branch: a pooled connection inside a transaction that will be prepared as ``xid``.

    ``send_prepare`` and ``send_commit_prepared`` only send the command; the
    next ``prepare`` / ``commit_prepared`` waits for its answer. The driver sends
    to every branch first and then waits, so that all of them prepare (and
    commit) at once, on one thread (or task).
    """

    def __init__(self, resource: BranchHome, conn: psycopg.Connection[Any], xid: Xid) -> None:
        self.resource = resource
        self.conn = conn
        self._xid = xid
        pgconn = conn.pgconn  # the server's side, ended if the session is lost: as reported
        self._server_side = (pgconn.backend_pid, pgconn.parameter_status(b"application_name"))
        # The session, lost with a PREPARE maybe still to run there, until its end is
        # seen: the backlog ends it before it retries the rollback.
        self.lost_session: ServerSession | None = None
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
        # Of those answers, the ones whose row count is checked: (index, rows, statement).
        self._counted: list[tuple[int, int, bytes]] = []
        self._counts_deferred = False  # a deferred statement not sent yet has rows=
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

    def execute(self, query: LiteralString | Any, params: Any = None) -> psycopg.Cursor[Any]:
        """Run one statement in the branch; a failure makes the branch vote NO.

        Work that ended the branch's transaction (COMMIT, ROLLBACK, PREPARE
        TRANSACTION) raises :func:`~participants.pg_vote.branch_ended`'s error, and
        so does every later call: nothing runs outside the branch.
        """
        self._check_takes_work()
        return self._execute(query, params)

    def carry_decision(self, query: LiteralString | Any, params: Any = None) -> psycopg.Cursor[Any]:
        """Run the coordinator's decision row in the branch (docs/design.md §3), as
        :meth:`execute` runs a statement, also once the caller ended the branch's work
        (:meth:`end_work` without prepare): the caller's work is over, the coordinator's
        is not. Refused (InvalidTransition) once the branch is prepared or may be: a
        prepared branch takes no row."""
        if self._ended is not None:
            raise self._ended
        if self._maybe_prepared or self._prepared:
            raise InvalidTransition(
                f"PostgreSQL {self.name!r}, transaction {self._xid.gtrid}: the branch is "
                "prepared and cannot take the coordinator's decision row"
            )
        return self._execute(query, params)

    def _execute(self, query: LiteralString | Any, params: Any = None) -> psycopg.Cursor[Any]:
        if self._deferred:
            self._flush()  # in order: the deferred statements ran before this one
        try:
            cursor = self.conn.execute(query, params)
        except psycopg.Error as exc:
            self.failure = exc
            self._raise_if_lost(exc)
            raise  # the caller's SQL failed: theirs to handle; the branch will vote NO
        tag = cursor.statusmessage or ""
        status = self.conn.pgconn.transaction_status
        if not in_progress(tag, status):
            tags = result_tags(cursor)
            kind = ended_by(tags, status, statement_text(query, self.conn))
            if kind is not None:
                raise self._end(kind, query)
        if not self._wrote and tag.startswith(_WRITE_TAGS):
            self._wrote = True
        return cursor

    # -- work sent without waiting for each answer (docs/design.md §2) ---------------

    def defer(
        self, query: LiteralString | Any, params: Any = None, *, rows: int | None = None
    ) -> None:
        """Queue one statement whose result the caller does not need: it is sent, in
        libpq's pipeline mode, with the branch's next command (its PREPARE TRANSACTION
        or one-phase COMMIT), with the next :meth:`execute`, or at :meth:`flush`, and
        nothing waits for its answer until then.

        ``rows``: the number of rows the statement must touch (its answer's row count,
        as ``Cursor.rowcount``), e.g. 1 for an UPDATE of one account that must exist.
        Another count is the statement's failure, as an error of its SQL is:
        :class:`~coordinator.errors.WrongRowCount` (naming the participant, the gtrid
        and the statement) raised at :meth:`flush`, or the branch's NO vote at
        prepare. Unlike an SQL error it does not stop what was sent after it: a
        PREPARE TRANSACTION that went with it is rolled back (ROLLBACK PREPARED), and
        a one-phase COMMIT waits for the counts to be read (docs/design.md §2, "Row
        counts of deferred work").

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
        statement = convert(self.conn, query, params, rows)
        if _TRANSACTION_CONTROL.match(statement.query):
            word = statement.query.split(None, 1)[0].decode(errors="replace").upper()
            raise InvalidTransition(
                f"PostgreSQL {self.name!r}, transaction {self._xid.gtrid}: defer() takes the "
                f"branch's work, not transaction control ({word}); run it with execute()"
            )
        if rows is not None:
            self._counts_deferred = True
        self._deferred.append(statement)

    def flush(self) -> None:
        """Send the deferred statements now (one round trip) and wait for their answers;
        raise the first one's error (the branch then votes NO).

        A caller working on several branches flushes one before the next branch's
        work, so that each branch's locks are taken in the order of the branches
        (docs/design.md §2: work on two databases at once can deadlock).
        """
        self._check_takes_work()
        self._flush()

    def _flush(self) -> None:
        self._begun_on_conn()
        if not self._deferred:
            return
        try:
            self._send_pipeline(None)
            _, miscount = self._read_pipeline()
        except psycopg.Error as exc:
            self.failure = self.failure or exc
            self._raise_if_lost(exc)
            raise  # the caller's SQL failed: theirs to handle; the branch will vote NO
        if miscount is not None:
            raise miscount  # as an SQL error: the caller's to handle; the branch votes NO

    def prepare_now(self) -> None:
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
            self.prepare()
        except BaseException as exc:
            self.failure = self.failure or exc
            raise
        finally:
            self._work_done = True  # a NO vote too: the branch is rolled back

    def end_work(self, *, prepare: bool) -> None:
        """End the branch's work: with ``prepare``, :meth:`prepare_now`; without, the
        deferred statements go now (:meth:`flush`) and the PREPARE waits for phase 1,
        where it runs beside the other branches'. Either way the branch takes no more
        work, and a failure of its work raises :class:`~coordinator.errors.PrepareFailed`
        naming the participant and the gtrid, the server's error as its cause (the
        branch votes NO). :meth:`coordinator.aio.transaction.Transaction.end_work`
        chooses ``prepare`` (docs/design.md §2, "Ending the work: now or at phase 1").
        Work that failed before (an ``execute`` whose error the caller caught) raises
        here too, as :meth:`prepare` would.
        """
        if prepare:
            self.prepare_now()
            return
        try:
            self.flush()
        except (psycopg.Error, WrongRowCount) as exc:
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
        self._counts_deferred = False
        pgconn = self.conn.pgconn
        pgconn.enter_pipeline_mode()
        sent: list[Key | None] = []
        counted: list[tuple[int, int, bytes]] = []
        try:
            for statement in statements:
                if isinstance(statement, bytes):
                    pgconn.send_query_params(statement, None)
                else:
                    self._send_deferred(statement, sent)
                    if statement.rows is not None:
                        counted.append((len(sent), statement.rows, statement.query))
                sent.append(None)
            if command is not None:
                pgconn.send_query_params(command, None)
            pgconn.pipeline_sync()
        except BaseException:
            if self._statements is not None:
                self._statements.forget()  # a Parse recorded may not have gone out
            raise
        self._pipelined = sent
        self._counted = counted

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

    def _read_pipeline(self) -> tuple[list[pq.abc.PGresult], WrongRowCount | None]:
        """Read the answers to the pipeline sent last: the work's, then the command's
        results, if a command went with it, then the Sync's; return the command's results
        and the first wrong row count (``defer(..., rows=)``), or None.

        The work's first SQL error is kept as the branch's failure and raised: the server
        skipped what followed it, the command too. A wrong row count is kept as the
        branch's failure and returned, not raised: what followed it ran."""
        sent, self._pipelined = self._pipelined, []
        counted, self._counted = self._counted, []
        command = self._in_flight is not None
        pgconn = self.conn.pgconn
        try:
            if pgconn.flush():  # the Sync flushed all unless the socket was full
                self.conn.wait(generators.send(pgconn))
            work = [self.conn.wait(generators.fetch_many(pgconn)) for _ in sent]
            answer = self.conn.wait(generators.fetch_many(pgconn)) if command else []
            self.conn.wait(generators.fetch_many(pgconn))  # the Sync's
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
        return answer, self._miscount(counted, work)

    def _miscount(
        self, counted: list[tuple[int, int, bytes]], work: list[list[pq.abc.PGresult]]
    ) -> WrongRowCount | None:
        """The first statement in ``counted`` whose answer in ``work`` gives another row
        count than its ``rows`` (kept as the branch's failure), or None."""
        for index, rows, query in counted:
            results = work[index]
            touched = results[-1].command_tuples if results else None
            if touched != rows:
                self.failure = WrongRowCount(
                    query.decode(errors="replace"),
                    required=rows,
                    touched=touched,
                    participant=self.name,
                    gtrid=self._xid.gtrid,
                )
                return self.failure
        return None

    def _end(self, kind: str, query: Any) -> ParticipantError:
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
                    run_command(self.conn, b"ROLLBACK PREPARED " + quote_gid(gid))
                except psycopg.Error as exc:
                    error = str(exc).strip()
            foreign = foreign_outcome(gid, error, describe_dsn(self.resource.dsn))
        self._ended = branch_ended(
            kind, participant=self.name, gtrid=self._xid.gtrid, foreign=foreign
        )
        self.failure = self._ended
        log().warning(
            ev.PG_BRANCH_ENDED,
            participant=self.name,
            gtrid=self._xid.gtrid,
            statement=kind,
            error=self._ended.detail,
        )
        return self._ended

    def read_only(self) -> bool:
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
        cursor = self.conn.execute("SELECT pg_current_xact_id_if_assigned() IS NULL")
        row = cursor.fetchone()
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

    def _run(self, command: bytes) -> str:
        """Wait for ``command`` if it was sent already, else send it and wait: its tag.

        Deferred work sent with it is read first: its failure raises
        :class:`_WorkFailed`, and the command was not run."""
        if self._in_flight is None and self._send_error is None:
            self._send(command)
        if self._send_error is not None:
            error, self._send_error = self._send_error, None
            raise error
        if self._in_flight != command:
            return run_command(self.conn, command)
        if self.conn.pgconn.pipeline_status == pq.PipelineStatus.OFF:
            self._in_flight = None
            return receive_answer(self.conn)
        try:
            answer, miscount = self._read_pipeline()
        except psycopg.Error as exc:
            self._in_flight = None
            if self.conn.closed or self.conn.broken:
                raise
            raise _WorkFailed(exc) from exc
        self._in_flight = None
        if miscount is not None:
            raise _WorkFailed(miscount, ran=answer) from miscount
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

    def prepare(self) -> Vote:
        if self._prepared:
            return Vote.YES  # prepared early (prepare_now): its vote was read then
        gtrid = self._xid.gtrid
        if self.failure is not None or self._in_error():
            self.rollback()
            raise self._no_vote(self.failure) from self.failure
        self._maybe_prepared = True
        try:
            tag = self._run(self._prepare_command)
        except _WorkFailed as failed:
            # An SQL error skipped the PREPARE: the transaction is aborted. A wrong row
            # count did not: the PREPARE's answer says whether the branch is prepared,
            # and rollback() then rolls it back by its gid.
            self._prepared = failed.ran is not None and self._prepared_by(failed.ran)
            self._maybe_prepared = self._prepared
            self.rollback()
            raise self._no_vote(failed.error) from failed.error
        except psycopg.Error as exc:
            self._after_failed_prepare()
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
            self.rollback()
            raise wrong
        self._prepared = True
        return Vote.YES

    def _prepared_by(self, answer: list[pq.abc.PGresult]) -> bool:
        """Whether ``answer``, the server's to the branch's PREPARE TRANSACTION, says
        the branch is prepared."""
        try:
            tag = answer_of(answer, self.conn)
        except psycopg.Error:
            return False  # PREPARE failed: the server rolled the transaction back
        return self._wrong_prepare_answer(tag) is None

    def _after_failed_prepare(self) -> None:
        """PREPARE raised. On a live session the server has rolled the transaction back;
        on a lost one it may have prepared it first, and rollback() resolves it by xid."""
        if self.conn.closed or self.conn.broken:
            self.rollback()
            return
        self._maybe_prepared = False
        self._finished = True

    def commit_one_phase(self) -> None:
        if self._prepared:  # prepared early (prepare_now): the only writer commits it
            self.commit_prepared()
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
            if self._counts_deferred:
                self._flush_counted()  # a COMMIT sent with them would not wait
            # Outside a transaction PostgreSQL answers COMMIT with a WARNING: not sent.
            ended = before == pq.TransactionStatus.IDLE
            tag = "" if ended else self._run(b"COMMIT")
        except _WorkFailed as failed:  # COMMIT was skipped: the transaction is aborted
            self.rollback()
            raise CommitRefused(
                f"one-phase COMMIT refused: the branch's work failed: {failed.error}",
                participant=self.name,
                gtrid=self._xid.gtrid,
            ) from failed.error
        except psycopg.Error as exc:
            if not (self.conn.closed or self.conn.broken):  # the server answered: rolled back
                self._finished = True
                self.conn.close()  # psycopg may still believe it is in a tpc transaction
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
            self.rollback()
            raise refused
        self._finished = True

    def _flush_counted(self) -> None:
        """Send the deferred work and read its answers, as :meth:`flush` does, before a
        one-phase COMMIT: a wrong row count must stop that COMMIT, which an SQL error in
        the same pipeline would skip but a count read after it would not. Its failure
        raises :class:`_WorkFailed`."""
        try:
            self._flush()
        except (psycopg.Error, WrongRowCount) as exc:
            if self.conn.closed or self.conn.broken:
                raise
            raise _WorkFailed(exc) from exc

    # -- phase 2 -----------------------------------------------------------------------

    def send_commit_prepared(self) -> None:
        """Send COMMIT PREPARED now; :meth:`commit_prepared` reads the answer."""
        if not (self.conn.closed or self.conn.broken):
            self._send(self._commit_command)

    def commit_prepared(self) -> None:
        """COMMIT PREPARED, on this connection or, if it broke, on a fresh one."""
        if self.conn.closed or self.conn.broken:
            self._in_flight = self._send_error = None
            if not self.resource.commit_recovered(self._xid):
                raise ParticipantError(
                    "COMMIT PREPARED found no prepared branch",
                    participant=self.name,
                    gtrid=self._xid.gtrid,
                )
            self._finished = True
            return
        try:
            self._run(self._commit_command)
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

    def _read_in_flight(self) -> None:
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
                answer, _ = self._read_pipeline()  # a wrong count is the failure
                tag = answer_of(answer, self.conn)
            else:
                tag = receive_answer(self.conn)
        except psycopg.Error:
            return  # a failed PREPARE rolled the transaction back; a failed COMMIT left it
        finally:
            self._in_flight, self._pipelined = None, []
        if command == self._prepare_command:
            self._prepared = self._wrong_prepare_answer(tag) is None
        elif command == self._commit_command:
            self._finished = True

    def rollback(self) -> None:
        self._read_in_flight()
        if self._finished:
            return
        if not (self.conn.closed or self.conn.broken):
            try:
                if self._prepared:
                    run_command(self.conn, self._rollback_command)
                else:
                    self.conn.rollback()
            except psycopg.Error as exc:
                if not (self.conn.closed or self.conn.broken):
                    self._warn_rollback(exc)
                    return
            else:
                self._finished = True
                return
        # The session is gone. An active branch died with it; a prepared one lives on
        # in the server and is rolled back by xid on another connection. The server's
        # side of the session is ended first: a PREPARE sent behind work that waits for
        # a lock would run once it is freed, after the rollback found nothing
        # (docs/design.md §2, "A PREPARE behind work that waits").
        if not self._maybe_prepared:
            self._finished = True
            return
        self.lost_session = ServerSession.reported(*self._server_side)
        try:
            self.resource.end_lost_session(self.lost_session, self._xid)
            self.lost_session = None
            self.resource.rollback_recovered(self._xid)
        except ParticipantError as exc:
            self._warn_rollback(exc)  # left_prepared stays True: the coordinator retries
            return
        self._finished = True

    def _warn_rollback(self, exc: Exception) -> None:
        log().warning(
            ev.PG_ROLLBACK_FAILED,
            participant=self.name,
            gtrid=self._xid.gtrid,
            error=str(exc),
            prepared=self._maybe_prepared,
        )

    def cancel(self) -> None:
        """Cancel the statement running now (the timeout watchdog; from another thread in a
        thread coordinator)."""
        with contextlib.suppress(psycopg.Error):
            self.conn.cancel_safe(timeout=2.0)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            if not self._finished and not self._prepared:
                self.rollback()
            if self._prepared and not self._finished:
                # Phase 2 was deferred to recovery: the prepared transaction lives on
                # in the server without this session, which is simply closed.
                self.conn.close()
                self.resource._release(self.conn)  # a pool's slot is given back
            else:
                self.resource._release(self.conn)
