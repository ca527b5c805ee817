"""The outbox component in a service of its own: write, relay, consume; no 2PC, no scenario.

An order service records an order and the message announcing it in one local
transaction on its database; a relay publishes what committed; a shipping
service applies each message once, in the same transaction as its inbox row.
Run it against the lab (``eval "$(twopc lab env)"`` first) or your own servers:
``python docs/examples/outbox_service.py``. It prints what happened as JSON.
"""

import asyncio
import json
import os
import secrets
import sys
import threading
import time

import psycopg

from outbox import OutboxMessage, Tables
from outbox.aio import writer as async_writer
from outbox.clean import clean
from outbox.consumer import InboxConsumer, Reject
from outbox.failures import FailurePolicy, RetrySettings
from outbox.relay import LastIdRelay, RelayConfig, StatusRelay, StompPublisher
from outbox.writer import write
from participants.stomp_client import StompClient
from participants.stomp_core import Message

ORDERS = os.environ["TWOPC_PG_A"]  # the order service's database (libpq connection string)
SHIPPING = os.environ["TWOPC_PG_B"]  # the shipping service's database
BROKER = os.environ["TWOPC_STOMP"]  # host:port of ActiveMQ's STOMP connector
LOGIN = os.environ.get("TWOPC_STOMP_USER") or None  # None: a broker that takes anyone
PASSCODE = os.environ.get("TWOPC_STOMP_PASSWORD") or None
TLS = os.environ.get("TWOPC_STOMP_TLS") == "1"
CA_FILE = os.environ.get("TWOPC_STOMP_CA") or None

# The component's tables under this service's own names (a fresh set per run here).
RUN = f"shop_{secrets.token_hex(3)}"
TABLES = Tables(
    outbox=f"{RUN}_outbox",
    failures=f"{RUN}_outbox_failures",
    positions=f"{RUN}_relay_positions",
    inbox=f"{RUN}_inbox",
    key="order_id",  # the message key: the inbox's idempotency key
    key_header="order-id",  # the header it travels in
    channel=f"{RUN}_outbox",
)
QUEUE = f"/queue/{RUN}.orders"


def broker() -> StompClient:
    return StompClient.open(BROKER, login=LOGIN, passcode=PASSCODE, tls=TLS, ca_file=CA_FILE)


def create_tables() -> None:
    with psycopg.connect(ORDERS, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {RUN}_orders (order_id text PRIMARY KEY, item text)")
        for statement in TABLES.schema_a(partitions=2):
            conn.execute(statement)
    with psycopg.connect(SHIPPING, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {RUN}_shipments (order_id text PRIMARY KEY, item text)")
        for statement in TABLES.schema_b():
            conn.execute(statement)


def place_order(order_id: str, item: str, *, commit: bool = True) -> None:
    """The order service: its own row and the message, one local transaction."""
    with psycopg.connect(ORDERS) as conn:
        conn.execute(f"INSERT INTO {RUN}_orders VALUES (%s, %s)", (order_id, item))
        message = OutboxMessage(order_id, QUEUE, json.dumps({"item": item}), {"type": "order"})
        write(conn, message, tables=TABLES, status="pending")  # a status relay sends it
        if not commit:
            conn.rollback()  # the order and its message are gone together


async def place_orders_async(count: int) -> None:
    """The same from asyncio code: rows a last-id relay sends (status None)."""
    async with await psycopg.AsyncConnection.connect(ORDERS) as conn:
        for n in range(count):
            order_id = f"async-{n}"
            await conn.execute(f"INSERT INTO {RUN}_orders VALUES (%s, 'book')", (order_id,))
            message = OutboxMessage(order_id, QUEUE, json.dumps({"item": "book"}))
            await async_writer.write(conn, message, tables=TABLES)
            await conn.commit()


def ship(conn: psycopg.Connection, message: Message) -> None:
    """The shipping service's handler: runs in the inbox row's transaction, once per order."""
    body = json.loads(message.body)
    if body["item"] == "poison":
        raise Reject("no such item")  # dead-lettered, never retried
    order_id = message.headers["order-id"]
    conn.execute(f"INSERT INTO {RUN}_shipments VALUES (%s, %s)", (order_id, body["item"]))


def main() -> dict[str, object]:
    create_tables()
    for n in range(10):
        place_order(f"sync-{n}", "pen")
    place_order("never", "pen", commit=False)
    place_order("poison-1", "poison")
    asyncio.run(place_orders_async(10))

    stop = threading.Event()
    config = RelayConfig(batch_size=5, poll_interval=0.2, retry=RetrySettings(FailurePolicy.RETRY))
    relays = [
        StatusRelay(ORDERS, StompPublisher(broker), config, tables=TABLES),
        LastIdRelay(ORDERS, StompPublisher(broker), config, tables=TABLES, partitions=2),
    ]
    consumer = InboxConsumer(SHIPPING, broker, QUEUE, ship, tables=TABLES)
    workers = [threading.Thread(target=w.run, args=(stop,)) for w in [*relays, consumer]]
    for worker in workers:
        worker.start()
    # A relay's retry after a lost receipt: the same message published twice.
    again = StompPublisher(broker, key_header=TABLES.key_header)
    again.publish([OutboxMessage("sync-0", QUEUE, json.dumps({"item": "pen"}))])
    again.close()

    deadline = time.monotonic() + 60
    with psycopg.connect(SHIPPING, autocommit=True) as conn:
        while time.monotonic() < deadline:
            shipped = conn.execute(f"SELECT count(*) FROM {RUN}_shipments").fetchone()
            stats = consumer.stats
            if shipped == (20,) and stats.dead_lettered == 1 and stats.duplicates >= 1:
                break
            time.sleep(0.05)
        shipments = {r[0] for r in conn.execute(f"SELECT order_id FROM {RUN}_shipments")}
    stop.set()
    for worker in workers:
        worker.join(30)

    with broker() as client:  # the dead letter, with its reason
        dead = client.subscribe(f"/queue/DLQ.{RUN}.orders", ack="client-individual")
        letter = dead.get(10)
        if letter is not None:
            client.ack(letter)
    with psycopg.connect(ORDERS, autocommit=True) as conn:
        cleaned = clean(conn, tables=TABLES).deleted  # every row was relayed: all go
        for table in (f"{RUN}_orders", TABLES.outbox, TABLES.failures, TABLES.positions):
            conn.execute(f"DROP TABLE {table}")
    with psycopg.connect(SHIPPING, autocommit=True) as conn:
        for table in (f"{RUN}_shipments", TABLES.inbox):
            conn.execute(f"DROP TABLE {table}")
    return {
        "shipped": sorted(shipments),
        "consumer": consumer.stats.as_dict(),
        "relays": {r.mode: r.stats.as_dict() for r in relays},
        "dead_letter_reason": letter.headers.get("twopc-dlq-reason") if letter else None,
        "cleaned": cleaned,
        "packages": sorted({m.split(".")[0] for m in sys.modules} & {"scenarios", "outbox"}),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
