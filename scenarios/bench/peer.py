"""The peer: the two-database part of the transfer through SQLAlchemy's two-phase Session.

``Session(twophase=True)`` prepares every engine's transaction and then
commits them all (one after the other), with no decision log and no broker
branch: a crash between the prepares and the commits leaves the branches
prepared for someone else to resolve by hand. It is the library a Python team
would reach for instead of twopc, so twopc with its durable log should be no
slower on the same work (issue 6's target).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy import Engine, create_engine, exc, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from scenarios.config import Settings
from scenarios.transfer.model import CREDIT, DEBIT_TO, Transfer

#: SQLAlchemy's gids ("_sa_" + 32 hex digits, sqlalchemy.engine.default.create_xid).
SQLALCHEMY_GID_PREFIX = "_sa_"


def _named(sql: str) -> Any:
    """The psycopg ``%(name)s`` statement as a SQLAlchemy text() with ``:name``."""
    return text(re.sub(r"%\((\w+)\)s", r":\1", sql))


_DEBIT = _named(DEBIT_TO)
_CREDIT = _named(CREDIT)


class Peer:
    """Transfers (A and B only) as SQLAlchemy two-phase sessions over pooled engines."""

    name = "peer"

    def __init__(self, settings: Settings, *, concurrency: int = 1) -> None:
        self.settings = settings
        self.engine_a = _engine(settings.pg_a, concurrency)
        self.engine_b = _engine(settings.pg_b, concurrency)

    def run_one(self, t: Transfer) -> bool:
        """One transfer; True when committed, False when A's balance refused the debit."""
        params = {"amount": t.amount, "tid": t.transfer_id}
        with Session(twophase=True) as session:
            try:
                session.execute(
                    _DEBIT,
                    {**params, "account": t.source, "counterparty": t.target},
                    bind_arguments={"bind": self.engine_a},
                )
            except exc.IntegrityError:  # the CHECK (balance >= 0): A refuses the debit
                session.rollback()
                return False
            session.execute(
                _CREDIT, {**params, "account": t.target}, bind_arguments={"bind": self.engine_b}
            )
            session.commit()
        return True

    def close(self) -> None:
        """Dispose of both engines' pools; leaves nothing prepared (idempotent)."""
        self.engine_a.dispose()
        self.engine_b.dispose()


def _engine(dsn: str, size: int) -> Engine:
    return create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn),
        poolclass=QueuePool,
        pool_size=size,
        max_overflow=0,
    )


def roll_back_leftovers(settings: Settings) -> int:
    """Roll back prepared transactions SQLAlchemy left in A and B; return how many.

    Only while no peer runs: a running session's prepared branches look the same.
    """
    done = 0
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            gids = [
                row[0]
                for row in conn.execute(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() "
                    "AND starts_with(gid, %s)",
                    (SQLALCHEMY_GID_PREFIX,),
                )
            ]
            for gid in gids:
                with contextlib.suppress(pg_errors.UndefinedObject):  # finished meanwhile
                    conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(gid))
                    done += 1
    return done
