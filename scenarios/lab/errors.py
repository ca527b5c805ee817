"""The lab's one error."""

from __future__ import annotations

from coordinator.errors import TwoPhaseCommitError


class LabError(TwoPhaseCommitError):
    """The lab cannot start or stop; the message says what to do."""
