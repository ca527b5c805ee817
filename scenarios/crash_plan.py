"""Injected crashes: the points a writer, relay or consumer passes, and which of them are armed.

A strategy's writer, the relays, the consumers and the batch job each hold a
:class:`CrashPlan`; tests and ``twopc transfer`` arm it (``point=action@n``).
``abandon`` makes the caller stop there as if its process died; ``kill``
SIGKILLs the process.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Literal

from coordinator.errors import ConfigurationError

CrashAction = Literal["abandon", "kill"]

#: Environment variable arming a writer crash in a ``twopc transfer`` process:
#: ``point=action@n``, e.g. ``after-a-commit=kill@5`` (see Strategy.arm_crash).
CRASH_SETTING = "TWOPC_STRATEGY_CRASH"


@dataclass
class _ArmedCrash:
    action: CrashAction
    every: int
    hits: int = 0


class CrashPlan:
    """The crash points a strategy's writer passes, and which of them are armed."""

    def __init__(self, strategy: str, points: tuple[str, ...]) -> None:
        self.strategy = strategy
        self.points = points
        self._armed: dict[str, _ArmedCrash] = {}
        self._lock = threading.Lock()

    def arm(self, point: str, *, every: int = 1, action: CrashAction = "abandon") -> None:
        if point not in self.points:
            known = ", ".join(self.points) or "none"
            raise ConfigurationError(
                f"strategy {self.strategy!r} has no crash point {point!r}; known: {known}"
            )
        if action not in ("abandon", "kill"):
            raise ConfigurationError(f"crash action {action!r} must be 'abandon' or 'kill'")
        if every < 1:
            raise ConfigurationError(f"crash at {point}: every must be >= 1, not {every}")
        with self._lock:
            self._armed[point] = _ArmedCrash(action, every)

    def arm_from_env(self, setting: str = CRASH_SETTING) -> None:
        """Arm what ``setting`` names (``point=action@n``, comma-separated; action: kill)."""
        for item in filter(None, (p.strip() for p in os.environ.get(setting, "").split(","))):
            point, _, rest = item.partition("=")
            action, _, count = (rest or "kill").partition("@")
            if action not in ("abandon", "kill") or (count and not count.isdigit()):
                raise ConfigurationError(
                    f"{setting} item {item!r} must look like point=kill@5 or point=abandon@3"
                )
            self.arm(point.strip(), every=int(count or 1), action=action)  # type: ignore[arg-type]

    def disarm(self) -> None:
        with self._lock:
            self._armed.clear()

    def hit(self, point: str) -> bool:
        """True when the writer must die here (abandon); never returns when armed to kill."""
        if not self._armed:
            return False
        with self._lock:
            armed = self._armed.get(point)
            if armed is None:
                return False
            armed.hits += 1
            if armed.hits % armed.every:
                return False
        if armed.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return True
