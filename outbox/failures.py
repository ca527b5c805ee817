"""What a relay does when the broker refuses or is down: ignore, retry, or the failure log.

The three choices, as :class:`RetrySettings` (``TWOPC_OUTBOX_POLICY`` in the
environment, or ``twopc relay --policy``):

* ``ignore``: one attempt; a message that cannot be sent is dropped (marked
  ``ignored``) and the relay moves on. For messages nobody must receive.
* ``retry``: retry with exponential backoff, without limit. Nothing is lost,
  but a message that can never be sent holds up the rows behind it in the
  position-ordered modes (last-id, cdc).
* ``failure-log`` (default): retry with backoff up to ``max_attempts``, then
  record the messages in the failure log table (``Tables.failures``) and move
  on. :func:`list_failures` lists them; :func:`retry_failures` sends them again.

Every retry may send a message twice (the broker may have stored a batch
whose receipt never came): the consumer's inbox removes the duplicates.
"""

from __future__ import annotations

import enum
import json
import os
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from coordinator.errors import ConfigurationError, TwoPhaseCommitError
from coordinator.events import get_logger
from outbox import events as ev
from outbox.message import OutboxMessage
from outbox.tables import Tables

POLICY_SETTING = "TWOPC_OUTBOX_POLICY"
MAX_ATTEMPTS_SETTING = "TWOPC_OUTBOX_MAX_ATTEMPTS"
BACKOFF_SETTING = "TWOPC_OUTBOX_BACKOFF"


class FailurePolicy(enum.Enum):
    """What to do with a message the broker would not take."""

    IGNORE = "ignore"
    RETRY = "retry"
    FAILURE_LOG = "failure-log"


class Disposition(enum.Enum):
    """How one batch left :func:`deliver`."""

    SENT = "sent"
    FAILED = "failed"  # to be recorded in the failure log
    IGNORED = "ignored"
    STOPPED = "stopped"  # shutdown asked while retrying: nothing recorded, sent again later


@dataclass(frozen=True)
class RetrySettings:
    """The failure policy and its backoff: ``first_delay`` doubling up to ``max_delay``."""

    policy: FailurePolicy = FailurePolicy.FAILURE_LOG
    max_attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(
                f"{MAX_ATTEMPTS_SETTING}: max attempts must be >= 1, not {self.max_attempts}"
            )
        if self.first_delay <= 0 or self.max_delay < self.first_delay:
            raise ConfigurationError(
                f"{BACKOFF_SETTING}: the backoff must be > 0 and <= {self.max_delay} s"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), with jitter.

        The jitter keeps several relays that failed together from retrying in step.
        """
        ceiling = min(self.max_delay, self.first_delay * 2 ** (attempt - 1))
        return float(ceiling * random.uniform(0.5, 1.0))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RetrySettings:
        """The settings from TWOPC_OUTBOX_* variables; ``overrides`` that are not None win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        try:
            if env.get(POLICY_SETTING):
                values["policy"] = FailurePolicy(env[POLICY_SETTING])
            if env.get(MAX_ATTEMPTS_SETTING):
                values["max_attempts"] = int(env[MAX_ATTEMPTS_SETTING])
            if env.get(BACKOFF_SETTING):
                values["first_delay"] = float(env[BACKOFF_SETTING])
        except ValueError as exc:
            choices = ", ".join(p.value for p in FailurePolicy)
            raise ConfigurationError(
                f"bad outbox failure setting ({exc}); {POLICY_SETTING} is one of {choices}, "
                f"{MAX_ATTEMPTS_SETTING} an integer, {BACKOFF_SETTING} seconds"
            ) from None
        for key, value in overrides.items():
            if value is not None:
                values[key] = FailurePolicy(value) if key == "policy" else value
        return cls(**values)


#: Publishes a batch to the broker, all or nothing; raises TwoPhaseCommitError if it may not have.
Publish = Callable[[Sequence[OutboxMessage]], None]


def deliver(
    publish: Publish,
    batch: Sequence[OutboxMessage],
    retry: RetrySettings,
    stop: threading.Event,
    *,
    source: str,
) -> tuple[Disposition, int, str]:
    """Publish ``batch`` under the failure policy: (disposition, attempts, last error)."""
    log = get_logger(component="relay", source=source)
    attempt = 0
    while True:
        attempt += 1
        try:
            publish(batch)
        except TwoPhaseCommitError as exc:
            error = str(exc)
        else:
            if attempt > 1:
                log.info(ev.RELAY_PUBLISH_RECOVERED, attempts=attempt, messages=len(batch))
            return Disposition.SENT, attempt, ""
        log.warning(
            ev.RELAY_PUBLISH_FAILED,
            attempt=attempt,
            messages=len(batch),
            policy=retry.policy.value,
            error=error,
        )
        if retry.policy is FailurePolicy.IGNORE:
            return Disposition.IGNORED, attempt, error
        if retry.policy is FailurePolicy.FAILURE_LOG and attempt >= retry.max_attempts:
            return Disposition.FAILED, attempt, error
        if stop.wait(retry.delay(attempt)):
            return Disposition.STOPPED, attempt, error


# -- the failure log --------------------------------------------------------------------


