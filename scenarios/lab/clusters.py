"""A PostgreSQL cluster of the lab: made by initdb with the lab's own superuser and
passwords only, then given the roles and the database twopc uses.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from psycopg import sql

from scenarios.lab.credentials import (
    DB_ADMIN,
    DB_NAME,
    DB_USER,
    READER_USER,
    Credentials,
    write_private,
)
from scenarios.lab.errors import LabError
from scenarios.lab.ports import Service
from scenarios.lab.probes import admin_connect


def initdb(
    service: Service, base: Path, bindir: Path, run_as: Mapping[str, Any], password: str
) -> None:
    """A new cluster whose superuser is the lab's own, every login by password (SCRAM)."""
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


def ensure_roles(port: int, credentials: Credentials) -> None:
    """``twopc`` (no superuser; what twopc needs), the batch reader, the database.

    Run as the lab's superuser at every start: passwords follow credentials.json.
    The passwords reach the server as SCRAM verifiers made here, never in clear.
    """
    with admin_connect(port, credentials.pg_admin_password) as conn:

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
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
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
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
        if not exists:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DB_NAME), sql.Identifier(DB_USER)
                )
            )
