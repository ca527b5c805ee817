"""Many coordinators, no local state (DESIGN §7): liveness, and the recovery of dead peers.

:class:`Membership` is what the coordinator needs from wherever liveness is
kept (PostgreSQL's advisory locks: ``participants.membership``). A running
coordinator holds its own lock; one that lost it reaches no new commit point
(the driver asks :meth:`Membership.holds` right before). A peer whose lock is
free but that left prepared branches is dead: :func:`recover_dead` takes its
lock, fences it (its sessions end; its broker client-ids are taken over by
recovery) and decides each of its gtrids with the one rule,
:func:`coordinator.recovery.decide`.
"""

from __future__ import annotations

from typing import Protocol


class Membership(Protocol):
    """Liveness of the coordinators sharing the participants; every call names its own."""

    @property
    def coordinator_id(self) -> str: ...

    def join(self, *, fence_timeout: float = 30.0) -> None:
        """Take this coordinator's lock (and end an earlier incarnation's sessions).
        Raises ConfigurationError when a live coordinator holds it."""
        ...

    def holds(self) -> bool:
        """True while this coordinator holds its lock. Cheap: asked before each commit point."""
        ...

    def keep(self) -> bool:
        """Take the lock again if it was lost; True when held. Never raises."""
        ...

    def leave(self) -> None:
        """Release the lock. Never raises."""
        ...

    def peers(self) -> list[str]:
        """The other coordinator ids that take part (raises ParticipantError)."""
        ...

    def claim(self, peer: str) -> bool:
        """Take ``peer``'s lock; False when it is held (the peer is alive)."""
        ...

    def release(self, peer: str) -> None:
        """Give ``peer``'s lock back. Never raises."""
        ...

    def fence(self, peer: str, timeout: float) -> None:
        """End every database session of ``peer`` and wait until they are gone.
        Raises ParticipantError when that cannot be seen within ``timeout``."""
        ...
