"""What every scenario story is built from: the :class:`Story` it tells, the evidence it reads
from A, B and the broker, and the one-transfer child process it can kill.

The stories themselves are in scenarios.stories (and the modules it gathers them from).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import psycopg

from coordinator.failpoints import failpoint_env
from coordinator.states import Outcome
from coordinator.xid import gtrid_prefix
from scenarios.config import Settings
from scenarios.strategies.transfer_2pc import transfer_2pc
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import gather_evidence
from scenarios.wiring import open_coordinator
from scenarios.wiring import recover as run_recovery


@dataclass
class Story:
    """What a scenario told and whether the promises held."""

    name: str
    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def say(self, line: str) -> None:
        self.lines.append(line)

    def expect(self, condition: bool, line: str) -> None:
        """Say ``line``, marked as a broken promise when ``condition`` is false."""
        self.lines.append(line if condition else f"UNEXPECTED: {line}")
        self.ok = self.ok and condition


# -- evidence helpers -----------------------------------------------------------


def balance(dsn: str, account: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE id = %s", (account,)).fetchone()
    return int(row[0]) if row else 0


def prepared_gids(dsn: str, gtrid: str) -> int:
    """How many prepared transactions of ``gtrid`` the server lists (pg_prepared_xacts)."""
    with psycopg.connect(dsn) as conn:
        return sum(1 for x in conn.tpc_recover() if x.gtrid == gtrid)


def evidence(story: Story, settings: Settings, t: scenario.Transfer, *, committed: bool) -> None:
    """Read A, B, the events (the ledger's queue of the events' topic) and the prepared
    branches for ``t``; say what they hold."""
    gtrid = gtrid_prefix(settings.coordinator_id) + t.transfer_id
    found = gather_evidence(settings)
    in_a, in_b = int(t.transfer_id in found.in_a), int(t.transfer_id in found.in_b)
    queued = found.on_queue.get(t.transfer_id, 0)
    prepared = sum(p.split(":", 1)[1] == gtrid for p in found.prepared)
    want = 1 if committed else 0
    story.expect(
        (in_a, in_b, queued, prepared) == (want, want, want, 0),
        f"evidence: A.transfers {in_a} row, B.transfers {in_b} row, "
        f"transfer.completed events {queued}, pg_prepared_xacts {prepared} entries",
    )


def one_transfer(settings: Settings, t: scenario.Transfer) -> tuple[Outcome, str]:
    coordinator = open_coordinator(settings, sessions=2)
    try:
        return transfer_2pc(coordinator, t)
    finally:
        coordinator.close()


def run_child(t: scenario.Transfer, failpoints: str) -> int:
    """Run one transfer in a child ``twopc`` process that dies at ``failpoints``."""
    env = {**os.environ, **failpoint_env(failpoints)}
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "scenarios.stories",
            "one",
            t.transfer_id,
            t.source,
            t.target,
            str(t.amount),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return child.returncode


def recover(story: Story, settings: Settings) -> None:
    report = run_recovery(settings, sessions=2)
    for item in report.items:
        story.say(
            f"recovery: {item.gtrid}: COMMIT logged {'yes' if item.logged_commit else 'no'}, "
            f"marker {({True: 'yes', False: 'no', None: 'not needed'})[item.marker]} -> "
            f"{item.decision.value} "
            f"({'; '.join(item.done)})"
        )
    story.expect(report.resolved, f"recovery resolved everything in {report.seconds:.2f} s")


def new_transfer(amount: int = 10, source: int = 0, target: int = 1) -> scenario.Transfer:
    return scenario.Transfer(
        f"story-{scenario.new_run_id()}",
        scenario.account_id(source),
        scenario.account_id(target),
        amount,
    )
