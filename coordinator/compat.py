"""The names that differ between the asyncio engine and its generated thread twin.

The asyncio modules are the sources (``coordinator/aio``, ``participants/aio``);
``scripts/unasync.py`` writes the synchronous ones from them. Whatever cannot
be had by dropping ``async``/``await`` lives here as a pair: the name with an
``A`` (or ``a``) prefix is the asyncio one, the same name without it the
thread one, and the generator maps the first to the second (as psycopg's
``_acompat.py``). Nothing else belongs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator.errors import CrashInjected

if TYPE_CHECKING:
    from coordinator.protocol import AsyncLastResource, AsyncXAResource, LastResource, XAResource

#: Wait ``seconds`` without blocking the loop / the thread.
asleep = asyncio.sleep
sleep = time.sleep

#: A lock shared by the tasks / the threads that use one resource.
ALock = asyncio.Lock
Lock = threading.Lock


def amatches_api(call: object) -> bool:
    """True when ``call`` is made for this API: a coroutine function under asyncio."""
    return inspect.iscoroutinefunction(call)


def matches_api(call: object) -> bool:
    """True when ``call`` is made for this API: a plain function under threads."""
    return callable(call) and not inspect.iscoroutinefunction(call)


# -- the coordinator's background work and its hand-offs (coordinator/aio/coordinator.py) --

T = TypeVar("T")

#: A flag the background work watches (a coordinator closing).
AEvent = asyncio.Event
Event = threading.Event


async def await_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    return event.is_set()


def wait_event(event: threading.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it is set."""
    return event.wait(timeout)


