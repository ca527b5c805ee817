"""A coordinator process for tests/test_peers.py: database-only transactions in postgres mode.

Each transaction inserts its gtrid as a tag into ``peers_probe`` on A and on B
(so atomicity is: the same tags on both sides), and appends one line to
``--outcomes`` the moment it is told the outcome (one O_APPEND write each):
``{"ready": true}`` once started, then ``{"gtrid": ..., "outcome": ..., "t": <epoch>}``.

    TWOPC_DECISIONS=postgres TWOPC_COORDINATOR_ID=w1 python -m tests.peer_worker --outcomes F
"""

from __future__ import annotations

import argparse
import json
import os
import time

from coordinator.errors import TwoPhaseCommitError
from scenarios.config import Settings
from scenarios.log_setup import configure as configure_logging
from scenarios.wiring import open_coordinator


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peer_worker")
    parser.add_argument("--outcomes", required=True)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--peer-interval", type=float, default=1.0)
    args = parser.parse_args()
    configure_logging()
    fd = os.open(args.outcomes, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(record: dict[str, object]) -> None:
        os.write(fd, (json.dumps(record) + "\n").encode())

    coordinator = open_coordinator(Settings.load(), sessions=2, peer_interval=args.peer_interval)
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
