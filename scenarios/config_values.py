"""The settings' names, and the parsers of their values: flags, ports, addresses,
connection strings, and the ``NAME=value`` config file.

Shared by the one settings reader (scenarios.config) and the lab, which offers
its own values under the same names (scenarios.lab.settings).
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg

from coordinator.errors import ConfigurationError
from participants.stomp_client import parse_address

SETTING_NAMES = ("TWOPC_PG_A", "TWOPC_PG_B", "TWOPC_STOMP", "TWOPC_OPENWIRE")
STOMP_USER = "TWOPC_STOMP_USER"
STOMP_PASSWORD = "TWOPC_STOMP_PASSWORD"
STOMP_TLS = "TWOPC_STOMP_TLS"
STOMP_CA = "TWOPC_STOMP_CA"
STOMP_TLS_ADDRESS = "TWOPC_STOMP_TLS_ADDRESS"  # exported by 'twopc lab env', for reference
PGPASSFILE = "PGPASSFILE"  # libpq's password file; 'twopc lab env' exports the lab's
BROKER_CONFIG = "TWOPC_BROKER_CONFIG"
METRICS_PORT = "TWOPC_METRICS_PORT"
METRICS_ADDRESS = "TWOPC_METRICS_ADDRESS"
DEFAULT_METRICS_ADDRESS = "127.0.0.1"  # this host only, unless the operator says otherwise
LAB_STATE = "lab.json"  # what 'twopc lab up' records in the state folder: the lab is there
DECISIONS = "TWOPC_DECISIONS"
DECISION_MODES = ("file", "postgres")
DECISION_PARTICIPANT = "TWOPC_DECISION_PARTICIPANT"
DATABASE_NAMES = ("a", "b")
DEFAULT_HOME = ".twopc"
MASK = "********"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def parse_flag(value: str | None, setting: str) -> bool:
    """A yes/no setting (1/0, true/false, yes/no, on/off); ConfigurationError naming it."""
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{setting}={value!r} must be 1 or 0")


def redact_dsn(dsn: str) -> str:
    """A libpq connection string (key=value or URI) with its password masked."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable connection string)"
    if "password" in info:
        info["password"] = MASK
    return psycopg.conninfo.make_conninfo("", **info)


def parse_host_port(value: str, setting: str) -> tuple[str, int]:
    """Split ``host:port`` as the STOMP client does; ConfigurationError naming ``setting``."""
    try:
        host, port = parse_address(value)
    except ConfigurationError:
        host, port = "", 0
    if not 0 < port < 65536:
        raise ConfigurationError(f"{setting}={value!r} must look like host:port (127.0.0.1:26613)")
    return host, port


def parse_port(value: str | None, setting: str) -> int | None:
    """A TCP port number setting (unset or empty: None); ConfigurationError naming it."""
    text = (value or "").strip()
    if not text:
        return None
    if not (text.isdigit() and 0 < int(text) < 65536):
        raise ConfigurationError(f"{setting}={value!r} must be a TCP port number (1-65535)")
    return int(text)


def parse_address_setting(value: str | None, setting: str) -> str:
    """A host name or IP address to listen on (unset or empty: 127.0.0.1); no port, no spaces."""
    text = (value or "").strip()
    if not text:
        return DEFAULT_METRICS_ADDRESS
    if any(c.isspace() for c in text) or text.count(":") == 1:
        raise ConfigurationError(
            f"{setting}={value!r} must be a host name or IP address without a port "
            f"(127.0.0.1, 0.0.0.0 for every interface, ::1); the port is {METRICS_PORT}"
        )
    return text


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
                f"{setting} has port {port!r}, not a TCP port number (1-65535); set it to {example}"
            )


def read_config_file(path: Path) -> dict[str, str]:
    """The settings of the dotenv file ``path`` (missing file: empty).

    python-dotenv parses it (quotes, comments, ``export``), without expanding
    ``${...}``; a line it cannot parse, or a name without ``=value``, is a
    ConfigurationError naming the file and the line.
    """
    if not path.exists():
        return {}
    from dotenv.parser import parse_stream

    values: dict[str, str] = {}
    with path.open(encoding="utf-8") as stream:
        for binding in parse_stream(stream):
            line = binding.original.line
            text = binding.original.string.strip()
            if binding.error or (binding.key is not None and binding.value is None):
                raise ConfigurationError(f"{path}:{line}: expected NAME=value, got {text!r}")
            if binding.key is not None and binding.value is not None:
                values[binding.key] = binding.value
    return values


_PASSWORDS = (
    (re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE), r"\1***"),
    (re.compile(r"(://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),
)


def redact(text: str) -> str:
    """``text`` with every password of a libpq keyword string or URI replaced by ``***``."""
    for pattern, replacement in _PASSWORDS:
        text = pattern.sub(replacement, text)
    return text
