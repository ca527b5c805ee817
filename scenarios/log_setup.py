"""The one place that configures logging, for twopc's own processes (the CLI and its children).

The library (``coordinator``, ``participants``) never configures logging; an
application embedding it keeps its own structlog and stdlib set-up.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import sys
from typing import Any

import structlog

from coordinator.errors import ConfigurationError
from coordinator.events import StderrLogger

#: The values TWOPC_LOG_LEVEL takes (any case).
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Set up structlog: level from ``TWOPC_LOG_LEVEL`` (default WARNING), to stderr.

    Per-step events are DEBUG so the commit path pays almost nothing for them
    unless asked; outcomes of recovery are INFO; failures WARNING or ERROR.
    ``TWOPC_LOG_FORMAT=json`` renders JSON lines. A level that is not one of
    :data:`LEVELS` is a ConfigurationError naming TWOPC_LOG_LEVEL.
    """
    value = level or os.environ.get("TWOPC_LOG_LEVEL") or "WARNING"
    if value.strip().upper() not in LEVELS:
        raise ConfigurationError(
            f"TWOPC_LOG_LEVEL={value!r} is not a log level; set it to one of "
            f"{', '.join(LEVELS)} (or unset it for WARNING)"
        )
    numeric = logging.getLevelName(value.strip().upper())
    use_json = json if json is not None else os.environ.get("TWOPC_LOG_FORMAT") == "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # stomp.py warns through stdlib logging when it closes a socket twice, which
    # twopc's deliberate drops of sessions in an unknown state do; its errors still show.
    logging.getLogger("stomp.py").setLevel(max(numeric, logging.ERROR))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: StderrLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    atexit.unregister(silence_stderr_if_gone)  # once, however often this runs
    atexit.register(silence_stderr_if_gone)


def silence_stderr_if_gone() -> None:
    """At exit, a stderr whose reader went away (``twopc transfer 2>&1 | head``) takes
    /dev/null instead.

    StderrLogger drops the lines it cannot write, but what stays in stderr's buffer
    (with buffered stdio: no PYTHONUNBUFFERED) makes the interpreter's last flush
    fail, and the process exits with status 120 after its work was done.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced or closed: nothing to flush
        return
    if not _reader_gone(fd):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _reader_gone(fd: int) -> bool:
    """Whether the pipe or socket ``fd`` writes to lost its reader: poll reports an error
    or a hang-up on it (a file or a terminal reports neither)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in events)
