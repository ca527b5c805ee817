"""``twopc doctor``: checks a deployment before use, each finding with its fix.

Every check is a small function from what was observed (a setting's value,
the broker's activemq.xml, a folder's mode) to a :class:`Check`, so that its
wording is tested without a server; :func:`run_checks` gathers the
observations from the servers the settings name and runs them all.

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

import contextlib
import enum
import os
import secrets
import stat
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from coordinator.errors import TwoPhaseCommitError
from participants.activemq import MARKER_QUEUE_PREFIX
from participants.pg_commands import describe_dsn
from scenarios.config import Settings
from scenarios.config_values import BROKER_CONFIG, redact
from scenarios.lab.templates import QUEUE_MEMORY
from scenarios.stomp_probe import receipt_gaps

#: ActiveMQ's maxBrowsePageSize when a policyEntry matches the queue without setting it.
DEFAULT_BROWSE_PAGE = 400
#: The browse page doctor asks for: markers of this many committed transactions may wait
#: to be swept (a crash under load leaves them all) and recovery must see every one.
MIN_BROWSE_PAGE = 10_000
#: The clock skew doctor accepts between this host and a database, in seconds.
DEFAULT_MAX_SKEW = 1.0
#: The gap doctor accepts between two receipts the broker sends back to back (ms): with
#: Nagle's algorithm on its connector the second waits for this host's delayed ACK
#: (40 ms or more on Linux); without, it follows at once (well under a millisecond).
MAX_RECEIPT_GAP_MS = 20.0
#: Receipt pairs the live tcpNoDelay probe measures (their median gap is judged).
RECEIPT_PAIRS = 5
#: Where the live check stores one persistent message, and takes it back.
DOCTOR_QUEUE = "/queue/twopc.doctor"
#: How long it waits for the broker's RECEIPT of that SEND, in seconds.
PERSISTENT_SEND_TIMEOUT = 5.0


class Status(enum.Enum):
    OK = "ok"
    FINDING = "FAIL"
    SKIPPED = "skip"


@dataclass(frozen=True)
class Check:
    """One check's verdict: what was seen and, for a finding, what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status is Status.FINDING

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def _ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def _finding(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.FINDING, detail, fix)


# -- PostgreSQL ------------------------------------------------------------------


def max_prepared_check(
    database: str, setting: str, max_prepared: int, prepared_now: int, concurrency: int
) -> Check:
    """max_prepared_transactions of one database against the transactions run at once."""
    name = f"max_prepared_transactions ({database})"
    detail = (
        f"database {database} ({setting}): max_prepared_transactions = {max_prepared}, "
        f"{prepared_now} prepared now, concurrency {concurrency}"
    )
    fix = (
        f"set max_prepared_transactions = {max(2 * concurrency, concurrency + prepared_now)} "
        f"(at least the {concurrency} transactions run at once, plus those left prepared) "
        f"in database {database}'s postgresql.conf and restart PostgreSQL"
    )
    if max_prepared == 0:
        return _finding(name, detail + ": PREPARE TRANSACTION is disabled", fix)
    if max_prepared - prepared_now < concurrency:
        return _finding(name, detail + f": room for only {max_prepared - prepared_now} more", fix)
    return _ok(name, detail)


def wal_level_check(database: str, setting: str, wal_level: str) -> Check:
    """wal_level on the database the CDC strategies decode (A)."""
    name = f"wal_level ({database})"
    detail = f"database {database} ({setting}): wal_level = {wal_level}"
    if wal_level == "logical":
        return _ok(name, detail)
    return _finding(
        name,
        detail + ": CDC (--strategy cdc, cdc-fanout) cannot decode its WAL",
        f"set wal_level = logical in database {database}'s postgresql.conf and restart "
        "PostgreSQL (only the CDC strategies need it)",
    )


