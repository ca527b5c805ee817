"""The batch job: copy A's committed debits to B as credits, in chunks, from a recorded position.

The chapter's oldest way of integrating two systems asynchronously: a periodic
job that reads the source database, opened to it read-only, and writes the
target (DB to DB). No broker is involved. Each run copies everything A has
committed since the last run, ``chunk`` rows per B transaction, then the job
sleeps ``interval`` seconds; a transfer therefore reaches B up to one interval
(plus the run) after A committed it, which is the convergence lag the report
shows for it.

Reading A: as the role ``twopc_batch_reader`` (SELECT on ``batch_export`` only,
every transaction read-only; scenarios.transfer.schema), from the table the
batch strategy's writer fills in the debit's own transaction.

The position: the pair (writer's transaction id, row id) of the last row copied,
in B's ``batch_positions``. Only rows written by transactions older than A's
oldest running one are read, as the last-id relay does
(scenarios.outbox.relay)::

    txid < pg_snapshot_xmin(pg_current_snapshot())

Every transaction below that horizon has ended, so the rows below it are final;
reading them in (txid, id) order after the position skips none, and a row
committed later has a txid at or above the horizon, so it is read on a later
run, after the position.

One chunk is one B transaction: lock the position row, read the chunk from A,
write each credit with its inbox row (``message_id`` ``batch:<txid>:<id>``), move
the position, commit. A crash anywhere before that commit leaves B as it was:
the next run reads the same chunk again. A run over a range already copied (a
position set back, two jobs at once) finds the inbox rows there and credits
nothing twice. The inbox row is also what makes the invariant checker count the
transfer as delivered (``gather_evidence(settings, inbox=True)``).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import conninfo
from psycopg import errors as pg_errors

from coordinator.errors import TwoPhaseCommitError
from coordinator.events import get_logger
from scenarios import events as ev
from scenarios.config import Settings
from scenarios.crash_plan import CrashPlan
from scenarios.outbox.consumer import APPLIED, REJECTED
from scenarios.transfer.model import CREDIT
from scenarios.transfer.schema import BATCH_READER

#: Environment variable arming a batch crash: ``after-read=kill@2`` SIGKILLs the job on
#: its second chunk, after reading A and before B's commit.
BATCH_CRASH_SETTING = "TWOPC_BATCH_CRASH"
BATCH_CRASH_POINTS = ("after-read", "before-commit")

POSITION = "batch"

READ_CHUNK = (
    "SELECT id, txid, transfer_id, target, amount FROM batch_export "
    "WHERE txid < (SELECT pg_snapshot_xmin(pg_current_snapshot())) "
    "AND (txid, id) > (%(txid)s::xid8, %(id)s::bigint) "
    "ORDER BY txid, id LIMIT %(limit)s"
)
INBOX_INSERT = (
    "INSERT INTO inbox (transfer_id, message_id, outcome) VALUES (%s, %s, %s) "
    "ON CONFLICT (transfer_id) DO UPDATE SET duplicates = inbox.duplicates + 1 "
    "RETURNING (xmax = 0)"  # true for a fresh insert, false when the row was there
)


class BatchFailed(TwoPhaseCommitError):
    """The batch job met an error it cannot work around (tables missing, a bug) and stopped."""


class _Stopped(Exception):
    """An injected crash (abandon) in the middle of a chunk: roll back, record nothing."""


def reader_dsn(settings: Settings) -> str:
    """A's connection string as the read-only role, every transaction read-only."""
    return conninfo.make_conninfo(
        settings.pg_a,
        user=BATCH_READER,
        options="-c default_transaction_read_only=on",
        application_name="twopc batch",
    )


@dataclass
class BatchConfig:
    """How often the job runs and how much one B transaction copies."""

    interval: float = 1.0  # seconds between runs
    chunk: int = 500  # rows per B transaction
    name: str = ""  # shows in the logs


