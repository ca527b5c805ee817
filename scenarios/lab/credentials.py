"""The lab's secrets and roles: the broker's login, the keystore's and the PostgreSQL
roles' passwords, the libpq password file, and the connection string that names it.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import psycopg

from scenarios.lab.layout import CREDENTIALS_FILE, PASSFILE

DB_USER = "twopc"
DB_NAME = "twopc"
DB_ADMIN = "twopc_admin"  # the clusters' superuser: initdb, roles, databases; the lab only
READER_USER = "twopc_batch_reader"  # the batch job's read-only role (scenarios.transfer.schema)


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
    """192 random bits in hex: no character a command line, a URL or a passfile reads as
    syntax (a URL-safe token may begin with '-', which activemq's tools take for an option)."""
    return secrets.token_hex(24)


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
