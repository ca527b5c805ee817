"""The one place that configures logging, for twopc's own processes (the CLI and its children).

The library (``coordinator``, ``participants``) never configures logging; an
application embedding it keeps its own structlog and stdlib set-up.
"""

from __future__ import annotations

import logging
import os
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
