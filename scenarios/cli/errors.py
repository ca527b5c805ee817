"""The one place that turns what a user can cause into one line of ``twopc: error: ...``.

``twopc`` exits 0 when the command did what it was asked, 1 on a runtime
error (a service down, the schema missing, a wrong setting), 2 on a usage
error (click's UsageError and BadParameter: a wrong option or argument), and
``twopc indoubt`` exits 3 when it found something in doubt; a long-running
command stopped by SIGINT or SIGTERM exits 130 or 143 (scenarios.stopping).
Nothing a user can cause prints a traceback; a message names the database
(its setting and host:port/dbname, never the password) and says what to run
next.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import errors as pg_errors

from coordinator.errors import TwoPhaseCommitError
from participants.pg_commands import describe_dsn
from scenarios.answer_deadline import QueryTimeout
from scenarios.config_values import redact as redact
from scenarios.transfer.results import BatchFailed

#: What to run when the scenario's tables are missing or out of date.
RESET_HINT = "run 'twopc transfer --reset' to create the transfer scenario's tables"

#: What to run when a statement timed out waiting for a lock (lock_timeout).
LOCK_HINT = (
    "a lock is held, most likely by a transaction prepared by a run that was killed: "
    "'twopc indoubt' lists this coordinator's, 'twopc recover' resolves them, and "
    "'twopc recover --dead' (TWOPC_DECISIONS=postgres) those of coordinators that are gone"
)

#: Seconds a probe waits for a database to answer (to name the one that did not).
PROBE_TIMEOUT = 3

_SCHEMA_ERRORS = (pg_errors.UndefinedTable, pg_errors.UndefinedColumn)


def explain(exc: BaseException) -> str | None:
    """The one-line message for an error a user can cause, or None for a bug (a traceback)."""
    if isinstance(exc, BatchFailed) and isinstance(exc.__cause__, psycopg.Error):
        # what the transfer met, worded as if the command had met it (e.g. the reset hint)
        return redact(f"transfer {exc.transfer_id}: {_explain_database_error(exc.__cause__)}")
    if isinstance(exc, TwoPhaseCommitError):
        return redact(str(exc))
    if isinstance(exc, psycopg.Error):
        return redact(_explain_database_error(exc))
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return redact(f"{exc.strerror or exc}{where}")
    return None


def _explain_database_error(exc: psycopg.Error) -> str:
    where, setting = _which_database(exc)
    reason = _first_line(exc)
    if isinstance(exc, _SCHEMA_ERRORS):
        if exc.pgconn is None:  # the session is gone: find the database that lacks the table
            where = _database_lacking(exc) or where
        return f"{where}: {reason}: {RESET_HINT}"
    if isinstance(exc, pg_errors.LockNotAvailable):
        return f"{where}: {reason}: {LOCK_HINT}"
    if isinstance(exc, pg_errors.ConnectionTimeout):
        if exc.pgconn is None:  # no session to ask: find the database that does not answer
            where, setting = _database_not_answering() or (where, setting)
        if not isinstance(exc, QueryTimeout):  # else: a query on an open connection
            reason = f"{reason} (no answer within its connect_timeout)"
    if isinstance(exc, pg_errors.ConnectionTimeout) or (
        isinstance(exc, psycopg.OperationalError)
        and reason.startswith(("connection failed", "connection is bad"))
    ):
        return f"cannot connect to {where}: {reason}; run 'twopc lab up' or check {setting}"
    return f"{where}: {type(exc).__name__}: {reason}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _which_database(exc: psycopg.Error) -> tuple[str, str]:
    """Where the error happened ('database a (TWOPC_PG_A, host:port/db)') and its setting."""
    unknown = ("PostgreSQL", "TWOPC_PG_A and TWOPC_PG_B")
    pgconn = exc.pgconn
    if pgconn is None:
        return unknown
    try:
        host = pgconn.host.decode() or "localhost"
        port = pgconn.port.decode() or "5432"
        dbname = pgconn.db.decode()
    except Exception:  # a connection that never got far enough to have these
        return unknown
    found = f"{host}:{port}/{dbname}"
    for name, setting, dsn in _databases():
        if _same_server(dsn, host, port, dbname):
            return f"database {name} ({setting}, {found})", setting
    return f"PostgreSQL at {found}", unknown[1]


def _databases() -> list[tuple[str, str, str]]:
    """(name, setting, connection string) of databases A and B; empty if the settings fail."""
    from scenarios.config import Settings

    try:
        settings = Settings.load()
    except Exception:  # the settings themselves are the problem: name the server only
        return []
    return [("a", "TWOPC_PG_A", settings.pg_a), ("b", "TWOPC_PG_B", settings.pg_b)]


def _database_lacking(exc: psycopg.Error) -> str | None:
    """'database b (TWOPC_PG_B, host:port/db)' for the first database without the relation."""
    found = re.search(r'relation "([^"]+)"', exc.diag.message_primary or "")
    if found is None:
        return None
    for name, setting, dsn in _databases():
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                row = conn.execute("SELECT to_regclass(%s) IS NULL", (found.group(1),)).fetchone()
        except psycopg.Error:
            continue
        if row and row[0]:
            return f"database {name} ({setting}, {describe_dsn(dsn)})"
    return None


def _database_not_answering() -> tuple[str, str] | None:
    """('database b (TWOPC_PG_B, host:port/db)', 'TWOPC_PG_B') for the first that cannot connect."""
    for name, setting, dsn in _databases():
        try:
            with psycopg.connect(dsn, connect_timeout=PROBE_TIMEOUT):
                continue
        except psycopg.Error:
            return f"database {name} ({setting}, {describe_dsn(dsn)})", setting
    return None


def _same_server(dsn: str, host: str, port: str, dbname: str) -> bool:
    described = describe_dsn(dsn)
    d_host, _, rest = described.partition(":")
    d_port, _, d_db = rest.partition("/")
    return (d_host, d_port) == (host, port) and d_db in ("", dbname)
