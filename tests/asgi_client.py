"""Drive an ASGI application by calling it directly: lifespan, then requests."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class AsgiClient:
    """Runs an app's lifespan in a task and sends it HTTP requests, as a server would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsgiClient:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
        self._task = asyncio.create_task(self.app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        answer = await self._outbox.get()
        assert answer["type"] == "lifespan.startup.complete", answer
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inbox.put({"type": "lifespan.shutdown"})
        answer = await self._outbox.get()
        assert answer["type"] == "lifespan.shutdown.complete", answer
        assert self._task is not None
        await self._task

    async def post(self, path: str, payload: Any) -> tuple[int, Any]:
        """POST ``payload`` as JSON; the status and the decoded JSON answer."""
        body = json.dumps(payload).encode()
        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        status = sent[0]["status"]
        return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
