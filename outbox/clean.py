"""Delete relayed outbox rows in batches, never a row some relay has yet to send.

Without it the outbox grows for ever: every message ever written stays. A row
may go once it is older than ``older_than`` seconds and

* (status relay) its status is ``sent``, ``failed`` or ``ignored``: a failed
  message is kept in the failure log, with its body, for a retry; or
* (last-id relays) its status is NULL and every last-id relay has passed it:
  its (txid, id) is at or below the recorded position of every relay, in its
  partition, and at least one relay has a position there. The lowest position
  bounds the clean-up, so a relay that lags (or is stopped) keeps the rows it
  has not sent yet; a relay that has never started has no position, and rows
  deleted before it starts are never sent by it (start a new relay once before
  cleaning, or give it time).

Each batch is one short DELETE in its own transaction (rows a relay holds
are skipped, not waited for), so clean-up runs beside the writers and relays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psycopg

from coordinator.events import get_logger
from outbox import events as ev
from outbox.tables import Tables


@dataclass
class CleanReport:
    """What one clean-up deleted, in how many batches."""

    deleted: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"deleted": self.deleted, "batches": self.batches}


def delete_statement(tables: Tables) -> str:
    """One batch's DELETE (parameters: age in seconds, batch size)."""
    outbox, positions = tables.outbox, tables.positions
    return f"""
        WITH doomed AS (
            SELECT o.id FROM {outbox} o
            WHERE o.created_at < clock_timestamp() - %(age)s * interval '1 second'
            AND (
                (o.status IN ('sent', 'failed', 'ignored')
                 AND coalesce(o.sent_at, o.created_at)
                     < clock_timestamp() - %(age)s * interval '1 second')
                OR (o.status IS NULL
                    AND EXISTS (SELECT FROM {positions} p
                                WHERE p.part = o.part AND p.last_txid IS NOT NULL)
                    AND NOT EXISTS (SELECT FROM {positions} p
                                    WHERE p.part = o.part AND p.last_txid IS NOT NULL
                                    AND (o.txid, o.id) > (p.last_txid, p.last_id)))
            )
            ORDER BY o.id LIMIT %(batch)s FOR UPDATE SKIP LOCKED
        )
        DELETE FROM {outbox} WHERE id IN (SELECT id FROM doomed)
    """


def clean(
    conn: psycopg.Connection,
    *,
    older_than: float = 0.0,
    batch_size: int = 1000,
    max_batches: int | None = None,
    tables: Tables | None = None,
    stop: threading.Event | None = None,
    source: str = "clean",
) -> CleanReport:
    """Delete relayed rows older than ``older_than`` seconds, ``batch_size`` at a time.

    ``conn`` must be in autocommit mode: each batch commits on its own. Stops
    when a batch deletes fewer than ``batch_size`` rows, after ``max_batches``,
    or once ``stop`` is set.
    """
    if not conn.autocommit:
        raise ValueError("outbox clean-up needs an autocommit connection (one commit per batch)")
    if older_than < 0 or batch_size < 1:
        raise ValueError(f"older_than {older_than} must be >= 0 and batch_size {batch_size} >= 1")
    tables = tables or Tables()
    statement = delete_statement(tables)
    report = CleanReport()
    while max_batches is None or report.batches < max_batches:
        if stop is not None and stop.is_set():
            break
        deleted = conn.execute(statement, {"age": older_than, "batch": batch_size}).rowcount
        report.batches += 1
        report.deleted += max(deleted, 0)
        if deleted < batch_size:
            break
    if report.deleted:
        get_logger(component="outbox", source=source).info(ev.OUTBOX_CLEANED, **report.as_dict())
    return report


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit, ``ms``, ``s``, ``m``, ``h`` or ``d``
    (``90``, ``30s``, ``10m``, ``1.5h``, ``7d``)."""
    value = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h", "d") if value.endswith(u)), "")
    number = value[: len(value) - len(unit)] if unit else value
    try:
        seconds = float(number) * _UNITS.get(unit, 1.0)
    except ValueError:
        raise ValueError(
            f"duration {text!r}: a number with an optional unit (ms, s, m, h, d), e.g. 10m"
        ) from None
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"duration {text!r} must be a finite number of seconds >= 0")
    return seconds
