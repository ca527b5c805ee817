"""The embedded lab: two PostgreSQL clusters (A, B) and one ActiveMQ broker, on 127.0.0.1.

Everything lives in the state folder (``TWOPC_HOME``, default ``./.twopc``)::

    lab.json                 ports chosen at the first ``up``
    credentials.json         the broker's user and password, the keystore password, and
                             the PostgreSQL passwords (twopc, twopc_batch_reader, and
                             the lab's own superuser twopc_admin) (0600)
    pgpass                   libpq password file for twopc and twopc_batch_reader (0600);
                             the lab's connection strings name it (``passfile=``) and
                             ``twopc lab env`` exports it as ``PGPASSFILE``
    pg-a/data, pg-b/data     the clusters (owned by an unprivileged user when run as root)
    pg-a/server.log, ...     their logs
    activemq/conf            broker configuration (STOMP, STOMP+TLS and OpenWire, each
                             requiring the login; KahaDB with journal syncs)
    activemq/broker.p12      the broker's key and self-signed certificate (keytool)
    activemq/broker-cert.pem that certificate, for clients to trust (TWOPC_STOMP_CA)
    activemq/data            broker persistence
    run/<service>.json       pid and process start time of what ``up`` started

The state folder is 0700, the activemq folder too, and credentials.json 0600.
When twopc runs as root, PostgreSQL and the broker run as ``twopc-lab`` and must
traverse the state folder to reach their files: the folder is then 0710 with
group ``twopc-lab`` -- that user may pass through it, nobody else may even do
that, and only root reads or lists it. The clusters' folders and the activemq
folder belong to ``twopc-lab``; credentials.json and pgpass stay root's.

Every connection to the clusters authenticates with a password (SCRAM, host
and local): nobody else on the machine gets in. ``twopc`` is no superuser: it
owns the ``twopc`` database and holds what the coordinator, the relays and CDC
need (REPLICATION, CREATEDB, pg_signal_backend). initdb and the roles are the
work of ``twopc_admin``, a superuser only the lab itself logs in as.

``up`` is idempotent and restarts what died (stale pid files are recognised by
the process start time); ``down`` stops exactly the processes it recorded.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import html
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from coordinator.errors import TwoPhaseCommitError
from scenarios.config_values import (
    BROKER_CONFIG,
    PGPASSFILE,
    STOMP_CA,
    STOMP_PASSWORD,
    STOMP_TLS,
    STOMP_TLS_ADDRESS,
    STOMP_USER,
    parse_flag,
    read_config_file,
)
from scenarios.lab import procfs

LAB_USER = "twopc-lab"  # the unprivileged user the services run as when twopc runs as root
DB_USER = "twopc"
DB_NAME = "twopc"
DB_ADMIN = "twopc_admin"  # the clusters' superuser: initdb, roles, databases; the lab only
READER_USER = "twopc_batch_reader"  # the batch job's read-only role (scenarios.transfer.schema)
PASSFILE = "pgpass"
ACTIVEMQ_JAR = Path("/usr/share/activemq/bin/activemq.jar")
ACTIVEMQ_HOME = Path("/usr/share/activemq")


class LabError(TwoPhaseCommitError):
    """The lab cannot start or stop; the message says what to do."""


@dataclass(frozen=True)
class Service:
    """One lab service: its name, the setting that moves its port, its default port."""

    name: str
    port_setting: str
    default_port: int
    label: str


PG_A = Service("pg-a", "TWOPC_LAB_PG_A_PORT", 25432, "PostgreSQL A")
PG_B = Service("pg-b", "TWOPC_LAB_PG_B_PORT", 25433, "PostgreSQL B")
BROKER = Service("activemq", "TWOPC_LAB_STOMP_PORT", 26613, "ActiveMQ (STOMP)")
OPENWIRE_SETTING = "TWOPC_LAB_OPENWIRE_PORT"
OPENWIRE_DEFAULT = 26616
STOMP_TLS_SETTING = "TWOPC_LAB_STOMP_TLS_PORT"
STOMP_TLS_DEFAULT = 26614
SERVICES = (PG_A, PG_B, BROKER)

HOME_MODE = 0o700  # the state folder; 0710 with group twopc-lab when run as root
CREDENTIALS_FILE = "credentials.json"
BROKER_XML = "activemq/conf/activemq.xml"  # the broker's configuration, in the state folder
KEYSTORE = "activemq/broker.p12"
CERTIFICATE = "activemq/broker-cert.pem"


@dataclass(frozen=True)
class Ports:
    pg_a: int
    pg_b: int
    stomp: int
    openwire: int
    stomp_tls: int = STOMP_TLS_DEFAULT

    def of(self, service: Service) -> int:
        return {"pg-a": self.pg_a, "pg-b": self.pg_b, "activemq": self.stomp}[service.name]


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise LabError(f"{name}={value!r} is not a TCP port number (1-65535)")
    return int(value)


def resolve_ports(home: Path, env: Mapping[str, str]) -> Ports:
    """Ports from the environment, else those recorded in lab.json, else the defaults."""
    recorded: dict[str, int] = {}
    state = home / "lab.json"
    if state.exists():
        with contextlib.suppress(ValueError, OSError):
            recorded = json.loads(state.read_text()).get("ports", {})
    return Ports(
        pg_a=_env_port(env, PG_A.port_setting, recorded.get("pg_a", PG_A.default_port)),
        pg_b=_env_port(env, PG_B.port_setting, recorded.get("pg_b", PG_B.default_port)),
        stomp=_env_port(env, BROKER.port_setting, recorded.get("stomp", BROKER.default_port)),
        openwire=_env_port(env, OPENWIRE_SETTING, recorded.get("openwire", OPENWIRE_DEFAULT)),
        stomp_tls=_env_port(env, STOMP_TLS_SETTING, recorded.get("stomp_tls", STOMP_TLS_DEFAULT)),
    )


def pg_dsn(port: int, home: Path, *, dbname: str = DB_NAME, timeout: int = 5) -> str:
    """The lab's connection string as ``twopc``: the password comes from the lab's
    passfile (never in the string itself, so never in ps, logs or messages)."""
    return psycopg.conninfo.make_conninfo(
        host="127.0.0.1",
        port=str(port),
        user=DB_USER,
        dbname=dbname,
        passfile=str(home / PASSFILE),
        connect_timeout=str(timeout),
    )


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Credentials:
    """The secrets ``up`` generates: the broker's one user, the keystore's password, and
    the PostgreSQL roles' passwords (``twopc``, the batch reader, the lab's superuser)."""

    stomp_user: str = ""
    stomp_password: str = field(default="", repr=False)
    keystore_password: str = field(default="", repr=False)
    pg_password: str = field(default="", repr=False)
    pg_reader_password: str = field(default="", repr=False)
    pg_admin_password: str = field(default="", repr=False)

    @property
    def has_broker_login(self) -> bool:
        return bool(self.stomp_user and self.stomp_password and self.keystore_password)

    def completed(self) -> Credentials:
        """These credentials with whatever is missing generated (an older lab's file lacks
        the PostgreSQL passwords, or the broker's login: that is made anew as a whole)."""
        broker = (
            self
            if self.has_broker_login
            else replace(
                self,
                stomp_user=f"twopc-{secrets.token_hex(3)}",
                stomp_password=_password(),
                keystore_password=_password(),
            )
        )
        return replace(
            broker,
            pg_password=self.pg_password or _password(),
            pg_reader_password=self.pg_reader_password or _password(),
            pg_admin_password=self.pg_admin_password or _password(),
        )


def read_credentials(home: Path) -> Credentials | None:
    """The lab's credentials, or None before the first ``up``.

    What an older lab's file lacks is empty (``up`` adds it).
    """
    try:
        data = json.loads((home / CREDENTIALS_FILE).read_text())
        names = [f.name for f in fields(Credentials)]
        return Credentials(**{name: str(data.get(name) or "") for name in names})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def passfile_text(credentials: Credentials) -> str:
    """The libpq password file: the lab's two client roles on 127.0.0.1, any port/database."""
    return "".join(
        f"127.0.0.1:*:*:{user}:{password}\n"
        for user, password in (
            (DB_USER, credentials.pg_password),
            (READER_USER, credentials.pg_reader_password),
        )
    )


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in a file only its owner may read (0600), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)


