"""twopc doctor: each check's finding names the fix; the command passes on the lab and fails,
naming the fix, on a PostgreSQL without prepared transactions, or trusting, or logged in to
as a superuser."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import statistics
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from scenarios.config import Settings
from scenarios.doctor import Status, broker, broker_config, database, state_folder
from scenarios.lab.credentials import DB_ADMIN, pg_dsn
from scenarios.lab.services import Lab
from scenarios.lab.templates import (
    ACTIVEMQ_XML,
    QUEUE_MEMORY,
    QUEUE_PURGE_PERIOD_MS,
    TEST_QUEUE_IDLE_MS,
    TEST_QUEUE_PREFIX,
)
from scenarios.stomp_probe import receipt_gaps

TWOPC = [sys.executable, "-m", "scenarios.cli"]

BROKER_XML = """<beans xmlns="http://www.springframework.org/schema/beans">
  <broker xmlns="http://activemq.apache.org/schema/core" {broker}>
    <destinationPolicy><policyMap><policyEntries>{policies}</policyEntries></policyMap>
    </destinationPolicy>
    <persistenceAdapter><kahaDB directory="/d" {kahadb}/></persistenceAdapter>
    <transportConnectors>
      <transportConnector name="stomp" uri="stomp://0.0.0.0:61613{uri}" {connector}/>
    </transportConnectors>
  </broker>
