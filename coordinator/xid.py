"""The transaction id (Xid): format id, global transaction id and branch qualifier, validated."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from coordinator.errors import InvalidXid

#: Format id of every branch this project prepares ("tpc1" in ASCII); recovery
#: only touches prepared transactions carrying it.
FORMAT_ID = 0x74706331

#: gtrid and bqual are at most 64 characters (the XA limit; PostgreSQL's gid
#: would take 200 bytes, but the X/Open limit is what peers interoperate with).
MAX_ID_LENGTH = 64

#: Characters allowed in a gtrid or bqual: printable ASCII that needs no
#: escaping in a STOMP header, a SQL literal, a file name or a shell word.
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]+")
_COORDINATOR_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")


def validate_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a well-formed gtrid or bqual, else raise InvalidXid."""
    if not isinstance(value, str):
        raise InvalidXid(f"{kind} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidXid(f"{kind} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidXid(
            f"{kind} {value[:20]!r}... is {len(value)} characters long; at most "
            f"{MAX_ID_LENGTH} are allowed"
        )
    if not _ID_PATTERN.fullmatch(value):
        bad = next(ch for ch in value if not _ID_PATTERN.fullmatch(ch))
        raise InvalidXid(
            f"{kind} {value!r} contains {bad!r}; only letters, digits and . _ : - are allowed"
        )
    return value


def validate_coordinator_id(value: str) -> str:
    """Return ``value`` if it can prefix gtrids (lower-case letters, digits, dashes; 1-24)."""
    if not isinstance(value, str) or not _COORDINATOR_ID_PATTERN.fullmatch(value):
        raise InvalidXid(
            f"coordinator id {value!r} must be 1-24 lower-case letters, digits or dashes, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Xid:
    """One branch of a global transaction: (format id, gtrid, bqual)."""

    format_id: int
    gtrid: str
    bqual: str

    def __post_init__(self) -> None:
        if (
            isinstance(self.format_id, bool)
            or not isinstance(self.format_id, int)
            or not 0 <= self.format_id < 2**31
        ):
            raise InvalidXid(f"format id {self.format_id!r} must be an integer in [0, 2**31)")
        validate_id("gtrid", self.gtrid)
        validate_id("bqual", self.bqual)

    @classmethod
    def branch(cls, gtrid: str, bqual: str) -> Xid:
        """The Xid of branch ``bqual`` of ``gtrid`` with this project's format id."""
        return cls(FORMAT_ID, gtrid, bqual)


def gtrid_prefix(coordinator_id: str) -> str:
    """The prefix every gtrid of ``coordinator_id`` starts with."""
    return validate_coordinator_id(coordinator_id) + "."


def new_gtrid(coordinator_id: str) -> str:
    """A fresh gtrid owned by ``coordinator_id``: its prefix plus 96 random bits."""
    return gtrid_prefix(coordinator_id) + secrets.token_hex(12)
