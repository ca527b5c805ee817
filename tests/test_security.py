"""Security on the lab: the logins, STOMP over TLS, private files, no secret in output or logs,
PostgreSQL without trust or a superuser for twopc, the broker not running as root."""

from __future__ import annotations

import dataclasses
import grp
import io
import logging
import os
import pwd
import secrets
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import structlog
from psycopg import errors as pg_errors

from coordinator.errors import ConfigurationError
from coordinator.states import Outcome
from participants.stomp_client import BrokerLoginRefused, BrokerTlsRefused, StompClient
from scenarios.config import SETTING_NAMES, Settings
from scenarios.lab.credentials import DB_ADMIN, Credentials
from scenarios.lab.errors import LabError
from scenarios.lab.lab_user import LAB_USER
from scenarios.lab.layout import CERTIFICATE, CREDENTIALS_FILE, PASSFILE
from scenarios.lab.probes import trusting_rules
from scenarios.lab.services import Lab
from scenarios.lab.software import ACTIVEMQ_HOME, activemq_jar, java_binary, make_self_signed
from scenarios.log_setup import configure as configure_logging
from scenarios.wiring import open_coordinator, open_stomp
from tests.broker_queues import fresh_queue

pytestmark = pytest.mark.lab

TWOPC = [sys.executable, "-m", "scenarios.cli"]
QUEUE = "/queue/test.security"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tls_settings(settings: Settings, lab: Lab) -> Settings:
    """The lab's settings with TLS on: the TLS connector, the lab's certificate to trust."""
    return dataclasses.replace(
        settings,
        stomp=f"127.0.0.1:{lab.ports.stomp_tls}",
        stomp_tls=True,
        stomp_ca=str(lab.home / CERTIFICATE),
    )


def twopc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWOPC, *args], capture_output=True, text=True, env=env or dict(os.environ), check=False
    )


# -- the login -------------------------------------------------------------------


def test_wrong_password_names_the_settings_and_hides_the_password(settings: Settings) -> None:
    """A wrong password is a ConfigurationError naming both settings, without the password."""
    wrong = f"wrong-{secrets.token_hex(8)}"
    with pytest.raises(BrokerLoginRefused) as info:
        open_stomp(dataclasses.replace(settings, stomp_password=wrong))
    message = str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert "TWOPC_STOMP_USER" in message and "TWOPC_STOMP_PASSWORD" in message
    assert "wrong user name or password" in message
    assert wrong not in message
    assert settings.stomp_password is not None and settings.stomp_password not in message


def test_wrong_password_stops_the_cli_with_one_clear_line() -> None:
    """'twopc recover' with a wrong TWOPC_STOMP_PASSWORD fails naming it, never printing it."""
    wrong = f"wrong-{secrets.token_hex(8)}"
    result = twopc("recover", "--json", env={**os.environ, "TWOPC_STOMP_PASSWORD": wrong})
    assert result.returncode != 0
    assert "TWOPC_STOMP_PASSWORD" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_missing_login_is_refused_with_what_to_set(settings: Settings) -> None:
    """A client without login is refused; the error says which two settings to set."""
    with pytest.raises(BrokerLoginRefused) as info:
        open_stomp(dataclasses.replace(settings, stomp_user=None, stomp_password=None))
    message = str(info.value)
    assert "requires a login and none was given" in message
    assert "TWOPC_STOMP_USER" in message and "TWOPC_STOMP_PASSWORD" in message


def test_missing_password_is_refused_without_echoing_anything(settings: Settings) -> None:
    """A user without a password is refused, and the coordinator does not start."""
    with pytest.raises(BrokerLoginRefused) as info:
        open_coordinator(dataclasses.replace(settings, stomp_password=None), sessions=1)
    assert "without a password" in str(info.value)
    assert "TWOPC_STOMP_PASSWORD" in str(info.value)


def test_lab_credentials_go_only_to_the_labs_broker(settings: Settings, tmp_path: Path) -> None:
    """Another state folder pointing at the lab's broker gets no login from the lab by itself."""
    env = {**settings.as_env(), "TWOPC_HOME": str(tmp_path)}
    del env["TWOPC_STOMP_USER"], env["TWOPC_STOMP_PASSWORD"]
    loaded = Settings.load(env)
    assert loaded.stomp == settings.stomp
    assert loaded.stomp_user is None and loaded.stomp_password is None
    with pytest.raises(BrokerLoginRefused):
        open_stomp(loaded)


