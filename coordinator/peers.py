"""Many coordinators, no local state (docs/design.md §4): liveness, and the recovery of dead peers.

:class:`~coordinator.protocol.Membership` is what the coordinator needs from wherever liveness is
kept (PostgreSQL's advisory locks: ``participants.membership``). A running
coordinator holds its own lock; one that lost it reaches no new commit point
(the driver asks ``Membership.holds`` right before). A peer whose lock is
free but that left prepared branches is dead: :func:`recover_dead` takes its
lock, fences it (its sessions end; its broker client-ids are taken over by
recovery) and decides each of its gtrids with the one rule,
:func:`coordinator.recovery.decide`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator import events
from coordinator.errors import TwoPhaseCommitError
from coordinator.log import DecisionLog
from coordinator.protocol import DecisionHolder, LastResource, Membership, XAResource
from coordinator.recovery import Recovery, RecoveryReport
from coordinator.xid import FORMAT_ID


@dataclass
class PeerRecovery:
    """What the recovery of one dead peer found and did."""

    peer: str
    seconds: float
    report: RecoveryReport | None = None
    error: str | None = None

    @property
    def resolved(self) -> bool:
        return self.error is None and self.report is not None and self.report.resolved

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "seconds": round(self.seconds, 3),
            "resolved": self.resolved,
            "error": self.error,
            "recovery": None if self.report is None else self.report.as_dict(),
        }


def owner(gtrid: str) -> str:
    """The coordinator id a gtrid belongs to (its prefix, see coordinator.xid)."""
    return gtrid.partition(".")[0]


def owners_with_prepared(resources: Sequence[XAResource]) -> set[str]:
    """The coordinator ids that have prepared branches (this project's format id) anywhere."""
    found: set[str] = set()
    for resource in resources:
        found |= {owner(xid.gtrid) for xid in resource.recover(FORMAT_ID, "")}
    return found


def recover_dead(
    membership: Membership,
    log: DecisionLog,
    resources: Sequence[XAResource],
    broker_for: Callable[[str], LastResource | None],
    *,
    decision_holder: DecisionHolder | None = None,
    also_owning: Collection[str] = (),
    fence_timeout: float = 30.0,
) -> list[PeerRecovery]:
    """Recover every registered peer whose lock is free and that left prepared branches.

    ``decision_holder`` is where the peers' decision rows are. ``also_owning`` adds
    ids that own something else (markers, decision rows), for ``twopc recover
    --dead``. For each dead peer: take its lock, fence it (its database sessions
    end; the broker's client-ids are taken over by the recovery pass), decide each
    gtrid with :func:`coordinator.recovery.decide`, act, release the lock. A peer
    whose lock is held is alive and left alone.
    Raises ParticipantError only when the peers or prepared branches cannot be listed.
    """
    peers = membership.peers()
    if not peers:
        return []
    candidates = owners_with_prepared(resources) | set(also_owning)
    results: list[PeerRecovery] = []
    for peer in peers:
        if peer == membership.coordinator_id or peer not in candidates:
            continue
        if not membership.claim(peer):
            continue  # alive: its own coordinator finishes what it started
        results.append(
            _recover_one(
                membership, peer, log, resources, broker_for, decision_holder, fence_timeout
            )
        )
    return results


def _recover_one(
    membership: Membership,
    peer: str,
    log: DecisionLog,
    resources: Sequence[XAResource],
    broker_for: Callable[[str], LastResource | None],
    decision_holder: DecisionHolder | None,
    fence_timeout: float,
) -> PeerRecovery:
    """Fence and recover ``peer``, whose lock this coordinator holds; release it."""
    started = time.monotonic()
    logger = events.get_logger(component="peers", peer=peer)
    logger.info(events.PEER_DEAD)
    try:
        membership.fence(peer, fence_timeout)
        broker = broker_for(peer)
        try:
            # A peer's decisions are never records of this coordinator's log: pending={}.
            report = Recovery(
                peer, log, resources, broker, pending={}, decision_holder=decision_holder
            ).run(fence_timeout=fence_timeout)
        finally:
            if broker is not None:
                broker.close()
    except TwoPhaseCommitError as exc:
        logger.warning(events.PEER_RECOVERY_FAILED, error=str(exc))
        return PeerRecovery(peer, time.monotonic() - started, error=str(exc))
    finally:
        membership.release(peer)
    result = PeerRecovery(peer, time.monotonic() - started, report)
    logger.info(
        events.PEER_RECOVERED,
        found=len(report.items),
        resolved=result.resolved,
        seconds=round(result.seconds, 3),
    )
    return result
