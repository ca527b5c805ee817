"""``twopc doctor``: checks a deployment before use, each finding with its fix.

Every check is a small function from what was observed (a setting's value,
the broker's activemq.xml, a folder's mode) to a
:class:`~scenarios.doctor.check.Check`, so that its wording is tested without a
server; :func:`run_checks` gathers the observations from the servers the
settings name and runs them all. The checks live by what they look at:
:mod:`~scenarios.doctor.database`, :mod:`~scenarios.doctor.broker` (live),
:mod:`~scenarios.doctor.broker_config` (activemq.xml) and
:mod:`~scenarios.doctor.state_folder`.

What is checked, and why twopc needs it:

* the credentials: each database and the broker accept the configured login;
* ``max_prepared_transactions`` on each database: every transaction in flight
  holds one prepared branch per database between PREPARE and COMMIT PREPARED;
* ``wal_level = logical`` on database A: the CDC strategies decode A's WAL;
* the broker's journal sync (KahaDB): a COMMIT receipt must mean the commit
  marker is on disk, since the marker is the commit point;
* ``maxBrowsePageSize`` of the marker queue: recovery browses every marker, and
  a browse the broker cuts short is refused rather than trusted;
* a ``memoryLimit`` for each queue: a backlog nobody consumes must not fill the
  broker's heap, nor the memory every other queue pages its messages into;
* link stealing off on the STOMP connectors: fencing relies on the broker
  refusing a second connection with a client-id a live one holds;
* ``transport.tcpNoDelay=true`` on the STOMP connectors: with Nagle's
  algorithm on, a frame the broker writes right after another (a RECEIPT, then
  the next MESSAGE) waits for the client's delayed ACK, about 40 ms, which
  bounds the 2pc consumer to some 25 transactions a second. Read in the
  activemq.xml when it is given, and measured live: two receipt-requested
  frames written back to back, the gap between their receipts;
* no ``trust`` on each database (a login with no password at all is refused;
  a superuser reads ``pg_hba_file_rules`` instead; over a Unix socket, where
  peer and trust look alike, it says it cannot check), and the role twopc
  logs in as is no superuser: with either, any local user or anyone with the
  password runs shell commands as the server (``COPY ... TO PROGRAM``);
* clock skew between this host and each PostgreSQL: the age of a prepared
  branch (``twopc indoubt``, the metrics) is PostgreSQL's ``prepared`` time
  against this host's clock;
* the broker stores a persistent message (a SEND with a receipt, then the
  message consumed again): a broker whose store is full holds every producer,
  so no transaction reaches its commit point and no relay publishes;
* the state folder (``TWOPC_HOME``): it holds the decision log and secrets, so
  it must belong to this user and be writable by nobody else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from scenarios.config import Settings
from scenarios.doctor.broker import broker_checks
from scenarios.doctor.broker_config import broker_config_checks
from scenarios.doctor.check import Check, Status
from scenarios.doctor.database import DEFAULT_MAX_SKEW, database_checks
from scenarios.doctor.state_folder import state_folder_checks

__all__ = ["DEFAULT_MAX_SKEW", "Check", "Status", "run_checks"]


def run_checks(
    settings: Settings, *, concurrency: int, max_skew: float = DEFAULT_MAX_SKEW
) -> list[Check]:
    """Every check against the servers and files ``settings`` name, in a fixed order."""
    steps: Iterable[Callable[[], list[Check]]] = (
        lambda: state_folder_checks(settings.home),
        lambda: database_checks("a", "TWOPC_PG_A", settings.pg_a, concurrency, max_skew),
        lambda: database_checks("b", "TWOPC_PG_B", settings.pg_b, concurrency, max_skew),
        lambda: broker_checks(settings),
        lambda: broker_config_checks(settings.broker_config),
    )
    checks: list[Check] = []
    for step in steps:
        checks.extend(step())
    return checks
