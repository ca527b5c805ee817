"""Costs read from the servers during a benchmark: WAL written, and the services' CPU."""

from __future__ import annotations

import psycopg

from scenarios.bench import measure
from scenarios.config import Settings
from scenarios.lab.services import Lab


def wal_bytes(settings: Settings) -> dict[str, int]:
    """The WAL insert position of A and B, in bytes: deltas are the WAL written in between.

    Not pg_stat_wal.wal_bytes, although it counts the same bytes: backends
    report into it at most once a second (an idle one even later), so a delta
    taken right after a run misses part of it. The insert position is exact.
    """
    out = {}
    for name, dsn in (("a", settings.pg_a), ("b", settings.pg_b)):
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
            ).fetchone()
            out[name] = int(row[0]) if row else 0
    return out


def service_cpu(settings: Settings) -> measure.ServiceCpu:
    """CPU accounting of the lab's services when they run on this machine (else none)."""
    try:
        statuses = Lab(settings.home).status()
    except Exception:  # not an embedded lab: the servers are elsewhere
        return measure.ServiceCpu({})
    return measure.ServiceCpu({s.label: s.pid for s in statuses if s.pid is not None})
