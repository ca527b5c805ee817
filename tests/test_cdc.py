"""The CDC strategy on the real lab: pgoutput decoding of A's business rows, exactly once.

Covers the writer (the debit alone: no table written for CDC's sake), the
slot's plugin (pgoutput, not test_decoding), 16 writers committing out of
start order, a CDC relay SIGKILLed between publishing and recording (its
replay absorbed by the consumer), two CDC relays at once (one decodes, the
other takes over when the first is killed), and a balance changed with no
transfer (decoded, not sent: no reason comes with it), and the decoder on
the bytes PostgreSQL really sends. The decoder's tests with no database are
in tests/test_pgoutput.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scenarios.config import Settings
from scenarios.outbox.cdc import drop_slot, slot_plugin
from scenarios.outbox.consumer import inbox_counts
from scenarios.outbox.pgoutput import (
    UNCHANGED_TOAST,
    RowChange,
    TableTruncate,
    TransactionAssembler,
    lsn_value,
)
from scenarios.outbox.pipeline import Pipeline
from scenarios.outbox.relay import CDC_LOCK, LOCK_CLASS, RELAY_CRASH_SETTING, CdcRelay
from scenarios.strategies import cdc as cdc_strategy
from scenarios.strategies.cdc import CdcStrategy
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.transfer.schema import CDC_SLOT
from tests.cli_process import stop_report
from tests.test_outbox import (
    ACCOUNTS,
    assert_exactly_once,
    fast_config,
    fresh,
    jitter_before_commit,
    run_writers,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def no_slot_left_behind() -> Iterator[None]:
    """Drop the slot after these tests: an unread slot holds back A's WAL."""
    yield
    if "TWOPC_PG_A" in os.environ:
        drop_slot(os.environ["TWOPC_PG_A"])


def committed_transfers(settings: Settings) -> set[str]:
    with psycopg.connect(settings.pg_a) as conn:
        return {row[0] for row in conn.execute("SELECT transfer_id FROM transfers")}


def slot_exists(settings: Settings) -> bool:
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (CDC_SLOT,)
        ).fetchone()
    return bool(row and row[0])


# -- the writer's SQL -------------------------------------------------------------------


def test_the_cdc_writer_source_writes_no_table_but_the_business_ones() -> None:
    """The CDC strategy's module holds no SQL, and its writer runs only DEBIT_TO."""
    source = Path(cdc_strategy.__file__).read_text()
    assert not re.search(r"\b(INSERT|UPDATE|DELETE)\b", source, re.IGNORECASE)
    assert "cdc_events" not in source
    writer = CdcStrategy()
    assert writer._insert is None, "the CDC writer adds a statement to the debit"
    assert re.findall(r"(?:INSERT INTO|UPDATE) (\w+)", scenario.DEBIT_TO) == [
        "accounts",
        "transfers",
    ]


# -- the real lab -----------------------------------------------------------------------


def created_at_cursor(settings: Settings, stop: threading.Event, seen: set[str]) -> None:
    """The trap: poll transfers ``created_at > last`` (transaction start) in that order."""
    last = None
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        while True:
            done = stop.is_set()
            for transfer_id, created_at in conn.execute(
                "SELECT transfer_id, created_at FROM transfers "
                "WHERE %(last)s::timestamptz IS NULL OR created_at > %(last)s "
                "ORDER BY created_at",
                {"last": last},
            ).fetchall():
                seen.add(transfer_id)
                last = created_at
            if done:
                return
            time.sleep(0.002)


def table_writes(settings: Settings) -> dict[str, int]:
    """Rows inserted, updated and deleted so far, per table of A (the statistics collector)."""
    with psycopg.connect(settings.pg_a) as conn:
        return {
            row[0]: int(row[1])
            for row in conn.execute(
                "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables"
            )
        }


@pytest.mark.lab
def test_cdc_writer_writes_only_the_business_tables(settings: Settings) -> None:
    """A run of the CDC writer inserts and updates rows of accounts and transfers, nothing else."""
    fresh(settings)
    strategy = CdcStrategy()
    strategy.prepare(settings)  # sets the relay's destination: one update, before any transfer
    strategy.close()
    # The statistics arrive when a session reports them: wait for the reset's 5 inserts
    # and prepare's update of relay_positions, so that the baseline holds them.
    wait_for(lambda: table_writes(settings).get("relay_positions", 0) >= 6, 30, "prepare's stats")
    before = table_writes(settings)
    strategy.prepare(settings, concurrency=4)
    try:
        plan = scenario.plan(40, accounts=ACCOUNTS, seed=7)
        result = run_batch(plan, strategy.run_one, concurrency=4)
    finally:
        strategy.close()
    assert result.outcomes["committed"] == 40

    def counted() -> bool:  # the writers' backends report their counts when they end
        return table_writes(settings).get("transfers", 0) - before.get("transfers", 0) >= 40

    wait_for(counted, 30, "the statistics of the writers' sessions")
    after = table_writes(settings)
    changed = {t for t in after if after[t] != before.get(t, 0)}
    assert changed == {"accounts", "transfers"}