def record_failures(
    conn: psycopg.Connection,
    batch: Sequence[OutboxMessage],
    *,
    source: str,
    attempts: int,
    error: str,
    tables: Tables | None = None,
) -> None:
    """Write ``batch`` to the failure log inside the caller's transaction on A."""
    tables = tables or Tables()
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {tables.failures} "
            f"({tables.key}, source, destination, headers, body, attempts, last_error) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) "
            f"ON CONFLICT ({tables.key}, destination) DO UPDATE SET attempts = "
            f"{tables.failures}.attempts + EXCLUDED.attempts, last_error = EXCLUDED.last_error, "
            "failed_at = clock_timestamp(), resent_at = NULL",
            [
                (
                    m.key,
                    source,
                    m.destination,
                    json.dumps(dict(m.headers), sort_keys=True),
                    m.body,
                    attempts,
                    error,
                )
                for m in batch
            ],
        )
    get_logger(component="relay", source=source).error(
        ev.RELAY_FAILURE_LOGGED,
        messages=len(batch),
        attempts=attempts,
        error=error,
        hint="'twopc outbox retry' (or outbox.failures.retry_failures) sends them again",
    )


@dataclass(frozen=True)
class FailedMessage:
    """One row of the failure log; ``key_name`` is the key's column (how JSON names it)."""

    key: str
    source: str
    destination: str
    headers: Mapping[str, str]
    body: str
    attempts: int
    last_error: str
    failed_at: datetime
    resent_at: datetime | None
    key_name: str = "message_key"

    @property
    def message(self) -> OutboxMessage:
        return OutboxMessage(self.key, self.destination, self.body, self.headers)

    def as_dict(self) -> dict[str, Any]:
        return {
            self.key_name: self.key,
            "source": self.source,
            "destination": self.destination,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "failed_at": self.failed_at.isoformat(),
            "resent_at": self.resent_at.isoformat() if self.resent_at else None,
        }


def _failed(row: Sequence[Any], tables: Tables) -> FailedMessage:
    key, source, destination, headers, body, attempts, last_error, failed_at, resent_at = row
    return FailedMessage(
        key,
        source,
        destination,
        dict(headers or {}),
        body,
        attempts,
        last_error,
        failed_at,
        resent_at,
        key_name=tables.key,
    )


def _columns(tables: Tables) -> str:
    return (
        f"{tables.key}, source, destination, headers, body, attempts, last_error, "
        "failed_at, resent_at"
    )


def list_failures(
    dsn: str, *, include_resent: bool = False, tables: Tables | None = None
) -> list[FailedMessage]:
    """The failure log, oldest first; by default only what has not been sent again."""
    tables = tables or Tables()
    where = "" if include_resent else "WHERE resent_at IS NULL"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT {_columns(tables)} FROM {tables.failures} {where} "
            f"ORDER BY failed_at, {tables.key}, destination"
        ).fetchall()
    return [_failed(row, tables) for row in rows]


@dataclass
class RetryReport:
    """What :func:`retry_failures` did: the keys sent again, and those that failed again."""

    sent: list[str]
    failed: list[str]
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"sent": len(self.sent), "failed": len(self.failed), "error": self.error}


def retry_failures(
    dsn: str,
    publish: Publish,
    keys: Sequence[str] | None = None,
    *,
    batch_size: int = 500,
    stop: threading.Event | None = None,
    tables: Tables | None = None,
) -> RetryReport:
    """Send the failure log's unsent messages again (all, or ``keys``), batch by batch.

    Rows are locked while they are sent (FOR UPDATE SKIP LOCKED), so two retries
    running at once do not send a message twice; a batch that fails again keeps
    its rows, with the attempt counted and the new error. Once ``stop`` is set
    the batch in hand is finished and no other is taken.
    """
    tables = tables or Tables()
    report = RetryReport([], [])
    done: set[tuple[str, str]] = set()
    with psycopg.connect(dsn) as conn:
        while True:
            if stop is not None and stop.is_set():
                return report
            rows = conn.execute(
                f"SELECT {_columns(tables)} FROM {tables.failures} "
                "WHERE resent_at IS NULL "
                f"AND (%(ids)s::text[] IS NULL OR {tables.key} = ANY(%(ids)s)) "
                f"AND NOT ({tables.key} || ' ' || destination) = ANY(%(done)s) "
                f"ORDER BY failed_at, {tables.key} LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
                {
                    "ids": list(keys) if keys is not None else None,
                    "done": [f"{k} {d}" for k, d in done],
                    "limit": batch_size,
                },
            ).fetchall()
            if not rows:
                conn.rollback()
                return report
            failed = [_failed(row, tables) for row in rows]
            ids = [f.key for f in failed]
            pairs = [(f.key, f.destination) for f in failed]
            done.update(pairs)
            try:
                publish([f.message for f in failed])
            except TwoPhaseCommitError as exc:
                report.failed += ids
                report.error = str(exc)
                conn.execute(
                    f"UPDATE {tables.failures} SET attempts = attempts + 1, last_error = %s "
                    f"WHERE ({tables.key}, destination) IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                    (report.error, ids, [d for _, d in pairs]),
                )
                conn.commit()
                continue
            conn.execute(
                f"UPDATE {tables.failures} SET resent_at = clock_timestamp() "
                f"WHERE ({tables.key}, destination) IN "
                "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                (ids, [d for _, d in pairs]),
            )
            conn.execute(
                f"UPDATE {tables.outbox} SET status = 'sent', sent_at = clock_timestamp() "
                f"WHERE {tables.key} = ANY(%s) AND status = 'failed'",
                (ids,),
            )
            conn.commit()
            report.sent += ids
            get_logger(component="outbox").info(ev.OUTBOX_FAILURES_RESENT, messages=len(ids))
