"""The fault-injecting fakes (:mod:`participants.fake`) behind the asyncio protocols.

Each asyncio fake wraps its sync fake and forwards every call to it: a step
that does work on the "server" yields to the event loop once first, then runs
the sync fake's step. Faults armed on the sync fake (``fail``) act here
unchanged, and recovery uses the sync fake itself over the same store. The
calls, their arguments and their faults are written once, in the sync fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from coordinator.protocol import LastResource, XAResource
from participants.fake import FakeBranch, FakeBroker, FakeBrokerSession, FakeResource


def _step(
    name: str, *, yields: bool = True, wrap: Callable[[Any], Any] | None = None
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """A coroutine method that runs the sync fake's ``name`` (after one yield to the loop
    when ``yields``), its result wrapped by ``wrap``."""

    async def step(self: _Wrapper, *args: Any, **kwargs: Any) -> Any:
        if yields:
            await asyncio.sleep(0)
        result = getattr(self.sync, name)(*args, **kwargs)
        return wrap(result) if wrap is not None else result

    step.__name__ = name
    return step


def _forward(name: str) -> Callable[..., Any]:
    """A plain method that runs the sync fake's ``name`` (a send that waits for nothing)."""

    def call(self: _Wrapper, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.sync, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _attribute(name: str, *, settable: bool = False) -> Any:
    """The sync fake's attribute ``name``, read (and written when ``settable``) through."""

    def get(self: _Wrapper) -> Any:
        return getattr(self.sync, name)

    def put(self: _Wrapper, value: Any) -> None:
        setattr(self.sync, name, value)

    return property(get, put if settable else None)


class _Wrapper:
    """An asyncio fake: the sync fake it forwards to, and its name."""

    name = _attribute("name")

    def __init__(self, sync: Any) -> None:
        self.sync = sync


class _AsyncCursor(_Wrapper):
    """A fake branch's cursor, fetched from with ``await`` as an asyncio cursor is."""

    fetchone = _step("fetchone", yields=False)


class AsyncFakeBranch(_Wrapper):
    """A :class:`FakeBranch` as an AsyncXABranch."""

    sync: FakeBranch
    xid = _attribute("xid")
    failure = _attribute("failure", settable=True)
    left_prepared = _attribute("left_prepared")
    execute = _step("execute", wrap=_AsyncCursor)
    read_only = _step("read_only", yields=False)
    send_prepare = _forward("send_prepare")
    send_commit_prepared = _forward("send_commit_prepared")
    prepare = _step("prepare")
    commit_one_phase = _step("commit_one_phase")
    commit_prepared = _step("commit_prepared")
    rollback = _step("rollback")
    cancel = _step("cancel", yields=False)
    release = _step("release", yields=False)


class AsyncFakeResource(_Wrapper):
    """A :class:`FakeResource` as an AsyncXAResource."""

    sync: FakeResource
    begin = _step("begin", wrap=AsyncFakeBranch)
    close = _step("close", yields=False)

    def recovery_resource(self) -> XAResource:
        return self.sync


class AsyncFakeBrokerSession(_Wrapper):
    """A :class:`FakeBrokerSession` as an AsyncLastResourceSession."""

    sync: FakeBrokerSession
    has_work = _attribute("has_work")
    send = _step("send")
    ack = _step("ack", yields=False)
    send_ahead = _step("send_ahead", yields=False)
    commit_with_marker = _step("commit_with_marker")
    commit = _step("commit")
    abort = _step("abort", yields=False)
    release = _step("release", yields=False)


class AsyncFakeBroker(_Wrapper):
    """A :class:`FakeBroker` as an AsyncLastResource: sessions are settled as their sync fake."""

    sync: FakeBroker
    begin = _step("begin", wrap=AsyncFakeBrokerSession)
    close = _step("close", yields=False)

    async def settle(self, session: object, timeout: float) -> None:
        if isinstance(session, AsyncFakeBrokerSession):
            session = session.sync
        self.sync.settle(session, timeout)

    def recovery_broker(self) -> LastResource:
        return self.sync
