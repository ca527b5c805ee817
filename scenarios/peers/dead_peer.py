"""How long a dead peer's prepared branches stay prepared: SIGKILL a worker, time the keeper.

A keeper coordinator (postgres mode) runs in this process with its peer check
every ``--peer-interval`` seconds. Each round starts a worker process
(:mod:`scenarios.peers.worker`, an id of its own), SIGKILLs it at a moment it
has a branch prepared in B, and measures the time until no branch of its id is
left prepared in A or B (read from pg_prepared_xacts every 20 ms), nothing done
by hand. Prints p50/p90/p99/max over the rounds, and the check that A and B
hold the same transactions of every victim.

    python -m scenarios.peers.dead_peer --kills 20 [--peer-interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psycopg

from scenarios.config import Settings
from scenarios.log_setup import configure as configure_logging
from scenarios.transfer.results import percentiles
from scenarios.wiring import open_coordinator


def prepared(dsn: str, prefix: str) -> set[str]:
    """The gtrids starting with ``prefix`` that are prepared in ``dsn``'s database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {x.gtrid for x in conn.tpc_recover() if x.gtrid.startswith(prefix)}


def tags(dsn: str, prefix: str) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tag FROM peers_probe WHERE starts_with(tag, %s)", (prefix,)
        ).fetchall()
    return {r[0] for r in rows}


def one_round(settings: Settings, ident: str, home: Path, timeout: float) -> float:
    """Start worker ``ident``, kill it with a branch prepared in B; seconds until resolved."""
    outcomes = home / f"{ident}.outcomes"
    env = {**os.environ, **replace(settings, coordinator_id=ident, home=home / ident).as_env()}
    worker = subprocess.Popen(
        [sys.executable, "-m", "scenarios.peers.worker", "--outcomes", str(outcomes)], env=env
    )
    prefix = f"{ident}."
    try:
        deadline = time.monotonic() + 60
        while not (outcomes.exists() and outcomes.read_text().count("\n") >= 3):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {ident} did not start")
            time.sleep(0.05)
        while True:  # stop it, look, and kill it only with a branch prepared in B
            os.kill(worker.pid, signal.SIGSTOP)
            if prepared(settings.pg_b, prefix):
                break
            os.kill(worker.pid, signal.SIGCONT)
            time.sleep(0.005)
        worker.kill()
        killed = time.monotonic()
        worker.wait()
        while prepared(settings.pg_b, prefix) or prepared(settings.pg_a, prefix):
            if time.monotonic() - killed > timeout:
                raise RuntimeError(f"{ident}: still prepared after {timeout:g} s")
            time.sleep(0.02)
        return time.monotonic() - killed
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.peers.dead_peer")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--peer-interval", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    configure_logging()
    base = Settings.load()
    settings = replace(base, decisions="postgres")
    run = f"{os.getpid() % 100000}"
    keeper = open_coordinator(
        replace(settings, coordinator_id=f"keeper-{run}"),
        sessions=2,
        peer_interval=args.peer_interval,
    )
    seconds: list[float] = []
    victims: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="twopc-dead-peer-") as home:
            for i in range(args.kills):
                ident = f"victim-{run}-{i}"
                victims.append(ident)
                seconds.append(one_round(settings, ident, Path(home), args.timeout))
                print(f"round {i + 1}: resolved {seconds[-1]:.2f} s after SIGKILL", flush=True)
    finally:
        keeper.close()
    agree = all(tags(settings.pg_a, f"{v}.") == tags(settings.pg_b, f"{v}.") for v in victims)
    figures = {k: round(v, 2) for k, v in percentiles(seconds).items()}
    print(
        json.dumps(
            {
                "kills": len(seconds),
                "peer_interval_s": args.peer_interval,
                "resolve_seconds": figures,
                "a_and_b_agree": agree,
            }
        )
    )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