</beans>"""


def broker_xml(
    *, broker: str = "", policies: str = "", kahadb: str = "", uri: str = "", connector: str = ""
) -> ET.Element:
    return broker_config.parse_broker_config(
        BROKER_XML.format(
            broker=broker, policies=policies, kahadb=kahadb, uri=uri, connector=connector
        )
    )


GOOD_POLICY = '<policyEntry queue=">" maxBrowsePageSize="1000000"/>'


def test_max_prepared_zero_is_a_finding_naming_the_setting() -> None:
    """max_prepared_transactions = 0 is a finding whose fix sets it in postgresql.conf."""
    check = database.max_prepared_check("a", "TWOPC_PG_A", 0, 0, 32)
    assert check.status is Status.FINDING
    assert "PREPARE TRANSACTION is disabled" in check.detail
    assert "set max_prepared_transactions = 64" in check.fix
    assert "postgresql.conf" in check.fix


def test_max_prepared_below_concurrency_plus_prepared_is_a_finding() -> None:
    """Room for fewer prepared branches than the concurrency is a finding; enough room is ok."""
    short = database.max_prepared_check("b", "TWOPC_PG_B", 40, 10, 32)
    assert short.status is Status.FINDING
    assert "room for only 30 more" in short.detail
    assert database.max_prepared_check("b", "TWOPC_PG_B", 42, 10, 32).status is Status.OK


def test_wal_level_replica_is_a_finding_for_cdc() -> None:
    """wal_level other than logical is a finding naming the CDC strategies; logical is ok."""
    check = database.wal_level_check("a", "TWOPC_PG_A", "replica")
    assert check.failed and "cdc" in check.detail
    assert "wal_level = logical" in check.fix
    assert not database.wal_level_check("a", "TWOPC_PG_A", "logical").failed


def test_clock_skew_beyond_the_limit_is_a_finding() -> None:
    """A skew past --max-skew (either sign) is a finding pointing at NTP; within it is ok."""
    assert database.clock_skew_check("a", "TWOPC_PG_A", -2.5, 1.0).failed
    check = database.clock_skew_check("b", "TWOPC_PG_B", 1.5, 1.0)
    assert check.failed and "+1.500 s" in check.detail and "NTP" in check.fix
    assert not database.clock_skew_check("a", "TWOPC_PG_A", 0.2, 1.0).failed


def test_login_failures_name_the_settings_to_check() -> None:
    """A refused database or broker login names the settings to fix, never a password."""
    db = database.database_login_check(
        "b", "TWOPC_PG_B", "host=db port=5 dbname=x password=hunter2", "password failed"
    )
    assert db.failed and "TWOPC_PG_B" in db.fix and "db:5/x" in db.detail
    assert "hunter2" not in db.detail + db.fix
    mq = broker.broker_login_check("mq:61613", "login refused")
    assert mq.failed and "TWOPC_STOMP_USER and TWOPC_STOMP_PASSWORD" in mq.fix


@pytest.mark.parametrize(
    ("kahadb", "broker", "expected"),
    [
        ('enableJournalDiskSyncs="false"', "", 'enableJournalDiskSyncs="false"'),
        ('journalDiskSyncStrategy="periodic"', "", 'journalDiskSyncStrategy="periodic"'),
        ("", 'persistent="false"', "not persistent"),
    ],
)
def test_journal_without_sync_is_a_finding(kahadb: str, broker: str, expected: str) -> None:
    """A KahaDB that does not sync on commit (or no persistence) is a finding with the fix."""
    check = broker_config.journal_sync_check(broker_xml(kahadb=kahadb, broker=broker), "x.xml")
    assert check.failed and expected in check.detail
    assert "restart the broker" in check.fix


def test_journal_synced_always_is_ok() -> None:
    """The default (and 'always') sync strategy passes."""
    assert not broker_config.journal_sync_check(broker_xml(), "x.xml").failed
    always = broker_xml(kahadb='journalDiskSyncStrategy="always"')
    assert not broker_config.journal_sync_check(always, "x.xml").failed


def test_browse_page_default_or_small_is_a_finding() -> None:
    """No matching policyEntry (default 400) or a small maxBrowsePageSize is a finding."""
    none = broker_config.browse_page_check(broker_xml(), "x.xml")
    assert none.failed and "400" in none.detail and "maxBrowsePageSize" in none.fix
    small = broker_xml(policies='<policyEntry queue="twopc.>" maxBrowsePageSize="500"/>')
    check = broker_config.browse_page_check(small, "x.xml")
    assert check.failed and "first 500" in check.detail
    other = broker_xml(policies='<policyEntry queue="orders.>" maxBrowsePageSize="9999999"/>')
    assert broker_config.browse_page_check(other, "x.xml").failed


def test_the_most_specific_policy_entry_decides_the_browse_page() -> None:
    """A specific entry for the marker queues (twopc.markers.<id>) wins over a wildcard one."""
    policies = GOOD_POLICY + '<policyEntry queue="twopc.markers.>" maxBrowsePageSize="400"/>'
    assert broker_config.browse_page_check(broker_xml(policies=policies), "x.xml").failed
    assert not broker_config.browse_page_check(broker_xml(policies=GOOD_POLICY), "x.xml").failed


@pytest.mark.parametrize(
    ("uri", "connector"),
    [("?allowLinkStealing=true", ""), ("", 'allowLinkStealing="true"')],
)
def test_link_stealing_on_a_stomp_connector_is_a_finding(uri: str, connector: str) -> None:
    """allowLinkStealing on STOMP (URI option or attribute) is a finding naming fencing."""
    check = broker_config.link_stealing_config_check(
        broker_xml(uri=uri, connector=connector), "x.xml"
    )
    assert check.failed and "fencing" in check.detail and "allowLinkStealing" in check.fix
    assert not broker_config.link_stealing_config_check(broker_xml(), "x.xml").failed


def test_link_stealing_seen_live_is_a_finding() -> None:
    """A broker that let a second connection take a held client-id is a finding."""
    assert broker.link_stealing_probe_check("mq:1", True).failed
    assert not broker.link_stealing_probe_check("mq:1", False).failed


def test_a_stomp_connector_without_tcp_nodelay_is_a_finding() -> None:
    """A STOMP connector without transport.tcpNoDelay=true is a finding naming the ~40 ms
    and the URI option; with it, ok."""
    check = broker_config.stomp_nodelay_config_check(broker_xml(), "x.xml")
    assert check.failed and "stomp" in check.detail and "40 ms" in check.detail
    assert "?transport.tcpNoDelay=true" in check.fix and "x.xml" in check.fix
    fixed = broker_xml(uri="?transport.tcpNoDelay=true")
    assert not broker_config.stomp_nodelay_config_check(fixed, "x.xml").failed


def test_receipts_held_apart_are_a_finding_naming_nagle() -> None:
    """A second receipt held past MAX_RECEIPT_GAP_MS is a finding whose fix is tcpNoDelay."""
    check = broker.stomp_nodelay_probe_check("mq:1", 41.7)
    assert check.failed and "Nagle" in check.detail and "tcpNoDelay=true" in check.fix
    assert not broker.stomp_nodelay_probe_check("mq:1", 0.4).failed


class NagleResponder:
    """A TCP server speaking just enough STOMP (CONNECTED, RECEIPT) with Nagle's algorithm
    on, as a broker without tcpNoDelay: each RECEIPT is its own write. The receipts of the
    commands in ``hold`` never come, as from a broker whose full store holds producers."""

    def __init__(self, hold: tuple[str, ...] = ()) -> None:
        self.hold = hold
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        pending = b""
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                *frames, pending = (pending + data).split(b"\0")
                for frame in frames:
                    head = frame.lstrip(b"\r\n").split(b"\n\n")[0].decode().split("\n")
                    headers = dict(line.split(":", 1) for line in head[1:] if ":" in line)
                    if head[0] == "CONNECT":
                        conn.sendall(b"CONNECTED\nversion:1.2\n\n\0")
                    elif "receipt" in headers and head[0] not in self.hold:
                        conn.sendall(f"RECEIPT\nreceipt-id:{headers['receipt']}\n\n\0".encode())

    def close(self) -> None:
        self.server.close()


def test_the_live_probe_sees_a_connector_that_holds_its_second_receipt() -> None:
    """Against a STOMP server with Nagle's algorithm on, the live check is a finding (the
    second of two receipts waits for this host's delayed ACK; the lab's broker, with
    tcpNoDelay, passes in test_doctor_passes_on_the_lab)."""
    responder = NagleResponder()
    try:
        gaps = receipt_gaps(responder.address, pairs=broker.RECEIPT_PAIRS)
    finally:
        responder.close()
    check = broker.stomp_nodelay_probe_check(responder.address, statistics.median(gaps))
    assert check.failed and "Nagle" in check.detail


def test_a_broker_that_does_not_store_a_persistent_message_is_a_finding_naming_its_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A persistent SEND the broker never answers (a full store holds every producer) is a
    finding whose fix names the store; the lab's broker, which stores it, passes in
    test_doctor_passes_on_the_lab."""
    monkeypatch.setattr(broker, "PERSISTENT_SEND_TIMEOUT", 0.5)
    responder = NagleResponder(hold=("SEND",))
    try:
        settings = Settings(tmp_path, "postgresql://a", "postgresql://b", responder.address, "")
        error = broker.store_one(settings)
    finally:
        responder.close()
    assert error is not None and "SEND to /queue/twopc.doctor" in error, error
    check = broker.persistent_send_check(responder.address, error)
    assert check.failed and responder.address in check.detail and error in check.detail
    assert "Persistent store is Full" in check.fix and "storeUsage" in check.fix
    assert not broker.persistent_send_check("mq:1", None).failed