def clock_skew_check(database: str, setting: str, skew: float, max_skew: float) -> Check:
    """This host's clock against a database's (``skew``: the server minus this host)."""
    name = f"clock skew ({database})"
    detail = f"database {database} ({setting}) is {skew:+.3f} s from this host's clock"
    if abs(skew) <= max_skew:
        return _ok(name, detail)
    return _finding(
        name,
        detail + f" (more than {max_skew:g} s): the ages of prepared branches are off by as much",
        "synchronise both clocks with NTP (chrony or systemd-timesyncd) on this host and on "
        "the database server",
    )


def database_login_check(database: str, setting: str, dsn: str, error: str | None) -> Check:
    """Whether a database accepted the connection string's login."""
    name = f"credentials ({database})"
    where = f"database {database} ({setting}, {describe_dsn(dsn)})"
    if error is None:
        return _ok(name, f"{where} accepted the login")
    return _finding(
        name,
        f"cannot connect to {where}: {error}",
        f"check {setting}: host, port, user, dbname, password (or ~/.pgpass) and "
        "pg_hba.conf; for the lab run 'twopc lab up'",
    )


OWN_SERVERS_DOC = "docs/own-servers.md"
NO_PASSFILE = "/nonexistent/.pgpass"  # a passfile libpq finds absent, quietly (/dev/null: warns)


def superuser_check(database: str, setting: str, role: str, superuser: bool) -> Check:
    """Whether the role twopc logs in as is a superuser (it needs not be, and should not)."""
    name = f"superuser ({database})"
    detail = f"database {database} ({setting}): role {role!r} is "
    if not superuser:
        return _ok(name, detail + "not a superuser")
    return _finding(
        name,
        detail + "a superuser: whoever logs in as it runs shell commands as the server's OS "
        "user (COPY ... TO PROGRAM) and reads every database",
        f"connect as a role without SUPERUSER that owns twopc's tables and holds REPLICATION "
        f"(CDC), CREATEDB (tests) and pg_signal_backend (fencing); see {OWN_SERVERS_DOC}",
    )


def password_required_check(
    database: str,
    setting: str,
    dsn: str,
    let_in: bool | None,
    *,
    reason: str = "",
    trust_rules: Sequence[str] = (),
) -> Check:
    """Whether the server asks for a password: ``let_in`` is what a login attempt without
    any password did (None: the attempt could not tell, ``reason`` says why); with
    ``trust_rules`` (pg_hba.conf's, when the role may read them) those are the evidence."""
    name = f"password required ({database})"
    where = f"database {database} ({setting}, {describe_dsn(dsn)})"
    fix = (
        "replace 'trust' by 'scram-sha-256' in pg_hba.conf (host and local lines), give "
        "the roles passwords, and reload PostgreSQL (SELECT pg_reload_conf()); twopc then "
        "reads its password from the connection string, PGPASSFILE or ~/.pgpass"
    )
    if trust_rules:
        return _finding(
            name,
            f"{where}: pg_hba.conf trusts without a password: {'; '.join(trust_rules)}",
            fix,
        )
    if let_in is None:
        return Check(name, Status.SKIPPED, f"{where}: cannot check ({reason})")
    if let_in:
        return _finding(
            name,
            f"{where} let this role in without any password (trust): every local user "
            "can log in as it",
            fix,
        )
    return _ok(name, f"{where} asks for a password")


def broker_login_check(address: str, error: str | None) -> Check:
    """Whether the broker accepted the STOMP login."""
    name = "credentials (broker)"
    if error is None:
        return _ok(name, f"the broker at {address} (TWOPC_STOMP) accepted the login")
    return _finding(
        name,
        f"cannot connect to the broker at {address} (TWOPC_STOMP): {error}",
        "check TWOPC_STOMP, TWOPC_STOMP_USER and TWOPC_STOMP_PASSWORD (and TWOPC_STOMP_TLS, "
        "TWOPC_STOMP_CA); for the lab: eval \"$(twopc lab env)\" after 'twopc lab up'",
    )


# -- the broker's configuration (activemq.xml) ---------------------------------------


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _elements(root: ET.Element, tag: str) -> list[ET.Element]:
    return [e for e in root.iter() if isinstance(e.tag, str) and _local(e.tag) == tag]


