"""The three-coordinators story: workers in postgres mode, one killed entering phase 2, its
transactions recovered by the others with no command run by hand.

Each worker is ``twopc transfer`` in a process of its own, with its own coordinator
id; what each wrote (stdout, stderr) is kept in the temporary folder until the story
ends, so that a failed story can say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from coordinator.failpoints import failpoint_env
from scenarios.config import Settings
from scenarios.stopping import signal_status
from scenarios.story_kit import Story
from scenarios.transfer import model as scenario
from scenarios.transfer.invariants import Evidence, gather_evidence, prepared_of
from scenarios.wiring import recover_dead

#: The coordinator ids of the three-coordinators story's workers.
PEER_WORKERS = ("peer-worker-1", "peer-worker-2", "peer-worker-3")

#: The transfers a surviving worker is given: far more than it runs before the story
#: stops it (about 50 a second here), and few enough to plan in a moment.
SURVIVOR_TRANSFERS = 20_000

#: How ``twopc transfer`` exits when SIGTERM stops it (scenarios.stopping).
STOPPED_BY_SIGTERM = signal_status(signal.SIGTERM)


def _worker(
    settings: Settings,
    ident: str,
    count: int,
    failpoints: str = "",
    *,
    accounts: int | None = None,
    concurrency: int = 4,
) -> subprocess.Popen[bytes]:
    """``twopc transfer`` as one of several workers: postgres mode, coordinator id ``ident``,
    over the first ``accounts`` accounts (all the last reset made when None)."""
    env = {
        **os.environ,
        **replace(settings, coordinator_id=ident, decisions="postgres").as_env(),
        **failpoint_env(failpoints),
    }
    with (  # the child keeps its own copies
        _output_of(ident, "stdout").open("wb") as stdout,
        _output_of(ident, "stderr").open("wb") as stderr,
    ):
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scenarios.cli",
                "transfer",
                "--count",
                str(count),
                "--concurrency",
                str(concurrency),
                "--no-check",
                "--json",
                *([] if accounts is None else ["--accounts", str(accounts)]),
            ],
            env=env,
            stdout=stdout,
            stderr=stderr,
        )


def _output_of(ident: str, stream: str) -> Path:
    """Where the worker ``ident`` of this process writes its ``stream`` (stdout, stderr)."""
    return Path(tempfile.gettempdir()) / f"twopc-story-{os.getpid()}-{ident}.{stream}"


def _last_error(ident: str) -> str:
    """Why the finished worker ``ident`` stopped: the last line it wrote to stderr, and
    what its run reported (``--json`` on stdout), or ''."""
    lines = _output_of(ident, "stderr").read_text(errors="replace").strip().splitlines()
    why = f": {lines[-1]}" if lines else ""
    try:
        run = json.loads(_output_of(ident, "stdout").read_text(errors="replace"))
    except ValueError:
        return why
    return why + (
        f" (its run: {run.get('committed')} committed, {run.get('aborted')} aborted, "
        f"{run.get('in_doubt')} in doubt, {run.get('not_started')} not started; "
        f"abort reasons {run.get('abort_reasons')})"
    )


def _prepared_of(settings: Settings, ident: str) -> int:
    """How many branches of the worker ``ident``'s gtrids are prepared in A and B (read on
    sessions of the story's own, which the survivors' fencing of ``ident`` leaves alone)."""
    return len(prepared_of(settings, owner=ident))


def three_coordinators_one_killed(settings: Settings) -> Story:
    """Three coordinators on one lab; one is SIGKILLed entering phase 2, the others recover it."""
    story = Story("three-coordinators-one-killed")
    before = gather_evidence(settings)
    victim = PEER_WORKERS[1]
    # after_decision: the marker is committed, phase 2 has not begun, so both branches of
    # that transfer are prepared (the two COMMIT PREPAREDs run in parallel: a kill after
    # the first rarely finds the second still undone). Three more transfers are in flight.
    # The survivors run until the story stops them: a count they could finish before
    # their peer check comes (every 5 s) would make the story a race. Money only goes
    # from A to B, so they pay from the first half of the accounts only: however late
    # the victim starts, the accounts it also pays from (the second half) still hold
    # what its transfers need, and it reaches its 21st commit.
    accounts = scenario.stored_accounts(settings) or scenario.DEFAULT_ACCOUNTS
    workers = {
        ident: _worker(settings, ident, 100, "after_decision=kill@21")
        if ident == victim
        else _worker(settings, ident, SURVIVOR_TRANSFERS, accounts=max(1, accounts // 2))
        for ident in PEER_WORKERS
    }
    try:
        _three_coordinators_evidence(settings, story, workers, victim, before)
    finally:
        _leave_no_worker_behind(settings, story, workers)
    return story


def _three_coordinators_evidence(
    settings: Settings,
    story: Story,
    workers: dict[str, subprocess.Popen[bytes]],
    victim: str,
    before: Evidence,
) -> None:
    """What the three-coordinators story expects, from the kill to the evidence."""
    story.say(
        f"{', '.join(PEER_WORKERS)} run transfers, 4 at a time (TWOPC_DECISIONS=postgres; "
        f"the survivors pay from the first half of the accounts); {victim} dies at the "
        "start of phase 2 of its 21st"
    )
    code = workers[victim].wait(timeout=300)
    killed = time.monotonic()
    left = _prepared_of(settings, victim)
    story.expect(
        code == -9 and left >= 1,
        f"{victim} was killed (exit {code}) with {left} branches still prepared"
        + ("" if code == -9 else _last_error(victim)),
    )
    while _prepared_of(settings, victim) and time.monotonic() - killed < 30:
        time.sleep(0.1)
    resolved_after = time.monotonic() - killed
    survivors = [ident for ident in PEER_WORKERS if ident != victim]
    running = [ident for ident in survivors if workers[ident].poll() is None]
    story.expect(
        _prepared_of(settings, victim) == 0 and running == survivors,
        f"the survivors' peer check resolved them {resolved_after:.1f} s after the kill, "
        f"with no command run by hand (survivors still running: {', '.join(running) or 'none'})",
    )
    for ident in survivors:
        workers[ident].send_signal(signal.SIGTERM)
    for ident in survivors:
        code = workers[ident].wait(timeout=300)
        why = "" if code == STOPPED_BY_SIGTERM else _last_error(ident)
        story.expect(
            code == STOPPED_BY_SIGTERM,
            f"{ident} stopped on SIGTERM, its transfers in hand finished (exit {code}){why}",
        )
    after = gather_evidence(settings)
    new_violations = set(after.atomicity_violations) - set(before.atomicity_violations)
    story.expect(
        after.total_now == before.total_now,
        f"money conserved: A + B held {before.total_now} before and {after.total_now} after",
    )
    story.expect(
        not new_violations,
        f"evidence: {len(new_violations)} new transfers in one place and not the other "
        "(A, B, the transfer.completed events)",
    )
    leftover = sum(_prepared_of(settings, ident) for ident in PEER_WORKERS)
    story.expect(leftover == 0, f"pg_prepared_xacts: {leftover} branches of the workers left")


def _leave_no_worker_behind(
    settings: Settings, story: Story, workers: dict[str, subprocess.Popen[bytes]]
) -> None:
    """Stop the workers still running; if the story failed with branches still
    prepared, resolve them as an operator would (``twopc recover --dead``), so that
    the lab stays usable. The story's verdict was taken before."""
    for process in workers.values():
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    for ident in PEER_WORKERS:
        if not story.ok:  # what each worker logged (WARNING and up) says why
            for line in _output_of(ident, "stderr").read_text(errors="replace").splitlines()[-5:]:
                story.say(f"{ident} logged: {line[:300]}")
        for stream in ("stdout", "stderr"):
            _output_of(ident, stream).unlink(missing_ok=True)
    if sum(_prepared_of(settings, ident) for ident in PEER_WORKERS):
        try:
            done = recover_dead(
                replace(settings, coordinator_id="peer-story-cleanup", decisions="postgres")
            )
        except Exception as exc:  # the story's verdict stands; say why the lab is left so
            story.say(f"cleaning up: 'twopc recover --dead' failed: {exc}")
            return
        left = sum(_prepared_of(settings, ident) for ident in PEER_WORKERS)
        story.say(
            f"cleaning up: 'twopc recover --dead' recovered {len(done)} workers; "
            f"{left} branches still prepared"
        )
