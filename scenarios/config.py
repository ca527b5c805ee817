"""Connection settings: one place that reads them, from the environment, a file, or the lab.

Every component takes its connections from four settings::

    TWOPC_PG_A       libpq connection string of database A
    TWOPC_PG_B       libpq connection string of database B
    TWOPC_STOMP      host:port of the broker's STOMP connector
    TWOPC_OPENWIRE   host:port of the broker's OpenWire connector

where the coordinator keeps its decisions (docs/design.md §1)::

    TWOPC_DECISIONS              file (default: $TWOPC_HOME/decisions.log) or postgres
                                 (no local state: the markers, and decision rows in the
                                 commit-markable database; liveness locks; peer recovery)
    TWOPC_DECISION_PARTICIPANT   the commit-markable database in postgres mode: a (default) or b

and how to talk to the broker::

    TWOPC_STOMP_USER, TWOPC_STOMP_PASSWORD   the broker login (unset: no login)
    TWOPC_STOMP_TLS                          1: STOMP over TLS, the certificate verified
    TWOPC_STOMP_CA                           the certificate (PEM) to trust with TLS

The lab's connection strings name its libpq password file (``passfile=``), so
no PostgreSQL password is in them; ``twopc lab env`` also exports it as
``PGPASSFILE`` for ``psql``. Your own servers' strings may do the same, or
rely on ``PGPASSFILE``/``~/.pgpass`` (a ``password=`` in a string is masked
wherever twopc shows one, but is visible to whoever reads the environment).

and, for operations::

    TWOPC_BROKER_CONFIG   the broker's activemq.xml, which 'twopc doctor' reads
    TWOPC_METRICS_PORT    long-running commands serve Prometheus /metrics on this port
    TWOPC_METRICS_ADDRESS the address /metrics listens on (default 127.0.0.1; 0.0.0.0: all)

Each comes from the environment first, then from the config file
(``TWOPC_CONFIG``, default ``$TWOPC_HOME/twopc.conf``), read as a dotenv file
by python-dotenv: ``NAME=value`` lines, ``export NAME=value``, single or double
quotes (inner quotes kept), ``#`` comments on their own line or after an
unquoted value, no ``${...}`` expansion. docs/configuration.md lists every
setting.

The settings fail closed: the four connection settings are given all together
or not at all. With none of them given, the embedded lab supplies them -- only
when its state folder (``$TWOPC_HOME/lab.json``, made by ``twopc lab up``)
exists; then the lab also supplies the broker's login, its certificate and its
activemq.xml where those are not given, and ``Settings.lab`` names the folder
(the commands say so on stderr). Anything else is a ConfigurationError naming
the settings that are missing: some connection settings without the others, or
none and no lab. No secret appears in a Settings' repr: passwords are masked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from coordinator.errors import ConfigurationError
from coordinator.xid import validate_coordinator_id
from scenarios.config_values import (
    BROKER_CONFIG,
    DATABASE_NAMES,
    DECISION_MODES,
    DECISION_PARTICIPANT,
    DECISIONS,
    DEFAULT_HOME,
    DEFAULT_METRICS_ADDRESS,
    LAB_STATE,
    MASK,
    METRICS_ADDRESS,
    METRICS_PORT,
    SETTING_NAMES,
    STOMP_CA,
    STOMP_PASSWORD,
    STOMP_TLS,
    STOMP_USER,
    check_dsn,
    parse_address_setting,
    parse_flag,
    parse_host_port,
    parse_port,
    read_config_file,
    redact_dsn,
)
from scenarios.lab.settings import lab_settings  # the lab's values are only the defaults

LOG_FILE = "decisions.log"  # the file decision log, in the state folder
#: The coordinator's APIs a scenario can run on (``--api``): Coordinator on threads, or
#: AsyncCoordinator on asyncio.
APIS = ("threads", "asyncio")


class StompOptions(TypedDict):
    """How to log in to the broker and whether to use TLS: StompClient's and ActiveMQ's keywords."""

    login: str | None
    passcode: str | None
    tls: bool
    ca_file: str | None


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """The state folder: ``TWOPC_HOME`` or ``./.twopc``, as an absolute path."""
    env = os.environ if env is None else env
    return Path(env.get("TWOPC_HOME") or DEFAULT_HOME).resolve()


def lab_home(home: Path) -> Path | None:
    """``home`` if it holds a lab's state (``twopc lab up`` ran there), else None."""
    return home if (home / LAB_STATE).is_file() else None


def missing_settings(given: Mapping[str, str | None], home: Path) -> ConfigurationError:
    """The error for connection settings that are not all given (and no lab to give them)."""
    missing = [name for name in SETTING_NAMES if not given.get(name)]
    if len(missing) < len(SETTING_NAMES):
        present = [name for name in SETTING_NAMES if given.get(name)]
        return ConfigurationError(
            f"{', '.join(missing)} not set (only {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'}): set all four "
            "connection settings, or none of them to use the lab (docs/configuration.md)"
        )
    return ConfigurationError(
        f"{', '.join(missing)} not set and no lab in {home} (TWOPC_HOME): set them to your "
        "servers (docs/configuration.md), or run 'twopc lab up' to make a lab there"
    )