def parse_broker_config(text: str) -> ET.Element:
    """The root of an activemq.xml; ValueError if it is not XML."""
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc


def journal_sync_check(root: ET.Element, where: str) -> Check:
    """KahaDB must sync its journal on every commit (the marker is the commit point)."""
    name = "broker journal sync"
    for broker in _elements(root, "broker"):
        if broker.get("persistent", "true").lower() == "false":
            return _finding(
                name,
                f'{where}: the broker is not persistent (persistent="false"): a commit '
                "marker is lost when the broker stops",
                f'set persistent="true" on <broker> in {where} and restart the broker',
            )
    fix = (
        f'in {where}, set journalDiskSyncStrategy="always" on <kahaDB> (and remove '
        'enableJournalDiskSyncs="false"), then restart the broker'
    )
    stores = _elements(root, "kahaDB")
    for store in stores:
        if store.get("enableJournalDiskSyncs", "true").lower() == "false":
            return _finding(
                name,
                f'{where}: kahaDB enableJournalDiskSyncs="false": a COMMIT receipt does '
                "not mean the commit marker is on disk",
                fix,
            )
        strategy = store.get("journalDiskSyncStrategy", "always")
        if strategy.lower() != "always":
            return _finding(
                name,
                f'{where}: kahaDB journalDiskSyncStrategy="{strategy}": a COMMIT receipt '
                "does not mean the commit marker is on disk",
                fix,
            )
    if stores:
        return _ok(name, f"{where}: KahaDB syncs its journal on every commit")
    return _ok(name, f"{where}: no <kahaDB> override: ActiveMQ's default KahaDB syncs always")


def _destination_matches(pattern: str, name: str) -> bool:
    """ActiveMQ's destination wildcards: ``>`` the rest, ``*`` one segment, ``.`` a separator."""
    parts, names = pattern.split("."), name.split(".")
    for index, part in enumerate(parts):
        if part == ">":
            return True
        if index >= len(names) or part not in ("*", names[index]):
            return False
    return len(parts) == len(names)


def _queue_policy(root: ET.Element, queue_name: str) -> ET.Element | None:
    """The policyEntry ActiveMQ applies to queue ``queue_name``, if any matches: the most
    specific one (fewest wildcards, then the longest pattern)."""
    matching = [
        entry
        for entry in _elements(root, "policyEntry")
        if entry.get("queue") is not None
        and _destination_matches(str(entry.get("queue")), queue_name)
    ]
    if not matching:
        return None
    return min(
        matching,
        key=lambda e: (
            str(e.get("queue")).count(">") + str(e.get("queue")).count("*"),
            -len(str(e.get("queue"))),
        ),
    )


def browse_page_check(
    root: ET.Element, where: str, queue: str = MARKER_QUEUE_PREFIX + "twopc"
) -> Check:
    """The marker queues' maxBrowsePageSize: recovery must browse every marker (a
    coordinator's queue is ``/queue/twopc.markers.<coordinator id>``)."""
    name = "maxBrowsePageSize"
    queue_name = queue.removeprefix("/queue/")
    entry = _queue_policy(root, queue_name)
    if entry is None:
        return _finding(
            name,
            f"{where}: no policyEntry matches queue {queue_name}, so a browse stops after "
            f"{DEFAULT_BROWSE_PAGE} messages",
            f'add <policyEntry queue=">" maxBrowsePageSize="1000000"/> (or at least '
            f"{MIN_BROWSE_PAGE}) to the destinationPolicy in {where} and restart the broker",
        )
    value = entry.get("maxBrowsePageSize", str(DEFAULT_BROWSE_PAGE))
    try:
        size = int(value)
    except ValueError:
        size = -1
    detail = (
        f'{where}: policyEntry queue="{entry.get("queue")}" gives {queue_name} '
        f"maxBrowsePageSize {value}"
    )
    if size >= MIN_BROWSE_PAGE:
        return _ok(name, detail)
    return _finding(
        name,
        detail + f": recovery cannot see markers beyond the first {value}",
        f'set maxBrowsePageSize="1000000" (at least {MIN_BROWSE_PAGE}) on that policyEntry '
        f"in {where} and restart the broker",
    )


