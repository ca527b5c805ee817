"""A coordinator process running database-only transactions in postgres mode (docs/design.md §4).

Each transaction inserts its gtrid as a tag into ``peers_probe`` on A and on B
(so atomicity is: the same tags on both sides), and appends one line to
``--outcomes`` the moment it is told the outcome (one O_APPEND write each):
``{"ready": true}`` once started, then ``{"gtrid": ..., "outcome": ..., "t": <epoch>}``.

    TWOPC_DECISIONS=postgres TWOPC_COORDINATOR_ID=w1 python -m scenarios.peers.worker --outcomes F
"""

from __future__ import annotations

import argparse
import json
import os
import time

from coordinator.errors import TwoPhaseCommitError
from coordinator.protocol import XAResource
from participants.pg_schema import create_table
from participants.postgres import PostgresResource
from scenarios.config import Settings
from scenarios.log_setup import configure as configure_logging
from scenarios.wiring import open_coordinator

PROBE_DDL = "CREATE TABLE IF NOT EXISTS peers_probe (tag text)"


def create_probe_table(resource: XAResource) -> None:
    """``peers_probe`` in the resource's database (several workers start at once)."""
    if not isinstance(resource, PostgresResource):
        return
    with resource.connect(autocommit=True) as conn:
        create_table(conn, PROBE_DDL, "peers_probe")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.peers.worker")
    parser.add_argument("--outcomes", required=True)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--peer-interval", type=float, default=1.0)
    args = parser.parse_args()
    configure_logging()
    fd = os.open(args.outcomes, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(record: dict[str, object]) -> None:
        os.write(fd, (json.dumps(record) + "\n").encode())

    coordinator = open_coordinator(Settings.load(), sessions=2, peer_interval=args.peer_interval)
    for resource in coordinator.resources.values():
        create_probe_table(resource)
    write({"ready": True})
    try:
        for _ in range(args.count):
            tx = coordinator.begin()
            try:
                with tx:
                    for name in ("a", "b"):
                        tx.execute(name, "INSERT INTO peers_probe VALUES (%s)", (tx.gtrid,))
            except TwoPhaseCommitError:
                pass
            outcome = tx.outcome.value if tx.outcome is not None else "error"
            write({"gtrid": tx.gtrid, "outcome": outcome, "t": time.time()})
    finally:
        coordinator.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