@dataclass(frozen=True)
class Settings:
    """Where the two databases and the broker are, and who this coordinator is."""

    home: Path
    pg_a: str
    pg_b: str
    stomp: str
    openwire: str
    coordinator_id: str = "twopc"
    stomp_user: str | None = None
    stomp_password: str | None = field(default=None, repr=False)
    stomp_tls: bool = False
    stomp_ca: str | None = None
    broker_config: str | None = None
    metrics_port: int | None = None
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    decisions: str = "file"
    decision_participant: str = "a"
    lab: Path | None = None  # the lab's state folder, when the lab supplied the settings

    def __repr__(self) -> str:
        password = None if self.stomp_password is None else MASK
        return (
            f"Settings(home={str(self.home)!r}, pg_a={redact_dsn(self.pg_a)!r}, "
            f"pg_b={redact_dsn(self.pg_b)!r}, stomp={self.stomp!r}, openwire={self.openwire!r}, "
            f"coordinator_id={self.coordinator_id!r}, stomp_user={self.stomp_user!r}, "
            f"stomp_password={password!r}, stomp_tls={self.stomp_tls!r}, "
            f"stomp_ca={self.stomp_ca!r}, broker_config={self.broker_config!r}, "
            f"metrics_port={self.metrics_port!r}, metrics_address={self.metrics_address!r}, "
            f"decisions={self.decisions!r}, "
            f"decision_participant={self.decision_participant!r}, "
            f"lab={None if self.lab is None else str(self.lab)!r})"
        )

    __str__ = __repr__

    def stomp_options(self) -> StompOptions:
        """Keywords for StompClient.open and ActiveMQ: the login and the TLS choice."""
        return StompOptions(
            login=self.stomp_user,
            passcode=self.stomp_password,
            tls=self.stomp_tls,
            ca_file=self.stomp_ca,
        )

    @property
    def log_path(self) -> Path:
        """The coordinator's decision log."""
        return self.home / LOG_FILE

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables (for child processes and ``twopc lab env``)."""
        return {
            "TWOPC_HOME": str(self.home),
            "TWOPC_PG_A": self.pg_a,
            "TWOPC_PG_B": self.pg_b,
            "TWOPC_STOMP": self.stomp,
            "TWOPC_OPENWIRE": self.openwire,
            "TWOPC_COORDINATOR_ID": self.coordinator_id,
            STOMP_USER: self.stomp_user or "",
            STOMP_PASSWORD: self.stomp_password or "",
            STOMP_TLS: "1" if self.stomp_tls else "0",
            STOMP_CA: self.stomp_ca or "",
            BROKER_CONFIG: self.broker_config or "",
            METRICS_PORT: "" if self.metrics_port is None else str(self.metrics_port),
            METRICS_ADDRESS: self.metrics_address,
            DECISIONS: self.decisions,
            DECISION_PARTICIPANT: self.decision_participant,
        }

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Environment, then config file; the lab only when no connection setting is given."""
        env = os.environ if env is None else env
        home = home_dir(env)
        config_path = Path(env.get("TWOPC_CONFIG") or home / "twopc.conf")
        from_file = read_config_file(config_path)

        def pick(name: str) -> str | None:
            return env.get(name) or from_file.get(name)

        values = {name: pick(name) for name in SETTING_NAMES}
        tls = parse_flag(pick(STOMP_TLS), STOMP_TLS)
        user, password, ca = pick(STOMP_USER), pick(STOMP_PASSWORD), pick(STOMP_CA)
        broker_config = pick(BROKER_CONFIG)
        lab = None
        if not all(values.values()):
            lab = lab_home(home) if not any(values.values()) else None
            if lab is None:
                raise missing_settings(values, home)
            supplied = lab_settings(home, env, tls=tls)
            values = {name: supplied[name] for name in SETTING_NAMES}
            if user is password is None:
                user, password = supplied.get(STOMP_USER), supplied.get(STOMP_PASSWORD)
            if ca is None and tls:
                ca = supplied.get(STOMP_CA)
            if broker_config is None:
                broker_config = supplied.get(BROKER_CONFIG)
        if password is not None and user is None:
            raise ConfigurationError(
                f"{STOMP_PASSWORD} is set but {STOMP_USER} is not: set both, or neither for "
                "a broker without login"
            )
        coordinator_id = validate_coordinator_id(pick("TWOPC_COORDINATOR_ID") or "twopc")
        decisions = (pick(DECISIONS) or "file").strip().lower()
        if decisions not in DECISION_MODES:
            raise ConfigurationError(
                f"{DECISIONS}={decisions!r} must be one of {', '.join(DECISION_MODES)}"
            )
        participant = (pick(DECISION_PARTICIPANT) or "a").strip().lower()
        if participant not in DATABASE_NAMES:
            raise ConfigurationError(
                f"{DECISION_PARTICIPANT}={participant!r} must name a database: "
                f"{' or '.join(DATABASE_NAMES)}"
            )
        settings = cls(
            home=home,
            pg_a=str(values["TWOPC_PG_A"]),
            pg_b=str(values["TWOPC_PG_B"]),
            stomp=str(values["TWOPC_STOMP"]),
            openwire=str(values["TWOPC_OPENWIRE"]),
            coordinator_id=coordinator_id,
            stomp_user=user,
            stomp_password=password,
            stomp_tls=tls,
            stomp_ca=ca,
            broker_config=broker_config,
            metrics_port=parse_port(pick(METRICS_PORT), METRICS_PORT),
            metrics_address=parse_address_setting(pick(METRICS_ADDRESS), METRICS_ADDRESS),
            decisions=decisions,
            decision_participant=participant,
            lab=lab,
        )
        check_dsn(settings.pg_a, "TWOPC_PG_A")
        check_dsn(settings.pg_b, "TWOPC_PG_B")
        parse_host_port(settings.stomp, "TWOPC_STOMP")
        parse_host_port(settings.openwire, "TWOPC_OPENWIRE")
        return settings
