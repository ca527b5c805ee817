"""What brings B up to date for an asynchronous strategy: the relay modes."""

from __future__ import annotations

from typing import Literal

#: A relay of that mode and the consumer, or ("batch") the periodic batch job alone
#: (scenarios.outbox.batchjob).
RelayMode = Literal["status", "last-id", "cdc", "batch"]
RELAY_MODES: tuple[RelayMode, ...] = ("status", "last-id", "cdc")
