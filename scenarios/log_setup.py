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


def configure(level: str | None = None, *, json: bool | None = None) -> None:
    """Set up structlog: level from ``TWOPC_LOG_LEVEL`` (default WARNING), to stderr.

    Per-step events are DEBUG so the commit path pays almost nothing for them
    unless asked; outcomes of recovery are INFO; failures WARNING or ERROR.
    ``TWOPC_LOG_FORMAT=json`` renders JSON lines.
    """
    level_name = (level or os.environ.get("TWOPC_LOG_LEVEL", "WARNING")).upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.WARNING
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
