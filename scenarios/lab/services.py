"""The embedded lab: two PostgreSQL clusters (A, B) and one ActiveMQ broker, on 127.0.0.1.

Everything lives in the state folder (``TWOPC_HOME``, default ``./.twopc``),
laid out as scenarios.lab.layout says. The lab's parts, one module each: its
services and ports (ports), secrets and roles (credentials), the settings it
offers scenarios.config (settings), checks of what runs and answers (probes),
the software it runs (software), the configuration files it writes
(templates), a PostgreSQL cluster's initdb, roles and database (clusters), and
the account the services run as when twopc runs as root (lab_user).

Every connection to the clusters authenticates with a password (SCRAM, host
and local): nobody else on the machine gets in. ``twopc`` is no superuser: it
owns the ``twopc`` database and holds what the coordinator, the relays and CDC
need (REPLICATION, CREATEDB, pg_signal_backend). initdb and the roles are the
work of ``twopc_admin``, a superuser only the lab itself logs in as.

``up`` is idempotent and restarts what died (stale pid files are recognised by
the process start time); ``down`` stops exactly the processes it recorded.
"""

from __future__ import annotations

import atexit
import contextlib
import html
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scenarios.config_values import STOMP_TLS, parse_flag, read_config_file
from scenarios.lab.clusters import ensure_roles, initdb
from scenarios.lab.credentials import (
    DB_USER,
    Credentials,
    passfile_text,
    read_credentials,
    write_private,
)
from scenarios.lab.errors import LabError
from scenarios.lab.lab_user import check_reachable, chown_tree, lab_user
from scenarios.lab.layout import (
    BROKER_XML,
    CERTIFICATE,
    CREDENTIALS_FILE,
    HOME_MODE,
    KEYSTORE,
    PASSFILE,
)
from scenarios.lab.ports import (
    BROKER,
    OPENWIRE_SETTING,
    PG_A,
    PG_B,
    SERVICES,
    STOMP_TLS_SETTING,
    Service,
    ephemeral_hint,
    resolve_ports,
)
from scenarios.lab.probes import (
    PidRecord,
    pg_answers,
    port_free,
    process_start_time,
    stomp_connect_ok,
    trusting_rules,
)
from scenarios.lab.settings import lab_settings
from scenarios.lab.software import (
    ACTIVEMQ_HOME,
    activemq_jar,
    java_binary,
    make_self_signed,
    postgres_bindir,
)
from scenarios.lab.templates import ACTIVEMQ_XML, LOG4J_PROPERTIES, PG_CONF

# -- processes ---------------------------------------------------------------

# The services outlive the command that started them. Their Popen objects are
# kept here so that they are not collected (and warned about) while this
# process runs; zombies are reaped by probes.process_start_time.
_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _leave_the_services_running() -> None:
    """At exit the services this process started keep running, by design: their Popen
    objects are let go without Popen's "still running" ResourceWarning."""
    for proc in _STARTED:
        if proc.poll() is None:
            proc.returncode = 0  # detached on purpose; never waited for by this process
    _STARTED.clear()


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
            ensure_roles(self.ports.of(service), self.credentials())

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
            user = lab_user()
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
                    + ephemeral_hint(port)
                )

    def _port_released(self, port: int, services: list[Service]) -> bool:
        """True when ``port`` is free; waits a little if one of ours just died.

        A JVM killed with -9 is a zombie before all its threads have closed their
        sockets, so its port can stay busy for a moment after the pid is gone.
        """
        if port_free(port):
            return True
        if not any(self._pid_record(s) is not None for s in services):
            return False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if port_free(port):
                return True
        return False

    def _record_ports(self) -> None:
        state = self.home / "lab.json"
        state.write_text(json.dumps({"ports": asdict(self.ports)}, indent=2) + "\n")

    def _write_pid(self, service: Service, pid: int) -> None:
        start = process_start_time(pid)
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

    def _start_postgres(self, service: Service) -> None:
        bindir = postgres_bindir()
        base = self._pg_dir(service)
        data = base / "data"
        user = lab_user()
        base.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
            check_reachable(user, base)
        run_as: dict[str, Any] = (
            {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
        )
        credentials = self.credentials()
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)  # a half-made cluster from an interrupted initdb
            initdb(service, base, bindir, run_as, credentials.pg_admin_password)
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
            ensure_roles(self.ports.of(service), self.credentials())

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
        user = lab_user()
        run_as: dict[str, Any] = {}
        if user is not None:  # the JVM runs as the lab user, never as root
            chown_tree(base, user)
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
