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
import inspect
import threading
import time

#: Wait ``seconds`` without blocking the loop / the thread.
asleep = asyncio.sleep
sleep = time.sleep

#: A lock shared by the tasks / the threads that use one resource.
ALock = asyncio.Lock
Lock = threading.Lock


def amatches_api(call: object) -> bool:
    """True when ``call`` is made for this API: a coroutine function under asyncio."""
    return inspect.iscoroutinefunction(call)


def matches_api(call: object) -> bool:
    """True when ``call`` is made for this API: a plain function under threads."""
    return callable(call) and not inspect.iscoroutinefunction(call)
