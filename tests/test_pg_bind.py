"""A deferred statement is converted as ``Cursor.execute`` converts it and bound by the server
(sync and asyncio): the same statement, parameters, types and formats for every parameter type
and placeholder style, in the connection's encoding, and the same errors; deferred work with
each type and style commits, a bad one fails as before."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import generators, pq, sql
from psycopg.types.json import Json, Jsonb

from coordinator import Outcome
from coordinator.errors import InvalidTransition
from participants import pg_statements
from scenarios.config import Settings
from tests.test_vote import INSERT, TABLE, assert_nothing_prepared, count
from tests.test_vote import coordinator as coordinator
from tests.test_vote import ledger as ledger

#: (query, params): every parameter style and the types the API accepts.
CASES: list[tuple[Any, Any]] = [
    ("SELECT %s, %s, %s, %s", (1, -(2**40), 1.5, Decimal("12.345"))),
    ("SELECT %s, %s", ("it's a \\ 'quoted' string", "ünïcødé ✓")),
    ("SELECT %s, %s, %s", (None, True, False)),
    ("SELECT %s", (b"\x00\x01binary'\\",)),
    (
        "SELECT %s, %s, %s, %s",
        (
            dt.date(2026, 12, 3),
            dt.datetime(2026, 12, 3, 12, 0, 1, 5),
            dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC),
            dt.timedelta(days=1, seconds=3),
        ),
    ),
    ("SELECT %s, %s", (uuid.UUID(int=7), [1, 2, None])),
    ("SELECT %s, %s", (Json({"a": [1, "x'y"]}), Jsonb([1, 2]))),
    ("SELECT %(amount)s, %(tid)s, %(amount)s", {"amount": 5, "tid": "t-1"}),
    ("SELECT 100 %% 7, %s", ("percent",)),
    ("SELECT '100 %' AS literal", None),
    (sql.SQL("SELECT {} FROM {}").format(sql.Literal("x"), sql.Identifier("my table")), None),
    (sql.SQL("SELECT %s, {}").format(sql.Identifier("col")), (3,)),
    (b"SELECT %s", ("bytes query",)),
]

#: (query, params): wrong calls, which mogrify refuses.
BAD: list[tuple[Any, Any]] = [
    ("SELECT %s, %s", (1,)),  # too few parameters
    ("SELECT %s", (1, 2)),  # too many
    ("SELECT %(a)s", {"b": 1}),  # a name missing
    ("SELECT %(a)s, %s", {"a": 1}),  # mixed styles
    ("SELECT %s", (object(),)),  # a type psycopg cannot adapt
    ("SELECT %x", (1,)),  # an unknown placeholder
]


@pytest.fixture(params=["UTF8", "LATIN1"])
def conn(request: pytest.FixtureRequest, settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """A connection to A with the client encoding given."""
    with psycopg.connect(settings.pg_a) as connection:
        connection.execute(f"SET client_encoding TO {request.param}")
        connection.commit()
        yield connection


def _latin1_safe(params: Any) -> bool:
    values = params.values() if isinstance(params, dict) else (params or ())
    return all(not isinstance(v, str) or v.isascii() for v in values)


def _row(result: pq.abc.PGresult) -> list[bytes | None]:
    """The first row of ``result`` as the server sent it."""
    return [result.get_value(0, column) for column in range(result.nfields)]


@pytest.mark.lab
@pytest.mark.parametrize(("query", "params"), CASES)
def test_converted_statement_returns_what_execute_returns(
    conn: psycopg.Connection[Any], query: Any, params: Any
) -> None:
    """The converted statement, bound by the server, returns the row Cursor.execute returns
    (the server's own text of every value) or the same error, for each type and style, in
    the connection's encoding."""
    if conn.info.encoding != "utf-8" and not _latin1_safe(params):
        pytest.skip("text outside LATIN1")
    try:
        cursor = conn.execute(query, params)
    except psycopg.Error as exc:  # "my table" does not exist: the same error is expected
        expected: Any = exc.sqlstate
    else:
        assert cursor.pgresult is not None
        expected = _row(cursor.pgresult)
    conn.rollback()
    statement = pg_statements.convert(conn, query, params)
    conn.pgconn.send_query_params(
        statement.query, statement.params, statement.types, statement.formats
    )
    (result,) = conn.wait(generators.fetch_many(conn.pgconn))
    if isinstance(expected, str):
        assert result.error_field(pq.DiagnosticField.SQLSTATE) == expected.encode()
    else:
        assert result.status == pq.ExecStatus.TUPLES_OK, result.error_message
        assert _row(result) == expected


@pytest.mark.lab
@pytest.mark.parametrize(("query", "params"), BAD)
def test_convert_refuses_what_execute_refuses(
    conn: psycopg.Connection[Any], query: Any, params: Any
) -> None:
    """A wrong call raises Cursor.execute's error, of the same type and with the same words,
    before anything is sent."""
    try:
        conn.execute(query, params)
    except psycopg.Error as exc:
        expected = exc
    else:
        pytest.fail("execute took a wrong call")
    conn.rollback()
    with pytest.raises(type(expected)) as got:
        pg_statements.convert(conn, query, params)
    assert str(got.value) == str(expected)


#: The cases the server runs (the composed ones name a table and a column that do not exist).
RUNNABLE = [(query, params) for query, params in CASES if not isinstance(query, sql.Composed)]


@pytest.mark.lab
@pytest.mark.parametrize(("query", "params"), RUNNABLE)
def test_each_type_deferred_commits(coordinator: Any, query: Any, params: Any) -> None:
    """A deferred statement with each parameter type and style runs in the branch, bound by
    the server, and the transaction commits."""
    tx = coordinator.begin()
    tx.branch("a").defer(query, params)
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.COMMITTED, tx.reason


@pytest.mark.lab
def test_deferred_work_with_each_placeholder_style_commits(
    coordinator: Any, settings: Settings
) -> None:
    """Named, positional and composed deferred statements commit with the PREPARE."""
    tx = coordinator.begin()
    a = tx.branch("a")
    a.defer(f"INSERT INTO {TABLE} VALUES (%(id)s, %(amount)s)", {"id": tx.gtrid, "amount": 1})
    a.defer(INSERT, (tx.gtrid, 2))
    query = sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier(TABLE))
    tx.branch("b").defer(query, [tx.gtrid, 3])
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (2, 1)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
def test_a_wrongly_bound_deferred_statement_raises_at_defer(
    coordinator: Any, settings: Settings
) -> None:
    """defer() with too few parameters raises psycopg's ProgrammingError at once; nothing is
    queued, and the transaction's other work commits."""
    tx = coordinator.begin()
    with pytest.raises(psycopg.ProgrammingError, match="placeholders"):
        tx.branch("a").defer(INSERT, (tx.gtrid,))
    tx.branch("a").defer(INSERT, (tx.gtrid, 1))
    assert tx.commit() is Outcome.COMMITTED
    assert count(settings.pg_a, tx.gtrid) == 1


