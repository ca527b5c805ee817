"""The leader/follower group commit, with a batch function that records its groups."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from participants.group_commit import GroupCommit, Outcomes


class Recorder:
    """A batch function that takes a while and fails the items named 'bad'."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds
        self.groups: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[str]) -> Outcomes:
        time.sleep(self.seconds)
        with self.lock:
            self.groups.append(list(items))
        return [ValueError(f"refused {i}") if i.startswith("bad") else None for i in items]


def test_a_lone_caller_commits_alone_at_once() -> None:
    """With nobody else committing, a caller runs its own group of one and waits for no one."""
    recorder = Recorder(seconds=0.0)
    group = GroupCommit(recorder)
    group.submit("a")
    group.submit("b")
    assert recorder.groups == [["a"], ["b"]]
    assert (group.batches, group.items) == (2, 2)


def test_concurrent_callers_share_groups_and_each_is_committed_once() -> None:
    """Callers arriving while a commit runs share the next one; every item is in exactly one."""
    recorder = Recorder()
    group = GroupCommit(recorder)
    items = [f"i{n}" for n in range(64)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(group.submit, items))
    committed = [item for g in recorder.groups for item in g]
    assert sorted(committed) == sorted(items)
    assert len(recorder.groups) < len(items)
    assert group.items == 64 and group.batches == len(recorder.groups)


def test_each_member_sees_its_own_outcome() -> None:
    """A member's error reaches that member only; the others of its group succeed."""
    recorder = Recorder()
    group = GroupCommit(recorder)
    outcomes: dict[str, str] = {}

    def submit(item: str) -> None:
        try:
            group.submit(item)
        except ValueError as exc:
            outcomes[item] = str(exc)
        else:
            outcomes[item] = "ok"

    items = ["bad1", *[f"ok{n}" for n in range(20)], "bad2"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, items))
    assert outcomes == {i: (f"refused {i}" if i.startswith("bad") else "ok") for i in items}


def test_a_failing_batch_fails_every_member_and_the_next_group_still_runs() -> None:
    """A batch function that raises fails each member of its group; later groups are unaffected."""
    calls = 0

    def batch(items: Sequence[str]) -> Outcomes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("broken")
        return [None] * len(items)

    group = GroupCommit(batch)
    with pytest.raises(RuntimeError, match="broken"):
        group.submit("first")
    group.submit("second")
    assert calls == 2
