"""What makes an asynchronous strategy converge: its relays and the consumer, and how to watch them.

:class:`Pipeline` runs the relays of one mode and the consumer, either as
threads of this process (cheap, for tests and quick runs) or as child
processes ``python -m scenarios.cli relay|consumer`` (real crashes: SIGKILL one,
start it again). Then:

* :func:`wait_converged` waits until B's inbox holds every transfer A committed;
* :func:`convergence_latencies` gives, per transfer, the milliseconds from the
  client's commit (``Strategy.committed_at``) to B's commit of the credit
  (``inbox.applied_at``, taken just before that commit; the ACK follows it).

Once everything has converged, scenarios.transfer.invariants checks the
invariants (``gather_evidence(settings, inbox=True)``).

A relay or consumer thread that stops on an error it cannot contain does not
die silently: the error is logged (``pipeline.worker.failed``) and kept, and
:meth:`Pipeline.check` (which :func:`wait_converged` calls when given it) and
:meth:`Pipeline.stop` raise it as :class:`WorkerFailed`, one line that names
the worker. A child process that has not ended within the stop's timeout is
asked for its threads' stacks (SIGUSR1, scenarios.stopping), which go to its
log, then killed; ``pipeline.worker.killed`` says so and :attr:`Pipeline.stuck`
keeps a line about it, so that a stop that hangs can be read afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from coordinator.errors import TwoPhaseCommitError
from coordinator.events import get_logger
from scenarios import events as ev
from scenarios import stopping
from scenarios.answer_deadline import ANSWER_TIMEOUT, answered_within
from scenarios.config import Settings
from scenarios.outbox.batchjob import BatchConfig, BatchJob
from scenarios.outbox.consumer import Consumer
from scenarios.outbox.deadletter import one_line
from scenarios.outbox.relay import Relay, RelayConfig, make_relay
from scenarios.outbox.relay_modes import RelayMode
from scenarios.transfer.invariants import amounts_on

#: How long a child that did not stop is given to write its threads' stacks before SIGKILL.
STACKS_WAIT = 1.0


class WorkerFailed(TwoPhaseCommitError):
    """A relay or consumer thread of the pipeline stopped on an error."""


@dataclass
class _Worker:
    """One relay or consumer: a thread with its stop event, or a child process."""

    kind: str  # "relay" or "consumer"
    name: str = ""  # kind-index, e.g. "consumer-1" (its log is <log_dir>/<name>.log)
    thread: threading.Thread | None = None
    stop: threading.Event | None = None
    process: subprocess.Popen[bytes] | None = None
    runner: Relay | Consumer | BatchJob | None = None
    error: str = ""  # why the thread stopped, if it stopped on an error


def _run_contained(worker: _Worker, name: str) -> None:
    """The thread's body: run the worker; an error ends it logged and kept, never silently."""
    if worker.runner is None or worker.stop is None:
        return
    try:
        worker.runner.run(worker.stop)
    except BaseException as exc:  # kept for check() and stop(); nothing else reads it
        worker.error = one_line(f"{name} stopped: {type(exc).__name__}: {exc}")
        get_logger(component="pipeline").error(
            ev.PIPELINE_WORKER_FAILED, worker=name, error=worker.error
        )


