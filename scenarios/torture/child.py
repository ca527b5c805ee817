"""The process the crash torture kills: a transfer batch that logs each outcome as it is told.

It runs what ``twopc transfer --count N --concurrency C`` runs (the
coordinator from :func:`scenarios.wiring.open_coordinator`, failpoints armed
from ``TWOPC_FAILPOINTS``, :func:`scenarios.strategies.transfer_2pc.transfer_2pc`
on :func:`scenarios.transfer.batch.run_batch`), or with ``--api asyncio`` the
same on asyncio (:func:`scenarios.wiring.open_async_coordinator`, the asyncio
sources of that transfer and of the batch, C tasks at a time), half of the transfers with A
prepared early (:func:`early`), and appends one JSON line per transfer
to ``--outcomes`` the moment its caller is told the outcome. Each line is
one ``write`` to a file opened with O_APPEND, so what a process reported
before it was killed survives it: the torture then checks that every
transfer reported COMMITTED is durable and every one reported ABORTED left
nothing behind.

Lines: ``{"ready": <seconds since start>}`` once the coordinator is open (and
its start-up recovery done), then ``{"id": <transfer id>, "outcome":
"committed"|"aborted"|"in-doubt"}`` (or ``"error"`` with the exception, when
something other than an outcome reached the caller), then ``{"done": true}``.

    python -m scenarios.torture.child --count 60 --concurrency 8 --outcomes FILE [--api asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

from coordinator.states import Outcome
from scenarios.config import APIS, Settings
from scenarios.log_setup import configure as configure_logging
from scenarios.strategies import transfer_2pc_aio
from scenarios.strategies.transfer_2pc import transfer_2pc
from scenarios.transfer import batch_aio
from scenarios.transfer import model as scenario
from scenarios.transfer.batch import run_batch
from scenarios.wiring import open_async_coordinator, open_coordinator

Writer = Callable[[dict[str, Any]], None]


def _writer(path: str) -> Writer:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(record: dict[str, Any]) -> None:
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    return write


def early(transfer: scenario.Transfer) -> bool:
    """Whether ``transfer`` ends A's work before B's (end_work: A prepared then when other
    transfers are in flight): half of them, the same ones in every run of a plan."""
    return zlib.crc32(transfer.transfer_id.encode()) % 2 == 1


def _told(write: Writer, transfer: scenario.Transfer, outcome: Outcome) -> None:
    write({"id": transfer.transfer_id, "outcome": outcome.value})


def _unexpected(write: Writer, transfer: scenario.Transfer, exc: Exception) -> None:
    """An error the caller did not expect, instead of an outcome: recorded as such."""
    write({"id": transfer.transfer_id, "outcome": "error", "error": repr(exc)[:300]})


def _run_threads(args: argparse.Namespace, write: Writer, started: float) -> None:
    coordinator = open_coordinator(Settings.load(), sessions=max(args.concurrency, 1))
    write({"ready": round(time.monotonic() - started, 3)})
    try:
        plan = scenario.plan(args.count, accounts=args.accounts, seed=args.seed, run_id=args.run_id)

        def run_one(t: scenario.Transfer) -> tuple[Outcome, str]:
            try:
                outcome, reason = transfer_2pc(coordinator, t, end_a_work=early(t))
            except Exception as exc:
                _unexpected(write, t, exc)
                return Outcome.IN_DOUBT, f"unexpected {type(exc).__name__}"
            _told(write, t, outcome)
            return outcome, reason

        run_batch(plan, run_one, concurrency=args.concurrency)
    finally:
        coordinator.close()


async def _run_asyncio(args: argparse.Namespace, write: Writer, started: float) -> None:
    coordinator = open_async_coordinator(Settings.load(), sessions=max(args.concurrency, 1))
    await coordinator.start()  # its recovery, as the thread coordinator's opening runs it
    write({"ready": round(time.monotonic() - started, 3)})
    try:
        plan = scenario.plan(args.count, accounts=args.accounts, seed=args.seed, run_id=args.run_id)

        async def run_one(t: scenario.Transfer) -> tuple[Outcome, str]:
            try:
                outcome, reason = await transfer_2pc_aio.transfer_2pc(
                    coordinator, t, end_a_work=early(t)
                )
            except Exception as exc:
                _unexpected(write, t, exc)
                return Outcome.IN_DOUBT, f"unexpected {type(exc).__name__}"
            _told(write, t, outcome)
            return outcome, reason

        await batch_aio.run_batch(plan, run_one, concurrency=args.concurrency)
    finally:
        await coordinator.close()


def main(argv: list[str] | None = None) -> int:
    """Run the batch; exit 0 when it ran to the end (whatever the outcomes)."""
    parser = argparse.ArgumentParser(prog="python -m scenarios.torture.child")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--run-id", default=None, help="prefix of the transfer ids")
    parser.add_argument("--outcomes", required=True, help="file to append outcome lines to")
    parser.add_argument("--api", choices=APIS, default="threads", help="the coordinator's API")
    args = parser.parse_args(argv)

    configure_logging()
    started = time.monotonic()
    write = _writer(args.outcomes)
    if args.api == "asyncio":
        asyncio.run(_run_asyncio(args, write, started))
    else:
        _run_threads(args, write, started)
    write({"done": True})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
