"""What a relay does when the broker refuses or is down: ignore, retry, or the failure log.

The three choices of the background document, as the setting
``TWOPC_OUTBOX_POLICY`` (or ``twopc relay --policy``):

* ``ignore``: one attempt; a message that cannot be sent is dropped (marked
  ``ignored``) and the relay moves on. For messages nobody must receive.
* ``retry``: retry with exponential backoff, without limit. Nothing is lost,
  but a message that can never be sent holds up the rows behind it in the
  position-ordered modes (last-id, cdc).
* ``failure-log`` (default): retry with backoff up to ``TWOPC_OUTBOX_MAX_ATTEMPTS``,
  then record the messages in A's ``outbox_failures`` table and move on.
  ``twopc outbox failed`` lists them; ``twopc outbox retry`` sends them again.

Every retry may send a message twice (the broker may have stored a batch
whose receipt never came): the consumer's inbox removes the duplicates.
"""

from __future__ import annotations

import enum
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
from scenarios import events as ev

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
class OutMessage:
    """One message a relay publishes: the transfer id header, where, and the JSON body."""

    transfer_id: str
    destination: str
    body: str


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


Publish = Callable[[Sequence[OutMessage]], None]


def deliver(
    publish: Publish,
    batch: Sequence[OutMessage],
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
    batch: Sequence[OutMessage],
    *,
    source: str,
    attempts: int,
    error: str,
) -> None:
    """Write ``batch`` to the failure log inside the caller's transaction on A."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox_failures "
            "(transfer_id, source, destination, body, attempts, last_error) "
            "VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (transfer_id) DO UPDATE SET attempts = outbox_failures.attempts "
            "+ EXCLUDED.attempts, last_error = EXCLUDED.last_error, "
            "failed_at = clock_timestamp(), resent_at = NULL",
            [(m.transfer_id, source, m.destination, m.body, attempts, error) for m in batch],
        )
    get_logger(component="relay", source=source).error(
        ev.RELAY_FAILURE_LOGGED,
        messages=len(batch),
        attempts=attempts,
        error=error,
        hint="'twopc outbox retry' sends them again",
    )


@dataclass(frozen=True)
class FailedMessage:
    """One row of the failure log."""

    transfer_id: str
    source: str
    destination: str
    body: str
    attempts: int
    last_error: str
    failed_at: datetime
    resent_at: datetime | None

    @property
    def message(self) -> OutMessage:
        return OutMessage(self.transfer_id, self.destination, self.body)

    def as_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "source": self.source,
            "destination": self.destination,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "failed_at": self.failed_at.isoformat(),
            "resent_at": self.resent_at.isoformat() if self.resent_at else None,
        }


_FAILURE_COLUMNS = (
    "transfer_id, source, destination, body, attempts, last_error, failed_at, resent_at"
)


def list_failures(dsn: str, *, include_resent: bool = False) -> list[FailedMessage]:
    """The failure log, oldest first; by default only what has not been sent again."""
    where = "" if include_resent else "WHERE resent_at IS NULL"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT {_FAILURE_COLUMNS} FROM outbox_failures {where} "
            "ORDER BY failed_at, transfer_id"
        ).fetchall()
    return [FailedMessage(*row) for row in rows]


@dataclass
class RetryReport:
    """What ``twopc outbox retry`` did."""

    sent: list[str]
    failed: list[str]
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"sent": len(self.sent), "failed": len(self.failed), "error": self.error}


def retry_failures(
    dsn: str,
    publish: Publish,
    transfer_ids: Sequence[str] | None = None,
    *,
    batch_size: int = 500,
    stop: threading.Event | None = None,
) -> RetryReport:
    """Send the failure log's unsent messages again (all, or ``transfer_ids``), batch by batch.

    Rows are locked while they are sent (FOR UPDATE SKIP LOCKED), so two retries
    running at once do not send a message twice; a batch that fails again keeps
    its rows, with the attempt counted and the new error. Once ``stop`` is set
    the batch in hand is finished and no other is taken.
    """
    report = RetryReport([], [])
    done: set[str] = set()
    with psycopg.connect(dsn) as conn:
        while True:
            if stop is not None and stop.is_set():
                return report
            rows = conn.execute(
                f"SELECT {_FAILURE_COLUMNS} FROM outbox_failures "
                "WHERE resent_at IS NULL "
                "AND (%(ids)s::text[] IS NULL OR transfer_id = ANY(%(ids)s)) "
                "AND NOT transfer_id = ANY(%(done)s) "
                "ORDER BY failed_at, transfer_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
                {
                    "ids": list(transfer_ids) if transfer_ids is not None else None,
                    "done": list(done),
                    "limit": batch_size,
                },
            ).fetchall()
            if not rows:
                conn.rollback()
                return report
            failed = [FailedMessage(*row) for row in rows]
            ids = [f.transfer_id for f in failed]
            done.update(ids)
            try:
                publish([f.message for f in failed])
            except TwoPhaseCommitError as exc:
                report.failed += ids
                report.error = str(exc)
                conn.execute(
                    "UPDATE outbox_failures SET attempts = attempts + 1, last_error = %s "
                    "WHERE transfer_id = ANY(%s)",
                    (report.error, ids),
                )
                conn.commit()
                continue
            conn.execute(
                "UPDATE outbox_failures SET resent_at = clock_timestamp() "
                "WHERE transfer_id = ANY(%s)",
                (ids,),
            )
            conn.execute(
                "UPDATE outbox SET status = 'sent', sent_at = clock_timestamp() "
                "WHERE transfer_id = ANY(%s) AND status = 'failed'",
                (ids,),
            )
            conn.commit()
            report.sent += ids
            get_logger(component="outbox").info(ev.OUTBOX_FAILURES_RESENT, messages=len(ids))
