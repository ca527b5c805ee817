"""A backlog chore that breaks once, for the tests of the watchdog (sync and asyncio)."""

from __future__ import annotations

from coordinator.backlog import Backlog


class FirstRoundBreaks:
    """Put in place of ``backlog.work``: its first round raises ``RuntimeError("a bug in a
    chore")``, every later round does the work; ``rounds`` counts them."""

    def __init__(self, backlog: Backlog) -> None:
        self.rounds = 0
        self._work = backlog.work
        backlog.work = self  # type: ignore[method-assign]

    def __call__(self, settle_timeout: float = 10.0) -> None:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("a bug in a chore")
        self._work(settle_timeout)
