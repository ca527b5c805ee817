"""What a user can get wrong reaches them as one line and the right exit status, never a traceback.

Exit statuses: 0 done, 1 runtime error, 2 usage error, 3 'twopc indoubt' found something.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from coordinator.errors import ConfigurationError
from scenarios.answer_deadline import QueryTimeout
from scenarios.cli import errors as cli_errors
from scenarios.cli.errors import explain, redact
from scenarios.config import Settings
from scenarios.log_setup import configure as configure_logging

TWOPC = [sys.executable, "-m", "scenarios.cli"]
NO_SCHEMA_DB = "twopc_no_schema"
RESET_HINT = "run 'twopc transfer --reset'"


def twopc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process with ``env``."""
    return subprocess.run(
        [*TWOPC, *args], capture_output=True, text=True, env=env, check=False, timeout=300
    )


def lab_env(settings: Settings, home: Path, **changes: str) -> dict[str, str]:
    """The lab's settings in a state folder of the test's own, with ``changes``."""
    return {**os.environ, **settings.as_env(), "TWOPC_HOME": str(home), **changes}


def assert_one_line_error(done: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    """Exit ``status``, no traceback, and a 'twopc: error:' line holding every one of ``words``."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("twopc: error: ")]
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- a lab without the scenario's tables ----------------------------------------------------


def with_dbname(dsn: str, dbname: str) -> str:
    """``dsn`` pointing at database ``dbname`` of the same server."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


@pytest.fixture
def no_schema(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Settings pointing at empty databases on the lab's servers (no 'twopc transfer --reset')."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NO_SCHEMA_DB}")
            conn.execute(f"CREATE DATABASE {NO_SCHEMA_DB}")
    home = tmp_path / "home"
    home.mkdir()
    yield lab_env(
        settings,
        home,
        TWOPC_PG_A=with_dbname(settings.pg_a, NO_SCHEMA_DB),
        TWOPC_PG_B=with_dbname(settings.pg_b, NO_SCHEMA_DB),
    )
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NO_SCHEMA_DB} WITH (FORCE)")


@pytest.mark.lab
@pytest.mark.parametrize(
    "args",
    [
        ("transfer", "--count", "5"),
        ("transfer", "--count", "5", "--accounts", "10"),
        ("transfer", "--count", "5", "--strategy", "outbox-status"),
        ("transfer", "--count", "5", "--api", "asyncio"),
        ("scenario", "run", "all"),
        ("outbox", "failed"),
        ("outbox", "retry"),
    ],
    ids=" ".join,
)
def test_commands_on_a_lab_without_the_schema_say_to_reset(
    no_schema: dict[str, str], args: tuple[str, ...]
) -> None:
    """Without the scenario's tables: exit 1, one line naming the database and the reset."""
    done = twopc(no_schema, *args)
    assert_one_line_error(done, 1, "does not exist", RESET_HINT, "database ", NO_SCHEMA_DB)


# -- exit statuses ----------------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("transfer", "--concurrency", "0"), "--concurrency"),
        (("transfer", "--accounts", "0"), "--accounts"),
        (("transfer", "--strategy", "bogus"), "--strategy"),
        (("transfer", "--count", "5", "--api", "bogus"), "--api"),
        (
            ("transfer", "--count", "5", "--strategy", "naive", "--api", "asyncio"),
            "2pc strategy only",
        ),
        (("scenario", "run", "no-such-story"), "no-such-story"),
        (("no-such-command",), "no-such-command"),
    ],
    ids=[
        "concurrency 0",
        "accounts 0",
        "unknown strategy",
        "unknown api",
        "asyncio for a strategy without it",
        "unknown scenario",
        "unknown command",
    ],
)
def test_usage_errors_exit_2(
    settings: Settings, tmp_path: Path, args: tuple[str, ...], word: str
) -> None:
    """A wrong option, argument or command is a usage error: exit 2, click's message."""
    done = twopc(lab_env(settings, tmp_path), *args)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Usage:" in done.stderr and word in done.stderr


@pytest.mark.lab
def test_indoubt_exits_0_when_nothing_is_in_doubt(settings: Settings, tmp_path: Path) -> None:
    """'twopc indoubt' on a lab with nothing prepared exits 0 (3 is for something in doubt)."""
    done = twopc(lab_env(settings, tmp_path), "indoubt", "--json")
    assert done.returncode == 0, done.stderr
    assert '"transactions": []' in done.stdout


