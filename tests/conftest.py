"""Shared fixtures: the real lab (two PostgreSQL clusters and ActiveMQ) for the whole session.

The lab is brought up once in a temporary TWOPC_HOME on free ports and taken
down at the end. Set TWOPC_TEST_HOME to reuse a lab you keep running between
test runs (it is then left up).
"""

from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from coordinator import events
from participants.stomp_client import StompClient
from scenarios.config import Settings, StompOptions
from scenarios.lab.credentials import pg_dsn
from scenarios.lab.lab_user import lab_user
from scenarios.lab.ports import (
    BROKER,
    OPENWIRE_DEFAULT,
    OPENWIRE_SETTING,
    PG_A,
    PG_B,
    SERVICES,
    STOMP_TLS_DEFAULT,
    STOMP_TLS_SETTING,
    ephemeral_range,
)
from scenarios.lab.probes import admin_connect, port_free
from scenarios.lab.services import Lab
from scenarios.lab.software import postgres_bindir
from scenarios.log_setup import configure as configure_logging
from scenarios.transfer.model import drain
from tests.broker_queues import named_queues
from tests.cli_process import reap_children

#: Where a fatal error's tracebacks (a SIGSEGV or SIGABRT in a C extension) go, each
#: after the id of the test that was running: ``make test`` prints the crash from it
#: when the run fails (scripts/crash_report.py), since only the end of a long log is read.
CRASH_FILE = Path(__file__).resolve().parents[1] / "build" / "test-crash.txt"
_crash_file: list[Any] = []


@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin, which writes to stderr
def pytest_configure(config: pytest.Config) -> None:
    """Tests log as twopc's own processes do (WARNING and up, to stderr); a fatal error's
    tracebacks go to CRASH_FILE."""
    configure_logging()
    CRASH_FILE.parent.mkdir(exist_ok=True)
    crash = CRASH_FILE.open("w")  # open for the whole run: faulthandler writes to its fd
    faulthandler.enable(file=crash, all_threads=True)
    _crash_file.append(crash)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run ended without a fatal error: faulthandler off, CRASH_FILE closed."""
    if _crash_file:
        faulthandler.disable()
        _crash_file.pop().close()


def pytest_runtest_logstart(nodeid: str) -> None:
    """Note in CRASH_FILE which test runs, so that a crash names it."""
    if _crash_file:
        _crash_file[0].write(f"running {nodeid}\n")
        _crash_file[0].flush()


@pytest.fixture(autouse=True)
def reap_cli_children() -> Iterator[None]:
    """A ``twopc`` child a test left running (it failed before waiting) is ended and reaped."""
    yield
    reap_children()


#: Ports free_port() has handed out in this session (each once).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on right now, below the kernel's range for outgoing
    connections: a lab service restarted on it (a broker kill, a stopped PostgreSQL)
    cannot find it taken as the local port of some client's connection."""
    low, _ = ephemeral_range()
    first = min(20000, low // 2)
    defaults = {s.default_port for s in SERVICES} | {OPENWIRE_DEFAULT, STOMP_TLS_DEFAULT}
    for _ in range(1000):
        port = random.randrange(first, low)
        if port in _HANDED_OUT or port in defaults or not port_free(port):
            continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port between {first} and {low}")


def end_sessions(dsn: str, pids: list[int]) -> int:
    """The server ends the sessions with these backend pids (as an admin would); how many."""
    if not pids:
        return 0
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000))"
            " FROM unnest(%s::int[]) AS pid",
            (pids,),
        ).fetchone()
    return int(row[0]) if row else 0


def stomp_login() -> StompOptions:
    """The broker's login and TLS choice, from the settings the lab fixture exported."""
    return Settings.load().stomp_options()


def open_stomp_client(address: str, **options: Any) -> StompClient:
    """StompClient.open with the lab broker's login (``options`` win)."""
    return StompClient.open(address, **{**stomp_login(), **options})


@dataclass
class BrokerControl:
    """Kill and restart the lab's broker (fault injection)."""

    lab: Lab

    def kill(self) -> None:
        self.lab.kill("activemq")

    def start(self) -> None:
        self.lab.start_service("activemq")


