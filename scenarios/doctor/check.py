"""A check's verdict (:class:`Check`) and the helpers every check of ``twopc doctor`` uses."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from scenarios.config_values import redact


class Status(enum.Enum):
    OK = "ok"
    FINDING = "FAIL"
    SKIPPED = "skip"


@dataclass(frozen=True)
class Check:
    """One check's verdict: what was seen and, for a finding, what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status is Status.FINDING

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def finding(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.FINDING, detail, fix)


def first_line(exc: BaseException) -> str:
    """The last non-blank line of an error's text, its secrets redacted: what a check shows."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return redact(lines[-1] if lines else type(exc).__name__)
