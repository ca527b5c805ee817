"""A query on an open connection to a database that stops answering ends with an error naming it.

Database B sits behind a fault proxy; its blackhole holds every byte, as a
network partition does, so a query already sent never gets its answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors as pg_errors

from scenarios.answer_deadline import QUERY_TIMEOUT, QueryTimeout, answered_within
from scenarios.cli.errors import explain
from scenarios.config import Settings
from scenarios.lab.proxy import FaultProxy
from scenarios.outbox.pipeline import wait_converged
from scenarios.transfer.model import recover_and_reset

pytestmark = pytest.mark.lab


@contextlib.contextmanager
def proxied(dsn: str, name: str) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of the database of ``dsn``, and a connection string through it."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    with FaultProxy(f"{info['host']}:{info['port']}", name=name) as proxy:
        through = psycopg.conninfo.make_conninfo(
            dsn, host="127.0.0.1", port=proxy.port, connect_timeout=2
        )
        yield proxy, through
        proxy.heal(reset=True)


@pytest.fixture
def b_proxy(settings: Settings) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of database B, and a connection string through it."""
    with proxied(settings.pg_b, "pg-b") as proxy_and_dsn:
        yield proxy_and_dsn


def test_a_query_without_an_answer_raises_connection_timeout(
    b_proxy: tuple[FaultProxy, str],
) -> None:
    """Blackholed once connected: the query raises ConnectionTimeout, caused by the shut socket."""
    proxy, dsn = b_proxy
    with psycopg.connect(dsn, autocommit=True) as conn:
        proxy.blackhole()
        with pytest.raises(pg_errors.ConnectionTimeout) as raised, answered_within(conn, 0.5):
            conn.execute("SELECT 1")
    assert str(raised.value).startswith(f"{QUERY_TIMEOUT}: no answer within 0.5 s")
    assert isinstance(raised.value, QueryTimeout)
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)


def test_a_query_that_answers_leaves_the_connection_usable_after_the_bound(
    b_proxy: tuple[FaultProxy, str],
) -> None:
    """The bound passes after the block ended: the connection still answers, nothing was shut."""
    _, dsn = b_proxy
    with psycopg.connect(dsn, autocommit=True) as conn:
        with answered_within(conn, 3.0):  # seconds: a loaded machine's query is slow
            assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(3.3)
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_an_error_of_the_query_itself_passes_through(b_proxy: tuple[FaultProxy, str]) -> None:
    """A statement that fails within the bound raises its own error, not ConnectionTimeout."""
    _, dsn = b_proxy
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        pytest.raises(pg_errors.UndefinedTable),
        answered_within(conn, 5.0),
    ):
        conn.execute("SELECT * FROM no_such_table")


def line_when_blackholed_mid_wait(
    settings: Settings, proxy: FaultProxy, ids: set[str] | None
) -> str | None:
    """The CLI's line for the wait's error, the proxy blackholed after its first poll."""
    polls: list[int] = []

    def blackhole_after_first_poll() -> None:
        polls.append(1)
        proxy.blackhole()

    with pytest.raises(pg_errors.ConnectionTimeout) as raised:
        wait_converged(
            settings,
            ids,
            timeout=60.0,
            check=blackhole_after_first_poll,
            answer_timeout=5.0,  # the first poll answers within it on a loaded machine
        )
    assert polls == [1]
    return explain(raised.value)


def test_the_convergence_wait_names_b_when_b_stops_answering_mid_wait(
    settings: Settings, b_proxy: tuple[FaultProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B blackholed between two polls: the wait raises, and the CLI's line names B and lab up."""
    proxy, dsn = b_proxy
    recover_and_reset(settings)  # the scenario's tables (B's inbox, which the wait reads)
    monkeypatch.setenv("TWOPC_PG_B", dsn)  # the CLI's probe finds B behind the proxy
    through_proxy = dataclasses.replace(settings, pg_b=dsn)
    line = line_when_blackholed_mid_wait(through_proxy, proxy, {"never-committed"})
    assert line is not None
    for word in ("cannot connect to database b", "TWOPC_PG_B", QUERY_TIMEOUT, "twopc lab up"):
        assert word in line, line


def test_the_convergence_wait_names_a_when_a_stops_answering_mid_wait(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ids given, A blackholed between two polls: the wait raises, the CLI's line names A."""
    recover_and_reset(settings)  # the scenario's tables (A's transfers, B's inbox)
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:  # one B never credits
        conn.execute("INSERT INTO transfers (transfer_id, amount) VALUES ('never-credited', 1)")
    try:
        with proxied(settings.pg_a, "pg-a") as (proxy, dsn):
            monkeypatch.setenv("TWOPC_PG_A", dsn)  # the CLI's probe finds A behind the proxy
            through_proxy = dataclasses.replace(settings, pg_a=dsn)
            line = line_when_blackholed_mid_wait(through_proxy, proxy, None)
    finally:
        recover_and_reset(settings)  # the transfer without its debit goes
    assert line is not None
    for word in ("cannot connect to database a", "TWOPC_PG_A", QUERY_TIMEOUT, "twopc lab up"):
        assert word in line, line