def queue_memory_check(
    root: ET.Element, where: str, queue: str = MARKER_QUEUE_PREFIX + "twopc"
) -> Check:
    """Each queue's cache of pending messages must be bounded (``memoryLimit`` on its
    policyEntry): without one, a queue nobody consumes keeps every message in the heap
    until the broker dies of OutOfMemoryError; with only the broker's shared limit, such
    a queue fills it and no other queue can page its messages in, the marker queue that
    recovery browses included."""
    name = "queue memory limit"
    queue_name = queue.removeprefix("/queue/")
    entry = _queue_policy(root, queue_name)
    fix = (
        f'set memoryLimit="{QUEUE_MEMORY}" on the policyEntry matching the queues (queue=">") in '
        f"{where} and restart the broker"
    )
    if entry is None or entry.get("memoryLimit") is None:
        which = (
            "no policyEntry matches"
            if entry is None
            else (f'policyEntry queue="{entry.get("queue")}" sets no memoryLimit for')
        )
        return _finding(
            name,
            f"{where}: {which} queue {queue_name}: a queue's pending messages are cached "
            "in the heap up to the broker's shared limit (none, if <systemUsage> sets no "
            "<memoryUsage>), so a backlog nobody consumes ends the broker with "
            "OutOfMemoryError, or fills the shared limit so that recovery's browse of the "
            "markers sees nothing",
            fix,
        )
    return _ok(
        name,
        f'{where}: policyEntry queue="{entry.get("queue")}" caches at most '
        f"{entry.get('memoryLimit')} of each queue's pending messages",
    )


def link_stealing_config_check(root: ET.Element, where: str) -> Check:
    """No STOMP connector may let a new connection take over a live one's client-id."""
    name = "link stealing (config)"
    stealing = []
    for connector in _elements(root, "transportConnector"):
        uri = connector.get("uri", "")
        if not uri.lower().startswith("stomp"):
            continue
        attribute = connector.get("allowLinkStealing", "false").lower() == "true"
        in_uri = "allowlinkstealing=true" in uri.lower().replace(" ", "")
        if attribute or in_uri:
            stealing.append(connector.get("name") or uri)
    if not stealing:
        return _ok(name, f"{where}: no STOMP connector allows link stealing")
    return _finding(
        name,
        f"{where}: connector {', '.join(stealing)} allows link stealing: a new connection "
        "takes a live one's client-id, which defeats client-id fencing",
        f"remove allowLinkStealing (attribute or URI option) from those connectors in "
        f"{where} and restart the broker",
    )


def _stomp_connectors(root: ET.Element) -> list[tuple[str, str]]:
    """Each STOMP transportConnector's name (or URI) and URI."""
    return [
        (connector.get("name") or connector.get("uri") or "", connector.get("uri") or "")
        for connector in _elements(root, "transportConnector")
        if connector.get("uri", "").lower().startswith("stomp")
    ]


def stomp_nodelay_config_check(root: ET.Element, where: str) -> Check:
    """Every STOMP connector must turn Nagle's algorithm off (``transport.tcpNoDelay=true``)."""
    name = "STOMP tcpNoDelay (config)"
    missing = [
        shown
        for shown, uri in _stomp_connectors(root)
        if "transport.tcpnodelay=true" not in uri.lower().replace(" ", "")
    ]
    if not missing:
        return _ok(name, f"{where}: every STOMP connector sets transport.tcpNoDelay=true")
    return _finding(
        name,
        f"{where}: connector {', '.join(missing)} leaves Nagle's algorithm on: a frame the "
        "broker writes right after another (a RECEIPT, then the next MESSAGE) waits for the "
        "client's delayed ACK, about 40 ms, on every 2pc consumer transaction",
        f"add ?transport.tcpNoDelay=true to those connectors' uri in {where} and restart "
        "the broker",
    )


