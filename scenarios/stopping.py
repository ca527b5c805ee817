"""How a long-running ``twopc`` command stops early: on SIGTERM or SIGINT, or on a fatal error.

One mechanism for every command that runs until it is done or told to stop
(``twopc transfer``, ``demo``, ``scenario run``, ``bench``, ``torture``,
``relay``, ``consumer``, ``fanout``, ``batch``, ``outbox retry``)::

    with stop_on_signals() as stop:       # a RunStop: a threading.Event with a reason
        work(stop)                        # takes no new work once stop is set
        finish_run(stop, print_summary)   # the summary, one line, the exit status

Work that is not handed the stop (a benchmark's measuring threads) asks
:func:`stop_requested` between operations and calls :func:`checkpoint` where
it can give up: that raises :class:`RunStopped`, which ``twopc`` turns into
the same line and exit status (scenarios.cli.main.TwopcGroup).

The first SIGTERM or SIGINT sets the stop: the work in hand finishes (a
transaction commits or rolls back; nothing of the run stays prepared), no new
work starts, the summary prints, and the command exits ``128 + signal``
(143 for SIGTERM, 130 for SIGINT). The services (relay, consumer, fanout,
batch) exit 0 instead: being stopped is how they end. A second signal stops
at once with that status, as the default action would: whatever was in flight
is left to ``twopc recover``.

SIGUSR1 stops nothing: it writes every thread's stack to stderr (Python's
``faulthandler``, from the signal itself, so that it answers even while the
main thread is blocked inside a C call), for a command that seems stuck to be
looked at before it is killed.

A process started by another with ``TWOPC_STOP_WITH_PARENT`` set to that
process's pid (a pipeline's relays and consumers, scenarios.outbox.pipeline)
also stops, as on SIGTERM, once that process is gone, however it ended: killed
with SIGKILL, it could not stop them itself, and they would run on, unowned,
taking their share of the next run's rows and messages.

A fatal error (e.g. a decision log that cannot be written) goes through the
same path: :meth:`RunStop.fail` stops the run the same way, and
:func:`finish_run` prints the summary and one ``twopc: error:`` line and
exits :data:`~scenarios.exit_status.EXIT_RUNTIME_ERROR`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

from coordinator import events
from coordinator.errors import ConfigurationError
from scenarios import events as ev
from scenarios.exit_status import EXIT_RUNTIME_ERROR

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The signal that writes every thread's stack to stderr and stops nothing.
DUMP_SIGNAL = signal.SIGUSR1
#: The setting naming the process whose end stops this one (its parent's pid).
STOP_WITH_PARENT = "TWOPC_STOP_WITH_PARENT"
#: Seconds between two looks at whether that parent is still there.
PARENT_POLL = 0.5


def signal_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + its number (143, 130)."""
    return 128 + signum


class RunStop(threading.Event):
    """Set when the run must stop; says why (``reason``) and with what exit status.

    A ``threading.Event``: what a worker's ``run(stop)`` waits on. The first
    request wins; later ones change nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self.status = 0
        self.error = False
        self.signum: int | None = None
        self._lock = threading.Lock()

    def request(self, reason: str, status: int, *, error: bool = False) -> bool:
        """Stop the run because of ``reason``, to exit ``status``; False if already stopping."""
        with self._lock:
            if self.is_set():
                return False
            self.reason, self.status, self.error = reason, status, error
            self.set()
        return True

    def by_signal(self, signum: int) -> bool:
        """Stop because signal ``signum`` arrived (exit 128 + signum)."""
        first = self.request(signal.Signals(signum).name, signal_status(signum))
        if first:
            self.signum = signum
        return first

    def fail(self, message: str) -> bool:
        """Stop because of a fatal error: ``message`` is the one line the command prints."""
        return self.request(message, EXIT_RUNTIME_ERROR, error=True)

    def describe(self) -> str:
        """'stopped by SIGTERM' or the fatal error; empty when not stopped."""
        if not self.is_set():
            return ""
        return self.reason if self.error else f"stopped by {self.reason}"


class RunStopped(BaseException):  # like KeyboardInterrupt: past any `except Exception`
    """Raised by :func:`checkpoint` once the run was told to stop: the work gives up here."""

    def __init__(self, stop: RunStop) -> None:
        super().__init__(stop.describe())
        self.stop = stop


#: The stop of the command running in this process (set inside stop_on_signals).
_current: RunStop | None = None


def stop_requested() -> bool:
    """True once the running command was told to stop (a signal or a fatal error)."""
    return _current is not None and _current.is_set()


def checkpoint() -> None:
    """Raise RunStopped if the running command was told to stop; a place to give up safely."""
    if _current is not None and _current.is_set():
        raise RunStopped(_current)


@contextmanager
def stop_on_signals(stop: RunStop | None = None) -> Iterator[RunStop]:
    """SIGTERM and SIGINT set ``stop`` (a new RunStop by default) while the block runs.

    A second signal ends the process at once with 128 + its number. While the
    outermost block runs, :data:`DUMP_SIGNAL` writes every thread's stack to stderr. The
    previous handlers are restored when the block ends. Only the main thread
    can install handlers; elsewhere (a test calling the command in a thread)
    the stop is returned without them.
    """
    global _current
    stop = stop if stop is not None else RunStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    parent = _parent_to_follow()  # a bad value is refused before any handler changes
    watcher = _SignalWatcher(stop)
    previous = {signum: signal.signal(signum, watcher.handler) for signum in STOP_SIGNALS}
    # The outermost block only: an inner one's end must not take the dump from the outer.
    dump_to = _stderr_fd() if _current is None else None
    if dump_to is not None:
        faulthandler.register(DUMP_SIGNAL, file=dump_to, all_threads=True)
    if parent is not None:
        threading.Thread(
            target=_follow_parent, args=(stop, parent), name="twopc-parent-watch", daemon=True
        ).start()
    outer, _current = _current, stop
    try:
        yield stop
    finally:
        _current = outer
        if dump_to is not None:
            faulthandler.unregister(DUMP_SIGNAL)
        for signum, old in previous.items():
            signal.signal(signum, old)
        watcher.close()


class _SignalWatcher:
    """Acts on the stop signals of one stop_on_signals block, in a thread of its own.

    A signal runs its Python handler in the main thread, between two of that thread's
    steps, which may hold any lock: inside ``stop.wait()``, the Event's; inside a log
    call, the handler's or the stream's. A handler that took one of those locks would
    wait for itself for ever, and a second signal could no longer stop the process. So
    :meth:`handler` takes none: it writes the signal's number to a pipe, and the
    thread reading that pipe stops the run, logs and says so.
    """

    def __init__(self, stop: RunStop) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name="twopc-signals", daemon=True
        )
        self._thread.start()

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: passes ``signum`` on, and nothing else."""
        with contextlib.suppress(BlockingIOError):  # full: the signals in it stop the run
            os.write(self._write, bytes((signum,)))

    def _run(self, stop: RunStop) -> None:
        while data := os.read(self._read, 64):  # b"" once close() has closed the writing end
            for signum in data:
                _on_stop_signal(stop, signum)

    def close(self) -> None:
        """Act on the signals passed on so far, then end the thread. The handlers are the
        previous ones again by now, so nothing writes to the pipe any more."""
        os.close(self._write)
        self._thread.join()
        os.close(self._read)


