"""The batch runner, on threads and on asyncio tasks (one source, scenarios/transfer/batch_aio.py):
every transfer once, at most ``concurrency`` at a time; a raising transfer stops the batch
with BatchFailed; a stop lets the transfers in hand finish and starts no more."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from coordinator.states import Outcome
from scenarios.transfer import batch, batch_aio
from scenarios.transfer.model import Transfer, plan
from scenarios.transfer.results import BatchFailed, BatchResult

#: A transfer's own work: returns its outcome and reason.
Work = Callable[[Transfer], tuple[Outcome, str]]


class Load:
    """Counts the transfers running at once, and the most ever."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def enter(self, transfer: Transfer) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.seen.append(transfer.transfer_id)

    def leave(self) -> None:
        with self._lock:
            self.now -= 1


def run(
    api: str,
    transfers: list[Transfer],
    work: Work,
    *,
    concurrency: int,
    stop: threading.Event | None = None,
    load: Load | None = None,
) -> BatchResult:
    """``transfers`` through the runner of ``api``; each spends a moment in flight."""
    load = load or Load()
    if api == "threads":

        def one(transfer: Transfer) -> tuple[Outcome, str]:
            load.enter(transfer)
            try:
                time.sleep(0.002)
                return work(transfer)
            finally:
                load.leave()

        return batch.run_batch(transfers, one, concurrency=concurrency, stop=stop)

    async def aone(transfer: Transfer) -> tuple[Outcome, str]:
        load.enter(transfer)
        try:
            await asyncio.sleep(0.002)
            return work(transfer)
        finally:
            load.leave()

    return asyncio.run(batch_aio.run_batch(transfers, aone, concurrency=concurrency, stop=stop))


APIS = pytest.mark.parametrize("api", ["threads", "asyncio"])


@APIS
def test_every_transfer_runs_once_and_at_most_concurrency_at_a_time(api: str) -> None:
    """Outcomes and reasons are counted, latencies kept for the committed only."""
    transfers = plan(60, accounts=10, seed=1)
    load = Load()

    def work(transfer: Transfer) -> tuple[Outcome, str]:
        if transfer.amount % 3 == 0:
            return Outcome.ABORTED, f"refused {transfer.transfer_id}"
        return Outcome.COMMITTED, ""

    result = run(api, transfers, work, concurrency=4, load=load)
    refused = sum(t.amount % 3 == 0 for t in transfers)
    assert sorted(load.seen) == sorted(t.transfer_id for t in transfers)
    assert load.most == 4
    assert result.outcomes == {"committed": 60 - refused, "aborted": refused}
    assert result.reasons == {"refused …": refused}
    assert len(result.latencies_ms) == 60 - refused
    assert result.not_started == 0 and result.seconds > 0


@APIS
def test_a_transfer_that_raises_stops_the_batch_and_names_itself(api: str) -> None:
    """The others finish the transfer in hand and take no more; BatchFailed carries the result."""
    transfers = plan(200, accounts=10, seed=2)
    bad = transfers[5].transfer_id

    def work(transfer: Transfer) -> tuple[Outcome, str]:
        if transfer.transfer_id == bad:
            raise OSError("the disk is gone")
        return Outcome.COMMITTED, ""

    raised = f"transfer {bad} raised OSError: the disk is gone"
    with pytest.raises(BatchFailed, match=raised) as err:
        run(api, transfers, work, concurrency=4)
    assert err.value.transfer_id == bad
    assert isinstance(err.value.__cause__, OSError)
    result = err.value.result
    assert result is not None
    assert 5 <= result.outcomes["committed"] < 20
    assert result.not_started == 200 - result.outcomes["committed"] - 1


@APIS
def test_a_stop_finishes_the_transfers_in_hand_and_starts_no_more(api: str) -> None:
    """Once the stop is set, each worker ends after its transfer; the rest are not started."""
    transfers = plan(500, accounts=10, seed=3)
    stop = threading.Event()
    done = 0

    def work(transfer: Transfer) -> tuple[Outcome, str]:
        nonlocal done
        done += 1
        if done == 10:
            stop.set()
        return Outcome.COMMITTED, ""

    result = run(api, transfers, work, concurrency=3, stop=stop)
    committed = result.outcomes["committed"]
    assert 10 <= committed <= 10 + 2  # the other workers' transfers in hand
    assert result.not_started == 500 - committed