def test_a_queue_without_a_memory_limit_is_a_finding() -> None:
    """A queue policy without memoryLimit, or no policy at all, is a finding with the
    attribute to set; a memoryLimit on the entry that applies to the queues is ok, and
    the most specific entry is the one read."""
    check = broker_config.queue_memory_check(broker_xml(policies=GOOD_POLICY), "x.xml")
    assert (
        check.failed
        and "OutOfMemoryError" in check.detail
        and "sets no memoryLimit" in check.detail
    )
    assert 'memoryLimit="32 mb"' in check.fix and "restart the broker" in check.fix
    assert broker_config.queue_memory_check(broker_xml(), "x.xml").failed
    bounded = GOOD_POLICY.replace("/>", ' memoryLimit="32 mb"/>')
    check = broker_config.queue_memory_check(broker_xml(policies=bounded), "x.xml")
    assert not check.failed and "32 mb" in check.detail
    markers_unbounded = bounded + '<policyEntry queue="twopc.markers.>"/>'
    assert broker_config.queue_memory_check(broker_xml(policies=markers_unbounded), "x.xml").failed


def test_lab_broker_configuration_passes_every_config_check(tmp_path: Path) -> None:
    """The lab's own activemq.xml template passes the five configuration checks."""
    path = tmp_path / "activemq.xml"
    path.write_text(ACTIVEMQ_XML)
    checks = broker_config.broker_config_checks(str(path))
    assert [c.status for c in checks] == [Status.OK] * 5


