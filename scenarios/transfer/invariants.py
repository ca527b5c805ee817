"""The transfer's invariants: one checker that reads A, B and the events and says what holds.

For every strategy, after everything has settled:

- atomicity: every transfer id is in A, in B (with the same amount) and
  delivered, or in none of them;
- conservation: the sum of A's and B's balances is what the reset put there
  (``scenario_meta.total`` in A);
- no duplicates: no transfer was delivered twice;
- a refusal is a fact: a transfer announced ``transfer.refused`` is in neither A
  nor B, and no ``transfer.completed`` event announces it;
- nothing of this coordinator is left prepared in PostgreSQL, and no commit
  marker is left on the broker (reported; not part of ``ok``).

*Delivered* means a ``transfer.completed`` event for the synchronous strategies
(2PC, the naive dual write, the thread pool), read from the ledger's queue of
the events' virtual topic (``/queue/Consumer.ledger.VirtualTopic.transfers``,
created before the first event, which nothing but the torture's ledger
consumes), and an applied row of B's inbox for the asynchronous ones (outbox,
CDC, batch), whose consumer takes the credit commands off
``/queue/transfers.credit``. A caller that consumes the ledger's queue itself
(the torture's ledger) passes what it consumed instead.

On a lab where both kinds ran, the synchronous strategies' events are on the
ledger's queue (the credit consumer never sees them), so the asynchronous check
also counts a completed event as the delivery of its transfer, wherever it is:
on the ledger's queue, or dead-lettered by the credit consumer (an event sent to
the credit queue by mistake is refused as one). The CDC fan-out's relay
publishes the completed events of transfers the inbox also holds, at least once
(a relay replays after a crash; each event consumer deduplicates): only a
transfer without an inbox row is held to one event.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from coordinator.errors import ParticipantError
from coordinator.xid import FORMAT_ID, gtrid_prefix
from participants.activemq import SHARED_MARKER_QUEUE, marker_gtrids, marker_queue_for
from participants.stomp_client import Message, StompClient
from participants.stomp_core import BrowseIncomplete
from scenarios.config import Settings
from scenarios.transfer.destinations import LEDGER_QUEUE, dead_letter_queue
from scenarios.transfer.model import (
    CREDIT_QUEUE,
    TRANSFER_COMPLETED,
    TRANSFER_REFUSED,
    TYPE_HEADER,
)
from scenarios.wiring import databases, open_stomp


@dataclass
class Evidence:
    """What the real services hold after a run, and the invariants checked on it."""

    total_expected: int
    total_now: int
    amounts_a: dict[str, int]  # transfer id -> amount, A's transfers table
    amounts_b: dict[str, int]  # transfer id -> amount, B's transfers table
    #: transfer id -> messages on the strategy's queue (the completed events on the ledger's
    #: queue for 2PC, naive and thread; the credit commands with ``inbox``), or what the
    #: caller consumed itself.
    on_queue: Counter[str]
    prepared: list[str]  # "<db>:<gtrid>" of this coordinator's prepared branches
    markers: set[str]  # gtrids of this coordinator's commit markers left on the broker
    #: B's inbox for the asynchronous strategies: transfer id -> (outcome, duplicates absorbed).
    inbox: dict[str, tuple[str, int]] | None = None
    pending: int = 0  # outbox rows still waiting for the status relay
    failures: int = 0  # failure-log rows not sent again yet
    #: With ``inbox``: transfer id -> announcements (events) on the queue or dead-lettered.
    announced: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0  # with ``inbox``: what the credit consumer dead-lettered
    #: transfer id -> ``transfer.refused`` events on the ledger's queue.
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def in_a(self) -> set[str]:
        return set(self.amounts_a)

    @property
    def in_b(self) -> set[str]:
        return set(self.amounts_b)

    @property
    def delivered(self) -> set[str]:
        """Transfer ids whose message reached B's side: applied in the inbox, or on the queue."""
        if self.inbox is not None:
            applied = {t for t, (outcome, _) in self.inbox.items() if outcome == "applied"}
            return applied | {t for t, n in self.announced.items() if n >= 1}
        return {t for t, n in self.on_queue.items() if n >= 1}

    @property
    def atomicity_violations(self) -> list[str]:
        """Transfer ids that are not in A, in B and delivered with one amount, nor in none."""
        seen = (
            set(self.inbox) | set(self.announced) if self.inbox is not None else set(self.on_queue)
        )
        return atomicity_violations(self.amounts_a, self.amounts_b, self.delivered, seen)

    @property
    def duplicates(self) -> list[str]:
        """Transfer ids delivered more than once (an inbox absorbs its duplicates: none)."""
        if self.inbox is not None:  # the inbox's own transfers: their events are at least once
            return sorted(t for t, n in self.announced.items() if n > 1 and t not in self.inbox)
        return sorted(t for t, n in self.on_queue.items() if n > 1)

    @property
    def refused_but_done(self) -> list[str]:
        """Transfer ids announced refused that are in A or B, or announced completed."""
        done = self.in_a | self.in_b | self.delivered
        return sorted(t for t in self.refused if t in done)

    @property
    def lost_messages(self) -> list[str]:
        """Transfer ids in A and in B whose message was never delivered."""
        delivered = self.delivered
        return sorted(
            t for t in self.amounts_a.keys() & self.amounts_b.keys() if t not in delivered
        )

    @property
    def money_conserved(self) -> bool:
        return self.total_now == self.total_expected

    @property
    def ok(self) -> bool:
        return (
            self.money_conserved
            and not self.atomicity_violations
            and not self.duplicates
            and not self.refused_but_done
            and not self.prepared
        )

    def anomalies(self) -> list[str]:
        """Ids where A, B and the queue (or inbox) disagree, and ``"money"`` if not conserved."""
        found = self.atomicity_violations + self.duplicates + self.refused_but_done
        return found + ([] if self.money_conserved else ["money"])

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "money_conserved": self.money_conserved,
            "total_expected": self.total_expected,
            "total_now": self.total_now,
            "transfers_in_a": len(self.amounts_a),
            "transfers_in_b": len(self.amounts_b),
        }
        if self.inbox is not None:
            out["inbox_rows"] = len(self.inbox)
            out["duplicates_absorbed"] = sum(d for _, d in self.inbox.values())
        out["messages_on_queue"] = sum(self.on_queue.values())
        if self.inbox is not None:
            out["outbox_pending"] = self.pending
            out["failure_log"] = self.failures
            out["dead_lettered"] = self.dead_letters
        out.update(
            {
                "atomicity_violations": len(self.atomicity_violations),
                "duplicate_messages": len(self.duplicates),
                "refused_events": sum(self.refused.values()),
                "refused_but_done": len(self.refused_but_done),
                "prepared_left": self.prepared,
                "markers_left": len(self.markers),
                "ok": self.ok,
            }
        )
        return out


