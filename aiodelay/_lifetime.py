"""Per-request state: the completion future, the disconnect flag, request-scoped timers and tasks.

A :class:`Lifetime` is created by the middleware for each request it handles and stored on the
request; the public functions here find it there. It allocates nothing more until asked: no
future until ``notify_finish`` is called, no set until a timer or task is started.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from ._errors import ConnectionLost
from ._policy import Policy
from ._watch import Watch, response_completed

if TYPE_CHECKING:
    from ._middleware import Middleware

__all__ = (
    "NOT_SET_UP",
    "Lifetime",
    "call_later",
    "is_disconnected",
    "lifetime_of",
    "notify_finish",
    "spawn",
)

logger = logging.getLogger("aiodelay")

_T = TypeVar("_T")
# aiohttp >= 3.12 warns about plain string keys on a request; older ones lack RequestKey.
_KEY: Any = (
    web.RequestKey("aiodelay", object) if hasattr(web, "RequestKey") else "aiodelay.lifetime"
)
NOT_SET_UP = (
    "aiodelay is not installed on this request's app: call aiodelay.setup(app) "
    "(or add aiodelay.middleware() to its middlewares)"
)
_HAS_UNCANCEL = sys.version_info >= (3, 11)


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # A client leaving is an expected outcome, not a bug: mark it retrieved so that an
        # unobserved future does not log "Future exception was never retrieved".
        future.exception()


class Lifetime:
    """What aiodelay knows and owns for one request, from the handler's start to its end."""

    __slots__ = (
        "_cancel_requested",
        "_handles",
        "_tasks",
        "_waiters",
        "ended",
        "error",
        "lost",
        "lost_at",
        "owner",
        "policy",
        "request",
        "response",
        "shield_depth",
        "started_at",
        "task",
        "watch",
        "websocket",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        task: asyncio.Task[Any],
        policy: Policy,
        owner: Middleware,
        watch: Watch | None,
    ) -> None:
        self.request = request
        self.task = task
        self.policy = policy
        self.owner = owner
        self.watch = watch
        self.started_at = task.get_loop().time()
        self.lost: ConnectionLost | None = None
        self.lost_at: float | None = None
        self.ended = False
        #: After the end: the exception the request ended with, if it did not complete.
        self.error: BaseException | None = None
        #: After the end: the response handed to aiohttp, if any.
        self.response: web.StreamResponse | None = None
        self.shield_depth = 0
        #: The client left a WebSocket: aiohttp, not aiodelay, ends the handler.
        self.websocket = False
        self._cancel_requested = False
        self._waiters: list[asyncio.Future[None]] | None = None
        self._handles: list[asyncio.TimerHandle] | None = None
        self._tasks: set[asyncio.Task[Any]] | None = None
        request[_KEY] = self

    # -- what the middleware calls ---------------------------------------------------------

    def disconnected(self, lost: ConnectionLost) -> None:
        """The client left (called by the connection's Watch, or by the middleware).

        In this order: pending completion futures fail; then, under the cancel policy,
        request-scoped timers and tasks are cancelled and the handler is cancelled at its
        current await (both deferred while an ``aiodelay.shield()`` section runs).
        """
        if self.lost is not None or self.ended:
            return
        self.lost = lost
        self.lost_at = self.task.get_loop().time()
        self.fail_waiters(lost)
        for observer in self.owner.observers:
            observer.request_lost(self.request, lost)
        if self.watch is not None and self.watch.is_websocket():
            # aiohttp ends a WebSocket handler's receive loop itself; cancelling it instead
            # would change how WebSocket handlers end.
            self.websocket = True
        elif self.policy is Policy.CANCEL and self.shield_depth == 0:
            self.release()
            self._cancel_requested = True
            self.task.cancel("aiodelay: the client left")
            return
        # The handler runs on for now: shielded, in a shield() section, or a WebSocket.
        # Its timers and tasks go when it ends; at app cleanup it is cancelled.
        self.owner.orphans.add(self)

    def cancelled_by_disconnect(self) -> bool:
        """Called with a CancelledError in hand: is it the disconnect's, and nothing else's?"""
        remaining = 0
        if self._cancel_requested:
            self._cancel_requested = False
            if _HAS_UNCANCEL:
                remaining = self.task.uncancel()
        elif _HAS_UNCANCEL:
            remaining = self.task.cancelling()
        # Python 3.10 cannot count cancel requests: a foreign cancellation that coincides
        # with a disconnect is taken for the disconnect's.
        return self.lost is not None and self.policy is Policy.CANCEL and remaining == 0

    def forget_cancel(self) -> None:
        """The handler swallowed (or never reached) our cancellation: take the request back."""
        if self._cancel_requested:
            self._cancel_requested = False
            if _HAS_UNCANCEL:
                self.task.uncancel()

    def wants_completion(self) -> bool:
        return bool(self._waiters)

    def complete(self) -> None:
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)

    def fail_waiters(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            _fail(future, exc)

    def cancel_waiters(self) -> None:
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            future.cancel()

    def release(self) -> None:
        """Cancel the request's pending timers and tasks."""
        handles, self._handles = self._handles, None
        for handle in handles or ():
            handle.cancel()
        tasks, self._tasks = self._tasks, None
        for task in tasks or ():
            task.cancel()

    # -- what the public functions call ----------------------------------------------------

    def notify_finish(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.task.get_loop().create_future()
        if not self.ended:
            if self.lost is not None:
                _fail(future, self.lost)
            elif self._waiters is None:
                self._waiters = [future]
            else:
                self._waiters.append(future)
        elif self.lost is not None:
            _fail(future, self.lost)
        elif self.error is not None:
            _fail(future, self.error)
        elif self.response is None or response_completed(self.response):
            future.set_result(None)
        else:
            # aiohttp is still writing the response: the next request on this connection, or
            # its close, says how that went.
            watch = self.watch
            assert watch is not None  # a response was returned, so a Watch was installed
            if watch.trailing is None:
                watch.trailing = []
            watch.trailing.append(lambda: self._settle(future))
        return future

    def _settle(self, future: asyncio.Future[None]) -> None:
        if future.done():
            return
        if self.response is not None and response_completed(self.response):
            future.set_result(None)
        else:
            _fail(future, (self.watch and self.watch.lost) or ConnectionLost("closed"))

    def call_later(
        self, delay: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> asyncio.TimerHandle:
        self._check_open("call_later")
        handle = self.task.get_loop().call_later(delay, self._fire, callback, args)
        if self._handles is None:
            self._handles = [handle]
        else:
            self._handles.append(handle)
        return handle

    def _fire(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            logger.exception(
                "timer callback %r of %s %s raised",
                callback,
                self.request.method,
                self.request.path,
            )

    def spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        if self.ended:
            coro.close()
        self._check_open("spawn")
        task = self.task.get_loop().create_task(coro)
        if self._tasks is None:
            self._tasks = {task}
        else:
            self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "task %r spawned by %s %s raised",
                task,
                self.request.method,
                self.request.path,
                exc_info=exc,
            )

    def _check_open(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"aiodelay.{what}(): the request has already ended")


def lifetime_of(request: web.BaseRequest) -> Lifetime:
    life: Lifetime | None = request.get(_KEY)
    if life is None:
        raise RuntimeError(NOT_SET_UP)
    return life


def notify_finish(request: web.BaseRequest) -> asyncio.Future[None]:
    """A new future that says how the request ended.

    It resolves to ``None`` once the complete response has been handed to the transport
    (``write_eof()`` finished), and fails with :class:`ConnectionLost` if the client left
    before that, also in the middle of a streamed body, or with ``reason="shutdown"`` if the
    server stopped the request. If the handler raised, it fails with that exception.
    Each call returns a new future: cancelling one does not affect another.

    Called after the request ended, it returns an already completed future with the outcome
    (unlike Twisted's, which then never fires). One case resolves later: a response that
    aiohttp was still writing when asked (e.g. from an ``on_response_prepare`` signal) is
    settled when the next request on the connection starts, or the connection closes.
    A failure is marked retrieved: nobody awaiting it logs nothing.
    """
    return lifetime_of(request).notify_finish()


def is_disconnected(request: web.BaseRequest) -> bool:
    """True once the request's client is known to have left before its response was complete.

    After the request ended, it stays what it was then: a connection closed after a complete
    response does not count. False does not promise the client is there: a peer that vanished
    without FIN or RST, or whose FIN waits unread while aiohttp has paused reading, cannot be
    seen.
    """
    return lifetime_of(request).lost is not None


def call_later(
    request: web.BaseRequest, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_later`` owned by the request: cancelled if still pending when the request
    ends, whichever way (under the cancel policy, as soon as the client leaves; for a
    shielded handler, when the handler ends). An exception in ``callback`` is logged with its
    traceback on the ``aiodelay`` logger."""
    return lifetime_of(request).call_later(delay, callback, args)


def spawn(request: web.BaseRequest, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """A task owned by the request: cancelled if still running when the request ends
    (see :func:`call_later` for when that is). An exception it raises is logged with its
    traceback on the ``aiodelay`` logger; awaiting the task still gives it to you."""
    try:
        life = lifetime_of(request)
    except RuntimeError:
        coro.close()
        raise
    return life.spawn(coro)
