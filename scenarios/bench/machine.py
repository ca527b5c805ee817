"""The machine a report ran on: CPU, versions of the software, the servers' settings."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from scenarios.config import Settings


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command_output(args: Sequence[str]) -> str:
    if shutil.which(args[0]) is None:
        return "unknown"
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() or "unknown"


def machine_info(settings: Settings) -> dict[str, Any]:
    """The machine, the versions and the durability settings the figures were measured with."""
    with psycopg.connect(settings.pg_a) as conn:
        pg = {
            name: str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("server_version", "fsync", "synchronous_commit", "wal_sync_method")
        }
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {
            p: _version(p)
            for p in ("psycopg", "stomp.py", "SQLAlchemy", "hdrhistogram", "matplotlib", "twopc")
        },
        "postgresql": pg,
        "activemq": _command_output(["dpkg-query", "-W", "-f", "${Version}", "activemq"]),
        "activemq_journal": "KahaDB journalDiskSyncStrategy=always (the lab's setting)",
        "git_commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),
        "load_average": list(os.getloadavg()),
    }