def lab_settings(home: Path, env: Mapping[str, str], *, tls: bool | None = None) -> dict[str, str]:
    """The connection settings that point at the lab in ``home``.

    The four addresses; ``TWOPC_STOMP_TLS_ADDRESS`` (the TLS connector); once
    ``up`` made them, the login (``TWOPC_STOMP_USER``, ``TWOPC_STOMP_PASSWORD``),
    the certificate to trust (``TWOPC_STOMP_CA``) and the PostgreSQL password
    file (``PGPASSFILE``, which the two connection strings also name). With ``tls`` (default:
    ``TWOPC_STOMP_TLS`` of ``env``), ``TWOPC_STOMP`` is the TLS connector.
    """
    if tls is None:
        tls = parse_flag(env.get(STOMP_TLS), STOMP_TLS)
    ports = resolve_ports(home, env)
    tls_address = f"127.0.0.1:{ports.stomp_tls}"
    values = {
        "TWOPC_PG_A": pg_dsn(ports.pg_a, home),
        "TWOPC_PG_B": pg_dsn(ports.pg_b, home),
        "TWOPC_STOMP": tls_address if tls else f"127.0.0.1:{ports.stomp}",
        "TWOPC_OPENWIRE": f"127.0.0.1:{ports.openwire}",
        STOMP_TLS_ADDRESS: tls_address,
    }
    if tls:
        values[STOMP_TLS] = "1"
    credentials = read_credentials(home)
    if credentials is not None:
        values[STOMP_USER] = credentials.stomp_user
        values[STOMP_PASSWORD] = credentials.stomp_password
    if (home / PASSFILE).exists():  # for psql and other libpq clients: psql -h 127.0.0.1 ...
        values[PGPASSFILE] = str(home / PASSFILE)
    if (home / CERTIFICATE).exists():
        values[STOMP_CA] = str(home / CERTIFICATE)
    if (home / BROKER_XML).exists():
        values[BROKER_CONFIG] = str(home / BROKER_XML)
    return values