def test_lab_broker_removes_idle_empty_queues_of_the_tests_alone() -> None:
    """The lab's broker removes idle empty test queues, as the doctor reads its policy; no other."""
    root = ET.fromstring(ACTIVEMQ_XML)
    removed = broker_config._queue_policy(root, f"{TEST_QUEUE_PREFIX}sm.markers.0a1b")
    assert removed is not None and removed.get("gcInactiveDestinations") == "true"
    assert removed.get("inactiveTimeoutBeforeGC") == str(TEST_QUEUE_IDLE_MS)
    # otherwise as every queue: the doctor's browse and memory checks hold for it too
    assert removed.get("maxBrowsePageSize") == "1000000"
    assert removed.get("memoryLimit") == QUEUE_MEMORY
    for kept in (
        "twopc.markers.twopc",
        "Consumer.audit.VirtualTopic.transfers",
        "transfers.credit",
    ):
        policy = broker_config._queue_policy(root, kept)
        assert policy is not None and policy.get("gcInactiveDestinations") is None, kept
    broker_element = root.find("{http://activemq.apache.org/schema/core}broker")
    assert broker_element is not None
    assert broker_element.get("schedulePeriodForDestinationPurge") == str(QUEUE_PURGE_PERIOD_MS)


def test_unset_broker_config_is_skipped_and_says_which_setting() -> None:
    """Without TWOPC_BROKER_CONFIG the configuration checks are skipped, not passed."""
    checks = broker_config.broker_config_checks(None)
    assert {c.status for c in checks} == {Status.SKIPPED}
    assert all("TWOPC_BROKER_CONFIG" in c.fix for c in checks)


def test_unreadable_broker_config_is_a_finding(tmp_path: Path) -> None:
    """A TWOPC_BROKER_CONFIG that cannot be read or parsed is a finding."""
    (bad := tmp_path / "bad.xml").write_text("<broker")
    for path in (bad, tmp_path / "missing.xml"):
        (check,) = broker_config.broker_config_checks(str(path))
        assert check.failed and "TWOPC_BROKER_CONFIG" in check.fix


def test_state_folder_findings() -> None:
    """A missing, foreign or world-writable state folder is a finding with the command to run."""
    home = Path("/srv/twopc")
    missing = state_folder.state_folder_check(home, None, None, 1000)
    assert missing.failed and "mkdir -p -m 700 /srv/twopc" in missing.fix
    folder = stat.S_IFDIR
    foreign = state_folder.state_folder_check(home, folder | 0o700, 0, 1000)
    assert foreign.failed and "chown 1000" in foreign.fix
    open_to_all = state_folder.state_folder_check(home, folder | 0o777, 1000, 1000)
    assert open_to_all.failed and "chmod go-w" in open_to_all.fix
    assert not state_folder.state_folder_check(home, folder | 0o700, 1000, 1000).failed


@pytest.mark.parametrize("owner", [0, 1000], ids=["root's", "this user's"])
def test_a_shared_sticky_state_folder_is_told_to_move_not_to_chmod(owner: int) -> None:
    """TWOPC_HOME=/tmp (sticky, world-writable): advise a private folder, never chmod or chown."""
    shared = state_folder.state_folder_check(Path("/tmp"), stat.S_IFDIR | 0o1777, owner, 1000)
    assert shared.failed
    assert "chmod" not in shared.fix and "chown" not in shared.fix
    assert "mkdir -p -m 700 /tmp/twopc" in shared.fix and "TWOPC_HOME=/tmp/twopc" in shared.fix


