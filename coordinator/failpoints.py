"""Named failpoints at every protocol step, armed from tests or from TWOPC_FAILPOINTS.

``TWOPC_FAILPOINTS="after_prepare=kill,before_broker_commit=raise"`` arms
failpoints in a ``twopc`` process, but only one that also sets the test switch
``TWOPC_TEST_FAILPOINTS=1``: without it the setting is refused, so that a
stray variable cannot make a production process kill itself. Tests call
:func:`arm`. An armed failpoint
either raises :class:`CrashInjected` (in-process crash: no clean-up runs),
kills the process with SIGKILL, or (armed from a test with a callable) runs
that callable and goes on, e.g. to cut a connection at that exact step.
``name=kill@3`` fires on the third hit. Unarmed, :func:`hit` costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import ConfigurationError, CrashInjected

#: Every failpoint the coordinator, the log and recovery pass through, in protocol order.
NAMES: tuple[str, ...] = (
    "after_begin",
    "after_prepare",  # after each XA branch prepared (hit once per branch)
    "before_broker_commit",  # marker sent, COMMIT not yet sent
    "after_broker_commit",  # COMMIT sent, receipt not yet seen
    "before_decision_row_commit",  # decision row inserted in its branch, not yet committed
    "after_decision_row_commit",  # the branch carrying the decision row committed
    "log_torn_record",  # half a decision record written, then the crash
    "log_unsynced_record",  # whole record written, not yet fsync'd
    "after_decision",  # decision durable, phase 2 not started
    "after_commit_prepared",  # after each COMMIT PREPARED (hit once per branch)
    "before_end",  # phase 2 done, END not yet appended
    "recovery_after_gather",  # recovery: in-doubt list built, nothing resolved
    "recovery_after_resolve_one",  # recovery: after each branch resolved
)

ACTIONS = ("raise", "kill")

#: The setting that arms failpoints, and the test switch it needs beside it.
SETTING = "TWOPC_FAILPOINTS"
TEST_SWITCH = "TWOPC_TEST_FAILPOINTS"


@dataclass
class _Armed:
    action: str | Callable[[], None]
    remaining: int  # fires when it reaches 1


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def arm(name: str, action: str | Callable[[], None] = "raise", *, on_hit: int = 1) -> None:
    """Arm failpoint ``name`` to ``action`` on its ``on_hit``-th hit.

    ``action`` is 'raise', 'kill', or a callable to run there (the step then goes on).
    """
    if name not in NAMES:
        raise ConfigurationError(f"unknown failpoint {name!r}; known: {', '.join(NAMES)}")
    if not callable(action) and action not in ACTIONS:
        raise ConfigurationError(f"failpoint action {action!r} must be one of {ACTIONS}")
    if on_hit < 1:
        raise ConfigurationError(f"failpoint {name}: on_hit must be >= 1, not {on_hit}")
    with _lock:
        _armed[name] = _Armed(action, on_hit)


def disarm(name: str | None = None) -> None:
    """Disarm ``name``, or every failpoint when ``name`` is None."""
    with _lock:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)


def is_armed(name: str) -> bool:
    """True when ``name`` is armed and has not fired yet."""
    return name in _armed


def hit(name: str) -> None:
    """Pass failpoint ``name``: crash here if it is armed and its count has come."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return
        if armed.remaining > 1:
            armed.remaining -= 1
            return
        del _armed[name]
    if callable(armed.action):
        armed.action()
        return
    if armed.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise CrashInjected(f"failpoint {name} fired")


def arm_from_env(value: str | None = None) -> None:
    """Arm what ``TWOPC_FAILPOINTS`` (or ``value``) names: ``name=action[@hit],...``.

    Reading the environment requires ``TWOPC_TEST_FAILPOINTS=1``; otherwise a
    non-empty ``TWOPC_FAILPOINTS`` raises ConfigurationError.
    """
    if value is None:
        value = os.environ.get(SETTING, "")
        if value.strip() and os.environ.get(TEST_SWITCH) != "1":
            raise ConfigurationError(
                f"{SETTING}={value!r} is set, but failpoints crash the process on purpose and "
                f"are armed only in a test process that also sets {TEST_SWITCH}=1; "
                f"unset {SETTING} (or set {TEST_SWITCH}=1 in a test)"
            )
    spec = value
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition("=")
        action, _, count = (rest or "raise").partition("@")
        try:
            on_hit = int(count) if count else 1
        except ValueError:
            raise ConfigurationError(
                f"TWOPC_FAILPOINTS item {item!r}: the hit count after '@' must be an integer"
            ) from None
        arm(name.strip(), action.strip(), on_hit=on_hit)


def failpoint_env(spec: str | None) -> dict[str, str]:
    """Environment entries that arm ``spec`` in a child process (empty: arm nothing).

    A child started with these (over a copy of ``os.environ``) runs with the
    test switch set, so :func:`arm_from_env` accepts the setting there.
    """
    if not spec:
        return {SETTING: "", TEST_SWITCH: ""}
    return {SETTING: spec, TEST_SWITCH: "1"}