def stomp_nodelay_probe_check(address: str, gap_ms: float) -> Check:
    """The live test: the median gap (ms) between two receipts the broker sent back to back."""
    name = "STOMP tcpNoDelay (broker)"
    detail = (
        f"the broker at {address} sent the second of two receipts {gap_ms:.1f} ms after the "
        f"first (median of {RECEIPT_PAIRS} pairs)"
    )
    if gap_ms <= MAX_RECEIPT_GAP_MS:
        return _ok(name, detail)
    return _finding(
        name,
        detail + f", more than {MAX_RECEIPT_GAP_MS:g} ms: its STOMP connector leaves Nagle's "
        "algorithm on, so each frame it writes right after another waits for this host's "
        "delayed ACK",
        "add ?transport.tcpNoDelay=true to the uri of the broker's STOMP transportConnector "
        "(activemq.xml) and restart the broker",
    )


def link_stealing_probe_check(address: str, second_connected: bool) -> Check:
    """The live test: a second CONNECT with a client-id a live connection holds."""
    name = "link stealing (broker)"
    if not second_connected:
        return _ok(
            name, f"the broker at {address} refused a second connection with a held client-id"
        )
    return _finding(
        name,
        f"the broker at {address} let a second connection take a live connection's "
        "client-id (link stealing): fencing cannot stop a coordinator that is still running",
        "turn allowLinkStealing off on the broker's STOMP transportConnector (activemq.xml) "
        "and restart the broker",
    )


def marker_browse_check(address: str, error: str | None, markers: int) -> Check:
    """The live test: a full browse of the marker queue."""
    name = "marker browse (broker)"
    if error is None:
        return _ok(
            name,
            f"the broker at {address} browsed all {markers} markers on {MARKER_QUEUE_PREFIX}<id>",
        )
    return _finding(
        name,
        f"the broker at {address}: {error}",
        "raise maxBrowsePageSize of the policyEntry matching the marker queue in "
        "activemq.xml (e.g. 1000000) and restart the broker",
    )


def persistent_send_check(address: str, error: str | None) -> Check:
    """The live test: the broker stores one persistent message and answers its SEND."""
    name = "persistent send (broker)"
    if error is None:
        return _ok(name, f"the broker at {address} stored a persistent message on {DOCTOR_QUEUE}")
    return _finding(
        name,
        f"the broker at {address} did not store a persistent message on {DOCTOR_QUEUE}: {error}",
        "a broker whose store is full (its log says 'Persistent store is Full') holds "
        "every producer: consume or purge the queues that nothing reads (a benchmark's, a "
        "dead-letter queue), or raise storeUsage in activemq.xml and restart the broker",
    )


