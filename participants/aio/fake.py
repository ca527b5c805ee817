"""The fault-injecting fakes (:mod:`participants.fake`) behind the asyncio protocols.

Each call yields to the event loop once, then runs the sync fake's step, so
faults armed on the sync fake (``fail``) act here unchanged, and recovery uses
the sync fake itself over the same store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from coordinator.protocol import LastResource, XAResource, no_callback
from coordinator.states import Vote
from coordinator.xid import Xid
from participants.fake import FakeBranch, FakeBroker, FakeBrokerSession, FakeResource


class AsyncFakeResource:
    """A :class:`FakeResource` as an AsyncXAResource."""

    def __init__(self, sync: FakeResource) -> None:
        self.sync = sync

    @property
    def name(self) -> str:
        return self.sync.name

    async def begin(self, xid: Xid) -> AsyncFakeBranch:
        await asyncio.sleep(0)
        return AsyncFakeBranch(self.sync.begin(xid))

    def recovery_resource(self) -> XAResource:
        return self.sync

    async def close(self) -> None:
        self.sync.close()


class _AsyncCursor:
    """A fake branch's cursor, fetched from with ``await`` as an asyncio cursor is."""

    def __init__(self, sync: Any) -> None:
        self.sync = sync

    async def fetchone(self) -> Any:
        return self.sync.fetchone()


class AsyncFakeBranch:
    """A :class:`FakeBranch` as an AsyncXABranch."""

    def __init__(self, sync: FakeBranch) -> None:
        self.sync = sync

    @property
    def name(self) -> str:
        return self.sync.name

    @property
    def xid(self) -> Xid:
        return self.sync.xid

    @property
    def failure(self) -> BaseException | None:
        return self.sync.failure

    @failure.setter
    def failure(self, value: BaseException | None) -> None:
        self.sync.failure = value

    @property
    def left_prepared(self) -> bool:
        return self.sync.left_prepared

    async def execute(self, op: object, params: object = None) -> Any:
        await asyncio.sleep(0)
        return _AsyncCursor(self.sync.execute(op, params))

    async def read_only(self) -> bool:
        return self.sync.read_only()

    def send_prepare(self) -> None:
        self.sync.send_prepare()

    def send_commit_prepared(self) -> None:
        self.sync.send_commit_prepared()

    async def prepare(self) -> Vote:
        await asyncio.sleep(0)
        return self.sync.prepare()

    async def commit_one_phase(self) -> None:
        await asyncio.sleep(0)
        self.sync.commit_one_phase()

    async def commit_prepared(self) -> None:
        await asyncio.sleep(0)
        self.sync.commit_prepared()

    async def rollback(self) -> None:
        await asyncio.sleep(0)
        self.sync.rollback()

    async def cancel(self) -> None:
        self.sync.cancel()

    async def release(self) -> None:
        self.sync.release()


class AsyncFakeBroker:
    """A :class:`FakeBroker` as an AsyncLastResource."""

    def __init__(self, sync: FakeBroker) -> None:
        self.sync = sync

    @property
    def name(self) -> str:
        return self.sync.name

    async def begin(self, gtrid: str) -> AsyncFakeBrokerSession:
        await asyncio.sleep(0)
        return AsyncFakeBrokerSession(self.sync.begin(gtrid))

    async def settle(self, session: object, timeout: float) -> None:
        if isinstance(session, AsyncFakeBrokerSession):
            session = session.sync
        self.sync.settle(session, timeout)

    def recovery_broker(self) -> LastResource:
        return self.sync

    async def close(self) -> None:
        self.sync.close()


class AsyncFakeBrokerSession:
    """A :class:`FakeBrokerSession` as an AsyncLastResourceSession."""

    def __init__(self, sync: FakeBrokerSession) -> None:
        self.sync = sync

    @property
    def name(self) -> str:
        return self.sync.name

    @property
    def has_work(self) -> bool:
        return self.sync.has_work

    async def send(
        self, destination: str, body: str, headers: Mapping[str, str] | None = None
    ) -> None:
        await asyncio.sleep(0)
        self.sync.send(destination, body, headers)

    async def ack(self, ack_id: str) -> None:
        self.sync.ack(ack_id)

    async def commit_with_marker(
        self,
        gtrid: str,
        timeout: float,
        *,
        before_commit: Callable[[], None] = no_callback,
        commit_sent: Callable[[], None] = no_callback,
    ) -> None:
        await asyncio.sleep(0)
        self.sync.commit_with_marker(
            gtrid, timeout, before_commit=before_commit, commit_sent=commit_sent
        )

    async def commit(self, timeout: float) -> None:
        await asyncio.sleep(0)
        self.sync.commit(timeout)

    async def abort(self) -> None:
        self.sync.abort()

    async def release(self) -> None:
        self.sync.release()
