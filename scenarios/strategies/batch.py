"""The batch strategy: A's local commit records the transfer for a periodic job to copy to B.

The writer is the outbox writer with another table: the debit and a
``batch_export`` row (the target account and the amount, which A's
``transfers`` row lacks) commit in one local transaction of A. The batch job
(scenarios.outbox.batchjob, ``twopc batch``) copies committed rows to B as
credits, reading A as a read-only role.

No message goes to the broker: the chapter's batch transfer is DB to DB, and
the job writes B itself. What the invariant checker counts as the delivery is
the inbox row the job writes in B with each credit.
"""

from __future__ import annotations

from collections.abc import Callable

from scenarios.strategies.outbox import LocalCommitWriter

BATCH_INSERT = (
    "INSERT INTO batch_export (transfer_id, target, amount) "
    "VALUES (%(tid)s, %(target)s, %(amount)s)"
)


class BatchStrategy(LocalCommitWriter):
    """A local commit in A; the batch job credits B on its next run."""

    def __init__(self, *, before_commit: Callable[[], None] | None = None) -> None:
        super().__init__("batch", "batch", BATCH_INSERT, before_commit=before_commit)