def broker_config_checks(path: str | None) -> list[Check]:
    """The checks of the broker's activemq.xml at ``path`` (TWOPC_BROKER_CONFIG)."""
    names = (
        "broker journal sync",
        "maxBrowsePageSize",
        "link stealing (config)",
        "STOMP tcpNoDelay (config)",
        "queue memory limit",
    )
    if not path:
        return [
            Check(
                name,
                Status.SKIPPED,
                f"{BROKER_CONFIG} is not set, so the broker's activemq.xml was not read",
                f"set {BROKER_CONFIG} to the broker's activemq.xml to check it",
            )
            for name in names
        ]
    try:
        root = parse_broker_config(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return [
            _finding(
                names[0],
                f"cannot read the broker's configuration {path} ({BROKER_CONFIG}): {exc}",
                f"set {BROKER_CONFIG} to a readable activemq.xml",
            )
        ]
    return [
        journal_sync_check(root, path),
        browse_page_check(root, path),
        link_stealing_config_check(root, path),
        stomp_nodelay_config_check(root, path),
        queue_memory_check(root, path),
    ]


# -- the state folder -----------------------------------------------------------------


def state_folder_check(path: Path, mode: int | None, owner: int | None, uid: int) -> Check:
    """TWOPC_HOME: owned by this user, writable by nobody else (``mode`` None: missing)."""
    name = "state folder"
    if mode is None:
        return _finding(
            name,
            f"TWOPC_HOME={path} does not exist",
            f"create it for this user only: mkdir -p -m 700 {path} (or set TWOPC_HOME)",
        )
    shown = f"TWOPC_HOME={path} (mode {stat.S_IMODE(mode):04o}, owner uid {owner})"
    if not stat.S_ISDIR(mode):
        return _finding(name, f"{shown} is not a folder", "set TWOPC_HOME to a folder")
    if mode & stat.S_ISVTX and mode & stat.S_IWOTH:  # /tmp and its like: not ours to chmod
        return _finding(
            name,
            f"{shown} is a shared folder every user can create files in: another user "
            "could put a decision log or lock there first",
            "set TWOPC_HOME to a private folder of this user, e.g. "
            f"mkdir -p -m 700 {path / 'twopc'} && export TWOPC_HOME={path / 'twopc'}",
        )
    if owner != uid:
        return _finding(
            name,
            f"{shown} belongs to another user than this one (uid {uid}): another user could "
            "replace the decision log",
            f"chown {uid} {path}, or set TWOPC_HOME to a folder of your own",
        )
    if mode & (stat.S_IWOTH | stat.S_IWGRP):
        return _finding(
            name,
            f"{shown} is writable by other users: they could replace the decision log",
            f"chmod go-w {path} (0700, as 'twopc lab up' makes it)",
        )
    return _ok(name, f"{shown}: this user's, writable by nobody else")


# -- gathering the observations ------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return redact(lines[-1] if lines else type(exc).__name__)


def database_checks(
    database: str, setting: str, dsn: str, concurrency: int, max_skew: float
) -> list[Check]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        return [database_login_check(database, setting, dsn, _first_line(exc))]
    with conn:
        checks = [database_login_check(database, setting, dsn, None)]
        row = conn.execute(
            "SELECT current_setting('max_prepared_transactions')::int,"
            " (SELECT count(*) FROM pg_prepared_xacts)::int, current_setting('wal_level')"
        ).fetchone()
        assert row is not None
        checks.append(max_prepared_check(database, setting, row[0], row[1], concurrency))
        if database == "a":
            checks.append(wal_level_check(database, setting, row[2]))
        checks.append(clock_skew_check(database, setting, _skew(conn), max_skew))
        role = conn.execute(
            "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert role is not None
        checks.append(superuser_check(database, setting, role[0], bool(role[1])))
        checks.append(_password_check(database, setting, dsn, conn))
    return checks


def _password_check(database: str, setting: str, dsn: str, conn: psycopg.Connection[Any]) -> Check:
    """pg_hba.conf's trust rules if this role may read them, else a login with no password."""
    try:
        rows = conn.execute(
            "SELECT line_number, type, database::text, user_name::text, address"
            " FROM pg_hba_file_rules WHERE auth_method = 'trust' AND error IS NULL"
        ).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        pass  # only superusers (and whom they grant it) read pg_hba_file_rules
    else:
        rules = [f"line {r[0]}: {r[1]} {r[2]} {r[3]} {r[4] or ''}".strip() for r in rows]
        return password_required_check(database, setting, dsn, bool(rules), trust_rules=rules)
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(info.get("host") or "")
    if not host or host.startswith("/") or host.startswith("@"):
        return password_required_check(
            database,
            setting,
            dsn,
            None,
            reason="twopc connects over a Unix socket, where peer authentication (safe) and "
            "trust (not) both let a login in without a password; a superuser can tell them "
            "apart in pg_hba_file_rules",
        )
    # The same login with no password at all: none given, none from PGPASSWORD or a passfile.
    info.update(password="", passfile=NO_PASSFILE, connect_timeout="5")
    try:
        psycopg.connect(**info).close()  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        text = str(exc)
        if "password" in text or "authentication" in text:
            return password_required_check(database, setting, dsn, False)
        return password_required_check(database, setting, dsn, None, reason=_first_line(exc))
    return password_required_check(database, setting, dsn, True)


def _skew(conn: psycopg.Connection[Any]) -> float:
    """The server's clock minus this host's, taken at the middle of the round trip."""
    before = time.time()
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    after = time.time()
    assert row is not None
    return float(row[0]) - (before + after) / 2


def _broker_checks(settings: Settings) -> list[Check]:
    from participants.activemq import ActiveMQ
    from scenarios.wiring import open_stomp

    try:
        open_stomp(settings, participant="mq").close()
    except TwoPhaseCommitError as exc:
        return [broker_login_check(settings.stomp, _first_line(exc))]
    checks = [broker_login_check(settings.stomp, None)]
    client_id = f"twopc-doctor-{secrets.token_hex(4)}"
    first = open_stomp(settings, client_id=client_id)
    try:
        try:
            second = open_stomp(settings, client_id=client_id)
        except TwoPhaseCommitError:
            checks.append(link_stealing_probe_check(settings.stomp, False))
        else:
            second.close()
            checks.append(link_stealing_probe_check(settings.stomp, True))
    finally:
        with contextlib.suppress(Exception):
            first.close()
    try:
        checks.append(stomp_nodelay_probe_check(settings.stomp, receipt_gap(settings)))
    except TwoPhaseCommitError as exc:
        checks.append(
            Check(
                "STOMP tcpNoDelay (broker)",
                Status.SKIPPED,
                f"the broker at {settings.stomp}: cannot measure ({_first_line(exc)})",
            )
        )
    checks.append(persistent_send_check(settings.stomp, _store_one(settings)))
    mq = ActiveMQ(settings.stomp, settings.coordinator_id, pool_size=1, **settings.stomp_options())
    try:
        checks.append(marker_browse_check(settings.stomp, None, len(mq.markers())))
    except TwoPhaseCommitError as exc:
        checks.append(marker_browse_check(settings.stomp, _first_line(exc), 0))
    finally:
        mq.close()
    return checks


def _store_one(settings: Settings) -> str | None:
    """SEND one persistent message with a receipt, then consume it; None, or what failed."""
    from scenarios.transfer.model import drain
    from scenarios.wiring import open_stomp

    try:
        with open_stomp(settings) as client:
            client.send(DOCTOR_QUEUE, "twopc doctor", receipt_timeout=PERSISTENT_SEND_TIMEOUT)
    except TwoPhaseCommitError as exc:
        return _first_line(exc)
    drain(settings, DOCTOR_QUEUE)
    return None


def receipt_gap(settings: Settings, *, address: str | None = None) -> float:
    """The median gap (ms) between two receipts the broker wrote back to back
    (scenarios.stomp_probe), over RECEIPT_PAIRS pairs."""
    gaps = receipt_gaps(address or settings.stomp, pairs=RECEIPT_PAIRS, **settings.stomp_options())
    return statistics.median(gaps)


def _state_folder(home: Path) -> Check:
    try:
        info = home.stat()
    except FileNotFoundError:
        return state_folder_check(home, None, None, os.geteuid())
    return state_folder_check(home, info.st_mode, info.st_uid, os.geteuid())


def run_checks(
    settings: Settings, *, concurrency: int, max_skew: float = DEFAULT_MAX_SKEW
) -> list[Check]:
    """Every check against the servers and files ``settings`` name, in a fixed order."""
    steps: Iterable[Callable[[], list[Check]]] = (
        lambda: [_state_folder(settings.home)],
        lambda: database_checks("a", "TWOPC_PG_A", settings.pg_a, concurrency, max_skew),
        lambda: database_checks("b", "TWOPC_PG_B", settings.pg_b, concurrency, max_skew),
        lambda: _broker_checks(settings),
        lambda: broker_config_checks(settings.broker_config),
    )
    checks: list[Check] = []
    for step in steps:
        checks.extend(step())
    return checks