def test_lab_env_exports_the_login_it_generated(lab: Lab) -> None:
    """'twopc lab env' exports the user and password in credentials.json, and they log in."""
    out = twopc("lab", "env").stdout
    credentials = lab.credentials()
    assert f"export TWOPC_STOMP_USER={credentials.stomp_user}" in out.splitlines()
    assert f"export TWOPC_STOMP_PASSWORD={credentials.stomp_password}" in out.splitlines()
    assert f"export TWOPC_STOMP_TLS_ADDRESS=127.0.0.1:{lab.ports.stomp_tls}" in out.splitlines()
    with StompClient.open(
        f"127.0.0.1:{lab.ports.stomp}",
        login=credentials.stomp_user,
        passcode=credentials.stomp_password,
    ) as client:
        assert client.alive


def openwire_producer(lab: Lab, tmp_path: Path, queue: str, *options: str) -> str:
    """Run ActiveMQ's own 'producer' command (an OpenWire client) once, sending to
    ``queue`` with ``options`` (the login, the body); its output."""
    command = [
        java_binary(),
        f"-Dactivemq.home={ACTIVEMQ_HOME}",
        *(f"-Dactivemq.{name}={tmp_path}" for name in ("base", "conf", "data")),
        "-jar",
        str(activemq_jar()),
        "producer",
        "--brokerUrl",
        f"tcp://127.0.0.1:{lab.ports.openwire}",
        "--destination",
        f"queue://{queue}",
        "--messageCount",
        "1",
        *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return result.stdout + result.stderr


def test_openwire_connector_requires_the_login_too(
    settings: Settings, lab: Lab, tmp_path: Path
) -> None:
    """An OpenWire client without the login is refused; with it, its message is queued."""
    queue = fresh_queue("security.openwire").removeprefix("/queue/")  # this run's alone
    refused = openwire_producer(lab, tmp_path, queue)
    assert "JMSSecurityException" in refused and "password is invalid" in refused
    credentials = lab.credentials()
    body = uuid.uuid4().hex
    sent = openwire_producer(
        lab,
        tmp_path,
        queue,
        "--message",
        body,
        "--user",
        credentials.stomp_user,
        "--password",
        credentials.stomp_password,
    )
    assert "JMSSecurityException" not in sent, sent
    # The send is persistent, so synchronous: the message is stored once it returns. What
    # the tool does after it, closing its producer, is not the login's concern: that close
    # has failed on a connection already gone ("Cannot send, channel has already failed").
    with open_stomp(settings) as client:
        queued = [m.body for m in client.browse(f"/queue/{queue}", idle_timeout=2.0)]
    assert queued == [body], sent


# -- TLS -------------------------------------------------------------------------


def test_coordinator_commits_over_tls(settings: Settings, lab: Lab) -> None:
    """With TWOPC_STOMP_TLS on, a transaction commits through the TLS connector, verified."""
    secure = tls_settings(settings, lab)
    body = uuid.uuid4().hex
    with open_coordinator(secure, sessions=2) as coordinator:
        with coordinator.transaction() as tx:
            tx.send(QUEUE, body, {"test": "tls"})
        assert tx.outcome is Outcome.COMMITTED
    with open_stomp(secure) as client:
        assert isinstance(client.tcp_socket, ssl.SSLSocket)
        assert body in [m.body for m in client.browse(QUEUE, idle_timeout=2.0)]


def test_tls_connection_sees_the_broker_close_it(settings: Settings, lab: Lab) -> None:
    """Over TLS the client notices the broker closing the connection (close takes no 2 s wait)."""
    client = open_stomp(tls_settings(settings, lab))
    started = time.monotonic()
    client.close(timeout=2.0)  # DISCONNECT, then wait for the broker to close the socket
    assert time.monotonic() - started < 1.0
    assert not client.alive


def test_tls_frames_are_written_by_the_io_thread_alone(
    settings: Settings, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS the caller's frames reach the socket through stomp.py's I/O thread, which
    reads it too (OpenSSL forbids a write in one thread while another reads)."""
    client = open_stomp(tls_settings(settings, lab))
    sock = client.tcp_socket
    assert isinstance(sock, ssl.SSLSocket)
    written_by: list[str] = []
    for name in ("send", "sendall"):
        real = getattr(sock, name)

        def recording(*args: object, _real: object = real) -> object:
            written_by.append(threading.current_thread().name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(sock, name, recording)
    try:
        client.send(QUEUE, uuid.uuid4().hex, {"test": "tls-writer"}, receipt_timeout=5.0)
    finally:
        client.close(timeout=2.0)
    caller = threading.current_thread().name
    assert written_by and caller not in written_by, written_by


def test_tls_client_connects_every_time(settings: Settings, lab: Lab) -> None:
    """A TLS client opened 100 times in a row connects and sends every time (written from
    the caller's thread while the I/O thread read, 1 to 3 opens in 100 failed)."""
    secure = tls_settings(settings, lab)
    for _ in range(100):
        client = open_stomp(secure)
        try:
            client.send(QUEUE, "ping", {"test": "tls-open"}, receipt_timeout=5.0)
        finally:
            client.close(timeout=2.0)


@pytest.mark.parametrize("ending", ["close", "drop"])
def test_only_the_receiver_thread_closes_a_tls_socket(
    settings: Settings, lab: Lab, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """Closing or dropping a TLS client never shuts TLS down or closes the socket from the
    caller's thread while stomp.py's receiver runs (two threads at once abort in OpenSSL)."""
    client = open_stomp(tls_settings(settings, lab))
    transport = client._conn.transport
    receiver = transport.io_thread
    closed_by: list[str] = []
    sock = client.tcp_socket
    assert isinstance(sock, ssl.SSLSocket)
    for name in ("close", "unwrap"):
        real = getattr(sock, name)

        def recording(*args: object, _real: object = real, _name: str = name) -> object:
            closed_by.append(f"{_name} on {threading.current_thread().name}")
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(sock, name, recording)
    caller = threading.current_thread().name
    if ending == "close":
        client.close(timeout=2.0)
    else:
        client.drop()
    assert not receiver.is_alive()
    assert closed_by and all(not c.endswith(f" on {caller}") for c in closed_by), closed_by
    assert not client.alive


def test_tls_settings_from_the_environment_point_at_the_tls_connector(lab: Lab) -> None:
    """TWOPC_STOMP_TLS=1 with the lab's defaults: TLS address, the lab's certificate, the login."""
    given = ("TWOPC_STOMP_CA", "TWOPC_STOMP_USER", "TWOPC_STOMP_PASSWORD", *SETTING_NAMES)
    env = {k: v for k, v in os.environ.items() if k not in given}
    env["TWOPC_STOMP_TLS"] = "1"
    loaded = Settings.load(env)
    assert loaded.stomp == f"127.0.0.1:{lab.ports.stomp_tls}"
    assert loaded.stomp_ca == str(lab.home / CERTIFICATE)
    assert loaded.stomp_user == lab.credentials().stomp_user
    with open_stomp(loaded) as client:
        assert isinstance(client.tcp_socket, ssl.SSLSocket)
    exported = twopc("lab", "env", env=env).stdout.splitlines()
    assert f"export TWOPC_STOMP=127.0.0.1:{lab.ports.stomp_tls}" in exported
    assert "export TWOPC_STOMP_TLS=1" in exported


def test_client_trusting_another_certificate_is_refused(
    settings: Settings, lab: Lab, tmp_path: Path
) -> None:
    """A client that trusts another self-signed certificate refuses the broker, saying why."""
    other = tmp_path / "other.pem"
    make_self_signed(tmp_path / "other.p12", other, secrets.token_hex(8), name="someone else")
    secure = dataclasses.replace(tls_settings(settings, lab), stomp_ca=str(other))
    with pytest.raises(BrokerTlsRefused) as info:
        open_stomp(secure)
    message = str(info.value)
    assert "certificate" in message and "TWOPC_STOMP_CA" in message
    assert str(other) in message
    with pytest.raises(BrokerTlsRefused):
        open_coordinator(secure, sessions=1)


def test_tls_to_the_plain_connector_is_a_clear_error(settings: Settings) -> None:
    """TLS spoken to the plain STOMP port fails the handshake and names TWOPC_STOMP."""
    with pytest.raises(BrokerTlsRefused) as info:
        open_stomp(dataclasses.replace(settings, stomp_tls=True), connect_timeout=2.0)
    assert "TLS handshake" in str(info.value) and "TWOPC_STOMP" in str(info.value)


# -- files -----------------------------------------------------------------------


def test_state_folder_and_secrets_are_private(lab: Lab, settings: Settings) -> None:
    """The state folder lets nobody else in; credentials, keystore and decision log are 0600."""
    open_coordinator(settings, sessions=1).close()
    home_mode = mode(lab.home)
    if os.geteuid() == 0:  # PostgreSQL runs as the lab user and must pass through
        assert home_mode == 0o710
        assert grp.getgrgid(lab.home.stat().st_gid).gr_name == LAB_USER
    else:
        assert home_mode == 0o700
    assert mode(lab.home / CREDENTIALS_FILE) == 0o600
    assert mode(lab.home / "activemq") == 0o700
    assert mode(lab.home / "activemq" / "broker.p12") == 0o600
    assert mode(lab.home / "activemq" / "conf" / "activemq.xml") == 0o600
    assert mode(settings.log_path) == 0o600
    assert mode(Path(f"{settings.log_path}.lock")) == 0o600


def test_up_tightens_a_loose_state_folder_and_credentials(lab: Lab) -> None:
    """'up' on a state folder and credentials file left readable makes them private again."""
    (lab.home / CREDENTIALS_FILE).chmod(0o644)
    lab.home.chmod(0o755)
    lab.up()
    assert mode(lab.home) & 0o077 in (0, 0o010)
    assert mode(lab.home / CREDENTIALS_FILE) == 0o600


def test_a_shared_folder_is_refused_as_state_folder() -> None:
    """TWOPC_HOME=/tmp (world-writable, sticky) is refused before anything changes."""
    before = mode(Path("/tmp"))
    with pytest.raises(LabError, match="TWOPC_HOME=/tmp "):
        Lab(Path("/tmp")).up()
    assert mode(Path("/tmp")) == before


# -- no secret in any output -------------------------------------------------------


def test_generated_passwords_are_hex() -> None:
    """Every secret the lab generates is hex, so no tool reads one as an option or syntax."""
    for _ in range(200):
        made = Credentials().completed()
        for password in (
            made.stomp_password,
            made.keystore_password,
            made.pg_password,
            made.pg_reader_password,
            made.pg_admin_password,
        ):
            assert len(password) == 48 and all(c in "0123456789abcdef" for c in password)


def test_settings_repr_shows_no_password() -> None:
    """Settings' repr and str mask the passwords of both connection strings and the broker."""
    pg_secret, uri_secret, mq_secret = (secrets.token_hex(8) for _ in range(3))
    settings = Settings(
        home=Path("/nowhere"),
        pg_a=f"host=db user=app password={pg_secret} dbname=a",
        pg_b=f"postgresql://app:{uri_secret}@db:5432/b",
        stomp="mq:61613",
        openwire="mq:61616",
        stomp_user="app",
        stomp_password=mq_secret,
    )
    for text in (repr(settings), str(settings)):
        for secret in (pg_secret, uri_secret, mq_secret):
            assert secret not in text
        assert "host=db" in text and "stomp_user='app'" in text


def test_no_password_in_any_output(settings: Settings, lab: Lab) -> None:
    """Passwords from TWOPC_PG_A/B and TWOPC_STOMP_PASSWORD appear in no output of twopc."""
    pg_secret = lab.credentials().pg_password  # the right one, in the strings themselves
    env = {
        **os.environ,
        "TWOPC_PG_A": f"{settings.pg_a} password={pg_secret}",
        "TWOPC_PG_B": f"{settings.pg_b} password={pg_secret}",
        "TWOPC_LOG_LEVEL": "DEBUG",
    }
    mq_secret = lab.credentials().stomp_password
    outputs = [
        twopc("lab", "status", "--json", env=env),
        twopc("indoubt", "--json", env=env),
        twopc("transfer", "--reset", "--accounts", "20", "--count", "5", "--json", env=env),
        twopc("transfer", "--count", "3", "--accounts", "20", "--strategy", "naive", env=env),
    ]
    wrong = f"wrong-{secrets.token_hex(8)}"
    refused = twopc("recover", env={**env, "TWOPC_STOMP_PASSWORD": wrong})
    assert refused.returncode != 0 and "TWOPC_STOMP_PASSWORD" in refused.stderr
    outputs.append(refused)
    for result in outputs:
        text = result.stdout + result.stderr
        assert pg_secret not in text, result.args
        assert mq_secret not in text, result.args
        assert wrong not in text, result.args
    transfer = outputs[2]
    assert transfer.returncode == 0, transfer.stderr
    assert '"committed": 5' in transfer.stdout
    assert "tpc." in transfer.stderr  # the DEBUG events were there to be searched


def test_no_secret_in_any_log_line_at_debug(
    settings: Settings, lab: Lab, capfd: pytest.CaptureFixture[str]
) -> None:
    """With the root logger and twopc's events at DEBUG, no log line carries a lab password."""
    credentials = lab.credentials()
    passwords = [
        credentials.stomp_password,
        credentials.keystore_password,
        credentials.pg_password,
        credentials.pg_reader_password,
        credentials.pg_admin_password,
    ]
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    before = root.level, logging.getLogger("stomp.py").level, structlog.get_config()
    configure_logging("DEBUG")  # its output goes to this test's captured stderr
    logging.getLogger("stomp.py").setLevel(logging.NOTSET)  # as the root logger says
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    errors = []
    try:
        lab.up()  # the lab's own logins (its superuser's) and status
        with open_coordinator(settings, sessions=1) as coordinator, coordinator.transaction() as tx:
            tx.send(QUEUE, uuid.uuid4().hex, {"test": "log-secrets"})
        with pytest.raises(BrokerLoginRefused) as refused:
            open_stomp(dataclasses.replace(settings, stomp_password=f"x{passwords[0]}"))
        errors.append(str(refused.value))
        with_password = f"{settings.pg_a} password={credentials.pg_password} dbname=nowhere"
        with pytest.raises(Exception) as unreachable:
            open_coordinator(dataclasses.replace(settings, pg_a=with_password), sessions=1)
        errors.append(str(unreachable.value))
    finally:
        root.removeHandler(handler)
        root.setLevel(before[0])
        logging.getLogger("stomp.py").setLevel(before[1])
        structlog.configure(**before[2])  # not this test's stderr, closed once it ends
    assert tx.outcome is Outcome.COMMITTED
    out, err = capfd.readouterr()
    text = "\n".join([captured.getvalue(), out, err, *errors])
    assert "stomp.py DEBUG attempting connection" in text  # stomp.py's DEBUG lines were there
    # Frames (CONNECT with its passcode among them) are written by twopc, not through
    # stomp.py's transmit, so stomp.py never logs one.
    assert "sending frame" not in text
    assert "tpc." in text  # and twopc's DEBUG events
    for password in passwords:
        assert password not in text


# -- PostgreSQL: passwords for everyone, no superuser for twopc -------------------------


def test_the_clusters_let_no_connection_in_without_a_password(lab: Lab) -> None:
    """pg_hba.conf has no trust rule, and a session without the passfile is refused."""
    for service in ("pg-a", "pg-b"):
        hba = lab.home / service / "data" / "pg_hba.conf"
        assert trusting_rules(hba) == []
        assert "scram-sha-256" in hba.read_text()
    for user in ("twopc", DB_ADMIN):
        dsn = f"host=127.0.0.1 port={lab.ports.pg_a} user={user} dbname=postgres"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(dsn, passfile="/nonexistent", connect_timeout=5).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root")
def test_another_os_user_cannot_connect_to_the_labs_postgres(lab: Lab) -> None:
    """User nobody's psql, as twopc or the lab's superuser, is asked for a password and refused."""
    psql = shutil.which("psql")
    assert psql is not None
    address = ["-h", "127.0.0.1", "-p", str(lab.ports.pg_a), "-d", "postgres"]
    for user in ("twopc", DB_ADMIN):
        result = subprocess.run(
            ["runuser", "-u", "nobody", "--", psql, "-w", *address, "-U", user, "-c", "SELECT 1"],
            capture_output=True,
            text=True,
            env={"PATH": os.environ["PATH"], "PGPASSFILE": str(lab.home / PASSFILE)},
            check=False,
        )
        assert result.returncode == 2, result.stdout
        assert "no password supplied" in result.stderr


def test_twopc_is_no_superuser_and_cannot_run_programs(settings: Settings) -> None:
    """The coordinator's role is no superuser: COPY ... TO PROGRAM is permission denied."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            assert row == (False,)
            with pytest.raises(pg_errors.InsufficientPrivilege, match="external program"):
                conn.execute("COPY (SELECT 1) TO PROGRAM 'id'")


def test_twopc_holds_what_fencing_and_cdc_need(settings: Settings) -> None:
    """twopc ends another twopc session, and makes, reads, advances and drops a logical slot."""
    slot = f"security_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.pg_a, autocommit=True) as victim:
        pid = victim.info.backend_pid
        with psycopg.connect(settings.pg_a, autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (
                True,
            )
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            try:
                conn.execute(
                    "SELECT * FROM pg_logical_slot_peek_binary_changes(%s, NULL, 10, "
                    "'proto_version', '1', 'publication_names', 'twopc_cdc')",
                    (slot,),
                )
                conn.execute(
                    "SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (slot,)
                )
            finally:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


@pytest.mark.skipif(os.geteuid() != 0, reason="the lab switches users only when run as root")
def test_broker_runs_as_the_lab_user_not_root(lab: Lab) -> None:
    """The ActiveMQ JVM's real and effective uid are the lab user's, and it owns its files."""
    pid = {s.name: s.pid for s in lab.status()}["activemq"]
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    lab_uid = pwd.getpwnam(LAB_USER).pw_uid
    assert [int(u) for u in uids] == [lab_uid] * 4  # real, effective, saved, filesystem
    for path in ("activemq", "activemq/data", "activemq/conf/activemq.xml", "activemq/broker.p12"):
        assert (lab.home / path).stat().st_uid == lab_uid