def atomicity_violations(
    amounts_a: Mapping[str, int],
    amounts_b: Mapping[str, int],
    delivered: Collection[str],
    seen: Collection[str] = (),
) -> list[str]:
    """Ids in A, B, ``delivered`` or ``seen`` that are not in all three with one amount."""
    ids = amounts_a.keys() | amounts_b.keys() | set(delivered) | set(seen)
    return sorted(
        t
        for t in ids
        if not (t in amounts_a and t in amounts_b and t in delivered)
        or amounts_a[t] != amounts_b[t]
    )


# -- reading the services -----------------------------------------------------------


def transfer_amounts(dsn: str) -> dict[str, int]:
    """transfer id -> amount of every row in the database's ``transfers`` table."""
    with psycopg.connect(dsn) as conn:
        return amounts_on(conn)


def amounts_on(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """:func:`transfer_amounts` read on an open connection."""
    rows = conn.execute("SELECT transfer_id, amount FROM transfers")
    return {row[0]: int(row[1]) for row in rows}


def balance_sum(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(sum(balance), 0) FROM accounts").fetchone()
        return int(row[0]) if row else 0


def expected_total(settings: Settings) -> int:
    """The sum of balances the reset put in A and B (``scenario_meta.total`` in A)."""
    with psycopg.connect(settings.pg_a) as conn:
        row = conn.execute("SELECT value FROM scenario_meta WHERE key = 'total'").fetchone()
    return int(row[0]) if row else 0


def queued_transfer_ids(
    settings: Settings, destination: str = LEDGER_QUEUE, kind: str | None = None
) -> Counter[str]:
    """transfer-id header -> number of messages with it on the queue (a full browse); with
    ``kind``, only the messages of that ``type``."""
    with open_stomp(settings) as client:
        messages = client.browse(destination, idle_timeout=10.0)
    return Counter(
        m.headers.get("transfer-id", "?")
        for m in messages
        if not m.is_sentinel and (kind is None or m.headers.get(TYPE_HEADER) == kind)
    )


def every_message(client: StompClient, destination: str) -> list[Message]:
    """Every message on ``destination``, a queue nobody consumes while the checks run (the
    ledger's, a dead-letter queue); ParticipantError if the broker would not show them all.

    A plain browse may end early and look complete: a browse sees only the messages the
    broker holds in memory (the queue's memory limit, 32 MB in the lab: about 20,000
    events). Counting on such a browse, the checks would report every event past it as
    lost."""
    try:
        return client.browse_complete(destination, idle_timeout=10.0)
    except BrowseIncomplete as exc:
        raise ParticipantError(
            f"{exc.detail}. The checks count every message on that queue, and cannot: empty "
            "it ('twopc transfer --reset' empties the scenario's queues), or run without the "
            "checks (--no-check)",
            participant=exc.participant,
        ) from exc


def ledger_events(settings: Settings) -> tuple[Counter[str], Counter[str]]:
    """Transfer id -> ``transfer.completed`` events, and -> ``transfer.refused`` events, on the
    ledger's queue of the events' topic (every message on it)."""
    with open_stomp(settings) as client:
        messages = every_message(client, LEDGER_QUEUE)
    completed: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for m in messages:
        kind = m.headers.get(TYPE_HEADER)
        if kind in (TRANSFER_COMPLETED, TRANSFER_REFUSED):
            found = completed if kind == TRANSFER_COMPLETED else refused
            found[m.headers.get("transfer-id", "?")] += 1
    return completed, refused


def announcements(
    settings: Settings, destination: str = LEDGER_QUEUE, consumed: str = CREDIT_QUEUE
) -> tuple[Counter[str], int]:
    """Transfer id -> completed events on ``destination`` or dead-lettered by the consumer of
    ``consumed`` (an event sent there by mistake), and how many messages the consumer of
    ``consumed`` dead-lettered (every message on both)."""
    with open_stomp(settings) as client:
        queued = every_message(client, destination)
        dead = every_message(client, dead_letter_queue(consumed))
    found = Counter(
        m.headers.get("transfer-id", "?")
        for m in (*queued, *dead)
        if m.headers.get(TYPE_HEADER) == TRANSFER_COMPLETED
    )
    return found, len(dead)


def prepared_of(settings: Settings, owner: str | None = None) -> list[str]:
    """'<db>:<gtrid>' of every prepared transaction this coordinator (or coordinator
    ``owner``) owns, in A and B; read on sessions named by this coordinator's id, so that
    a peer fencing ``owner`` (or the recovery of ``owner``) does not end them."""
    prefix = gtrid_prefix(owner or settings.coordinator_id)
    found = []
    for resource in databases(settings, pool_size=1):
        try:
            found += [f"{resource.name}:{x.gtrid}" for x in resource.recover(FORMAT_ID, prefix)]
        finally:
            resource.close()
    return sorted(found)


def markers_of(settings: Settings) -> set[str]:
    """gtrids of this coordinator's commit markers: on its own marker queue, and on the
    queue every coordinator shared before (docs/design.md §3)."""
    queues = (marker_queue_for(settings.coordinator_id), SHARED_MARKER_QUEUE)
    with open_stomp(settings) as client:
        gtrids = {
            g
            for queue in queues
            for m in client.browse(queue, idle_timeout=10.0)
            for g in marker_gtrids(m.headers)
        }
    prefix = gtrid_prefix(settings.coordinator_id)
    return {g for g in gtrids if g.startswith(prefix)}


def gather_evidence(
    settings: Settings,
    *,
    inbox: bool = False,
    delivered: Counter[str] | None = None,
    consumer: str = "inbox",
) -> Evidence:
    """Read A, B, the events, the prepared branches and the markers into one :class:`Evidence`.

    ``inbox``: the strategy is asynchronous; read B's inbox, the outbox backlog,
    the failure log and the dead-letter queue too, and count an applied inbox
    row, or a completed event on the ledger's queue or dead-lettered, as the
    delivery. ``delivered``: the completed events the caller consumed from the
    ledger's queue itself; then the queue is not browsed (nor its refusals read).
    ``consumer`` "2pc": the credits were consumed in global
    transactions that keep no inbox: a transfer B holds is one whose message was
    consumed with it (same commit), and counts as an applied inbox row.
    """
    refused: Counter[str] = Counter()
    if delivered is not None:
        on_queue = delivered
    elif inbox:
        on_queue = queued_transfer_ids(settings, CREDIT_QUEUE)
    else:
        on_queue, refused = ledger_events(settings)
    evidence = Evidence(
        total_expected=expected_total(settings),
        total_now=balance_sum(settings.pg_a) + balance_sum(settings.pg_b),
        amounts_a=transfer_amounts(settings.pg_a),
        amounts_b=transfer_amounts(settings.pg_b),
        on_queue=on_queue,
        prepared=prepared_of(settings),
        markers=markers_of(settings),
        refused=refused,
    )
    if inbox:
        with psycopg.connect(settings.pg_a) as conn:
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending'), "
                "(SELECT count(*) FROM outbox_failures WHERE resent_at IS NULL)"
            ).fetchone()
        with psycopg.connect(settings.pg_b) as conn:
            evidence.inbox = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT transfer_id, outcome, duplicates FROM inbox")
            }
        if consumer == "2pc":
            evidence.inbox.update((t, ("applied", 0)) for t in evidence.amounts_b)
        pending, failures = counts if counts else (0, 0)
        evidence.pending, evidence.failures = int(pending), int(failures)
        evidence.announced, evidence.dead_letters = announcements(settings)
    return evidence


def anomalies(settings: Settings, relay_mode: str | None) -> list[str]:
    """The anomalies of a strategy with ``relay_mode`` (None: 2PC, naive), after convergence."""
    return gather_evidence(settings, inbox=relay_mode is not None).anomalies()