@pytest.fixture
def logging_that_raises() -> Iterator[list[str]]:
    """structlog configured so that the watchdog's events (a timeout, a failed chore) raise
    BrokenPipeError, as an application's logging to a stream that went away would; the
    list collects the events that raised. The configuration is put back afterwards."""
    raised: list[str] = []
    failing = {events.TIMEOUT, events.HOUSEKEEPING_FAILED}

    def break_on_watchdog_events(_: object, __: str, event_dict: dict[str, Any]) -> Any:
        if event_dict["event"] in failing:
            raised.append(event_dict["event"])
            raise BrokenPipeError(32, "Broken pipe")
        raise structlog.DropEvent

    was_configured, config = structlog.is_configured(), structlog.get_config()
    structlog.configure(processors=[break_on_watchdog_events])
    try:
        yield raised
    finally:
        if was_configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The running lab; its settings are exported to os.environ for child processes."""
    reuse = os.environ.get("TWOPC_TEST_HOME")
    if reuse:
        home = Path(reuse)
    else:
        # /tmp itself, not pytest's tmp_path: PostgreSQL runs as an unprivileged user
        # when the tests run as root, and must be able to reach its data directory.
        home = Path(tempfile.mkdtemp(prefix="twopc-test-", dir="/tmp"))
        home.chmod(0o755)
        for service in (PG_A, PG_B, BROKER):
            os.environ[service.port_setting] = str(free_port())
        os.environ[OPENWIRE_SETTING] = str(free_port())
        os.environ[STOMP_TLS_SETTING] = str(free_port())
    os.environ["TWOPC_HOME"] = str(home)
    the_lab = Lab(home)
    the_lab.up()
    os.environ.update(the_lab.settings_env())
    yield the_lab
    if reuse:
        # The lab outlives the session: empty this session's queues, so that its broker
        # removes them (tests/broker_queues.py).
        drain(Settings.load(), *named_queues())
    else:
        the_lab.down()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(lab: Lab) -> Settings:
    """Connection settings pointing at the lab."""
    return Settings.load()


@pytest.fixture(scope="session")
def stomp_addr(settings: Settings) -> str:
    """host:port of the lab broker's STOMP connector."""
    return settings.stomp


@pytest.fixture
def broker_control(lab: Lab) -> Iterator[BrokerControl]:
    """Kill/start the broker; it is running again when the test ends."""
    control = BrokerControl(lab)
    yield control
    lab.start_service("activemq")


@contextmanager
def spare_postgres(*options: str, hba: str | None = None) -> Iterator[Lab]:
    """A PostgreSQL of its own (cluster A of a lab in a temporary home) started with the
    server ``options`` and, if given, ``hba`` as its pg_hba.conf; stopped afterwards."""
    home = Path(tempfile.mkdtemp(prefix="twopc-spare-pg-", dir="/tmp"))
    home.chmod(0o755)
    env = {
        **os.environ,
        "TWOPC_HOME": str(home),
        "TWOPC_LAB_PG_A_PORT": str(free_port()),
        "TWOPC_LAB_PG_B_PORT": str(free_port()),
        "TWOPC_LAB_STOMP_PORT": str(free_port()),
        "TWOPC_LAB_OPENWIRE_PORT": str(free_port()),
    }
    spare = Lab(home, env)
    assert postgres_bindir()
    spare.start_service("pg-a")  # initdb, the roles, then the same cluster as asked:
    spare.stop_service("pg-a")
    data = home / "pg-a" / "data"
    if hba is not None:
        (data / "pg_hba.conf").write_text(hba)
    user = lab_user()
    run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    server = subprocess.Popen(
        [str(postgres_bindir() / "postgres"), "-D", str(data), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **run_as,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            admin_connect(spare.ports.pg_a, spare.credentials().pg_admin_password).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield spare
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def server_without_prepared_transactions(lab: Lab) -> Iterator[str]:
    """A real PostgreSQL started with max_prepared_transactions = 0 (as a user's may be)."""
    with spare_postgres("-c", "max_prepared_transactions=0") as spare:
        yield pg_dsn(spare.ports.pg_a, spare.home, dbname="postgres", timeout=2)


@pytest.fixture
def trusting_server(lab: Lab) -> Iterator[Lab]:
    """A real PostgreSQL whose pg_hba.conf trusts every connection from 127.0.0.1."""
    with spare_postgres(hba="host all all 127.0.0.1/32 trust\n") as spare:
        yield spare
