"""A plain ASGI service that moves money between two databases with twopc's asyncio API.

``POST /orders`` with ``{"id": "...", "amount": 5}`` writes the order to
database ``a``, the stock movement to database ``b`` and, when the
coordinator has a broker, an event on ``/queue/orders``, all in one global
transaction. It answers 201 once committed, 409 when the transaction was
aborted (a duplicate order id, for one), and 202 when its outcome is in doubt (recovery decides).

Run it with any ASGI server (``uvicorn asgi_app:app``): the lifespan starts
the coordinator (which recovers first) and closes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import psycopg

from coordinator import FileDecisionLog, TransactionAborted, TransactionInDoubt
from coordinator.aio import AsyncCoordinator
from participants.aio.postgres import AsyncPostgresResource

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SCHEMA = "CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, amount integer NOT NULL)"


def create_app(coordinator: AsyncCoordinator) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI application, over a coordinator that its lifespan starts and closes."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http" and scope["path"] == "/orders" and scope["method"] == "POST":
            await place_order(await read_json(receive), send)
        else:
            await respond(send, 404, {"error": "not found"})

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await coordinator.start()
                async with coordinator.transaction() as tx:
                    await tx.execute("a", SCHEMA.format(table="orders"))
                    await tx.execute("b", SCHEMA.format(table="stock_moves"))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await coordinator.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def place_order(order: dict[str, Any], send: Send) -> None:
        try:
            async with coordinator.transaction() as tx:
                await tx.execute(
                    "a",
                    "INSERT INTO orders (id, amount) VALUES (%s, %s)",
                    (order["id"], order["amount"]),
                )
                await tx.execute(
                    "b",
                    "INSERT INTO stock_moves (id, amount) VALUES (%s, %s)",
                    (order["id"], -order["amount"]),
                )
                if coordinator.broker is not None:
                    await tx.send("/queue/orders", json.dumps(order), {"type": "order.placed"})
        except psycopg.errors.UniqueViolation:  # raised in the block: rolled back everywhere
            await respond(send, 409, {"outcome": "aborted", "reason": "the order exists"})
            return
        except TransactionAborted as exc:
            await respond(send, 409, {"outcome": "aborted", "reason": exc.reason})
            return
        except TransactionInDoubt as exc:
            await respond(send, 202, {"outcome": "in doubt", "gtrid": exc.gtrid})
            return
        await respond(send, 201, {"outcome": "committed", "gtrid": tx.gtrid})

    return app


async def read_json(receive: Receive) -> dict[str, Any]:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return dict(json.loads(body or b"{}"))


async def respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def app_from_environment() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The app over ORDERS_PG_A, ORDERS_PG_B and ORDERS_LOG (the decision log's path)."""
    coordinator = AsyncCoordinator(
        "orders",
        FileDecisionLog(os.environ["ORDERS_LOG"]),
        [
            AsyncPostgresResource("a", os.environ["ORDERS_PG_A"]),
            AsyncPostgresResource("b", os.environ["ORDERS_PG_B"]),
        ],
    )
    return create_app(coordinator)
