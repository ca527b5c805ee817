"""The broker's session pool (sync and asyncio): a slot that a settle waits for is lent to no
transaction once it is back, and a slot put back wakes a waiter that can use it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from coordinator.errors import ParticipantError, ParticipantUnavailable
from participants import mq_session
from participants.aio import mq_session as aio_mq_session
from participants.aio.session_pool import AsyncSessionPool
from participants.session_pool import SessionPool


def settle_waits(pool: SessionPool | AsyncSessionPool) -> bool:
    """Whether a take() is waiting in ``pool`` (read while the test arranges a race)."""
    return bool(pool._wanted)


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (up to 10 s) for ``condition()`` to hold."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_slot_awaited_by_a_settle_is_not_lent_again_sync() -> None:
    """Threads: the transaction that put the slot back asks for one at once and waits; the
    settle gets the slot."""
    slot = mq_session.Slot(0, "twopc-t1-0")
    pool = SessionPool([slot], "mq")
    held = pool.acquire(1.0, "g-1")
    taken: list[str] = []

    def settle() -> None:
        try:
            pool.take(held, time.monotonic() + 10, "g-0")
            taken.append("settle")
            pool.put_back(held)
        except ParticipantError as exc:
            taken.append(str(exc))

    settler = threading.Thread(target=settle)
    settler.start()
    until(lambda: settle_waits(pool), "the settle waits for its slot")
    pool.put_back(held)
    again = pool.acquire(10.0, "g-2")  # waits for the settle to give the slot back
    taken.append("transaction")
    settler.join(10)
    assert again is slot
    assert taken == ["settle", "transaction"]


def test_a_slot_awaited_by_a_settle_is_not_lent_again_asyncio() -> None:
    """asyncio: the same, with tasks."""

    async def scenario() -> list[str]:
        slot = aio_mq_session.Slot(0, "twopc-t1-0")
        pool = AsyncSessionPool([slot], "mq")
        held = await pool.acquire(1.0, "g-1")
        taken: list[str] = []

        async def settle() -> None:
            await pool.take(held, time.monotonic() + 10, "g-0")
            taken.append("settle")
            await asyncio.sleep(0.05)  # the transaction below asks meanwhile
            await pool.put_back(held)

        settler = asyncio.create_task(settle())
        while not settle_waits(pool):
            await asyncio.sleep(0.01)
        await pool.put_back(held)
        again = await pool.acquire(10.0, "g-2")
        taken.append("transaction")
        await settler
        assert again is slot
        return taken

    assert asyncio.run(scenario()) == ["settle", "transaction"]


def test_a_slot_put_back_wakes_a_transaction_while_a_settle_waits_for_another_sync() -> None:
    """Threads: two slots lent, a settle waiting for the first; the second put back goes to
    the transaction waiting for any slot, long before its timeout."""
    first, second = mq_session.Slot(0, "twopc-t1-0"), mq_session.Slot(1, "twopc-t1-1")
    pool = SessionPool([first, second], "mq")
    held = [pool.acquire(1.0, "g-1"), pool.acquire(1.0, "g-2")]
    assert held == [first, second]
    refused: list[ParticipantError] = []

    def settle() -> None:
        try:
            pool.take(first, time.monotonic() + 3, "g-0")  # nobody puts it back
        except ParticipantError as exc:
            refused.append(exc)

    settler = threading.Thread(target=settle)
    settler.start()
    until(lambda: settle_waits(pool), "the settle waits for its slot")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(60.0, "g-3")))
    waiter.start()
    time.sleep(0.2)  # the transaction waits behind the settle
    pool.put_back(second)
    waiter.join(20)
    assert got == [second], "the transaction was not woken when a slot came back"
    settler.join(10)
    assert len(refused) == 1, "the settle was to give up at its deadline"


def test_a_pool_that_stays_busy_or_closes_says_so() -> None:
    """acquire: 'stayed busy' at its timeout and 'is closed' after close(); take: 'stayed
    busy' naming the client-id; take_all names the sessions in use."""
    first, second = mq_session.Slot(0, "twopc-t1-0"), mq_session.Slot(1, "twopc-t1-1")
    pool = SessionPool([first, second], "mq")
    pool.acquire(1.0, "g-1")
    pool.acquire(1.0, "g-2")
    with pytest.raises(ParticipantUnavailable, match=r"2 broker sessions stayed busy for 0\.1 s"):
        pool.acquire(0.1, "g-3")
    with pytest.raises(ParticipantError, match="client-id twopc-t1-0: its slot stayed busy"):
        pool.take(first, time.monotonic() + 0.1, "g-0")
    with pytest.raises(ParticipantError, match="twopc-t1-0, twopc-t1-1 are in use"):
        pool.take_all(time.monotonic() + 0.1)
    pool.put_back(second)
    assert pool.lends_one()
    assert pool.close() == [second]
    with pytest.raises(ParticipantUnavailable, match="sessions is closed"):
        pool.acquire(1.0, "g-4")
