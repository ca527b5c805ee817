"""What a PostgreSQL branch's statements and its PREPARE did to its transaction (no I/O).

A branch is one server transaction from BEGIN to PREPARE TRANSACTION. Work that
ends it (COMMIT, ROLLBACK, its own PREPARE TRANSACTION, ``... AND CHAIN``)
leaves the branch with nothing to prepare, and PostgreSQL answers a PREPARE
outside a transaction with a WARNING only, under the command tag ROLLBACK. So
the branches (:mod:`participants.postgres`, :mod:`participants.aio.postgres`)
read, after every statement and after PREPARE, the command tag and the
connection's transaction status that libpq already holds (no round trip) and
ask these functions what they mean. After a statement, :func:`in_progress` is the
hot path; :func:`ended_by` runs only when it says no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psycopg import pq, sql
from psycopg.abc import AdaptContext

from coordinator.errors import CommitRefused, HeuristicMixed, ParticipantError, PrepareFailed

_IN_PROGRESS = pq.TransactionStatus.INTRANS
_ENDING_TAGS = ("COMMIT", "ROLLBACK", "PREPARE TRANSACTION")
# ROLLBACK TO SAVEPOINT answers ROLLBACK too, inside the transaction; only the text
# tells it from ROLLBACK AND CHAIN.
_AND_CHAIN = re.compile(r"\bAND\s+CHAIN\s*;?\s*$", re.IGNORECASE)
# The gid of a PREPARE TRANSACTION that ends the statement: a plain SQL string literal.
_PREPARED_GID = re.compile(r"PREPARE\s+TRANSACTION\s+'((?:[^']|'')*)'\s*;?\s*$", re.IGNORECASE)


def _name(status: int) -> str:
    return pq.TransactionStatus(status).name


def in_progress(tag: str, status: int) -> bool:
    """The hot-path test after each statement: True when it surely left the branch's
    transaction in progress (libpq's status INTRANS, a tag that ends nothing). One
    comparison and one prefix test; otherwise ask :func:`ended_by`."""
    return status == _IN_PROGRESS and not tag.startswith(_ENDING_TAGS)


def ended_by(tags: Sequence[str], status: int, statement: str) -> str | None:
    """The kind of statement that ended the branch's transaction, or None if none did.

    ``tags`` are the command tags of the statement's results (a string of several
    statements has one each), ``status`` the connection's transaction status after
    them (libpq's ``pq.TransactionStatus`` value), ``statement`` their text: only
    the text tells ROLLBACK TO SAVEPOINT (the transaction goes on) from ROLLBACK AND
    CHAIN, which both answer ROLLBACK inside a transaction.
    """
    for tag in tags:
        for kind in _ENDING_TAGS:
            if not tag.startswith(kind):
                continue
            if status != _IN_PROGRESS:
                return kind
            if kind == "ROLLBACK" and not _AND_CHAIN.search(statement):
                return None  # ROLLBACK TO SAVEPOINT
            return f"{kind} AND CHAIN"  # ended, and a new transaction began
    if status == _IN_PROGRESS:
        return None
    return f"a statement that ended the transaction (command tags {', '.join(tags) or 'none'})"


def statement_text(query: object, context: AdaptContext) -> str:
    """The text of a statement as given to ``execute`` (empty if it has none)."""
    if isinstance(query, str):
        return query
    if isinstance(query, bytes):
        return query.decode(errors="replace")
    if isinstance(query, sql.Composable):
        return query.as_string(context)
    return ""


def foreign_gid(statement: str) -> str | None:
    """The gid of the PREPARE TRANSACTION ``statement`` ends with, if it is a plain literal."""
    found = _PREPARED_GID.search(statement)
    return found.group(1).replace("''", "'") if found else None


def quote_gid(gid: str) -> bytes:
    """``gid`` as an SQL string literal (for ROLLBACK PREPARED)."""
    return ("'" + gid.replace("'", "''") + "'").encode()


def foreign_outcome(gid: str | None, error: str | None, where: str) -> str:
    """What became of the transaction the work's own PREPARE TRANSACTION left prepared:
    rolled back by its gid (``error`` None), or what to run to remove it."""
    if gid is None:
        return (
            "it left a prepared transaction whose gid could not be read from the statement: "
            f"find it on {where} with 'SELECT gid, prepared FROM pg_prepared_xacts' and remove "
            "it with ROLLBACK PREPARED '<gid>'"
        )
    literal = quote_gid(gid).decode()
    if error is not None:
        return (
            f"it left the prepared transaction {literal}, which could not be rolled back "
            f"({error}): remove it on {where} with ROLLBACK PREPARED {literal}"
        )
    return f"the prepared transaction {literal} it left was rolled back (ROLLBACK PREPARED)"


def branch_ended(
    kind: str, *, participant: str, gtrid: str, foreign: str | None = None
) -> ParticipantError:
    """The error a branch's ``execute`` raises, and keeps as its failure, when the work
    ended the branch's transaction with a statement of ``kind``.

    A COMMIT made the work durable outside the protocol: HeuristicMixed (the global
    transaction can only roll back, so its outcome is heuristic). Anything else
    voted NO in advance: PrepareFailed. ``foreign`` says what became of the
    transaction a PREPARE TRANSACTION of the work left prepared.
    """
    said = (
        f"the work ran {kind} inside the branch, which ended the branch's transaction; "
        "no later statement runs in it and the global transaction can only roll back"
    )
    if kind.startswith("COMMIT"):
        return HeuristicMixed(
            f"{said}. The work done before the {kind} in this branch IS COMMITTED, outside "
            "the global transaction: undo it by hand if the other participants' work must "
            "not stand alone. Never run COMMIT, ROLLBACK or PREPARE TRANSACTION in a branch",
            participant=participant,
            gtrid=gtrid,
        )
    detail = f"; {foreign}" if foreign else ""
    return PrepareFailed(
        f"{said}{detail}. Never run COMMIT, ROLLBACK or PREPARE TRANSACTION in a branch",
        participant=participant,
        gtrid=gtrid,
    )


def wrong_prepare_answer(
    tag: str, status: int, *, participant: str, gtrid: str
) -> PrepareFailed | None:
    """None when PostgreSQL answered PREPARE as a PREPARE of this branch (command tag
    PREPARE TRANSACTION, the session idle after it); else the NO vote to raise."""
    if tag == "PREPARE TRANSACTION" and status == pq.TransactionStatus.IDLE:
        return None
    return PrepareFailed(
        f"voted NO: PostgreSQL answered the branch's PREPARE TRANSACTION with {tag or 'nothing'} "
        f"(transaction status {_name(status)} after it), not as a prepare of this branch: the "
        "branch's transaction had already ended (a COMMIT or ROLLBACK on the branch's "
        "connection outside execute?), so its work is not prepared and may have been "
        "committed on its own: check this database for the transaction's work",
        participant=participant,
        gtrid=gtrid,
    )


def wrong_commit_answer(
    tag: str,
    before: int,
    after: int,
    *,
    participant: str,
    gtrid: str,
) -> CommitRefused | None:
    """None when a one-phase COMMIT was sent inside the branch's transaction and answered
    as a commit (command tag COMMIT, the session idle after it); else the refusal to raise.

    PostgreSQL answers COMMIT outside a transaction with a WARNING and the tag COMMIT, so
    the status ``before`` it counts too (a branch that is idle is not sent one: ``tag``
    is then empty), and a failed transaction answers ROLLBACK.
    """
    if before == _IN_PROGRESS and tag == "COMMIT" and after == pq.TransactionStatus.IDLE:
        return None
    answer = f"answered {tag}" if tag else "not sent"
    return CommitRefused(
        f"one-phase COMMIT {answer} (transaction status {_name(before)} before, "
        f"{_name(after)} after): the branch's transaction had failed or already ended "
        "(a COMMIT or ROLLBACK on the branch's connection outside execute?), so this COMMIT "
        "committed nothing",
        participant=participant,
        gtrid=gtrid,
    )
