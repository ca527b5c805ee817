"""Connection settings: one place that reads them, from the environment, a file, or the lab.

Every component takes its connections from four settings::

    TWOPC_PG_A       libpq connection string of database A
    TWOPC_PG_B       libpq connection string of database B
    TWOPC_STOMP      host:port of the broker's STOMP connector
    TWOPC_OPENWIRE   host:port of the broker's OpenWire connector

Each comes from the environment first, then from the config file
(``TWOPC_CONFIG``, default ``$TWOPC_HOME/twopc.conf``; ``NAME=value`` lines,
``#`` comments), then from the embedded lab's recorded ports. Pointing twopc
at your own servers is a matter of setting these four.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg

from coordinator.errors import ConfigurationError
from coordinator.xid import validate_coordinator_id
from participants.stomp_client import parse_address

SETTING_NAMES = ("TWOPC_PG_A", "TWOPC_PG_B", "TWOPC_STOMP", "TWOPC_OPENWIRE")
DEFAULT_HOME = ".twopc"


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """The state folder: ``TWOPC_HOME`` or ``./.twopc``, as an absolute path."""
    env = os.environ if env is None else env
    return Path(env.get("TWOPC_HOME") or DEFAULT_HOME).resolve()


def parse_host_port(value: str, setting: str) -> tuple[str, int]:
    """Split ``host:port`` as the STOMP client does; ConfigurationError naming ``setting``."""
    try:
        host, port = parse_address(value)
    except ConfigurationError:
        host, port = "", 0
    if not 0 < port < 65536:
        raise ConfigurationError(f"{setting}={value!r} must look like host:port (127.0.0.1:26613)")
    return host, port


def check_dsn(value: str, setting: str) -> None:
    """A libpq connection string libpq can parse, with numeric ports; else ConfigurationError.

    The message names ``setting`` and never repeats the password.
    """
    example = "e.g. 'host=127.0.0.1 port=5432 dbname=postgres'"
    try:
        info = psycopg.conninfo.conninfo_to_dict(value)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unparsable"
        if "password" in value.lower() or "@" in value:  # libpq quotes what it could not read
            reason = re.sub(r'"[^"]*"', '"..."', reason)
        raise ConfigurationError(
            f"{setting} is not a libpq connection string ({reason}); set it to {example}"
        ) from None
    for port in str(info.get("port") or "").split(","):
        if port and not (port.strip().isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(
                f"{setting} has port {port!r}, not a TCP port number (1-65535); "
                f"set it to {example}"
            )


def read_config_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of ``path`` (missing file: empty)."""
    if not path.exists():
        return {}
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ConfigurationError(f"{path}:{number}: expected NAME=value, got {raw!r}")
        values[name.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


@dataclass(frozen=True)
class Settings:
    """Where the two databases and the broker are, and who this coordinator is."""

    home: Path
    pg_a: str
    pg_b: str
    stomp: str
    openwire: str
    coordinator_id: str = "twopc"

    @property
    def log_path(self) -> Path:
        """The coordinator's decision log."""
        return self.home / "decisions.log"

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables (for child processes and ``twopc lab env``)."""
        return {
            "TWOPC_HOME": str(self.home),
            "TWOPC_PG_A": self.pg_a,
            "TWOPC_PG_B": self.pg_b,
            "TWOPC_STOMP": self.stomp,
            "TWOPC_OPENWIRE": self.openwire,
            "TWOPC_COORDINATOR_ID": self.coordinator_id,
        }

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Environment, then config file, then the lab's recorded ports."""
        env = os.environ if env is None else env
        home = home_dir(env)
        config_path = Path(env.get("TWOPC_CONFIG") or home / "twopc.conf")
        from_file = read_config_file(config_path)

        def pick(name: str) -> str | None:
            return env.get(name) or from_file.get(name)

        values = {name: pick(name) for name in SETTING_NAMES}
        if any(v is None for v in values.values()):
            from scenarios.lab.services import lab_settings  # the lab is only the default

            lab = lab_settings(home, env)
            values = {name: values[name] or lab[name] for name in SETTING_NAMES}
        coordinator_id = validate_coordinator_id(pick("TWOPC_COORDINATOR_ID") or "twopc")
        settings = cls(
            home=home,
            pg_a=str(values["TWOPC_PG_A"]),
            pg_b=str(values["TWOPC_PG_B"]),
            stomp=str(values["TWOPC_STOMP"]),
            openwire=str(values["TWOPC_OPENWIRE"]),
            coordinator_id=coordinator_id,
        )
        check_dsn(settings.pg_a, "TWOPC_PG_A")
        check_dsn(settings.pg_b, "TWOPC_PG_B")
        parse_host_port(settings.stomp, "TWOPC_STOMP")
        parse_host_port(settings.openwire, "TWOPC_OPENWIRE")
        return settings
