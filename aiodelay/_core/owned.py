"""What a request owns: timers (``call_later``), tasks (``spawn``) and threads (``to_thread``).

All three end with the request: a pending timer is cancelled, a running task is cancelled, and
a thread is told to stop (``aiodelay.check_cancelled()`` raises in it from then on; a thread
cannot be interrupted, so it stops at its next check). When that happens depends on the
request's policy (see :class:`aiodelay.Policy`): under ``cancel`` as soon as the client leaves
or the deadline passes, otherwise when the handler ends.

A thread outlives its request's ``await`` (which ends at once on cancellation, as any await
does); each installation keeps the threads still running, and the app's cleanup waits for them
for a bounded time and logs what it leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ("Owned", "ThreadJob", "check_cancelled", "spawned")

logger = logging.getLogger("aiodelay")

_T = TypeVar("_T")

#: The tasks ``aiodelay.spawn()`` started and that still run (``aiodelay.shield()`` looks here).
spawned: set[asyncio.Task[Any]] = set()

_local = threading.local()


class ThreadJob:
    """One call of ``aiodelay.to_thread``: its stop flag and its end, seen from the loop."""

    __slots__ = ("done", "func", "lock", "reason", "state", "where")

    def __init__(self, func: Callable[..., Any], where: str) -> None:
        self.func = func
        self.where = where
        #: Set (with a reason) when the request no longer wants the result.
        self.reason: str | None = None
        #: Resolved on the loop once the function has returned or raised in its thread, or
        #: once it is certain never to run (given up while it waited for a worker).
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: "queued", then "running" (the thread took it) or "given up" (the loop did first).
        self.state = "queued"
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<thread job {getattr(self.func, '__qualname__', self.func)!r} of {self.where}>"


def check_cancelled() -> None:
    """In a function that ``aiodelay.to_thread`` runs: raise ``asyncio.CancelledError`` once
    the request it runs for no longer wants its result (its client left under the cancel
    policy, its deadline passed, or it ended). Anywhere else, and before that, do nothing.

    A thread cannot be interrupted from outside: call this between steps of the work (it costs
    a thread-local lookup), so that the work stops at the next one.
    """
    job: ThreadJob | None = getattr(_local, "job", None)
    if job is not None and job.reason is not None:
        raise asyncio.CancelledError(job.reason)


def _in_thread(
    job: ThreadJob,
    loop: asyncio.AbstractEventLoop,
    context: contextvars.Context,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    with job.lock:
        if job.state != "queued":
            return None  # given up while it waited for a worker: nothing to do, nobody waits
        job.state = "running"
    _local.job = job
    try:
        return context.run(job.func, *args, **kwargs)
    finally:
        _local.job = None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_finished, job.done)


def _finished(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class Owned:
    """The timers, tasks and threads of one request; made when it first starts one."""

    __slots__ = ("_handles", "_jobs", "_tasks", "threads", "where")

    def __init__(self, where: str, threads: set[ThreadJob]) -> None:
        #: "METHOD /path" of the request, for error lines.
        self.where = where
        #: Where the installation keeps its running threads (for its cleanup).
        self.threads = threads
        self._handles: list[asyncio.TimerHandle] | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._jobs: set[ThreadJob] | None = None

    def release(self, reason: str) -> None:
        """Cancel the pending timers and running tasks; tell the threads to stop."""
        handles, self._handles = self._handles, None
        for handle in handles or ():
            handle.cancel()
        tasks, self._tasks = self._tasks, None
        for task in tasks or ():
            task.cancel()
        jobs, self._jobs = self._jobs, None
        for job in jobs or ():
            if job.reason is None:
                job.reason = reason

    def call_later(
        self, delay: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> asyncio.TimerHandle:
        handle = asyncio.get_running_loop().call_later(delay, self._fire, callback, args)
        if self._handles is None:
            self._handles = [handle]
        else:
            self._handles.append(handle)
        return handle

    def _fire(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception("timer callback %r of %s raised", callback, self.where)

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(coro)
        spawned.add(task)
        if self._tasks is None:
            self._tasks = {task}
        else:
            self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        spawned.discard(task)
        if self._tasks is not None:
            self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("task %r spawned by %s raised", task, self.where, exc_info=exc)

    def to_thread(
        self, func: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        job = ThreadJob(func, self.where)
        if self._jobs is None:
            self._jobs = {job}
        else:
            self._jobs.add(job)
        threads = self.threads
        threads.add(job)

        def ended(_: asyncio.Future[None]) -> None:
            threads.discard(job)
            if self._jobs is not None:
                self._jobs.discard(job)

        job.done.add_done_callback(ended)
        context = contextvars.copy_context()
        result = loop.run_in_executor(None, _in_thread, job, loop, context, args, kwargs)
        result.add_done_callback(functools.partial(_awaited, job))
        return result


def _awaited(job: ThreadJob, result: asyncio.Future[Any]) -> None:
    """The await of a ``to_thread`` call ended. Cancelled (its request stopped, or the code
    awaiting it gave up, say an ``asyncio.timeout``): the function is told to stop, and if no
    worker has taken it yet, it never will."""
    if not result.cancelled():
        return
    if job.reason is None:
        job.reason = "aiodelay: the code awaiting this thread's result was cancelled"
    with job.lock:
        given_up = job.state == "queued"
        if given_up:
            job.state = "given up"
    if given_up:
        _finished(job.done)
