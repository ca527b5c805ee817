"""twopc from asyncio: one atomic operation over two databases and a broker.

Run it against the lab (``eval "$(twopc lab env)"`` first) or your own servers:
``python docs/examples/aio_embed.py``.
"""

import asyncio
import os
import uuid

from coordinator import FileDecisionLog, Outcome
from coordinator.aio import AsyncCoordinator
from participants.aio.activemq import AsyncActiveMQ
from participants.aio.postgres import AsyncPostgresResource

BILLING = os.environ["TWOPC_PG_A"]  # libpq connection strings
STOCK = os.environ["TWOPC_PG_B"]
BROKER = os.environ["TWOPC_STOMP"]  # host:port of ActiveMQ's STOMP connector
LOGIN = os.environ.get("TWOPC_STOMP_USER")  # None: a broker that takes anyone
PASSCODE = os.environ.get("TWOPC_STOMP_PASSWORD")
TLS = os.environ.get("TWOPC_STOMP_TLS") == "1"  # then BROKER is its TLS connector
CA_FILE = os.environ.get("TWOPC_STOMP_CA")  # the certificate to trust (None: the system's)
SCHEMA = "CREATE TABLE IF NOT EXISTS shop_ledger (id text PRIMARY KEY, amount int)"


async def main() -> None:
    order = uuid.uuid4().hex
    coordinator = AsyncCoordinator(
        "ashop",  # prefixes this coordinator's gtrids and broker client-ids
        FileDecisionLog("ashop-decisions.log"),  # one coordinator per log
        [AsyncPostgresResource("billing", BILLING), AsyncPostgresResource("stock", STOCK)],
        AsyncActiveMQ(BROKER, "ashop", login=LOGIN, passcode=PASSCODE, tls=TLS, ca_file=CA_FILE),
    )
    async with coordinator:  # recovery runs at start (in a worker thread)
        async with coordinator.transaction() as tx:  # the schema, in both databases
            await tx.execute("billing", SCHEMA)
            await tx.execute("stock", SCHEMA)
        async with coordinator.transaction() as tx:  # commits when the block ends
            await tx.execute("billing", "INSERT INTO shop_ledger VALUES (%s, %s)", (order, -10))
            await tx.execute("stock", "INSERT INTO shop_ledger VALUES (%s, %s)", (order, 10))
            await tx.send("/queue/shop.orders", f'{{"order": "{order}"}}', {"order-id": order})
        # Here the outcome is COMMITTED; otherwise the block raised TransactionAborted
        # or TransactionInDoubt(gtrid) -- never a guess.
        assert tx.outcome is Outcome.COMMITTED
    print(f"order {order}: {tx.outcome.value} as {tx.gtrid}")


asyncio.run(main())