@pytest.mark.lab
def test_the_cdc_slot_decodes_with_pgoutput_not_test_decoding(settings: Settings) -> None:
    """The strategy's prepare makes the slot with pgoutput and the publication of the business
    tables."""
    fresh(settings)
    strategy = CdcStrategy()
    strategy.prepare(settings)
    strategy.close()
    assert slot_plugin(settings.pg_a) == "pgoutput"
    with psycopg.connect(settings.pg_a) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (CDC_SLOT,)
            )
        }
    assert tables == {"accounts", "transfers"}


@pytest.mark.lab
def test_a_balance_changed_without_a_transfer_is_decoded_but_not_sent(settings: Settings) -> None:
    """A bare UPDATE of a balance reaches the relay as a change with no reason: not sent."""
    fresh(settings)
    strategy = CdcStrategy()
    strategy.prepare(settings)
    strategy.close()
    with Pipeline(settings, "cdc", config=fast_config()) as pipeline:
        with psycopg.connect(settings.pg_a) as conn:  # a fee moved by hand: money kept
            conn.execute("UPDATE accounts SET balance = balance - 7 WHERE id = 'acc-00003'")
            conn.execute("UPDATE accounts SET balance = balance + 7 WHERE id = 'acc-00004'")
        result = run_writers(settings, strategy, 5, concurrency=1)
        assert result.outcomes["committed"] == 5
        assert_exactly_once(settings)
        relay = pipeline.relay_workers()[0].runner
        assert isinstance(relay, CdcRelay)
        wait_for(lambda: relay.stats.unexplained >= 2, 30, "the correction to be decoded")
        assert relay.stats.unexplained == 2
    assert inbox_counts(settings.pg_b)["rows"] == 5


@pytest.mark.lab
def test_cdc_delivers_sixteen_out_of_order_writers_once(settings: Settings) -> None:
    """16 writers commit out of start order; CDC (commit order) misses none, a created_at
    cursor over the same rows does."""
    fresh(settings)
    assert not slot_exists(settings), "reset must drop the slot"
    strategy = CdcStrategy(before_commit=jitter_before_commit)
    stop, seen = threading.Event(), set[str]()
    trap = threading.Thread(target=created_at_cursor, args=(settings, stop, seen))
    with Pipeline(settings, "cdc", config=fast_config()):
        trap.start()
        result = run_writers(settings, strategy, 320)
        stop.set()
        trap.join()
        assert result.outcomes["committed"] == 320
        assert_exactly_once(settings)
    assert committed_transfers(settings) - seen, "no out-of-order commit happened"
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(
            "SELECT p.lsn::text, s.confirmed_flush_lsn::text FROM relay_positions p, "
            "pg_replication_slots s WHERE p.name = 'cdc' AND s.slot_name = %s",
            (CDC_SLOT,),
        ).fetchone()
    assert row is not None and row[0] is not None, "the relay recorded no position"
    assert lsn_value(row[1]) >= lsn_value(row[0]), (
        "the slot was not advanced past the recorded position"
    )


@pytest.mark.lab
def test_cdc_relay_killed_after_publishing_replays_and_is_absorbed(
    settings: Settings, tmp_path: Path
) -> None:
    """A CDC relay SIGKILLed after publishing, before recording: the restart replays, once in B."""
    fresh(settings)
    strategy = CdcStrategy()
    strategy.prepare(settings)  # the slot must exist before the first write
    strategy.close()
    pipeline = Pipeline(
        settings,
        "cdc",
        processes=True,
        config=fast_config(),
        env={RELAY_CRASH_SETTING: "after-publish=kill@3"},
        log_dir=str(tmp_path),
    ).start()
    try:
        run_writers(settings, strategy, 200, concurrency=8)
        relay = pipeline.relay_workers()[0].process
        assert relay is not None
        assert relay.wait(30) == -9, "the relay was to SIGKILL itself after its third batch"
        pipeline.env = {}
        pipeline.restart("relay")
        assert_exactly_once(settings)
    finally:
        codes = pipeline.stop()
    assert codes == [0, 0], "SIGTERM must end the consumer and the relay cleanly: " + stop_report(
        pipeline
    )
    assert inbox_counts(settings.pg_b)["duplicates"] > 0, "the replay never arrived"


