"""The outbox component (the ``outbox`` package) on its own: writer, relays, inbox consumer,
independent last-id relays, and clean-up, with tables of its own names on the lab.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from outbox import OutboxMessage, Tables
from outbox.clean import clean, parse_duration
from outbox.relay import LastIdRelay, RelayConfig, StatusRelay, StompPublisher
from outbox.writer import row_of, write
from participants.stomp_client import StompClient
from scenarios.config import Settings
from tests.cli_process import all_stopped
from tests.conftest import open_stomp_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "examples" / "outbox_service.py"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- pure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("30s", 30.0),
        ("250ms", 0.25),
        ("10m", 600.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """A duration is seconds, or a number with a unit ms, s, m, h or d."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "-1s", "5w", "nan", "inf"])
def test_parse_duration_refuses(text: str) -> None:
    """Anything else is refused with a message that shows the form."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("field", ["outbox", "inbox", "key", "channel"])
def test_tables_refuse_names_that_are_not_identifiers(field: str) -> None:
    """Table and column names are SQL identifiers written into statements: nothing else."""
    from coordinator.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=field):
        Tables(**{field: "outbox; DROP TABLE x"})


def test_writer_row_refuses_a_status_no_relay_reads() -> None:
    """The writer writes 'pending' (status relay) or NULL (last-id relays), nothing else."""
    message = OutboxMessage("k-1", "/queue/q", "{}", {"type": "t"})
    assert row_of(message, "pending")["status"] == "pending"
    assert json.loads(str(row_of(message, None)["headers"])) == {"type": "t"}
    with pytest.raises(ValueError, match="status"):
        row_of(message, "sent")  # type: ignore[arg-type]


# -- on the lab ------------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.slow
def test_plain_script_writes_relays_and_consumes_without_scenarios(settings: Settings) -> None:
    """docs/examples/outbox_service.py, a script that imports nothing from scenarios, writes
    (sync and asyncio), relays (status and last-id) and consumes once through the component:
    rolled back messages never arrive, a duplicate is absorbed, a poison message is
    dead-lettered, and every relayed row is cleaned up."""
    done = subprocess.run(
        [sys.executable, "-I", str(EXAMPLE)],
        env=settings.as_env() | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    expected = sorted([f"sync-{n}" for n in range(10)] + [f"async-{n}" for n in range(10)])
    assert result["shipped"] == expected
    assert result["packages"] == ["outbox"]
    assert result["consumer"]["applied"] == 20
    assert result["consumer"]["duplicates"] >= 1
    assert result["consumer"]["dead_lettered"] == 1
    assert result["dead_letter_reason"] == "no such item"
    assert result["relays"]["status"]["sent"] == 11  # ten orders and the poison one
    assert result["relays"]["last-id"]["sent"] == 10
    assert result["cleaned"] == 21


@pytest.fixture
def tables(settings: Settings) -> Iterator[Tables]:
    """A fresh set of the component's tables on A (and an inbox on B), dropped after."""
    run = f"t_{secrets.token_hex(3)}"
    names = Tables(
        outbox=f"{run}_outbox",
        failures=f"{run}_failures",
        positions=f"{run}_positions",
        inbox=f"{run}_inbox",
        channel=f"{run}_outbox",
    )
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        for statement in names.schema_a(partitions=2):
            conn.execute(statement)
    yield names
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        for table in (names.outbox, names.failures, names.positions):
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def write_messages(settings: Settings, tables: Tables, keys: list[str], status: str | None) -> None:
    with psycopg.connect(settings.pg_a) as conn:
        for key in keys:
            queue = f"/queue/{tables.outbox}.orders"
            message = OutboxMessage(key, queue, json.dumps({"k": key}))
            write(conn, message, tables=tables, status=status)  # type: ignore[arg-type]
        conn.commit()


class Received:
    """Keys received on a queue, counted (a subscription acknowledging each message)."""

    def __init__(self, client: StompClient, queue: str, header: str) -> None:
        self.keys: Counter[str] = Counter()
        self._header = header
        self._client = client
        self._subscription = client.subscribe(queue, ack="client-individual", prefetch=1000)

    def take(self, idle: float = 0.2) -> Counter[str]:
        """Everything that arrives until nothing comes for ``idle`` seconds."""
        while (message := self._subscription.get(idle)) is not None:
            self.keys[message.headers.get(self._header, "")] += 1
            self._client.ack(message)
        return self.keys

    def holds(self, count: int) -> Callable[[], bool]:
        """A condition: ``count`` different keys have arrived."""
        return lambda: len(self.take()) == count


