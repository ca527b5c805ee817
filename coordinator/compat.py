"""The names that differ between the asyncio engine and its generated thread twin.

The asyncio modules are the sources (``coordinator/aio``, ``participants/aio``);
``scripts/unasync.py`` writes the synchronous ones from them. Whatever cannot
be had by dropping ``async``/``await`` lives here as a pair: the name with an
``A`` (or ``a``) prefix is the asyncio one, the same name without it the
thread one, and the generator maps the first to the second (as psycopg's
``_acompat.py``). Nothing else belongs here.
"""

from __future__ import annotations

import asyncio
import threading
import time

#: Wait ``seconds`` without blocking the loop / the thread.
asleep = asyncio.sleep
sleep = time.sleep

#: A mutual-exclusion lock.
ALock = asyncio.Lock
Lock = threading.Lock

#: A condition variable (``with``/``async with`` it; wait with :func:`acond_wait`).
ACondition = asyncio.Condition
Condition = threading.Condition


async def acond_wait(cond: asyncio.Condition, timeout: float) -> bool:
    """Wait, holding ``cond``, until notified or ``timeout`` seconds passed (then False)."""
    try:
        await asyncio.wait_for(cond.wait(), timeout)
    except TimeoutError:
        return False
    return True


def cond_wait(cond: threading.Condition, timeout: float) -> bool:
    """Wait, holding ``cond``, until notified or ``timeout`` seconds passed (then False)."""
    return cond.wait(timeout)