def cdc_leader_pid(settings: Settings) -> int | None:
    """The OS pid of the relay process holding the CDC lock (its name ends with the pid)."""
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted",
            (LOCK_CLASS, CDC_LOCK),
        ).fetchone()
    return int(row[0].rsplit("-", 1)[1]) if row else None


@pytest.mark.lab
def test_two_cdc_relays_one_decodes_and_the_other_takes_over(
    settings: Settings, tmp_path: Path
) -> None:
    """Two CDC relays: one leads; SIGKILL it mid-stream and the standby delivers the rest."""
    fresh(settings)
    strategy = CdcStrategy(before_commit=jitter_before_commit)
    strategy.prepare(settings)
    strategy.close()
    with Pipeline(
        settings, "cdc", relays=2, processes=True, config=fast_config(), log_dir=str(tmp_path)
    ) as pipeline:
        writers = threading.Thread(target=run_writers, args=(settings, strategy, 300))
        writers.start()
        wait_for(lambda: bool(inbox_counts(settings.pg_b)["rows"]), 30, "the first delivery")
        leader = cdc_leader_pid(settings)
        pids = [w.process.pid for w in pipeline.relay_workers() if w.process is not None]
        assert leader in pids
        os.kill(leader, signal.SIGKILL)
        wait_for(lambda: cdc_leader_pid(settings) not in (None, leader), 30, "a new leader")
        writers.join()
        assert_exactly_once(settings)
        assert pipeline.alive().count(False) == 1


@pytest.mark.lab
def test_pgoutput_bytes_from_postgresql_decode_every_row_message_and_column_kind(
    settings: Settings,
) -> None:
    """Real pgoutput output: insert, update (NULL, unchanged TOAST), key change, delete,
    truncate."""
    suffix = uuid.uuid4().hex[:8]
    table, publication, slot = f"cdc_probe_{suffix}", f"cdc_probe_{suffix}", f"probe_{suffix}"
    big = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)"
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text, big text)")
        conn.execute(f"CREATE PUBLICATION {publication} FOR TABLE {table}")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        try:
            conn.execute(f"INSERT INTO {table} VALUES (1, NULL, {big})")
            conn.execute(f"UPDATE {table} SET note = 'it''s' WHERE id = 1")
            conn.execute(f"UPDATE {table} SET id = 2 WHERE id = 1")
            with conn.transaction():
                conn.execute(f"DELETE FROM {table} WHERE id = 2")
                conn.execute(f"INSERT INTO {table} VALUES (3, 'x', 'small')")
            conn.execute(f"TRUNCATE {table}")
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                "'proto_version', '1', 'publication_names', %s)",
                (slot, publication),
            ).fetchall()
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute(f"DROP PUBLICATION {publication}")
            conn.execute(f"DROP TABLE {table}")
    inserted, noted, rekeyed, replaced, truncated = TransactionAssembler().feed(
        [bytes(row[0]) for row in rows]
    )
    name = f"public.{table}"
    (insert,) = inserted.changes
    assert isinstance(insert, RowChange) and insert.operation == "insert"
    assert insert.table == name and insert.new["id"] == "1" and insert.new["note"] is None
    assert isinstance(insert.new["big"], str) and len(insert.new["big"]) == 400 * 32
    (update,) = noted.changes
    assert update == RowChange(
        "update", name, {"id": "1", "note": "it's", "big": UNCHANGED_TOAST}, {}
    ), "an UPDATE that kept the key sends no old row, and not the TOASTed value"
    (moved,) = rekeyed.changes
    assert isinstance(moved, RowChange)
    assert moved.new["id"] == "2" and moved.old == {"id": "1", "note": None, "big": None}
    deleted, added = replaced.changes
    assert deleted == RowChange("delete", name, {}, {"id": "2", "note": None, "big": None})
    assert added == RowChange("insert", name, {"id": "3", "note": "x", "big": "small"}, {})
    assert truncated.changes == [TableTruncate((name,), cascade=False, restart_identity=False)]
    assert inserted.end_lsn < noted.end_lsn < truncated.end_lsn
