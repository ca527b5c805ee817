"""twopc's engine: the two-phase-commit coordinator, its decision log and its recovery.

The public API, with ``participants`` (``scenarios`` is the tool's, not the
library's). Build a coordinator from participants of your choosing::

    from coordinator import Coordinator, FileDecisionLog
    from participants.activemq import ActiveMQ
    from participants.postgres import PostgresResource

    coordinator = Coordinator(
        "orders",
        FileDecisionLog("/var/lib/orders/decisions.log"),
        [PostgresResource("billing", BILLING_DSN), PostgresResource("stock", STOCK_DSN)],
        ActiveMQ("127.0.0.1:61613", "orders"),
    )
"""

from importlib.metadata import PackageNotFoundError, version

from coordinator.coordinator import Coordinator
from coordinator.errors import (
    CommitRefused,
    ConfigurationError,
    DecisionLogCorrupt,
    DecisionLogError,
    DecisionLogLocked,
    DuplicateGtrid,
    FsyncFailed,
    HeuristicMixed,
    InvalidTransition,
    InvalidXid,
    OutcomeUnknown,
    ParticipantError,
    ParticipantUnavailable,
    PrepareFailed,
    RecordNotDurable,
    TransactionAborted,
    TransactionInDoubt,
    TransactionTimeout,
    TwoPhaseCommitError,
    UnknownParticipant,
    WrongRowCount,
)
from coordinator.log import DecisionLog
from coordinator.log.file import FileDecisionLog, read_pending
from coordinator.log.memory import MemoryDecisionLog
from coordinator.protocol import LastResource, LastResourceSession, XABranch, XAResource
from coordinator.recovery import Decision, InDoubt, Recovery, RecoveryReport
from coordinator.states import Outcome, TxState, Vote
from coordinator.transaction import Transaction
from coordinator.xid import FORMAT_ID, Xid

try:
    __version__ = version("twopc-coordinator")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FORMAT_ID",
    "CommitRefused",
    "ConfigurationError",
    "Coordinator",
    "Decision",
    "DecisionLog",
    "DecisionLogCorrupt",
    "DecisionLogError",
    "DecisionLogLocked",
    "DuplicateGtrid",
    "FileDecisionLog",
    "FsyncFailed",
    "HeuristicMixed",
    "InDoubt",
    "InvalidTransition",
    "InvalidXid",
    "LastResource",
    "LastResourceSession",
    "MemoryDecisionLog",
    "Outcome",
    "OutcomeUnknown",
    "ParticipantError",
    "ParticipantUnavailable",
    "PrepareFailed",
    "RecordNotDurable",
    "Recovery",
    "RecoveryReport",
    "Transaction",
    "TransactionAborted",
    "TransactionInDoubt",
    "TransactionTimeout",
    "TwoPhaseCommitError",
    "TxState",
    "UnknownParticipant",
    "Vote",
    "WrongRowCount",
    "XABranch",
    "XAResource",
    "Xid",
    "__version__",
    "read_pending",
]