@dataclass
class Pipeline:
    """``relays`` relays of ``mode`` plus one consumer, started by :meth:`start`.

    With ``fanout`` (event consumer names, scenarios.outbox.fanout), one consumer
    per name as well, each on its own queue of the events' virtual topic; the
    credit consumer comes after them (index ``len(fanout)``).
    """

    settings: Settings
    mode: RelayMode
    relays: int = 1
    processes: bool = False
    config: RelayConfig = field(default_factory=RelayConfig)
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for processes
    log_dir: str | None = None  # where child processes write their logs (default: discard)
    fanout: tuple[str, ...] = ()  # the fan-out's event consumers, by name, besides the credit
    slow_delay: float | None = None  # the slow fan-out consumer's delay (None: the setting)
    workers: list[_Worker] = field(default_factory=list)
    #: Each child the last :meth:`stop` had to kill (by name): what happened, and where
    #: its stacks are.
    stuck: dict[str, str] = field(default_factory=dict)

    def start(self) -> Pipeline:
        """Start the consumers and the relays; returns self (use as a context manager).

        Mode ``batch`` has neither: one batch job (``config.poll_interval`` is its
        interval, ``config.batch_size`` its chunk) writes B's credits and inbox rows.
        """
        if self.mode == "batch":
            self.workers = [self._start("batch", 0)]
            return self
        consumers = len(self.fanout) + 1
        self.workers = [self._start("consumer", i) for i in range(consumers)]
        self.workers += [self._start("relay", i) for i in range(self.relays)]
        return self

    def _start(self, kind: str, index: int) -> _Worker:
        name = f"{kind}-{index}"
        if self.processes:
            return _Worker(kind, name, process=self._spawn(kind, index))
        stop = threading.Event()
        runner: Relay | Consumer | BatchJob
        if kind == "consumer" and index < len(self.fanout):
            from scenarios.outbox.fanout import make_consumer

            runner = make_consumer(self.settings, self.fanout[index], delay=self.slow_delay)
        elif kind == "consumer":
            runner = Consumer(self.settings)
        elif kind == "batch":
            runner = BatchJob(
                self.settings,
                BatchConfig(
                    interval=self.config.poll_interval,
                    chunk=self.config.batch_size,
                    name=f"batch-{index}",
                ),
            )
        else:
            config = RelayConfig(
                batch_size=self.config.batch_size,
                poll_interval=self.config.poll_interval,
                retry=self.config.retry,
                name=f"{self.mode}-{index}",
            )
            runner = make_relay(self.mode, self.settings, config)
        worker = _Worker(kind, name, stop=stop, runner=runner)
        worker.thread = threading.Thread(
            target=_run_contained, args=(worker, name), name=name, daemon=True
        )
        worker.thread.start()
        return worker

    def command(self, kind: str, index: int = 0) -> list[str]:
        """The command line of a relay or consumer child process."""
        base = [sys.executable, "-m", "scenarios.cli"]
        if kind == "consumer" and index < len(self.fanout):
            delay = [] if self.slow_delay is None else ["--delay", str(self.slow_delay)]
            return [*base, "fanout", "--consumer", self.fanout[index], *delay]
        if kind == "consumer":
            return [*base, "consumer"]
        if kind == "batch":
            return [
                *base,
                "batch",
                "--interval",
                str(self.config.poll_interval),
                "--chunk",
                str(self.config.batch_size),
            ]
        retry = self.config.retry
        return [
            *base,
            "relay",
            "--mode",
            self.mode,
            "--batch-size",
            str(self.config.batch_size),
            "--poll-interval",
            str(self.config.poll_interval),
            "--policy",
            retry.policy.value,
            "--max-attempts",
            str(retry.max_attempts),
            "--backoff",
            str(retry.first_delay),
            *([] if self.config.retain is None else ["--retain", str(self.config.retain)]),
        ]

    def _spawn(self, kind: str, index: int) -> subprocess.Popen[bytes]:
        # The child stops once this process is gone, even killed with SIGKILL.
        env = {
            **os.environ,
            **self.settings.as_env(),
            **self.env,
            stopping.STOP_WITH_PARENT: str(os.getpid()),
        }
        out: Any = subprocess.DEVNULL
        log = self.log_path(f"{kind}-{index}")
        if log:
            out = open(log, "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(self.command(kind, index), env=env, stdout=out, stderr=out)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def log_path(self, name: str) -> str | None:
        """Where the child process ``name`` (e.g. ``consumer-1``) writes; None without a log_dir."""
        return os.path.join(self.log_dir, f"{name}.log") if self.log_dir else None

    # -- faults ------------------------------------------------------------------------

    def relay_workers(self) -> list[_Worker]:
        return [w for w in self.workers if w.kind == "relay"]

    def kill(self, kind: str = "relay", index: int = 0) -> None:
        """SIGKILL a relay or the consumer (child processes only) and reap it."""
        worker = [w for w in self.workers if w.kind == kind][index]
        if worker.process is None:
            raise TwoPhaseCommitError("kill() needs a pipeline of processes (processes=True)")
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(10)

    def restart(self, kind: str = "relay", index: int = 0) -> None:
        """Start a relay or the consumer again in place of one that died or was killed."""
        same = [i for i, w in enumerate(self.workers) if w.kind == kind]
        position = same[index]
        old = self.workers[position]
        if old.process is not None and old.process.poll() is None:
            raise TwoPhaseCommitError(f"{kind} {index} is still running: kill() it first")
        if old.thread is not None and old.thread.is_alive():
            raise TwoPhaseCommitError(f"{kind} {index} is still running")
        self.workers[position] = self._start(kind, index)

    def alive(self) -> list[bool]:
        """Per worker (consumer first, then relays): is it running?"""
        return [
            (w.process.poll() is None)
            if w.process is not None
            else bool(w.thread and w.thread.is_alive())
            for w in self.workers
        ]

    def failures(self) -> list[str]:
        """Why each relay or consumer thread that stopped on an error stopped."""
        return [w.error for w in self.workers if w.error]

    def check(self) -> None:
        """WorkerFailed if a relay or consumer thread stopped on an error."""
        failures = self.failures()
        if failures:
            raise WorkerFailed("; ".join(failures))

    # -- stopping ----------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> list[int | None]:
        """Ask everything to stop (SIGTERM / stop event) and wait; returns exit codes.

        A thread's code is 0, 1 if it stopped on an error (then WorkerFailed is
        raised once everything has stopped), or None if it is still running. A child
        still running at ``timeout`` is killed (its code -9), after writing its threads'
        stacks to its log: see :attr:`stuck`.
        """
        self.stuck = {}
        for worker in self.workers:
            if worker.stop is not None:
                worker.stop.set()
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            left = max(0.1, deadline - time.monotonic())
            if worker.thread is not None:
                worker.thread.join(left)
                codes.append(None if worker.thread.is_alive() else 1 if worker.error else 0)
            elif worker.process is not None:
                try:
                    codes.append(worker.process.wait(left))
                except subprocess.TimeoutExpired:
                    codes.append(self._kill_stuck(worker, worker.process, timeout))
        self.check()
        return codes

    def _kill_stuck(self, worker: _Worker, process: subprocess.Popen[bytes], timeout: float) -> int:
        """SIGKILL a child that did not stop, once it has written its threads' stacks."""
        process.send_signal(stopping.DUMP_SIGNAL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STACKS_WAIT)  # written at once, from the signal; it does not end it
        process.kill()
        code = process.wait(5)
        log = self.log_path(worker.name)
        where = f"its threads' stacks are in {log}" if log else "start it with a log_dir to see why"
        self.stuck[worker.name] = (
            f"{worker.name} (pid {process.pid}) had not stopped {timeout:g} s after SIGTERM "
            f"and was killed; {where}"
        )
        get_logger(component="pipeline").warning(
            ev.PIPELINE_WORKER_KILLED, worker=worker.name, pid=process.pid, waited=timeout, log=log
        )
        return code

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        except WorkerFailed:
            if exc_info[0] is None:  # otherwise the error already on its way is the news
                raise


def for_strategy(
    settings: Settings, strategy: Any, *, processes: bool = False, **options: Any
) -> Pipeline:
    """The relays and consumers ``strategy`` needs (its relay mode; its fan-out, if any)."""
    return Pipeline(
        settings,
        strategy.relay_mode,
        processes=processes,
        fanout=tuple(getattr(strategy, "fanout", ())),
        **options,
    )


# -- convergence -------------------------------------------------------------------------


def wait_converged(
    settings: Settings,
    ids: Iterable[str] | None = None,
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    check: Callable[[], None] | None = None,
    consumer: str = "inbox",
    stop: threading.Event | None = None,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> set[str]:
    """Wait until B's inbox holds ``ids`` (default: every transfer in A); return what is missing.

    ``stop`` set (a stopped run): stop waiting and return what is missing then.

    ``consumer`` "2pc": B's ``transfers`` table instead (a consumer in 2pc mode keeps
    no inbox; B holds the transfer exactly when its message was consumed).

    An empty set means converged: each of those transfers is credited in B and
    its message was consumed. ``check`` runs between polls (a Pipeline's
    :meth:`~Pipeline.check`: stop waiting for a consumer that has died).

    A poll of A or B without an answer within ``answer_timeout`` seconds raises
    :class:`~scenarios.answer_deadline.QueryTimeout` (a ConnectionTimeout): the
    database stopped answering, and the wait says so instead of hanging.
    """
    deadline = time.monotonic() + timeout
    pause = stop if stop is not None else threading.Event()
    with contextlib.ExitStack() as open_connections:
        conn = open_connections.enter_context(psycopg.connect(settings.pg_b, autocommit=True))
        a = None  # A's connection, when A's transfers are what is wanted
        if ids is None:
            a = open_connections.enter_context(psycopg.connect(settings.pg_a, autocommit=True))
        missing = set(ids) if ids is not None else set()
        seen: set[str] = set()  # every id wanted so far; B is asked only for the missing
        while True:
            if a is not None:  # A may still be committing: take its newest rows too
                with answered_within(a, answer_timeout):  # A stopped answering: say so
                    newest = amounts_on(a).keys() - seen
                seen |= newest
                missing |= newest
            with answered_within(conn, answer_timeout):  # B stopped answering: say so
                missing -= {
                    row[0]
                    for row in conn.execute(
                        f"SELECT transfer_id FROM {_applied_table(consumer)} "
                        "WHERE transfer_id = ANY(%s)",
                        (list(missing),),
                    )
                }
            if not missing or time.monotonic() >= deadline:
                return missing
            if check is not None:
                check()
            if pause.wait(interval):
                return missing


def _applied_table(consumer: str) -> str:
    """Where B records an applied credit for a consumer in ``consumer`` mode."""
    if consumer not in ("inbox", "2pc"):
        raise ValueError(f"consumer mode {consumer!r} must be 'inbox' or '2pc'")
    return "inbox" if consumer == "inbox" else "transfers"


def convergence_latencies(
    settings: Settings, committed_at: Mapping[str, float], consumer: str = "inbox"
) -> dict[str, float]:
    """transfer id -> ms from the client's commit to B's commit of the credit.

    ``committed_at`` is a Strategy's (time.time() when run_one's commit
    returned); transfers not in B's inbox yet are left out. Both clocks are this
    machine's wall clock.
    """
    if not committed_at:
        return {}
    table = _applied_table(consumer)
    stamp = "applied_at" if table == "inbox" else "created_at"
    with psycopg.connect(settings.pg_b) as conn:
        rows = conn.execute(
            f"SELECT transfer_id, extract(epoch FROM {stamp})::float8 FROM {table} "
            "WHERE transfer_id = ANY(%s)",
            (list(committed_at),),
        ).fetchall()
    return {tid: max(0.0, (applied - committed_at[tid]) * 1000) for tid, applied in rows}
