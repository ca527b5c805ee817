"""Embedding twopc in an application: its own logging, its own names, one atomic operation.

Run it against the lab (``eval "$(twopc lab env)"`` first) or your own servers:
``python docs/examples/embed.py``.
"""

import logging
import os
import uuid

import psycopg
import structlog

from coordinator import Coordinator, FileDecisionLog, Outcome
from participants.activemq import ActiveMQ
from participants.postgres import PostgresResource

# The application's own logging set-up: twopc emits structlog events into it
# and never changes it.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,  # carries the gtrid of each protocol step
        structlog.processors.add_log_level,
        structlog.processors.JSONRenderer(),
    ],
    wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
)
configured = structlog.get_config()

BILLING = os.environ["TWOPC_PG_A"]  # libpq connection strings
STOCK = os.environ["TWOPC_PG_B"]
BROKER = os.environ["TWOPC_STOMP"]  # host:port of ActiveMQ's STOMP connector
LOGIN = os.environ.get("TWOPC_STOMP_USER")  # None: a broker that takes anyone
PASSCODE = os.environ.get("TWOPC_STOMP_PASSWORD")
TLS = os.environ.get("TWOPC_STOMP_TLS") == "1"  # then BROKER is its TLS connector
CA_FILE = os.environ.get("TWOPC_STOMP_CA")  # the certificate to trust (None: the system's)

for dsn in (BILLING, STOCK):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shop_ledger (id text PRIMARY KEY, amount int)")

order = uuid.uuid4().hex
coordinator = Coordinator(
    "shop",  # prefixes this coordinator's gtrids and broker client-ids
    FileDecisionLog("shop-decisions.log"),  # one coordinator per log; recovery runs at start
    [PostgresResource("billing", BILLING), PostgresResource("stock", STOCK)],
    ActiveMQ(BROKER, "shop", login=LOGIN, passcode=PASSCODE, tls=TLS, ca_file=CA_FILE),
)
with coordinator:
    with coordinator.transaction() as tx:  # commits when the block ends
        tx.execute("billing", "INSERT INTO shop_ledger VALUES (%s, %s)", (order, -10))
        tx.execute("stock", "INSERT INTO shop_ledger VALUES (%s, %s)", (order, 10))
        tx.send("/queue/shop.orders", f'{{"order": "{order}"}}', {"order-id": order})
    # Here the outcome is COMMITTED; otherwise the block raised TransactionAborted
    # or TransactionInDoubt(gtrid) -- never a guess.
    assert tx.outcome is Outcome.COMMITTED

assert structlog.get_config() == configured, "twopc changed the application's structlog set-up"
print(f"order {order}: {tx.outcome.value} as {tx.gtrid}")