class Running:
    """A relay on a thread of its own, until stop()."""

    def __init__(self, relay: StatusRelay | LastIdRelay) -> None:
        self.relay = relay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=relay.run, args=(self._stop,))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def outbox_rows(settings: Settings, tables: Tables) -> int:
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute(f"SELECT count(*) FROM {tables.outbox}").fetchone()
    return int(row[0]) if row else -1


def positions(settings: Settings, tables: Tables) -> dict[str, int]:
    with psycopg.connect(settings.pg_a) as conn:
        rows = conn.execute(f"SELECT name, last_id FROM {tables.positions}").fetchall()
    return {name: last_id for name, last_id in rows}


@pytest.mark.lab
@pytest.mark.slow
def test_independent_last_id_relays_each_deliver_every_message_once(
    settings: Settings, stomp_addr: str, tables: Tables
) -> None:
    """Two last-id relays of different names read one outbox: each destination receives every
    message once; one stopped and restarted resumes from its own position; clean-up never
    deletes past the lowest position."""
    queues = {name: f"/queue/{tables.outbox}.{name}" for name in ("audit", "mail")}
    config = RelayConfig(batch_size=7, poll_interval=0.2)

    def relay(name: str) -> Running:
        publisher = StompPublisher(lambda: open_stomp_client(stomp_addr))
        return Running(
            LastIdRelay(
                settings.pg_a,
                publisher,
                config,
                tables=tables,
                position=name,
                partitions=2,
                destination=queues[name],
            )
        )

    first = [f"m-{n}" for n in range(30)]
    later = [f"m-{n}" for n in range(30, 50)]
    write_messages(settings, tables, first, None)
    with open_stomp_client(stomp_addr) as client:
        received = {name: Received(client, q, tables.key_header) for name, q in queues.items()}
        audit, mail = relay("audit"), relay("mail")
        try:
            for receiver in received.values():
                wait_for(receiver.holds(30), 30, "30 keys on each queue")
            mail.stop()
            write_messages(settings, tables, later, None)
            wait_for(received["audit"].holds(50), 30, "audit: 50 keys")
            # mail lags 20 behind: clean-up deletes only what both relays have passed.
            with psycopg.connect(settings.pg_a, autocommit=True) as conn:
                assert clean(conn, tables=tables, batch_size=4).deleted == 30
            assert outbox_rows(settings, tables) == 20
            mail = relay("mail")  # a new process would do the same: its positions are in A
            wait_for(received["mail"].holds(50), 30, "mail: 50 keys")
        finally:
            audit.stop()
            mail.stop()
        for name in queues:
            keys = received[name].take(idle=1.0)
            assert set(keys) == set(first + later), name
            assert max(keys.values()) == 1, f"{name} received a message twice"
    assert sorted(positions(settings, tables)) == ["audit:0", "audit:1", "mail:0", "mail:1"]
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        assert clean(conn, tables=tables).deleted == 20
    assert outbox_rows(settings, tables) == 0


@pytest.mark.lab
@pytest.mark.slow
def test_status_relay_with_retain_deletes_what_it_sent(
    settings: Settings, stomp_addr: str, tables: Tables
) -> None:
    """A status relay with retain set deletes the rows it sent, and never a pending one."""
    config = RelayConfig(batch_size=5, poll_interval=0.2, retain=0.0)
    with open_stomp_client(stomp_addr) as client:
        received = Received(client, f"/queue/{tables.outbox}.orders", tables.key_header)
        running = Running(
            StatusRelay(
                settings.pg_a,
                StompPublisher(lambda: open_stomp_client(stomp_addr)),
                config,
                tables=tables,
            )
        )
        try:
            write_messages(settings, tables, [f"s-{n}" for n in range(12)], "pending")
            wait_for(received.holds(12), 30, "12 messages")
            wait_for(lambda: outbox_rows(settings, tables) == 0, 30, "the relay's clean-up")
        finally:
            running.stop()
        assert running.relay.stats.cleaned == 12
        assert running.relay.stats.sent == 12
    write_messages(settings, tables, ["p-1", "p-2", "p-3"], "pending")  # no relay runs
    with psycopg.connect(settings.pg_a, autocommit=True) as conn:
        assert clean(conn, tables=tables).deleted == 0
    assert outbox_rows(settings, tables) == 3


