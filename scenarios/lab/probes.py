"""Is it running, does it answer: the lab's checks of processes, ports, STOMP and PostgreSQL."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from scenarios.lab import procfs
from scenarios.lab.credentials import DB_ADMIN


def process_start_time(pid: int) -> int | None:
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
        return process_start_time(self.pid) == self.start_time


def port_free(port: int) -> bool:
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
