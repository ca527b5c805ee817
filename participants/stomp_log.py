"""stomp.py's own logging, without the broker's password.

At DEBUG, stomp.py logs every frame it sends, CONNECT included; its own masking
(``stomp.utils.clean_lines``) misses ``passcode:secret`` as the frame is
written. A filter on its logger masks the header's value in every record
before any handler sees it, whatever the root logger's level and handlers.
"""

from __future__ import annotations

import logging
import re

STOMP_LOGGER = "stomp.py"  # the name stomp.py logs under (stomp/log.py)
MASK = "********"
_PASSCODE = re.compile(r"(passcode:)(?:(?!\\n)[^\n'\"])*")  # to the end of the line


def mask_passcodes(text: str) -> str:
    """``text`` with the value of every ``passcode:`` header masked."""
    return _PASSCODE.sub(rf"\g<1>{MASK}", text)


class PasscodeFilter(logging.Filter):
    """Masks passcode headers in a record's message (its arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "passcode" in message:
            record.msg, record.args = mask_passcodes(message), None
        return True


def install() -> None:
    """Add the filter to stomp.py's logger, once."""
    logger = logging.getLogger(STOMP_LOGGER)
    if not any(isinstance(f, PasscodeFilter) for f in logger.filters):
        logger.addFilter(PasscodeFilter())