@pytest.mark.lab
@pytest.mark.slow
def test_outbox_clean_command_deletes_relayed_transfers_and_keeps_pending(
    settings: Settings,
) -> None:
    """'twopc outbox clean' on the transfer scenario's outbox deletes what the status relay
    sent, in batches, and keeps the rows no relay has sent yet."""
    from scenarios.outbox.pipeline import Pipeline
    from scenarios.strategies.outbox import OutboxStatusStrategy
    from tests.test_outbox import assert_exactly_once, fast_config, fresh, run_writers

    fresh(settings)
    with Pipeline(settings, "status", config=fast_config()):
        run_writers(settings, OutboxStatusStrategy(), 20, concurrency=4)
        assert_exactly_once(settings)

    def clean_command(*args: str) -> dict[str, int]:
        done = subprocess.run(
            [sys.executable, "-m", "scenarios.cli", "outbox", "clean", "--json", *args],
            env=settings.as_env() | {"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    assert clean_command("--batch", "7") == {"deleted": 20, "batches": 3, "rows_left": 0}
    run_writers(settings, OutboxStatusStrategy(), 5, concurrency=1)  # no relay runs now
    assert clean_command("--older-than", "0s") == {"deleted": 0, "batches": 1, "rows_left": 5}


@pytest.mark.lab
@pytest.mark.slow
def test_outbox_size_part_measures_each_arm(settings: Settings) -> None:
    """'twopc bench outbox-size' in miniature: every arm writes and relays; only the arms
    with clean-up delete, never more than was written; the section shows each arm."""
    from scenarios.bench import outbox_size

    result = {
        "params": {"seconds": 2.0, "rate": 200.0, "retain": 0.5},
        "per_transaction": outbox_size.PER_TRANSACTION,
        "arms": {
            arm: outbox_size._run_arm(settings, arm, seconds=2.0, rate=200.0, retain=0.5)
            for arm in outbox_size.ARMS
        },
    }
    for arm, figures in result["arms"].items():
        assert figures["written"] > 0, arm
        assert 0 < figures["relayed"] <= figures["written"], arm
        assert figures["deleted"] <= figures["relayed"], arm
        assert figures["max_rows"] >= figures["final_rows"] >= 0, arm
        assert figures["samples"], arm
    assert result["arms"]["no clean-up"]["deleted"] == 0
    assert result["arms"]["relay --retain"]["deleted"] > 0
    assert result["arms"]["twopc outbox clean"]["deleted"] > 0
    (section,) = outbox_size.sections(result)
    assert [row[0] for row in section.rows] == list(outbox_size.ARMS)


@pytest.mark.lab
@pytest.mark.slow
def test_twopc_relay_position_and_destination_start_independent_relays(
    settings: Settings, stomp_addr: str
) -> None:
    """'twopc relay --mode last-id --position NAME --destination QUEUE', twice: each queue
    receives every transfer the outbox-last-id writer recorded, once."""
    from scenarios.strategies.outbox import OutboxLastIdStrategy
    from scenarios.transfer.schema import TABLES
    from tests.test_outbox import fresh, run_writers

    fresh(settings)
    run_writers(settings, OutboxLastIdStrategy(), 15, concurrency=4)
    with psycopg.connect(settings.pg_a) as conn:
        written = {row[0] for row in conn.execute("SELECT transfer_id FROM outbox")}
    run = secrets.token_hex(3)
    relay = [sys.executable, "-m", "scenarios.cli", "relay", "--mode", "last-id"]
    queues = {name: f"/queue/cli{run}.{name}" for name in ("audit", "mail")}
    env = settings.as_env() | {"PATH": "/usr/bin:/bin"}
    with open_stomp_client(stomp_addr) as client:
        received = {n: Received(client, q, TABLES.key_header) for n, q in queues.items()}
        relays = [
            subprocess.Popen(
                [*relay, "--poll-interval", "0.2", "--position", name, "--destination", queue],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, queue in queues.items()
        ]
        try:
            for receiver in received.values():
                wait_for(receiver.holds(len(written)), 60, "every transfer on each queue")
        finally:
            for process in relays:
                process.terminate()
            all_stopped(relays)
            assert [process.returncode for process in relays] == [0, 0]
        for name, receiver in received.items():
            keys = receiver.take(idle=1.0)
            assert set(keys) == written, name
            assert max(keys.values()) == 1, f"{name} received a transfer twice"
    assert {"audit:0", "mail:0"} <= set(positions(settings, TABLES))
