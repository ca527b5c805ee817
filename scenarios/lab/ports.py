"""The lab's services and their ports: from the environment, lab.json, or the defaults."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from scenarios.lab.errors import LabError


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


#: Where the kernel takes the local port of an outgoing connection, and Linux's default.
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_DEFAULT = (32768, 60999)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (low, high)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    return EPHEMERAL_DEFAULT


def ephemeral_hint(port: int) -> str:
    """Why ``port`` may be taken while its service is down, if it is in the ephemeral
    range: any outgoing connection can be given it as its local port, and the service
    cannot listen on it again until that connection ends. Empty outside the range."""
    low, high = ephemeral_range()
    if not low <= port <= high:
        return ""
    return (
        f"; port {port} is in the kernel's range for outgoing connections ({low}-{high}), "
        f"so a client connection may hold it: a port below {low} cannot be taken that way"
    )


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
