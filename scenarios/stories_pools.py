"""Stories of thread pools: a bounded queue that fills, with the caller blocked or refused.

The pool is scenarios.bounded_pool's; no lab service is involved (each task
sleeps, standing for a call to another service).
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from scenarios.bounded_pool import BoundedPool, FullQueuePolicy, PoolFull
from scenarios.config import Settings
from scenarios.story_kit import Story

#: The pool of the story: threads, queue slots, the burst given to it, each task's sleep.
THREADS, QUEUE, BURST, TASK_SECONDS = 2, 4, 20, 0.1


def _task(index: int) -> int:
    time.sleep(TASK_SECONDS)
    return index


def pool_queue_full(settings: Settings) -> Story:
    """A pool's bounded queue fills: the caller is blocked until room is free, or refused."""
    story = Story("pool-queue-full")
    story.say(
        f"a pool of {THREADS} threads with room for {QUEUE} waiting tasks is given a burst of "
        f"{BURST} tasks of {TASK_SECONDS * 1000:g} ms each, handed out back to back"
    )

    with BoundedPool(THREADS, QUEUE, FullQueuePolicy.BLOCK, name="story-block") as pool:
        started = time.perf_counter()
        futures = [pool.submit(_task, i) for i in range(BURST)]
        handed_out = time.perf_counter() - started
        results = [future.result() for future in futures]
    stats = pool.stats
    story.say(
        f"policy block: handing out the burst took the caller {handed_out:.2f} s; "
        f"{stats.blocked} of {BURST} submits waited for room, {stats.blocked_seconds:.2f} s "
        f"in all, the longest {stats.longest_block * 1000:.0f} ms"
    )
    story.expect(
        stats.blocked > 0 and stats.blocked_seconds > 0,
        "the caller was blocked while the queue was full (its time blocked is measured)",
    )
    story.expect(
        stats.most_waiting <= QUEUE,
        f"the queue never held more than {QUEUE} tasks (deepest: {stats.most_waiting})",
    )
    story.expect(
        results == list(range(BURST)) and stats.completed == BURST and stats.rejected == 0,
        f"evidence: {stats.completed} of {BURST} tasks ran, none refused",
    )

    refused: list[PoolFull] = []
    taken: list[Future[int]] = []
    with BoundedPool(THREADS, QUEUE, FullQueuePolicy.REJECT, name="story-reject") as pool:
        for i in range(BURST):
            try:
                taken.append(pool.submit(_task, i))
            except PoolFull as exc:  # the caller is told: it may fail, retry or record it
                refused.append(exc)
        ran = [future.result() for future in taken]
    stats = pool.stats
    story.say(
        f"policy reject: the pool took {stats.submitted} tasks and refused {stats.rejected} "
        f"(PoolFull raised to the caller each time: {refused[0] if refused else 'never'})"
    )
    story.expect(stats.rejected > 0, "the full queue refused work instead of growing")
    story.expect(
        len(refused) == stats.rejected and len(ran) + len(refused) == BURST,
        f"evidence: every task is accounted for: {len(ran)} ran + {len(refused)} refused "
        f"to the caller = {BURST} handed out; none lost silently",
    )
    story.expect(
        stats.completed == stats.submitted and stats.failed == 0,
        f"every task the pool took ran ({stats.completed} of {stats.submitted})",
    )
    story.say(
        "an unbounded queue (ThreadPoolExecutor's) would have taken all of them: memory "
        "grows with the backlog, and a process that dies loses every task still waiting"
    )
    return story