@pytest.mark.lab
def test_a_deferred_syntax_error_is_a_no_vote(coordinator: Any, settings: Settings) -> None:
    """A deferred statement the server cannot parse makes its branch vote NO with the
    server's error; nothing commits."""
    tx = coordinator.begin()
    tx.execute("a", INSERT, (tx.gtrid, 1))
    tx.branch("b").defer(f"INSERT INTO {TABLE} VALUS (%s, %s)", (tx.gtrid, 2))
    assert tx.commit() is Outcome.ABORTED
    assert "'b'" in tx.reason and "syntax error" in tx.reason
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (0, 0)
    assert_nothing_prepared(settings, tx.gtrid)


@pytest.mark.lab
@pytest.mark.parametrize("control", ["  begin", "START\n TRANSACTION", "prepare transaction 'x'"])
def test_defer_refuses_each_transaction_control(coordinator: Any, control: str) -> None:
    """defer() refuses BEGIN, START TRANSACTION and PREPARE TRANSACTION, naming the word."""
    tx = coordinator.begin()
    word = control.split()[0].upper()
    with pytest.raises(InvalidTransition, match=f"transaction control \\({word}\\)"):
        tx.branch("a").defer(control)
    tx.rollback()


@pytest.mark.lab
def test_deferred_work_larger_than_the_socket_buffer_commits(
    coordinator: Any, settings: Settings
) -> None:
    """Deferred statements of several megabytes (more than a socket takes at once) are all
    sent and commit with the PREPARE."""
    tx = coordinator.begin()
    big = "x" * (4 << 20)
    tx.branch("a").defer(f"INSERT INTO {TABLE} VALUES (%s, length(%s))", (tx.gtrid, big))
    tx.branch("b").defer(f"INSERT INTO {TABLE} VALUES (%s, length(%s))", (tx.gtrid, big))
    tx.branch("b").defer(INSERT, (tx.gtrid, 2))
    assert tx.commit() is Outcome.COMMITTED
    assert (count(settings.pg_a, tx.gtrid), count(settings.pg_b, tx.gtrid)) == (1, 2)
    assert_nothing_prepared(settings, tx.gtrid)