def aspawn(loop: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
    """Run the background ``loop`` as a task."""
    return asyncio.create_task(loop(), name=name)


def spawn(loop: Callable[[], None], name: str) -> threading.Thread:
    """Run the background ``loop`` on a daemon thread."""
    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread


async def ajoin(task: asyncio.Task[None] | None) -> None:
    """Wait for a background task that was told to stop (or cancelled) to end."""
    if task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def join(thread: threading.Thread | None) -> None:
    """Wait for a background thread that was told to stop to end."""
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def acancel(task: asyncio.Task[None] | None) -> None:
    """Stop a background task now (a process that died runs nothing more)."""
    if task is not None:
        task.cancel()


def cancel(thread: threading.Thread | None) -> None:
    """A thread cannot be stopped from outside: it sees the flag it watches at its next wake."""


async def ato_thread(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a blocking ``call`` (recovery, the backlog, a log write) in a worker thread."""
    return await asyncio.to_thread(call, *args, **kwargs)


def to_thread(call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a blocking ``call`` here: this is a thread already."""
    return call(*args, **kwargs)


_shielded: set[asyncio.Future[Any]] = set()


async def ashield(step: Coroutine[Any, Any, T]) -> T:
    """Run ``step`` to its end even if the awaiting task is cancelled (a commit sequence
    is never stopped half way); the caller gets CancelledError, the step goes on."""
    task = asyncio.ensure_future(step)
    _shielded.add(task)
    task.add_done_callback(_shielded.discard)
    return await asyncio.shield(task)


def shield(result: T) -> T:
    """A thread is never cancelled: the step has already run to its end."""
    return result


#: Raised in a task that is cancelled; a thread never is, so nothing raises its twin.
ACancelled = asyncio.CancelledError


class Cancelled(BaseException):
    """Never raised: the thread counterpart of a cancelled task."""


def afrom_thread(
    step: Callable[..., Coroutine[Any, Any, None]], *args: Any
) -> Callable[[float], None]:
    """``step(*args, timeout)`` as a blocking call a worker thread can make: it runs on
    this event loop (the backlog settles an asyncio broker session this way)."""
    loop = asyncio.get_running_loop()

    def call(timeout: float) -> None:
        asyncio.run_coroutine_threadsafe(step(*args, timeout), loop).result()

    return call


def from_thread(step: Callable[..., None], *args: Any) -> Callable[[float], None]:
    """``step(*args, timeout)`` as a blocking call (it is one already)."""
    return functools.partial(step, *args)


def arecovery_view(resource: AsyncXAResource) -> XAResource:
    """The synchronous view of an asyncio resource that recovery and the backlog use
    (in a worker thread)."""
    return resource.recovery_resource()


def recovery_view(resource: XAResource) -> XAResource:
    """Recovery and the backlog use a synchronous resource as it is."""
    return resource


def arecovery_broker(broker: AsyncLastResource | None) -> LastResource | None:
    """The synchronous view of an asyncio broker for recovery and the backlog."""
    return broker.recovery_broker() if broker is not None else None


def recovery_broker(broker: LastResource | None) -> LastResource | None:
    """Recovery and the backlog use a synchronous broker as it is."""
    return broker


def arelease_refused(
    release_all: Callable[[], Awaitable[None]], close_log: Callable[[], None]
) -> None:
    """A coordinator refused at construction closes its decision log only: its asyncio
    participants have not connected yet, and closing them needs the event loop."""
    close_log()


def release_refused(release_all: Callable[[], None], close_log: Callable[[], None]) -> None:
    """A coordinator refused at construction closes everything it was given."""
    release_all()


def astart_in_init(start: Callable[[], Awaitable[object]]) -> None:
    """An asyncio coordinator starts when awaited (``async with``, ``await start()``):
    recovery and its tasks need the running loop."""


def start_in_init(start: Callable[[], object]) -> None:
    """A thread coordinator starts as it is made (recovery first, then its threads)."""
    start()


#: A condition variable (``with``/``async with`` it; wait with :func:`acond_wait`).
ACondition = asyncio.Condition
Condition = threading.Condition


async def acond_wait(cond: asyncio.Condition, timeout: float) -> bool:
    """Wait, holding ``cond``, until notified or ``timeout`` seconds passed (then False)."""
    try:
        await asyncio.wait_for(cond.wait(), timeout)
    except TimeoutError:
        return False
    return True


def cond_wait(cond: threading.Condition, timeout: float) -> bool:
    """Wait, holding ``cond``, until notified or ``timeout`` seconds passed (then False)."""
    return cond.wait(timeout)


# -- the commit sequence's parallel calls and log writes (coordinator/aio/runtime.py) --


async def arun_parallel(
    executor: Executor, calls: Sequence[Callable[[], Awaitable[T]]]
) -> list[T | BaseException]:
    """Await ``calls`` concurrently as tasks (each copies this context, so the gtrid stays
    bound); return results or exceptions, re-raising an injected crash."""
    results: list[T | BaseException] = await asyncio.gather(
        *(call() for call in calls), return_exceptions=True
    )
    _raise_crash(results)
    return results


def run_parallel(executor: Executor, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` at once on the executor (the last one on this thread); return results
    or exceptions, re-raising an injected crash."""
    futures: list[Future[T]] = [_submit(executor, call) for call in calls[:-1]]
    results: list[T | BaseException] = []
    last: T | BaseException
    try:
        last = calls[-1]()
    except BaseException as exc:
        last = exc
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            results.append(exc)
    results.append(last)
    _raise_crash(results)
    return results


async def arun_each(
    executor: Executor, calls: Sequence[Callable[[], Awaitable[T]]]
) -> list[T | BaseException]:
    """Wait for each call's answer, one after the other, in this task: the driver sent
    every branch its command first, so the answers arrive together whatever the order
    they are read in, and no task or gather is made per step; an injected crash stops
    at once."""
    results: list[T | BaseException] = []
    for call in calls:
        try:
            results.append(await call())
        except CrashInjected:
            raise
        except BaseException as exc:
            results.append(exc)
    return results


def run_each(executor: Executor, calls: Sequence[Callable[[], T]]) -> list[T | BaseException]:
    """Run ``calls`` one after the other on this thread (the driver sent every branch its
    command first, so the branches work at once); an injected crash stops at once."""
    results: list[T | BaseException] = []
    for call in calls:
        try:
            results.append(call())
        except CrashInjected:
            raise
        except BaseException as exc:
            results.append(exc)
    return results


async def ain_worker(executor: Executor, call: Callable[[], None]) -> None:
    """Run the blocking ``call`` (a decision log write) on one of the executor's threads in
    a copy of this context, so the loop goes on; on the loop's default one once the
    executor is shut down (a closed coordinator)."""
    context = contextvars.copy_context()
    try:
        future = executor.submit(context.run, call)
    except RuntimeError:
        await asyncio.to_thread(call)
        return
    await asyncio.wrap_future(future)


def in_worker(executor: Executor, call: Callable[[], None]) -> None:
    """Run the blocking ``call`` here: this is a thread already."""
    call()


def _submit(executor: Executor, call: Callable[[], T]) -> Future[T]:
    """``call`` on the executor in a copy of this context (so the gtrid stays bound),
    or here and now once the executor is shut down (a closed coordinator)."""
    context = contextvars.copy_context()
    try:
        return executor.submit(context.run, call)
    except RuntimeError:
        done: Future[T] = Future()
        try:
            done.set_result(call())
        except BaseException as exc:
            done.set_exception(exc)
        return done


def _raise_crash(results: Sequence[object]) -> None:
    """An injected crash in any task or thread is a crash of the process."""
    for item in results:
        if isinstance(item, CrashInjected):
            raise item


# -- a STOMP client's state and its receiver (participants/aio/stomp_ops.py) --


class AStateLock:
    """Guards a client's state shared with its receiver: under asyncio the receiver is a
    task on the same thread and no step holding it awaits, so there is nothing to lock."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


#: Guards a client's state shared with its receiver thread.
StateLock = threading.Lock

#: A queue the receiver fills and a reader empties (a subscription's messages).
AQueue = asyncio.Queue
Queue = queue.SimpleQueue


async def aqueue_get(items: asyncio.Queue[T], timeout: float) -> T | None:
    """The next item, or None after ``timeout`` seconds."""
    with contextlib.suppress(asyncio.QueueEmpty):
        return items.get_nowait()  # wait_for with a timeout of 0 never takes it (3.11)
    try:
        return await asyncio.wait_for(items.get(), timeout)
    except TimeoutError:
        return None


def queue_get(items: queue.SimpleQueue[T], timeout: float) -> T | None:
    """The next item, or None after ``timeout`` seconds."""
    try:
        return items.get(timeout=timeout)
    except queue.Empty:
        return None


def acurrent_worker() -> object:
    """Who is running: the current task (a corked write belongs to it)."""
    return asyncio.current_task()


def current_worker() -> object:
    """Who is running: the current thread (a corked write belongs to it)."""
    return threading.get_ident()


# -- a process's main loop (scenarios/outbox/consumer_2pc_aio.py) --


def arun_main(main: Callable[..., Coroutine[Any, Any, T]], /, *args: Any) -> T:
    """Run ``main(*args)`` to its end on an event loop of its own (a process's main work)."""
    return asyncio.run(main(*args))


def run_main(main: Callable[..., T], /, *args: Any) -> T:
    """Run ``main(*args)`` to its end on this thread."""
    return main(*args)