@dataclass
class BatchStats:
    """What the job did since it started."""

    runs: int = 0
    chunks: int = 0
    copied: int = 0
    duplicates: int = 0
    rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class BatchJob:
    """The periodic copy; :meth:`run` until stopped, or :meth:`run_once` for one run."""

    def __init__(self, settings: Settings, config: BatchConfig | None = None) -> None:
        self.settings = settings
        self.config = config or BatchConfig()
        self.name = self.config.name or f"batch-{secrets.token_hex(2)}"
        self.stats = BatchStats()
        self.crashes = CrashPlan("batch", BATCH_CRASH_POINTS)
        self.log = get_logger(component="batch", job=self.name)
        self._a: psycopg.Connection | None = None
        self._b: psycopg.Connection | None = None

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> BatchStats:
        """Run every ``interval`` seconds until ``stop`` is set; survives A or B going away."""
        stop = stop or threading.Event()
        self.crashes.arm_from_env(BATCH_CRASH_SETTING)
        self.log.info(ev.BATCH_STARTED, interval=self.config.interval, chunk=self.config.chunk)
        failures = 0
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.run_once(stop)
                    failures = 0
                except _Stopped:
                    pass  # an injected crash: B rolled back; the next run starts over
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.log.warning(
                        ev.BATCH_DATABASE_LOST, error=str(exc).strip(), attempt=failures
                    )
                    self.close()
                stop.wait(max(0.0, self.config.interval - (time.monotonic() - started)))
        except Exception as exc:
            hint = (
                "; run 'twopc transfer --reset' to create the tables and the reader role"
                if isinstance(exc, pg_errors.UndefinedTable | pg_errors.InsufficientPrivilege)
                else ""
            )
            error = " ".join(f"{type(exc).__name__}: {exc}".split())
            failed = BatchFailed(f"batch job {self.name} stopped: {error}{hint}")
            self.log.error(ev.BATCH_FAILED, error=str(failed))
            raise failed from exc
        finally:
            self.close()
            self.log.info(ev.BATCH_STOPPED, **self.stats.as_dict())
        return self.stats

    def run_once(self, stop: threading.Event | None = None) -> int:
        """One run: copy chunks until one comes back short; return the rows copied."""
        self.stats.runs += 1
        total = 0
        while stop is None or not stop.is_set():
            try:
                copied = self.copy_chunk()
            except _Stopped:
                self.close()  # as if the process had died: B rolled back
                raise
            total += copied
            if copied < self.config.chunk:
                break
        return total

    def copy_chunk(self) -> int:
        """One B transaction: read the chunk after the position, credit it, move the position."""
        a, b = self._connect()
        with b.transaction(), b.cursor() as cur:
            position = cur.execute(
                "SELECT last_txid, last_id FROM batch_positions WHERE name = %s FOR UPDATE",
                (POSITION,),
            ).fetchone()
            if position is None:
                raise BatchFailed(
                    f"batch_positions has no row {POSITION!r}: run 'twopc transfer --reset' first"
                )
            rows = a.execute(
                READ_CHUNK,
                {"txid": str(position[0]), "id": position[1], "limit": self.config.chunk},
            ).fetchall()
            if not rows:
                return 0
            if self.crashes.hit("after-read"):
                raise _Stopped()
            fresh = duplicates = rejected = 0
            # Credits in account order: two jobs over one range lock the accounts alike.
            for row_id, txid, transfer_id, target, amount in sorted(rows, key=lambda r: r[3]):
                cur.execute(INBOX_INSERT, (transfer_id, f"batch:{txid}:{row_id}", APPLIED))
                inserted = cur.fetchone()
                if not (inserted and inserted[0]):
                    duplicates += 1  # copied before: by a run whose position was lost
                    continue
                cur.execute(CREDIT, {"amount": amount, "account": target, "tid": transfer_id})
                if cur.rowcount != 1:  # the account is not in B: record it, credit nothing
                    cur.execute(
                        "UPDATE inbox SET outcome = %s WHERE transfer_id = %s",
                        (f"{REJECTED}account {target} does not exist in database b", transfer_id),
                    )
                    rejected += 1
                    continue
                fresh += 1
            last_id, last_txid = rows[-1][0], rows[-1][1]
            cur.execute(
                "UPDATE batch_positions SET last_txid = %s::xid8, last_id = %s, "
                "copied = copied + %s, runs = runs + 1, updated_at = clock_timestamp() "
                "WHERE name = %s",
                (str(last_txid), last_id, fresh, POSITION),
            )
            if self.crashes.hit("before-commit"):
                raise _Stopped()
        self.stats.chunks += 1
        self.stats.copied += fresh
        self.stats.duplicates += duplicates
        self.stats.rejected += rejected
        self.log.debug(ev.BATCH_CHUNK, rows=len(rows), copied=fresh, duplicates=duplicates)
        return len(rows)

    def _connect(self) -> tuple[psycopg.Connection, psycopg.Connection]:
        if self._a is None or self._a.closed:
            self._a = psycopg.connect(reader_dsn(self.settings), autocommit=True)
        if self._b is None or self._b.closed:
            self._b = psycopg.connect(self.settings.pg_b, application_name="twopc batch")
        return self._a, self._b

    def close(self) -> None:
        for conn in (self._a, self._b):
            if conn is not None:
                conn.close()
        self._a = self._b = None


def position(settings: Settings) -> tuple[str, int, int]:
    """(last txid, last id, transfers copied) recorded in B's batch_positions."""
    with psycopg.connect(settings.pg_b) as conn:
        row = conn.execute(
            "SELECT last_txid::text, last_id, copied FROM batch_positions WHERE name = %s",
            (POSITION,),
        ).fetchone()
    if row is None:
        raise BatchFailed(f"batch_positions has no row {POSITION!r}: run 'twopc transfer --reset'")
    return str(row[0]), int(row[1]), int(row[2])
