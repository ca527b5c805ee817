"""A branch's deferred statements, converted once, and the ones prepared on the server (no I/O).

A statement given to a branch's ``defer`` is converted as psycopg's
``Cursor.execute`` converts it (:class:`Deferred`): ``$n`` placeholders and the
parameters dumped apart, bound by the server. On a connection the resource
opened itself, a statement deferred often is prepared on the server under a name
of its own, as psycopg prepares its own statements: at the use after the
connection's ``prepare_threshold`` (psycopg's default 5; ``None``: never), at
most ``prepared_max`` of them per connection. The server then neither parses
nor plans it again (docs/design.md §2, "Prepared statements").

:class:`Prepared` is one connection's record of them. A name is recorded when its
``Parse`` goes out and dropped again when that ``Parse`` did not succeed
(:meth:`Prepared.failed`); a server that no longer knows a name (the work ran
``DEALLOCATE ALL``) makes the branch forget them all (:meth:`Prepared.forget`).
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import adapt, pq
from psycopg._queries import PostgresQuery
from psycopg.abc import AdaptContext

#: The prefix of the statement names the branches prepare (psycopg's own are ``_pg3_``).
NAME_PREFIX = b"_twopc_"

Key = tuple[bytes, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Deferred:
    """One deferred statement, converted: its text with ``$n`` placeholders, its
    parameters dumped with their types and formats (psycopg's ``PostgresQuery``)."""

    query: bytes
    params: Sequence[Any] | None
    types: tuple[int, ...]
    formats: Sequence[pq.Format] | None
    rows: int | None = None  # the row count its answer must give (``defer(..., rows=)``)

    @property
    def key(self) -> Key:
        """The statement's identity on a connection: its text and its parameters' types
        (an int dumped as int2 and one dumped as int8 are two statements, as in psycopg)."""
        return (self.query, self.types)


def convert(context: AdaptContext, query: Any, params: Any, rows: int | None = None) -> Deferred:
    """``query`` with ``params`` converted as ``Cursor.execute`` converts them: the same
    placeholders, adaptation of every type and errors (raised here); ``rows``, the row
    count its answer must give, if any."""
    converted = PostgresQuery(adapt.Transformer(context))
    converted.convert(query, params)
    return Deferred(
        converted.query, converted.params, tuple(converted.types), converted.formats or None, rows
    )


class Prepared:
    """The statements prepared on one connection, and how often each other one was used."""

    def __init__(self, threshold: int, limit: int) -> None:
        self.threshold = threshold
        self.limit = limit
        self._names: dict[Key, bytes] = {}
        self._uses: dict[Key, int] = {}
        self._numbers = itertools.count(1)

    def name_for(self, key: Key) -> tuple[bytes | None, bool]:
        """The name to execute ``key`` by (None: send it unnamed) and whether its
        ``Parse`` must go first; counts a use of a statement not prepared yet."""
        name = self._names.get(key)
        if name is not None:
            return name, False
        if len(self._names) >= self.limit:
            return None, False
        uses = self._uses.get(key, 0)
        if uses < self.threshold:
            if len(self._uses) >= self.limit:
                self._uses.clear()  # bounded: the counts start again
            self._uses[key] = uses + 1
            return None, False
        self._uses.pop(key, None)
        name = NAME_PREFIX + str(next(self._numbers)).encode()
        self._names[key] = name  # a second use in the same pipeline executes it by name
        return name, True

    def failed(self, key: Key) -> None:
        """``key``'s ``Parse`` did not succeed (it failed, or an earlier error skipped it)."""
        self._names.pop(key, None)

    def forget(self) -> None:
        """The server may have dropped the statements: prepare them again when due."""
        self._names.clear()
        self._uses.clear()

    def __len__(self) -> int:
        return len(self._names)


_BY_CONNECTION: weakref.WeakKeyDictionary[Any, Prepared] = weakref.WeakKeyDictionary()


def prepared_on(conn: Any) -> Prepared | None:
    """The record of ``conn``'s prepared statements, made on first use; None when the
    connection prepares nothing (its ``prepare_threshold`` is None)."""
    threshold = conn.prepare_threshold
    if threshold is None:
        return None
    record = _BY_CONNECTION.get(conn)
    if record is None:
        limit = conn.prepared_max if conn.prepared_max is not None else sys.maxsize
        record = _BY_CONNECTION[conn] = Prepared(threshold, limit)
    return record
