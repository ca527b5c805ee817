"""The error tree: every error twopc raises derives from TwoPhaseCommitError."""

from __future__ import annotations


class TwoPhaseCommitError(Exception):
    """Base of every error twopc raises."""


class ConfigurationError(TwoPhaseCommitError):
    """A setting is missing or wrong; the message says which one and how to fix it."""


class InvalidXid(TwoPhaseCommitError, ValueError):
    """A gtrid, bqual, format id or coordinator id is malformed."""


class DuplicateGtrid(TwoPhaseCommitError):
    """A gtrid is already in use by a running or prepared transaction."""


class UnknownParticipant(TwoPhaseCommitError, KeyError):
    """A transaction was asked for a participant it was not given."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown participant"


class InvalidTransition(TwoPhaseCommitError):
    """The state machine refused a step (a bug in the caller, never a resource failure)."""


class ParticipantError(TwoPhaseCommitError):
    """A participant failed; carries its name and the gtrid."""

    def __init__(self, message: str, *, participant: str, gtrid: str | None = None) -> None:
        where = f"participant {participant!r}" + (f", gtrid {gtrid}" if gtrid else "")
        super().__init__(f"{message} ({where})")
        self.detail = message  # without the participant and gtrid
        self.participant = participant
        self.gtrid = gtrid


class ParticipantUnavailable(ParticipantError):
    """A participant cannot be reached (connection refused, broker down, server gone)."""


class PrepareFailed(ParticipantError):
    """A participant voted NO or failed to prepare: the transaction aborts."""


class WrongRowCount(ParticipantError):
    """A deferred statement given a required row count (``defer(..., rows=N)``) touched
    another number of rows: the branch's work failed, and the branch votes NO."""

    def __init__(
        self,
        statement: str,
        *,
        required: int,
        touched: int | None,
        participant: str,
        gtrid: str | None = None,
    ) -> None:
        count = "no row count" if touched is None else f"{touched} row(s)"
        super().__init__(
            f"the statement must touch {required} row(s) and its answer says {count}: {statement}",
            participant=participant,
            gtrid=gtrid,
        )
        self.statement = statement
        self.required = required
        self.touched = touched


class CommitRefused(ParticipantError):
    """The last resource refused the commit (ERROR frame): the transaction aborts."""


class OutcomeUnknown(ParticipantError):
    """The last resource's commit got no answer: the outcome is in doubt until recovery."""


class HeuristicMixed(ParticipantError):
    """A participant's outcome contradicts the decision: the broker committed without a
    message of the transaction, or a branch's work committed on its own (a COMMIT inside
    the branch) in a transaction that can then only roll back."""


class TransactionTimeout(TwoPhaseCommitError):
    """A transaction did not reach its commit point before its deadline and was aborted."""


class TransactionAborted(TwoPhaseCommitError):
    """The transaction was rolled back everywhere; nothing it did is visible."""

    def __init__(self, gtrid: str, reason: str) -> None:
        super().__init__(f"transaction {gtrid} aborted: {reason}")
        self.gtrid = gtrid
        self.reason = reason


class TransactionInDoubt(TwoPhaseCommitError):
    """The outcome is not known yet; recovery (``twopc recover``) will resolve it."""

    def __init__(self, gtrid: str, reason: str) -> None:
        super().__init__(
            f"transaction {gtrid} is in doubt: {reason}; run 'twopc recover' to resolve it"
        )
        self.gtrid = gtrid
        self.reason = reason


class DecisionLogError(TwoPhaseCommitError):
    """The decision log cannot be used (corrupt, locked by another coordinator, unwritable)."""


class UnloggableRecord(DecisionLogError, ValueError):
    """A record the log's format cannot hold (an empty or oversized field); nothing was written."""


class DecisionLogCorrupt(DecisionLogError):
    """A record in the middle of the decision log is damaged; carries the byte offset."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(
            f"decision log {path} is corrupt at byte offset {offset}: {reason}. "
            "Records after it cannot be trusted, so the coordinator refuses to start. "
            "Keep a copy of the file, look at it with 'twopc log dump', and once you know "
            "what the records after the damage decided, cut it there with "
            f"'twopc log truncate --at {offset} --i-know' (see docs/operations.md, 'The "
            "decision log')."
        )
        self.path = path
        self.offset = offset
        self.reason = reason


class DecisionLogLocked(DecisionLogError):
    """Another process holds the decision log (one coordinator per log)."""


class FsyncFailed(DecisionLogError):
    """fsync of the decision log failed: fatal, the process must stop (a retry could lie)."""


class RecordNotDurable(FsyncFailed):
    """A forced record was written but the log failed before it was durable (its fsync).

    Whether the record survives is unknown until the log is opened again: the
    log refuses every later call, and the transaction stays in doubt until a
    restart's recovery follows whatever the reopened file holds.
    """


class CrashInjected(BaseException):
    """Raised by an armed in-process failpoint: simulates the process dying at that step.

    A BaseException so that ordinary ``except Exception`` clean-up does not run,
    as it would not in a real crash.
    """
