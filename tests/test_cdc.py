"""The CDC strategy on the real lab: logical decoding (peek, publish, advance), exactly once.

Covers test_decoding's line format, 16 writers committing out of id order, a
CDC relay SIGKILLed between publishing and recording (its replay absorbed by
the consumer), and two CDC relays at once (one decodes, the other takes over
when the first is killed).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from scenarios.config import Settings
from scenarios.outbox.cdc import drop_slot, parse_insert
from scenarios.outbox.consumer import inbox_counts
from scenarios.outbox.pipeline import Pipeline
from scenarios.outbox.relay import CDC_LOCK, LOCK_CLASS, RELAY_CRASH_SETTING, _lsn
from scenarios.strategies.cdc import CdcStrategy
from scenarios.transfer.schema import CDC_SLOT
from tests.test_outbox import (
    all_ids,
    assert_exactly_once,
    fast_config,
    fresh,
    jitter_before_commit,
    naive_cursor,
    run_writers,
    wait_for,
)


@pytest.fixture(scope="module", autouse=True)
def no_slot_left_behind() -> Iterator[None]:
    """Drop the slot after these tests: an unread slot holds back A's WAL."""
    yield
    if "TWOPC_PG_A" in os.environ:
        drop_slot(os.environ["TWOPC_PG_A"])


def slot_exists(settings: Settings) -> bool:
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (CDC_SLOT,)
        ).fetchone()
    return bool(row and row[0])


# -- pure ------------------------------------------------------------------------------


def test_parse_insert_reads_quoted_text_with_doubled_quotes() -> None:
    """A test_decoding INSERT line gives its columns; quotes inside text are undoubled."""
    line = (
        "table public.cdc_events: INSERT: id[bigint]:7 transfer_id[text]:'t-1' "
        "destination[text]:'/queue/transfers' body[text]:'{\"to\":\"it''s\",\"n\":1}' "
        "created_at[timestamp with time zone]:'2026-01-01 00:00:00+00'"
    )
    columns = parse_insert(line)
    assert columns is not None
    assert columns["id"] == "7"
    assert columns["transfer_id"] == "t-1"
    assert columns["body"] == '{"to":"it\'s","n":1}'
    assert columns["created_at"] == "2026-01-01 00:00:00+00"


def test_parse_insert_ignores_other_tables_and_other_changes() -> None:
    """Only inserts into cdc_events are messages; nulls come back as None."""
    assert parse_insert("table public.transfers: INSERT: transfer_id[text]:'x'") is None
    assert parse_insert("table public.cdc_events: UPDATE: id[bigint]:1") is None
    assert parse_insert("BEGIN 726") is None
    columns = parse_insert("table public.cdc_events: INSERT: id[bigint]:1 body[text]:null")
    assert columns == {"id": "1", "body": None}


def test_lsn_order_is_numeric() -> None:
    """LSNs compare by value, not as text ('0/A' comes after '0/9')."""
    assert _lsn("0/A") > _lsn("0/9")
    assert _lsn("1/0") > _lsn("0/FFFFFFFF")


# -- the real lab -----------------------------------------------------------------------


@pytest.mark.lab
def test_cdc_delivers_sixteen_out_of_order_writers_once(settings: Settings) -> None:
    """16 writers commit out of id order; CDC (commit order) misses none, a last-id cursor does."""
    fresh(settings)
    assert not slot_exists(settings), "reset must drop the slot"
    strategy = CdcStrategy(before_commit=jitter_before_commit)
    stop, seen = threading.Event(), set[int]()
    trap = threading.Thread(target=naive_cursor, args=(settings, "cdc_events", stop, seen))
    with Pipeline(settings, "cdc", config=fast_config()):
        trap.start()
        result = run_writers(settings, strategy, 320)
        stop.set()
        trap.join()
        assert result.outcomes["committed"] == 320
        assert_exactly_once(settings)
    assert all_ids(settings, "cdc_events") - seen, "no out-of-order commit happened"
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(
            "SELECT p.lsn::text, s.confirmed_flush_lsn::text FROM relay_positions p, "
            "pg_replication_slots s WHERE p.name = 'cdc' AND s.slot_name = %s",
            (CDC_SLOT,),
        ).fetchone()
    assert row is not None and row[0] is not None, "the relay recorded no position"
    assert _lsn(row[1]) >= _lsn(row[0]), "the slot was not advanced past the recorded position"


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
    assert codes == [0, 0], "SIGTERM must end the consumer and the relay cleanly"
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
