"""The failure policies of the transfer scenario's relays: the outbox component's, on its tables.

The policies (``ignore``, ``retry``, ``failure-log``), the backoff and the
failure log are :mod:`outbox.failures`; this module binds the failure log to
the transfer scenario's tables (keyed by transfer id) for ``twopc outbox
failed`` and ``twopc outbox retry``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from outbox import failures as _failures
from outbox.failures import BACKOFF_SETTING as BACKOFF_SETTING
from outbox.failures import MAX_ATTEMPTS_SETTING as MAX_ATTEMPTS_SETTING
from outbox.failures import POLICY_SETTING as POLICY_SETTING
from outbox.failures import Disposition as Disposition
from outbox.failures import FailedMessage as FailedMessage
from outbox.failures import FailurePolicy as FailurePolicy
from outbox.failures import Publish as Publish
from outbox.failures import RetryReport as RetryReport
from outbox.failures import RetrySettings as RetrySettings
from outbox.failures import deliver as deliver
from outbox.message import OutboxMessage
from scenarios.transfer.schema import TABLES


class OutMessage(OutboxMessage):
    """One message a relay publishes: (transfer id, destination, JSON body[, headers])."""

    @property
    def transfer_id(self) -> str:
        """The transfer id: the message's key."""
        return self.key


def list_failures(dsn: str, *, include_resent: bool = False) -> list[FailedMessage]:
    """The failure log, oldest first; by default only what has not been sent again."""
    return _failures.list_failures(dsn, include_resent=include_resent, tables=TABLES)


def retry_failures(
    dsn: str,
    publish: Publish,
    transfer_ids: Sequence[str] | None = None,
    *,
    batch_size: int = 500,
    stop: threading.Event | None = None,
) -> RetryReport:
    """Send the failure log's unsent messages again (all, or ``transfer_ids``), batch by batch."""
    return _failures.retry_failures(
        dsn, publish, transfer_ids, batch_size=batch_size, stop=stop, tables=TABLES
    )
