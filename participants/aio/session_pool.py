"""The broker's pool of sessions: slots of fixed client-ids, lent one at a time.

A transaction borrows any free slot (:meth:`AsyncSessionPool.acquire`), the
one put back last first, whose connection is warm. Settling an in-doubt commit
needs the one slot whose connection carried it (:meth:`AsyncSessionPool.take`),
and a fence needs every slot (:meth:`AsyncSessionPool.take_all`).

A slot that someone waits for by name is lent to no transaction once it is
back. Otherwise, in a busy pool, every slot is borrowed again the moment it is
put back: the settle would wait until the load stopped, while the in-doubt
transaction's prepared branches kept their rows locked and the transactions
that need those rows ran into their timeouts (docs/design.md §5). For the same
reason a slot put back wakes every waiter while one of them waits for a
particular slot: the single wake-up must not go to a waiter that cannot use it.

Nothing here does I/O. Written once, for asyncio; ``scripts/unasync.py``
generates the thread version, :mod:`participants.session_pool`.
"""

from __future__ import annotations

import time
from collections import Counter

from coordinator.compat import ACondition, acond_wait
from coordinator.errors import ParticipantError, ParticipantUnavailable
from participants.aio.mq_session import Slot


class AsyncSessionPool:
    """The slots of one broker resource (``participant``), lent and given back."""

    def __init__(self, slots: list[Slot], participant: str) -> None:
        self.slots = slots
        self._participant = participant
        self._free = list(reversed(slots))  # a stack: warm low slots are reused first
        self._cond = ACondition()
        self._closed = False
        self._wanted: Counter[int] = Counter()  # slots (by index) a take() waits for
        self._choosy = 0  # waiters for particular slots: take() and take_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def lends_one(self) -> bool:
        """Whether exactly one slot is lent."""
        return len(self._free) == len(self.slots) - 1

    async def acquire(self, timeout: float, gtrid: str) -> Slot:
        """A free slot that nobody waits for by name; ParticipantUnavailable after
        ``timeout`` seconds, or once the pool is closed."""
        deadline = time.monotonic() + timeout
        async with self._cond:
            while (slot := self._lendable()) is None:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    why = "is closed" if self._closed else f"stayed busy for {timeout:g} s"
                    raise ParticipantUnavailable(
                        f"every one of the {len(self.slots)} broker sessions {why}",
                        participant=self._participant,
                        gtrid=gtrid,
                    )
                await acond_wait(self._cond, remaining)
            return slot

    async def take(self, slot: Slot, deadline: float, gtrid: str) -> None:
        """Wait for ``slot`` itself, lent to no transaction meanwhile, and take it;
        ParticipantError at ``deadline`` (a ``time.monotonic()``) or once closed."""
        async with self._cond:
            self._wanted[slot.index] += 1
            self._choosy += 1
            try:
                while not any(free is slot for free in self._free):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._closed:
                        raise ParticipantError(
                            f"cannot settle client-id {slot.client_id}: its slot stayed busy",
                            participant=self._participant,
                            gtrid=gtrid,
                        )
                    await acond_wait(self._cond, remaining)
            finally:
                self._choosy -= 1
                self._wanted[slot.index] -= 1
                if not self._wanted[slot.index]:
                    del self._wanted[slot.index]
            self._free = [free for free in self._free if free is not slot]

    async def take_all(self, deadline: float) -> list[Slot]:
        """Every slot, once none is lent; ParticipantError at ``deadline``."""
        async with self._cond:
            self._choosy += 1
            try:
                while len(self._free) < len(self.slots):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        free = {s.client_id for s in self._free}
                        lent = sorted({s.client_id for s in self.slots} - free)
                        raise ParticipantError(
                            f"cannot fence: broker sessions {', '.join(lent)} are in "
                            "use by running transactions of this process",
                            participant=self._participant,
                        )
                    await acond_wait(self._cond, remaining)
            finally:
                self._choosy -= 1
            taken, self._free = self._free, []
            return taken

    async def put_back(self, slot: Slot) -> None:
        """Give ``slot`` back (dropped if the pool is closed) and wake who can use it."""
        async with self._cond:
            if not self._closed:
                self._free.append(slot)
            if self._choosy:
                self._cond.notify_all()
            else:
                self._cond.notify()

    async def close(self) -> list[Slot]:
        """Lend nothing more; the slots that were free (their connections are the
        caller's to close). Slots still lent are dropped when put back."""
        async with self._cond:
            self._closed = True
            idle, self._free = self._free, []
            self._cond.notify_all()
        return idle

    def _lendable(self) -> Slot | None:
        """Take the free slot put back last that nobody waits for by name (None if none)."""
        if self._closed:
            return None
        for position in range(len(self._free) - 1, -1, -1):
            if self._free[position].index not in self._wanted:
                return self._free.pop(position)
        return None