@pytest.mark.lab
def test_doctor_passes_on_the_lab(lab: Lab) -> None:
    """'twopc doctor' on the lab exits 0 with every check ok, the broker's XML read."""
    result = subprocess.run(
        [*TWOPC, "doctor", "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert set(statuses.values()) == {"ok"}
    for name in (
        "max_prepared_transactions (a)",
        "broker journal sync",
        "persistent send (broker)",
        "link stealing (broker)",
        "superuser (a)",
        "password required (b)",
    ):
        assert name in statuses


@pytest.mark.lab
def test_doctor_fails_naming_the_fix_without_prepared_transactions(
    server_without_prepared_transactions: str,
) -> None:
    """Against a PostgreSQL started with max_prepared_transactions=0, doctor exits 1 and
    prints the finding for that database with the setting to change."""
    env = {**os.environ, "TWOPC_PG_A": server_without_prepared_transactions}
    result = subprocess.run([*TWOPC, "doctor"], capture_output=True, text=True, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    at = lines.index(next(line for line in lines if "max_prepared_transactions (a)" in line))
    assert lines[at].startswith("FAIL") and "PREPARE TRANSACTION is disabled" in lines[at]
    assert "set max_prepared_transactions = 64" in lines[at + 1]
    assert any(line.startswith("ok   max_prepared_transactions (b)") for line in lines)
    assert "finding(s)" in lines[-1]


def test_superuser_role_is_a_finding_naming_the_rights_to_give_instead() -> None:
    """A superuser login is a finding that says which rights a plain role needs instead."""
    check = database.superuser_check("a", "TWOPC_PG_A", "postgres", True)
    assert check.failed and "COPY ... TO PROGRAM" in check.detail
    assert "REPLICATION" in check.fix and "pg_signal_backend" in check.fix
    assert not database.superuser_check("a", "TWOPC_PG_A", "twopc", False).failed


def test_password_check_verdicts() -> None:
    """Let in without a password, or trust rules seen: finding; asked for one: ok; else skip."""
    dsn = "host=db port=5 dbname=x password=hunter2"
    let_in = database.password_required_check("a", "TWOPC_PG_A", dsn, True)
    assert let_in.failed and "trust" in let_in.detail and "scram-sha-256" in let_in.fix
    rules = database.password_required_check(
        "a", "TWOPC_PG_A", dsn, True, trust_rules=["line 3: host all all 127.0.0.1/32"]
    )
    assert rules.failed and "line 3" in rules.detail
    assert database.password_required_check("a", "TWOPC_PG_A", dsn, False).status is Status.OK
    unknown = database.password_required_check("a", "TWOPC_PG_A", dsn, None, reason="socket")
    assert unknown.status is Status.SKIPPED and "cannot check (socket)" in unknown.detail
    for check in (let_in, rules, unknown):
        assert "hunter2" not in check.detail + check.fix


@pytest.mark.lab
def test_doctor_flags_trust_and_a_superuser_login(trusting_server: Lab) -> None:
    """Against a trusting PostgreSQL logged in to as its superuser, doctor exits 1 with both
    findings for that database (pg_hba.conf's trust rule named) and their fixes."""
    port = trusting_server.ports.pg_a
    dsn = f"host=127.0.0.1 port={port} user={DB_ADMIN} dbname=postgres connect_timeout=2"
    env = {**os.environ, "TWOPC_PG_A": dsn}
    result = subprocess.run(
        [*TWOPC, "doctor", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["superuser (a)"]["status"] == "FAIL"
    assert "pg_signal_backend" in checks["superuser (a)"]["fix"]
    trust = checks["password required (a)"]
    assert trust["status"] == "FAIL" and "127.0.0.1" in trust["detail"]
    assert "scram-sha-256" in trust["fix"]
    assert checks["superuser (b)"]["status"] == "ok"
    assert checks["password required (b)"]["status"] == "ok"


@pytest.mark.lab
def test_doctor_finds_trust_by_a_login_without_password_as_a_plain_role(
    trusting_server: Lab,
) -> None:
    """As twopc (no superuser, so no pg_hba_file_rules), a login with no password gets in:
    a finding; the lab's own server, asking for a password, is ok."""
    plain = pg_dsn(trusting_server.ports.pg_a, trusting_server.home, dbname="postgres")
    checks = {c.name: c for c in database.database_checks("a", "TWOPC_PG_A", plain, 1, 5.0)}
    assert checks["password required (a)"].failed
    assert "without any password" in checks["password required (a)"].detail
    assert not checks["superuser (a)"].failed
