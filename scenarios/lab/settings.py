"""The connection settings that point at the lab: the defaults of scenarios.config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from scenarios.config_values import (
    BROKER_CONFIG,
    PGPASSFILE,
    STOMP_CA,
    STOMP_PASSWORD,
    STOMP_TLS,
    STOMP_TLS_ADDRESS,
    STOMP_USER,
    parse_flag,
)
from scenarios.lab.credentials import pg_dsn, read_credentials
from scenarios.lab.layout import BROKER_XML, CERTIFICATE, PASSFILE
from scenarios.lab.ports import resolve_ports


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
