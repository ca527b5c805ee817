"""The crash torture's ledger: a deduplicating consumer and the checks on top of the invariants.

The torture never resets between schedules: transfer ids are unique per run
and money is conserved, so the invariants hold over *everything* since the
start. After each schedule's recovery, :meth:`Ledger.check`:

- consumes every event on its queue of the events' virtual topic
  (``/queue/Consumer.ledger.VirtualTopic.transfers``, created before the first
  transfer) as the business consumer would, deduplicating by the
  ``transfer-id`` header (an inbox keyed by transfer id); a
  ``transfer.refused`` event delivers nothing; the queue stays short, so
  checks stay cheap;
- checks the transfer's invariants (scenarios.transfer.invariants) with what
  it consumed as the deliveries (docs/design.md §9): every transfer id is in A, in B
  and delivered, or in none of them, with the same amount (atomicity); the
  money is conserved; nothing of ours is prepared; no marker is left;
- and, on top of them: the decision log reopens with nothing pending; every
  transfer a caller was told COMMITTED is there, and every one told ABORTED
  left nothing.

Violations are counted once, in the schedule whose check first saw them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.log.file import read_pending
from participants.activemq import MARKER_QUEUE_PREFIX
from participants.stomp_client import SENTINEL_HEADER, Message
from participants.stomp_core import sentinel_token
from scenarios.config import Settings
from scenarios.transfer.destinations import LEDGER_QUEUE as QUEUE
from scenarios.transfer.invariants import gather_evidence
from scenarios.transfer.model import TRANSFER_REFUSED, TYPE_HEADER
from scenarios.wiring import open_stomp

DRAIN_TIMEOUT = 30.0


@dataclass
class Check:
    """What one check found that no earlier check had."""

    atomicity_violations: list[str] = field(default_factory=list)  # transfer ids
    money_conserved: bool = True
    total_expected: int = 0
    total_now: int = 0
    prepared_left: list[str] = field(default_factory=list)  # "<db>:<gtrid>"
    markers_left: int = 0
    lost_messages: list[str] = field(default_factory=list)  # in A and B, never delivered
    delivered: int = 0  # messages consumed by this check
    duplicates_before_dedup: int = 0  # extra copies delivered
    duplicates_after_dedup: int = 0  # extra copies the inbox could not recognise
    committed_not_durable: list[str] = field(default_factory=list)
    aborted_but_visible: list[str] = field(default_factory=list)
    in_doubt_committed: int = 0  # told IN_DOUBT, resolved to committed (all three there)
    in_doubt_rolled_back: int = 0  # told IN_DOUBT, resolved to rolled back (none there)
    log_pending: list[str] = field(default_factory=list)  # COMMIT without END after recovery
    log_error: str | None = None  # the decision log did not reopen
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """One line per violated invariant (empty: all hold)."""
        found = []
        if self.atomicity_violations:
            found.append(f"atomicity violated for {_some(self.atomicity_violations)}")
        if not self.money_conserved:
            found.append(
                f"money not conserved: the sum of balances is {self.total_now}, "
                f"it was {self.total_expected} at the reset"
            )
        if self.prepared_left:
            found.append(f"prepared transactions left: {_some(self.prepared_left)}")
        if self.markers_left:
            found.append(f"{self.markers_left} commit markers left on {MARKER_QUEUE_PREFIX}<id>")
        if self.lost_messages:
            found.append(f"messages lost for {_some(self.lost_messages)}")
        if self.duplicates_after_dedup:
            found.append(f"{self.duplicates_after_dedup} duplicates the inbox let through")
        if self.committed_not_durable:
            found.append(f"reported COMMITTED but not durable: {_some(self.committed_not_durable)}")
        if self.aborted_but_visible:
            found.append(f"reported ABORTED but visible: {_some(self.aborted_but_visible)}")
        if self.log_pending:
            found.append(f"decision log still has COMMIT without END: {_some(self.log_pending)}")
        if self.log_error:
            found.append(f"decision log does not reopen: {self.log_error}")
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "atomicity_violations": self.atomicity_violations,
            "money_conserved": self.money_conserved,
            "total_expected": self.total_expected,
            "total_now": self.total_now,
            "prepared_left": self.prepared_left,
            "markers_left": self.markers_left,
            "lost_messages": self.lost_messages,
            "delivered": self.delivered,
            "duplicates_before_dedup": self.duplicates_before_dedup,
            "duplicates_after_dedup": self.duplicates_after_dedup,
            "committed_not_durable": self.committed_not_durable,
            "aborted_but_visible": self.aborted_but_visible,
            "in_doubt_committed": self.in_doubt_committed,
            "in_doubt_rolled_back": self.in_doubt_rolled_back,
            "log_pending": self.log_pending,
            "log_error": self.log_error,
            "seconds": round(self.seconds, 3),
        }


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown


class Ledger:
    """Everything delivered and reported since the torture started, and the checks over it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.deliveries: Counter[str] = Counter()  # transfer id -> copies delivered
        self.reported: dict[str, str] = {}  # transfer id -> outcome a caller was told
        self._flagged: set[str] = set()  # ids already counted as violations
        self._lost_flagged: set[str] = set()
        self._duplicates_seen = 0
        self._money_offset = 0  # total now minus total at reset, as of the last check

    # -- the business consumer ------------------------------------------------------

    def drain(self) -> tuple[int, int]:
        """Consume the ledger's whole queue; return (messages delivered, undeduplicable extras).

        A sentinel is stored at the tail first; with no producer running, the
        queue is drained when the sentinel comes back (no idle timeout to guess).
        """
        token = sentinel_token()
        delivered = undeduplicable = 0
        with open_stomp(self.settings) as client:
            client.send(QUEUE, "", {SENTINEL_HEADER: token}, receipt_timeout=10.0)
            subscription = client.subscribe(QUEUE, ack="auto", prefetch=1000)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while True:
                message = subscription.get(max(0.1, deadline - time.monotonic()))
                if message is None:
                    raise TimeoutError(
                        f"draining {QUEUE}: the sentinel did not come back in {DRAIN_TIMEOUT:g} s"
                    )
                if message.is_sentinel:
                    if message.headers.get(SENTINEL_HEADER) == token:
                        break
                    continue
                if message.headers.get(TYPE_HEADER) == TRANSFER_REFUSED:
                    continue  # a fact with nothing to deliver: A refused, nothing happened
                delivered += 1
                key = self._dedup_key(message)
                if key is None:
                    undeduplicable += 1
                    continue
                self.deliveries[key] += 1
            subscription.unsubscribe(timeout=10.0)
        return delivered, undeduplicable

    @staticmethod
    def _dedup_key(message: Message) -> str | None:
        """The inbox key: the transfer-id header, which must agree with the body's."""
        header = message.headers.get("transfer-id")
        try:
            body = json.loads(message.body).get("transfer_id")
        except (ValueError, AttributeError):
            body = None
        return header if header and header == body else None

    # -- the check ---------------------------------------------------------------------

    def check(self, reported: Mapping[str, str]) -> Check:
        """Consume, read every service, compare; ``reported`` is this schedule's outcomes."""
        started = time.monotonic()
        self.reported.update(reported)
        result = Check()
        result.delivered, result.duplicates_after_dedup = self.drain()
        duplicates = sum(n - 1 for n in self.deliveries.values() if n > 1)
        result.duplicates_before_dedup = duplicates - self._duplicates_seen
        self._duplicates_seen = duplicates

        evidence = gather_evidence(self.settings, delivered=self.deliveries)
        in_a, in_b, delivered = evidence.in_a, evidence.in_b, evidence.delivered
        broken = set(evidence.atomicity_violations)
        result.atomicity_violations = sorted(broken - self._flagged)
        self._flagged |= broken
        lost = set(evidence.lost_messages)
        result.lost_messages = sorted(lost - self._lost_flagged)
        self._lost_flagged |= lost

        result.total_expected, result.total_now = evidence.total_expected, evidence.total_now
        # A conservation failure persists: blame only the schedule during which the sum moved.
        offset = result.total_now - result.total_expected
        result.money_conserved = offset == self._money_offset
        self._money_offset = offset

        result.prepared_left = evidence.prepared
        result.markers_left = len(evidence.markers)
        result.committed_not_durable = sorted(
            t
            for t, outcome in reported.items()
            if outcome == "committed" and not (t in in_a and t in in_b and t in delivered)
        )
        result.aborted_but_visible = sorted(
            t
            for t, outcome in reported.items()
            if outcome == "aborted" and (t in in_a or t in in_b or t in delivered)
        )
        in_doubt = [t for t, outcome in reported.items() if outcome == "in-doubt"]
        result.in_doubt_committed = sum(t in in_a and t not in broken for t in in_doubt)
        result.in_doubt_rolled_back = sum(
            not (t in in_a or t in in_b or t in delivered) for t in in_doubt
        )
        try:
            result.log_pending = sorted(read_pending(self.settings.log_path))
        except Exception as exc:  # any failure to reopen is the finding itself
            result.log_error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result
