# Generated from participants/aio/pg_commands.py by scripts/unasync.py: edit that file, then run
# `python scripts/unasync.py` (tests/test_unasync.py checks this file is current).
"""The commands a PostgreSQL branch sends to libpq itself, and how their answers read.

The branch's own commands (BEGIN, PREPARE TRANSACTION, COMMIT/ROLLBACK
PREPARED) are composed once per branch and go to libpq directly, with no SQL
composition on the hot path; the branch's gid is built here (docs/design.md
§1). What an answer *means* for the vote is :mod:`participants.pg_vote`'s. The
resource and the branch share the rest of this module too: the participant's
logger, and how a connection string is named in a message.

Written once, for asyncio: ``participants/aio/pg_commands.py`` is the source and
``scripts/unasync.py`` generates ``participants/pg_commands.py`` from it.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import generators, pq

from coordinator.events import get_logger
from coordinator.xid import Xid


def log() -> Any:
    """The PostgreSQL participant's logger, looked up at each use, so that the
    application's later structlog set-up applies."""
    return get_logger(component="postgres")


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


def send_command(conn: psycopg.Connection[Any], command: bytes) -> None:
    """Send ``command`` without waiting for its answer (:func:`receive_answer` waits).

    The branch's own commands (BEGIN, PREPARE TRANSACTION, COMMIT/ROLLBACK
    PREPARED) go to libpq directly: several connections then work at once from
    one thread (or task), with no SQL composition on the hot path.
    """
    conn.pgconn.send_query(command)


def succeeded(results: list[pq.abc.PGresult]) -> bool:
    """The command succeeded (a Parse, or a statement with no rows)."""
    return bool(results) and results[-1].status == pq.ExecStatus.COMMAND_OK


def raise_failed(results: list[pq.abc.PGresult], conn: psycopg.Connection[Any]) -> None:
    """Raise the first failed result's error as psycopg's (the connection's encoding is
    looked up only then)."""
    for result in results:
        if result.status == pq.ExecStatus.FATAL_ERROR:
            raise pg_errors.error_from_result(result, encoding=conn.info.encoding)


def answer_of(results: list[pq.abc.PGresult], conn: psycopg.Connection[Any]) -> str:
    """The command tag of the last result (what the server did); raise its error as psycopg's."""
    raise_failed(results, conn)
    status = results[-1].command_status if results else None
    return status.decode() if status else ""


def receive_answer(conn: psycopg.Connection[Any]) -> str:
    """Wait for the answer to the command sent last: its command tag, or the server's error."""
    return answer_of(conn.wait(generators.execute(conn.pgconn)), conn)


def run_command(conn: psycopg.Connection[Any], command: bytes) -> str:
    """Send ``command`` and wait for its answer (its command tag)."""
    send_command(conn, command)
    return receive_answer(conn)


def result_tags(cursor: psycopg.Cursor[Any]) -> list[str]:
    """The command tag of every result of the cursor's last execute (a string of several
    statements has one each), leaving the cursor on its first result, as execute did."""
    tags: list[str] = []
    while True:
        try:
            cursor.set_result(len(tags))
        except IndexError:
            break
        tags.append(cursor.statusmessage or "")
    if len(tags) > 1:
        cursor.set_result(0)
    return tags