def _on_stop_signal(stop: RunStop, signum: int) -> None:
    """The first stop signal stops the run; a second one ends the process at once. Nothing
    here raises: the watcher must live to see the second."""
    log = events.get_logger(component="cli")
    name = signal.Signals(signum).name
    if stop.by_signal(signum):
        events.log_contained(ev.SHUTDOWN_REQUESTED, level="info", logger=log, signal=name)
        _say(f"{name}: finishing the work in hand; {name} again stops at once")
        return
    events.log_contained(ev.SHUTDOWN_FORCED, level="warning", logger=log, signal=name)
    _say(f"{name} again: stopping at once; 'twopc recover' resolves what was in flight")
    os._exit(signal_status(signum))


def _stderr_fd() -> int | None:
    """The file descriptor under ``sys.stderr``; None when it has none (a test's captured
    stream, e.g. click's CliRunner): the stacks then have nowhere to go, and SIGUSR1 keeps
    whatever it did before."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


@functools.cache
def _parent_to_follow() -> int | None:
    """The pid in ``TWOPC_STOP_WITH_PARENT``, read once and taken out of the environment,
    so that this process's own children do not inherit a parent that is not theirs."""
    value = os.environ.pop(STOP_WITH_PARENT, "").strip()
    if value and not value.isdigit():
        raise ConfigurationError(
            f"{STOP_WITH_PARENT}={value!r} is not a process id: unset it (twopc sets it "
            "for the relays and consumers it starts)"
        )
    return int(value) if value else None


def _follow_parent(stop: RunStop, parent: int) -> None:
    """Stop the run, as on SIGTERM, once ``parent`` is no longer this process's parent."""
    while not stop.wait(PARENT_POLL):
        if os.getppid() != parent:
            reason = f"the end of its parent process {parent}"
            if stop.request(reason, signal_status(signal.SIGTERM)):
                events.get_logger(component="cli").warning(ev.SHUTDOWN_PARENT_GONE, parent=parent)
                _say(f"process {parent}, which started this one, is gone: finishing")
            return


def _say(line: str) -> None:
    """One line on stderr, unbuffered (a stream's lock may be held); dropped if stderr is
    gone."""
    with contextlib.suppress(OSError):
        os.write(2, f"twopc: {line}\n".encode())


def finish_run(
    stop: RunStop, summary: Callable[[], None] | None = None, *, status: int = 0
) -> None:
    """Print ``summary``; then, if the run was stopped, say why and exit with its status.

    Returns (having printed the summary) when the run was not stopped, for the
    command to finish normally; ``status`` nonzero exits with it instead.
    """
    if summary is not None:
        summary()
    if stop.is_set():
        exit_stopped(stop)
    if status:
        sys.exit(status)


def exit_stopped(stop: RunStop) -> NoReturn:
    """The one line about why the run stopped, on stderr, and its exit status."""
    if stop.error:
        print(f"twopc: error: {stop.reason}", file=sys.stderr, flush=True)
    else:
        print(f"twopc: {stop.describe()}", file=sys.stderr, flush=True)
    sys.exit(stop.status)