# -- processes ---------------------------------------------------------------

# The services outlive the command that started them. Their Popen objects are
# kept here so that they are not collected (and warned about) while this
# process runs; zombies are reaped by _start_time.
_STARTED: list[subprocess.Popen[bytes]] = []


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/pid/stat), None if gone."""
    fields = procfs.stat_fields(pid)
    if fields is None:
        return None
    if fields[0] == "Z":  # a zombie is dead; reap it if it is our child
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return None
    return int(fields[19])


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_time: int

    def alive(self) -> bool:
        return _start_time(self.pid) == self.start_time


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the servers use it: TIME_WAIT leftovers do not block a
        # restart, a listening socket still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def stomp_connect_ok(
    host: str,
    port: int,
    timeout: float = 2.0,
    *,
    login: str | None = None,
    passcode: str | None = None,
) -> bool:
    """True when a STOMP CONNECT on host:port (with ``login``, if given) gets CONNECTED."""
    frame = "CONNECT\naccept-version:1.2\nhost:localhost\n"
    if login is not None:
        frame += f"login:{login}\npasscode:{passcode or ''}\n"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(frame.encode() + b"\n\x00")
            data = b""
            while b"\x00" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"DISCONNECT\n\n\x00")
            return data.startswith(b"CONNECTED")
    except OSError:
        return False


def admin_connect(port: int, password: str, *, timeout: int = 2) -> psycopg.Connection[Any]:
    """An autocommit session as the lab's superuser, in the always-present 'postgres'.

    The password goes to libpq as a keyword: it is in no connection string that a
    message or a log could show.
    """
    dsn = f"host=127.0.0.1 port={port} user={DB_ADMIN} dbname=postgres connect_timeout={timeout}"
    return psycopg.connect(dsn, password=password, autocommit=True)


def pg_answers(port: int, admin_password: str) -> bool:
    """True when the server on ``port`` runs SQL for the lab's superuser."""
    try:
        with admin_connect(port, admin_password) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def trusting_rules(hba: Path) -> list[str]:
    """The lines of a pg_hba.conf that let a connection in without a password."""
    try:
        lines = hba.read_text().splitlines()
    except OSError:
        return []
    rules = [line.split("#", 1)[0].split() for line in lines]
    return [" ".join(rule) for rule in rules if "trust" in rule]


# -- binaries ----------------------------------------------------------------


def _install_hint(package: str) -> str:
    if os.geteuid() == 0:
        return f"apt-get install -y {package}"
    return f"sudo apt-get install -y {package}"


def postgres_bindir() -> Path:
    """The directory holding ``postgres`` and ``initdb`` (TWOPC_PG_BINDIR overrides)."""
    override = os.environ.get("TWOPC_PG_BINDIR")
    candidates = [Path(override)] if override else _installed_pg_bindirs()
    for directory in candidates:
        if (directory / "postgres").exists() and (directory / "initdb").exists():
            return directory
    raise LabError(
        "PostgreSQL server binaries (postgres, initdb) not found"
        + (f" in TWOPC_PG_BINDIR={override}" if override else "")
        + f". Install them with: {_install_hint('postgresql')}"
    )


def _installed_pg_bindirs() -> list[Path]:
    """Debian's versioned bin directories, newest first, then whatever PATH has."""
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates = [Path(v) for v in versions]
    found = shutil.which("postgres")
    if found:
        candidates.append(Path(found).resolve().parent)
    return candidates


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise LabError(
            f"Java is not installed (ActiveMQ needs it). Install it with: "
            f"{_install_hint('default-jre-headless')}"
        )
    return java


