"""The embedded lab: two PostgreSQL clusters (A, B) and one ActiveMQ broker, on 127.0.0.1.

Everything lives in the state folder (``TWOPC_HOME``, default ``./.twopc``)::

    lab.json                 ports chosen at the first ``up``
    pg-a/data, pg-b/data     the clusters (owned by an unprivileged user when run as root)
    pg-a/server.log, ...     their logs
    activemq/conf            broker configuration (STOMP + OpenWire, KahaDB with journal syncs)
    activemq/data            broker persistence
    run/<service>.json       pid and process start time of what ``up`` started

``up`` is idempotent and restarts what died (stale pid files are recognised by
the process start time); ``down`` stops exactly the processes it recorded.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from coordinator.errors import TwoPhaseCommitError
from scenarios.lab import procfs

LAB_USER = "twopc-lab"  # the unprivileged user PostgreSQL runs as when twopc runs as root
DB_USER = "twopc"
DB_NAME = "twopc"
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
SERVICES = (PG_A, PG_B, BROKER)


@dataclass(frozen=True)
class Ports:
    pg_a: int
    pg_b: int
    stomp: int
    openwire: int

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
    )


def pg_dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} user={DB_USER} dbname={DB_NAME} connect_timeout=5"


def lab_settings(home: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The four connection settings that point at the lab in ``home``."""
    ports = resolve_ports(home, env)
    return {
        "TWOPC_PG_A": pg_dsn(ports.pg_a),
        "TWOPC_PG_B": pg_dsn(ports.pg_b),
        "TWOPC_STOMP": f"127.0.0.1:{ports.stomp}",
        "TWOPC_OPENWIRE": f"127.0.0.1:{ports.openwire}",
    }


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


def stomp_connect_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a STOMP CONNECT on host:port gets CONNECTED."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"CONNECT\naccept-version:1.2\nhost:localhost\n\n\x00")
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


def pg_answers(port: int) -> bool:
    """True when the server on ``port`` runs SQL (asked in the always-present 'postgres')."""
    dsn = f"host=127.0.0.1 port={port} user={DB_USER} dbname=postgres connect_timeout=2"
    try:
        with psycopg.connect(dsn) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


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
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:{openwire}"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:{stomp}"/>
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
        return {"TWOPC_HOME": str(self.home), **lab_settings(self.home, self.env)}

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
        """Start what is not running, wait until all three answer; idempotent."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
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

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _service(name: str) -> Service:
        for service in SERVICES:
            if service.name == name:
                return service
        raise LabError(f"unknown lab service {name!r}; known: pg-a, pg-b, activemq")

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
        if service is BROKER:
            return stomp_connect_ok("127.0.0.1", self.ports.stomp, timeout=1.0)
        return pg_answers(self.ports.of(service))

    def _check_ports_free(self, services: list[Service]) -> None:
        checks: list[tuple[int, str, str]] = [
            (self.ports.of(s), s.label, s.port_setting) for s in services
        ]
        if BROKER in services:
            checks.append((self.ports.openwire, "ActiveMQ (OpenWire)", OPENWIRE_SETTING))
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
                [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", LAB_USER],
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
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)  # a half-made cluster from an interrupted initdb
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    DB_USER,
                    "--auth=trust",
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
            if result.returncode != 0:
                raise LabError(f"initdb for {service.label} failed:\n{result.stderr.strip()}")
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

    def _ensure_databases(self) -> None:
        for service in (PG_A, PG_B):
            port = self.ports.of(service)
            dsn = pg_dsn(port).replace(f"dbname={DB_NAME}", "dbname=postgres")
            with psycopg.connect(dsn, autocommit=True) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)
                ).fetchone()
                if not exists:
                    conn.execute(f"CREATE DATABASE {DB_NAME}")

    # ActiveMQ

    def _start_broker(self) -> None:
        java = java_binary()
        jar = activemq_jar()
        base = self.home / "activemq"
        conf = base / "conf"
        data = base / "data"
        conf.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        (conf / "activemq.xml").write_text(
            ACTIVEMQ_XML.replace("{data}", str(data))
            .replace("{stomp}", str(self.ports.stomp))
            .replace("{openwire}", str(self.ports.openwire))
        )
        (conf / "log4j.properties").write_text(LOG4J_PROPERTIES.format(log=base / "activemq.log"))
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
