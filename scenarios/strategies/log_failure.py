"""What a run of transfers does when a transfer met a decision log that cannot be written."""

from __future__ import annotations

from coordinator.errors import DecisionLogError
from coordinator.states import Outcome
from scenarios.transfer.model import Transfer


class DecisionLogFailing(DecisionLogError):
    """A transfer met a decision log that cannot be written: a run of transfers stops."""


def stop_on_log_failure(
    failure: DecisionLogError | None, transfer: Transfer, outcome: Outcome
) -> None:
    """Raise DecisionLogFailing if the transfer met a log failure (its outcome stands:
    the coordinator left nothing prepared that it could finish)."""
    if failure is None:
        return
    left = (
        "its branches stay prepared until 'twopc recover' reopens the log"
        if outcome is Outcome.IN_DOUBT
        else "nothing of it is left prepared"
    )
    raise DecisionLogFailing(
        f"{failure}; the run stopped there (that transfer {outcome.value}: {left})"
    ) from failure