def keytool_binary() -> str:
    """The JDK's keytool: next to the java that runs the broker, else on PATH."""
    beside = Path(java_binary()).resolve().parent / "keytool"
    if beside.exists():
        return str(beside)
    found = shutil.which("keytool")
    if found is None:
        raise LabError(
            "keytool (the JDK's key tool, which makes the broker's TLS certificate) is not "
            f"installed. Install it with: {_install_hint('default-jre-headless')}"
        )
    return found


def make_self_signed(keystore: Path, certificate: Path, password: str, *, name: str) -> None:
    """A key and self-signed certificate for 127.0.0.1/localhost in a PKCS12 ``keystore``,
    and the certificate in PEM at ``certificate``; made with keytool."""
    keytool = keytool_binary()
    keystore.unlink(missing_ok=True)
    env = {**os.environ, "TWOPC_KEYSTORE_PASSWORD": password}  # not on the command line
    common = ["-keystore", str(keystore), "-storetype", "PKCS12", "-alias", "broker"]
    common += ["-storepass:env", "TWOPC_KEYSTORE_PASSWORD"]
    steps = [
        [
            keytool,
            "-genkeypair",
            *common,
            "-keypass:env",
            "TWOPC_KEYSTORE_PASSWORD",
            "-keyalg",
            "EC",
            "-groupname",
            "secp256r1",
            "-validity",
            "3650",
            "-dname",
            f"CN={name}",
            "-ext",
            "SAN=IP:127.0.0.1,DNS:localhost",
            "-noprompt",
        ],
        [keytool, "-exportcert", "-rfc", *common, "-file", str(certificate)],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise LabError(
                f"keytool could not make the broker's TLS key and certificate "
                f"({keystore}): {(result.stdout + result.stderr).strip()}"
            )
    os.chmod(keystore, 0o600)


def activemq_jar() -> Path:
    jar = Path(os.environ.get("TWOPC_ACTIVEMQ_JAR") or ACTIVEMQ_JAR)
    if not jar.exists():
        raise LabError(
            f"ActiveMQ is not installed ({jar} is missing). Install it with: "
            f"{_install_hint('activemq')} (or set TWOPC_ACTIVEMQ_JAR)"
        )
    return jar


# -- the lab -----------------------------------------------------------------

ACTIVEMQ_XML = """<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans
    http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
    http://activemq.apache.org/schema/core
    http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="twopc-lab"
          useJmx="false" persistent="true" dataDirectory="{data}">
    <destinationPolicy>
      <policyMap><policyEntries>
        <!-- a browse returns at most maxBrowsePageSize messages (default 400) -->
        <policyEntry queue=">" producerFlowControl="false" maxBrowsePageSize="1000000"/>
      </policyEntries></policyMap>
    </destinationPolicy>
    <persistenceAdapter>
      <!-- journalDiskSyncStrategy="always": a COMMIT receipt means the journal is on disk -->
      <kahaDB directory="{data}/kahadb" journalDiskSyncStrategy="always"/>
    </persistenceAdapter>
    <systemUsage><systemUsage>
      <storeUsage><storeUsage limit="4 gb"/></storeUsage>
      <tempUsage><tempUsage limit="1 gb"/></tempUsage>
    </systemUsage></systemUsage>
    <plugins>
      <!-- every connector, OpenWire included, and the broker's own vm:// connections
           need this login: there is no anonymous access -->
      <simpleAuthenticationPlugin anonymousAccessAllowed="false">
        <users>
          <authenticationUser username="{user}" password="{password}" groups="users,admins"/>
        </users>
      </simpleAuthenticationPlugin>
    </plugins>
    <sslContext>
      <sslContext keyStore="{keystore}" keyStorePassword="{keystore_password}"
                  keyStoreType="PKCS12"/>
    </sslContext>
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp}"/>
      <transportConnector name="stomp+ssl" uri="stomp+ssl://127.0.0.1:{stomp_tls}"/>
    </transportConnectors>
  </broker>
</beans>
"""

LOG4J_PROPERTIES = """log4j.rootLogger=INFO, file
log4j.logger.org.apache.activemq.spring=WARN
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=10MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%d %-5p [%t] %c - %m%n
"""

PG_CONF = """
# twopc lab settings
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
max_connections = 200
max_prepared_transactions = 200
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 128MB
logging_collector = off
log_min_messages = warning
"""


@dataclass
class ServiceStatus:
    name: str
    label: str
    port: int
    pid: int | None
    state: str  # "up", "down", "starting", "not answering"


class Lab:
    """The embedded services in one state folder."""

    def __init__(self, home: Path, env: Mapping[str, str] | None = None) -> None:
        self.home = home.resolve()
        self.env = dict(os.environ if env is None else env)
        self.ports = resolve_ports(self.home, self.env)
        self.run_dir = self.home / "run"

    # -- public -----------------------------------------------------------

    def settings_env(self) -> dict[str, str]:
        """What ``twopc lab env`` exports (the password included: it is the point).

        ``TWOPC_STOMP_TLS=1`` in the environment or the config file makes
        ``TWOPC_STOMP`` the TLS connector.
        """
        config = Path(self.env.get("TWOPC_CONFIG") or self.home / "twopc.conf")
        tls = parse_flag(
            self.env.get(STOMP_TLS) or read_config_file(config).get(STOMP_TLS), STOMP_TLS
        )
        return {"TWOPC_HOME": str(self.home), **lab_settings(self.home, self.env, tls=tls)}

    def status(self) -> list[ServiceStatus]:
        result = []
        for service in SERVICES:
            record = self._pid_record(service)
            pid = record.pid if record and record.alive() else None
            port = self.ports.of(service)
            if pid is None:
                state = "down"
            elif self._answers(service):
                state = "up"
            else:
                state = "not answering"
            result.append(ServiceStatus(service.name, service.label, port, pid, state))
        return result

    def up(self, timeout: float = 120.0) -> list[ServiceStatus]:
        """Start what is not running, wait until all three answer; idempotent.

        Makes the broker's credentials, key and certificate if missing (a lab
        from before they existed is upgraded), and restarts a running broker
        whose configuration changed.
        """
        self._prepare_home()
        for service in (PG_A, PG_B):
            self._refuse_trusting_cluster(service)
        self.run_dir.mkdir(exist_ok=True)
        if self._write_broker_files() and self._running(BROKER):
            self._stop(BROKER, timeout=60)  # started with an older configuration
        to_start = [s for s in SERVICES if not self._running(s)]
        self._check_ports_free(to_start)
        self._record_ports()
        started: list[Service] = []
        try:
            for service in to_start:
                self._start(service)
                started.append(service)
            deadline = time.monotonic() + timeout
            for service in SERVICES:
                self._wait_ready(service, deadline)
            self._ensure_databases()
        except BaseException:
            for service in started:
                self._stop(service, timeout=20)
            raise
        return self.status()

    def down(self, timeout: float = 60.0) -> list[str]:
        """Stop exactly what ``up`` started (by recorded pid); return the names stopped."""
        stopped = []
        for service in SERVICES:
            if self._stop(service, timeout=timeout):
                stopped.append(service.name)
        return stopped

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to a service's main process (fault injection); return its pid."""
        service = self._service(name)
        record = self._pid_record(service)
        if record is None or not record.alive():
            raise LabError(f"{service.label} is not running")
        os.kill(record.pid, sig)
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 10
            while record.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        return record.pid

    def stop_service(self, name: str, timeout: float = 60.0, *, immediate: bool = False) -> None:
        """Stop one service (PostgreSQL: fast shutdown, or immediate with ``immediate``)."""
        self._stop(self._service(name), timeout=timeout, immediate=immediate)

    def start_service(self, name: str, timeout: float = 120.0) -> None:
        """Start one service if it is not running and wait until it answers."""
        service = self._service(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self._running(service):
            self._check_ports_free([service])
            self._start(service)
        self._wait_ready(service, time.monotonic() + timeout)
        if service is not BROKER:
            self._ensure_roles(service)

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _service(name: str) -> Service:
        for service in SERVICES:
            if service.name == name:
                return service
        raise LabError(f"unknown lab service {name!r}; known: pg-a, pg-b, activemq")

    def _prepare_home(self) -> None:
        """Create the state folder or tighten it: 0700, or 0710 for the lab user's group."""
        try:
            if self.home.exists():
                mode = self.home.stat().st_mode
                if mode & (stat.S_IWOTH | stat.S_ISVTX):
                    raise LabError(
                        f"TWOPC_HOME={self.home} is a folder every user may write to; the lab "
                        "keeps secrets in its state folder and makes it private. Set "
                        "TWOPC_HOME to a folder of its own (e.g. /var/tmp/twopc)"
                    )
            else:
                self.home.mkdir(parents=True, mode=HOME_MODE)
            user = self._lab_user()
            if user is None:
                self.home.chmod(HOME_MODE)
            else:
                os.chown(self.home, -1, user.pw_gid)
                self.home.chmod(HOME_MODE | stat.S_IXGRP)
        except OSError as exc:
            raise LabError(
                f"cannot make the state folder {self.home} private ({exc}); set TWOPC_HOME "
                "to a folder you own"
            ) from exc

    def credentials(self) -> Credentials:
        """The lab's credentials, generated (0600) if the state folder has none yet.

        A file from before the PostgreSQL passwords gets them added (the broker's
        login is kept). The passfile is (re)written from them.
        """
        existing = read_credentials(self.home)
        path = self.home / CREDENTIALS_FILE
        if not (existing and existing.pg_admin_password):
            self._refuse_unreachable_clusters()
        credentials = (existing or Credentials()).completed()
        if existing is None or not existing.has_broker_login:
            # A keystore left from other credentials cannot be opened with the new password.
            for leftover in (KEYSTORE, CERTIFICATE):
                (self.home / leftover).unlink(missing_ok=True)
        if credentials != existing:
            write_private(path, json.dumps(asdict(credentials), indent=2) + "\n")
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)
        passfile = self.home / PASSFILE
        text = passfile_text(credentials)
        try:
            current = passfile.read_text() if not passfile.stat().st_mode & 0o077 else None
        except OSError:
            current = None
        if current != text:
            write_private(passfile, text)
        return credentials

    def _write_broker_files(self) -> bool:
        """Credentials, keystore, certificate and activemq.xml; True if the XML changed."""
        credentials = self.credentials()
        base = self.home / "activemq"
        conf = base / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        base.chmod(0o700)
        keystore, certificate = self.home / KEYSTORE, self.home / CERTIFICATE
        if not (keystore.exists() and certificate.exists()):
            make_self_signed(
                keystore, certificate, credentials.keystore_password, name="twopc lab broker"
            )
        values = {
            "{data}": str(base / "data"),
            "{stomp}": str(self.ports.stomp),
            "{stomp_tls}": str(self.ports.stomp_tls),
            "{openwire}": str(self.ports.openwire),
            "{user}": credentials.stomp_user,
            "{password}": credentials.stomp_password,
            "{keystore}": str(keystore),
            "{keystore_password}": credentials.keystore_password,
        }
        xml = ACTIVEMQ_XML
        for placeholder, value in values.items():
            xml = xml.replace(placeholder, html.escape(value))
        path = self.home / BROKER_XML
        with contextlib.suppress(OSError):
            if path.read_text() == xml:
                return False
        write_private(path, xml)
        return True

    def _pid_file(self, service: Service) -> Path:
        return self.run_dir / f"{service.name}.json"

    def _pid_record(self, service: Service) -> PidRecord | None:
        try:
            data = json.loads(self._pid_file(service).read_text())
            return PidRecord(int(data["pid"]), int(data["start_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _running(self, service: Service) -> bool:
        record = self._pid_record(service)
        return record is not None and record.alive()

    def _answers(self, service: Service) -> bool:
        credentials = read_credentials(self.home)
        if service is BROKER:
            return stomp_connect_ok(
                "127.0.0.1",
                self.ports.stomp,
                timeout=1.0,
                login=credentials.stomp_user if credentials else None,
                passcode=credentials.stomp_password if credentials else None,
            )
        if credentials is None or not credentials.pg_admin_password:
            return False
        return pg_answers(self.ports.of(service), credentials.pg_admin_password)

    def _check_ports_free(self, services: list[Service]) -> None:
        checks: list[tuple[int, str, str]] = [
            (self.ports.of(s), s.label, s.port_setting) for s in services
        ]
        if BROKER in services:
            checks.append((self.ports.openwire, "ActiveMQ (OpenWire)", OPENWIRE_SETTING))
            checks.append((self.ports.stomp_tls, "ActiveMQ (STOMP+TLS)", STOMP_TLS_SETTING))
        seen: dict[int, str] = {}
        for port, label, setting in checks:
            if port in seen:
                raise LabError(
                    f"port {port} is configured for both {seen[port]} and {label}; "
                    f"set {setting} to another port"
                )
            seen[port] = label
            if not self._port_released(port, services):
                raise LabError(
                    f"port {port} for {label} is already in use by another program; "
                    f"set {setting} to a free port (then 'twopc lab up'), or stop that program"
                )

    def _port_released(self, port: int, services: list[Service]) -> bool:
        """True when ``port`` is free; waits a little if one of ours just died.

        A JVM killed with -9 is a zombie before all its threads have closed their
        sockets, so its port can stay busy for a moment after the pid is gone.
        """
        if _port_free(port):
            return True
        if not any(self._pid_record(s) is not None for s in services):
            return False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if _port_free(port):
                return True
        return False

    def _record_ports(self) -> None:
        state = self.home / "lab.json"
        state.write_text(json.dumps({"ports": asdict(self.ports)}, indent=2) + "\n")

    def _write_pid(self, service: Service, pid: int) -> None:
        start = _start_time(pid)
        if start is None:
            raise LabError(f"{service.label} exited right after it was started; see its log")
        tmp = self._pid_file(service).with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "start_time": start}))
        tmp.replace(self._pid_file(service))

    def _start(self, service: Service) -> None:
        stale = self._pid_record(service)
        if stale is not None:
            # A service killed with -9 can leave children (PostgreSQL backends) in its
            # process group; they must go before a new server can take the data dir.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(stale.pid, signal.SIGKILL)
            self._pid_file(service).unlink(missing_ok=True)
        if service is BROKER:
            self._start_broker()
        else:
            self._start_postgres(service)

    # PostgreSQL

    def _pg_dir(self, service: Service) -> Path:
        return self.home / service.name

    def _lab_user(self) -> pwd.struct_passwd | None:
        """None when not root; else the unprivileged user the clusters run as."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(LAB_USER)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",  # its own group: the one the state folder lets through
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    LAB_USER,
                ],
                check=True,
                capture_output=True,
            )
            return pwd.getpwnam(LAB_USER)

    def _check_reachable(self, user: pwd.struct_passwd, path: Path) -> None:
        probe = subprocess.run(
            ["test", "-x", str(path)], user=user.pw_uid, group=user.pw_gid, check=False
        )
        if probe.returncode != 0:
            raise LabError(
                f"PostgreSQL refuses to run as root, so the lab runs it as '{LAB_USER}', "
                f"who cannot reach {path}. Set TWOPC_HOME to a folder every user can "
                "traverse (e.g. /var/tmp/twopc) or make its parents world-executable."
            )

    def _start_postgres(self, service: Service) -> None:
        bindir = postgres_bindir()
        base = self._pg_dir(service)
        data = base / "data"
        user = self._lab_user()
        base.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
            self._check_reachable(user, base)
        run_as: dict[str, Any] = (
            {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        )
        credentials = self.credentials()
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)  # a half-made cluster from an interrupted initdb
            self._initdb(service, bindir, run_as, credentials.pg_admin_password)
        self._refuse_trusting_cluster(service)
        conf = data / "postgresql.auto.conf"
        conf.write_text(PG_CONF.format(port=self.ports.of(service)))
        if user is not None:
            os.chown(conf, user.pw_uid, user.pw_gid)
        stale_pid = data / "postmaster.pid"
        stale_pid.unlink(missing_ok=True)  # we only get here when its owner is dead
        log = open(base / "server.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=base,
                start_new_session=True,
                **run_as,
            )
        finally:
            log.close()
        _STARTED.append(proc)
        self._write_pid(service, proc.pid)

    def _initdb(
        self, service: Service, bindir: Path, run_as: Mapping[str, Any], password: str
    ) -> None:
        """A new cluster whose superuser is the lab's own, every login by password (SCRAM)."""
        base = self._pg_dir(service)
        pwfile = base / ".initdb-password"
        write_private(pwfile, password + "\n")  # read by initdb: not on its command line
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        try:
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(base / "data"),
                    "-U",
                    DB_ADMIN,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",  # host and local alike: no trust, no peer
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                cwd=base,
                check=False,
                **run_as,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise LabError(f"initdb for {service.label} failed:\n{result.stderr.strip()}")

    def _refuse_unreachable_clusters(self) -> None:
        """Clusters whose superuser's password is lost with credentials.json are refused."""
        for service in (PG_A, PG_B):
            data = self._pg_dir(service) / "data"
            if (data / "PG_VERSION").exists() and not trusting_rules(data / "pg_hba.conf"):
                raise LabError(
                    f"{self.home / CREDENTIALS_FILE} has no password for the superuser of "
                    f"{service.label}'s cluster in {data}, which asks for one: the lab cannot "
                    f"log in to it. Run 'twopc lab down', then 'rm -rf {self._pg_dir(PG_A)} "
                    f"{self._pg_dir(PG_B)}', then 'twopc lab up' to make new clusters"
                )

    def _refuse_trusting_cluster(self, service: Service) -> None:
        """An older lab's cluster (trust, ``twopc`` a superuser) cannot be fixed in place."""
        data = self._pg_dir(service) / "data"
        if (data / "PG_VERSION").exists() and trusting_rules(data / "pg_hba.conf"):
            raise LabError(
                f"{service.label}'s cluster in {data} was made by an older lab: it lets every "
                f"local connection in without a password and its '{DB_USER}' is a superuser, "
                "which cannot be changed in place. Its data is the lab's test data: run "
                f"'twopc lab down', then 'rm -rf {self._pg_dir(PG_A)} {self._pg_dir(PG_B)}', "
                "then 'twopc lab up' to make new clusters with passwords"
            )

    def _ensure_databases(self) -> None:
        for service in (PG_A, PG_B):
            self._ensure_roles(service)

    def _ensure_roles(self, service: Service) -> None:
        """``twopc`` (no superuser; what twopc needs), the batch reader, the database.

        Run as the lab's superuser at every start: passwords follow credentials.json.
        The passwords reach the server as SCRAM verifiers made here, never in clear.
        """
        credentials = self.credentials()
        with admin_connect(self.ports.of(service), credentials.pg_admin_password) as conn:

            def verifier(user: str, password: str) -> sql.Literal:
                hashed = conn.pgconn.encrypt_password(
                    password.encode(), user.encode(), b"scram-sha-256"
                )
                return sql.Literal(hashed.decode())

            roles = (
                (DB_USER, credentials.pg_password, "NOSUPERUSER REPLICATION CREATEDB"),
                (READER_USER, credentials.pg_reader_password, "NOSUPERUSER"),
            )
            for user, password, attributes in roles:
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)
                ).fetchone()
                verb = sql.SQL("ALTER" if exists else "CREATE")
                conn.execute(
                    sql.SQL("{} ROLE {} WITH LOGIN {} PASSWORD {}").format(
                        verb,
                        sql.Identifier(user),
                        sql.SQL(attributes),
                        verifier(user, password),
                    )
                )
            # Fencing ends a dead peer's sessions (pg_terminate_backend).
            conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(DB_USER)))
            conn.execute(
                sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(READER_USER)
                )
            )
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(DB_NAME), sql.Identifier(DB_USER)
                    )
                )

    # ActiveMQ

    def _start_broker(self) -> None:
        java = java_binary()
        jar = activemq_jar()
        base = self.home / "activemq"
        conf = base / "conf"
        data = base / "data"
        self._write_broker_files()
        data.mkdir(parents=True, exist_ok=True)
        (conf / "log4j.properties").write_text(LOG4J_PROPERTIES.format(log=base / "activemq.log"))
        user = self._lab_user()
        run_as: dict[str, Any] = {}
        if user is not None:  # the JVM runs as the lab user, never as root
            _chown_tree(base, user)
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        command = [
            java,
            "-Xms64m",
            "-Xmx512m",
            "-Djava.awt.headless=true",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={base}",
            f"-Dactivemq.conf={conf}",
            f"-Dactivemq.data={data}",
            f"-Dlog4j.configuration=file:{conf / 'log4j.properties'}",
            "-jar",
            str(jar),
            "start",
            f"xbean:file:{conf / 'activemq.xml'}",
        ]
        log = open(base / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=base,
                start_new_session=True,
                **run_as,
            )
        finally:
            log.close()
        _STARTED.append(proc)
        self._write_pid(BROKER, proc.pid)

    # waiting and stopping

    def _log_tail(self, service: Service) -> str:
        path = (
            self.home / "activemq" / "stdout.log"
            if service is BROKER
            else self._pg_dir(service) / "server.log"
        )
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return "(no log)"

    def _wait_ready(self, service: Service, deadline: float) -> None:
        while True:
            if not self._running(service):
                raise LabError(
                    f"{service.label} exited while starting; its log ends with:\n"
                    f"{self._log_tail(service)}"
                )
            if self._answers(service):
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{service.label} did not answer on port {self.ports.of(service)} in time; "
                    f"its log ends with:\n{self._log_tail(service)}"
                )
            time.sleep(0.2)

    def _stop(self, service: Service, timeout: float, *, immediate: bool = False) -> bool:
        record = self._pid_record(service)
        if record is None:
            return False
        if record.alive():
            if service is BROKER:
                sig = signal.SIGTERM
            else:  # SIGINT: fast shutdown; SIGQUIT: immediate (crash-like) shutdown
                sig = signal.SIGQUIT if immediate else signal.SIGINT
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, sig)
            deadline = time.monotonic() + timeout
            while record.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if record.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
        # Whatever is left in its process group (PostgreSQL backends) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while record.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pid_file(service).unlink(missing_ok=True)
        return True


def _chown_tree(root: Path, user: pwd.struct_passwd) -> None:
    """Give ``root`` and everything under it to ``user`` (what is theirs already is skipped)."""
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if (info.st_uid, info.st_gid) != (user.pw_uid, user.pw_gid):
            os.lchown(path, user.pw_uid, user.pw_gid)


def processes_of(home: Path) -> Iterator[int]:
    """Pids of live processes whose command line mentions ``home`` (for leak checks)."""
    marker = str(home.resolve()).encode()
    me = os.getpid()
    for pid in procfs.pids():
        if pid == me:
            continue
        command = procfs.cmdline(pid)
        fields = procfs.stat_fields(pid)
        if command is None or fields is None:
            continue
        if marker in command and fields[0] != "Z":
            yield pid
