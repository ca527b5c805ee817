"""The server's side of a branch's session, as its client saw it.

A branch keeps it from its start, so that a coordinator that loses the session can end
what the server still runs for it (docs/design.md §2, "A PREPARE behind work that waits"):
the backend's pid, and the application name the server reported, which a pid reused by
another session after a restart does not share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSession:
    """A session's backend pid and application name (``pg_stat_activity``'s ``pid`` and
    ``application_name``)."""

    pid: int
    application_name: str

    @classmethod
    def reported(cls, pid: int, application_name: bytes | None) -> ServerSession:
        """The session as ``PGconn`` reports it (``backend_pid``, and its
        ``parameter_status(b"application_name")``), read when the branch began."""
        return cls(pid, (application_name or b"").decode(errors="replace"))
