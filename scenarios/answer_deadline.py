"""A bound on how long a query on an open PostgreSQL connection waits for its answer.

libpq bounds the connection attempt (``connect_timeout``) but not a query on a
connection already open: a server that stops answering (a network partition, a
host that froze) leaves ``execute`` waiting for ever. A loop that polls a
database (the convergence wait of ``twopc transfer --no-pipeline``) would then
hang the command instead of saying which database stopped answering.

:func:`answered_within` gives the statements run inside it ``seconds`` to come
back. When they do not, it shuts the connection's socket down; libpq then sees
the connection closed and the statement raises, and :func:`answered_within`
raises :class:`QueryTimeout` (a :class:`psycopg.errors.ConnectionTimeout`) in
its place (the CLI names the database that does not answer, its setting and
``twopc lab up``). The connection is broken afterwards: the caller closes it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import errors as pg_errors

#: How the error's message starts.
QUERY_TIMEOUT = "query timeout"

#: Seconds a poll's query waits for its answer: far above a healthy query's milliseconds.
ANSWER_TIMEOUT = 10.0


class QueryTimeout(pg_errors.ConnectionTimeout):
    """A query on an open connection got no answer in time (not a connect_timeout)."""


@contextlib.contextmanager
def answered_within(conn: psycopg.Connection[Any], seconds: float) -> Iterator[None]:
    """Run the block's statements on ``conn`` with ``seconds`` to get their answers."""
    lock = threading.Lock()
    state = {"running": True, "expired": False}

    def expire() -> None:
        with lock:
            if not state["running"]:  # the block ended as the timer fired: leave conn alone
                return
            state["expired"] = True
            # shutdown, not close: the waiting thread keeps a valid descriptor and wakes
            # on it (end of file), libpq reports the connection closed; one closed
            # already (OSError, psycopg.Error) makes the block raise anyway
            with (
                contextlib.suppress(OSError, psycopg.Error),
                socket.socket(fileno=os.dup(conn.fileno())) as same,
            ):
                same.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.OperationalError as exc:
        with lock:
            expired = state["expired"]
        if expired:
            raise QueryTimeout(
                f"{QUERY_TIMEOUT}: no answer within {seconds:g} s on a connection that was open"
            ) from exc
        raise
    finally:
        with lock:
            state["running"] = False
        timer.cancel()