@pytest.mark.lab
def test_unreachable_database_is_one_line_naming_the_setting_without_the_password(
    settings: Settings, tmp_path: Path
) -> None:
    """PostgreSQL A unreachable: exit 1, TWOPC_PG_A and host:port named, the password never."""
    env = lab_env(
        settings,
        tmp_path,
        TWOPC_PG_A="host=127.0.0.1 port=1 user=twopc password=hunter2 connect_timeout=2",
    )
    done = twopc(env, "outbox", "failed")
    assert_one_line_error(done, 1, "cannot connect to database a", "TWOPC_PG_A", "127.0.0.1:1")
    assert "hunter2" not in done.stderr + done.stdout


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("host=127.0.0.1 port=notaport", ["TWOPC_PG_A", "'notaport'", "1-65535"]),
        ("host=127.0.0.1 port=0 password=hunter2", ["TWOPC_PG_A", "'0'"]),
        ("not a connection string", ["TWOPC_PG_A", "not a libpq connection string"]),
        ("host=127.0.0.1 password hunter2", ["TWOPC_PG_A", "not a libpq connection string"]),
        ("postgresql://u:hunter2@127.0.0.1:notaport/db", ["TWOPC_PG_A"]),
    ],
    ids=["port not a number", "port 0", "unparsable", "unparsable with password", "bad URI"],
)
def test_a_malformed_pg_a_is_refused_at_load_naming_the_setting(
    tmp_path: Path, value: str, words: list[str]
) -> None:
    """Settings.load refuses a malformed TWOPC_PG_A with a message naming it, no password."""
    env = {
        "TWOPC_HOME": str(tmp_path),
        "TWOPC_PG_A": value,
        "TWOPC_PG_B": "host=127.0.0.1 port=5432",
        "TWOPC_STOMP": "127.0.0.1:61613",
        "TWOPC_OPENWIRE": "127.0.0.1:61616",
    }
    with pytest.raises(ConfigurationError) as info:
        Settings.load(env)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert "hunter2" not in message


@pytest.mark.lab
def test_a_malformed_pg_a_stops_the_cli_with_one_line(settings: Settings, tmp_path: Path) -> None:
    """'twopc indoubt' with TWOPC_PG_A='host=127.0.0.1 port=notaport': exit 1 naming it."""
    env = lab_env(settings, tmp_path, TWOPC_PG_A="host=127.0.0.1 port=notaport")
    done = twopc(env, "indoubt")
    assert_one_line_error(done, 1, "TWOPC_PG_A", "notaport")


def test_an_unknown_log_level_is_an_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TWOPC_LOG_LEVEL=LOUD is refused with the allowed values; 'debug' in any case is fine."""
    monkeypatch.setenv("TWOPC_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigurationError, match=r"^TWOPC_LOG_LEVEL='LOUD' is not a log level"):
        configure_logging()
    with pytest.raises(ConfigurationError, match=r"DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        configure_logging("verbose")
    monkeypatch.setenv("TWOPC_LOG_LEVEL", "debug")
    try:
        configure_logging()
    finally:
        monkeypatch.delenv("TWOPC_LOG_LEVEL")
        configure_logging()


@pytest.mark.lab
def test_an_unknown_log_level_stops_the_cli_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    """Any command with TWOPC_LOG_LEVEL=LOUD exits 1 naming the setting, without a traceback."""
    done = twopc(lab_env(settings, tmp_path, TWOPC_LOG_LEVEL="LOUD"), "indoubt")
    assert_one_line_error(done, 1, "TWOPC_LOG_LEVEL", "WARNING")


# -- the translation itself ------------------------------------------------------------------


def test_redact_hides_passwords_of_keyword_strings_and_uris() -> None:
    """redact() replaces the password of 'password=...' and of a URI's user info."""
    assert redact("host=h password=hunter2 port=1") == "host=h password=*** port=1"
    assert redact("password = 'a b' x") == "password = *** x"
    assert redact("postgresql://u:hunter2@h:1/db") == "postgresql://u:***@h:1/db"


def test_only_errors_a_user_can_cause_are_explained() -> None:
    """twopc's errors, psycopg's and the OS's get a line; anything else is a bug and None."""
    assert explain(ConfigurationError("TWOPC_X is wrong")) == "TWOPC_X is wrong"
    assert explain(FileNotFoundError(2, "No such file or directory", "/x")) == (
        "No such file or directory: /x"
    )
    assert explain(psycopg.OperationalError("connection failed: refused")) is not None
    assert explain(RuntimeError("a bug")) is None


def test_a_lock_timeout_says_what_holds_the_lock_and_what_to_run() -> None:
    """A statement cancelled by lock_timeout (LockNotAvailable) is one line that names the
    likely holder, a transaction a killed run left prepared, and twopc indoubt / recover /
    recover --dead."""
    line = explain(psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"))
    assert line is not None
    assert line.startswith("PostgreSQL: canceling statement due to lock timeout: ")
    for command in ("'twopc indoubt'", "'twopc recover'", "'twopc recover --dead'"):
        assert command in line


def test_a_query_timeout_is_not_worded_as_a_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QueryTimeout (a query on an open connection) is told from a connect timeout by its
    type: only the connect timeout's line adds 'no answer within its connect_timeout'."""
    monkeypatch.setattr(cli_errors, "_database_not_answering", lambda: None)
    query = explain(QueryTimeout("no answer within 10 s on a connection that was open"))
    connect = explain(psycopg.errors.ConnectionTimeout("connection timeout expired"))
    assert query == (
        "cannot connect to PostgreSQL: no answer within 10 s on a connection that was open; "
        "run 'twopc lab up' or check TWOPC_PG_A and TWOPC_PG_B"
    )
    assert connect == (
        "cannot connect to PostgreSQL: connection timeout expired (no answer within its "
        "connect_timeout); run 'twopc lab up' or check TWOPC_PG_A and TWOPC_PG_B"
    )
