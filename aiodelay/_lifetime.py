"""Per-request state: the completion future, the disconnect flag, request-scoped timers and tasks.

Every request pays only for a few attribute stores on its connection's :class:`Connection`
(one per connection, reused by keep-alive requests). A :class:`Lifetime` is created for a
request only when something needs one: a call to ``notify_finish``, ``call_later``, ``spawn``,
``is_disconnected`` or ``shield``, or the client leaving. It allocates nothing more until
asked: no future until ``notify_finish`` is called, no list until a timer or task is started.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._errors import ConnectionLost
from ._policy import Policy, policy_of
from ._watch import Watch, response_completed

if TYPE_CHECKING:
    from ._middleware import Middleware

__all__ = (
    "CANCEL_MESSAGE",
    "NOT_SET_UP",
    "Connection",
    "Lifetime",
    "fail",
    "lifetime_key",
    "live",
    "spawned",
)

logger = logging.getLogger("aiodelay")

# aiohttp >= 3.12 warns about plain string keys on a request; older ones lack RequestKey.
lifetime_key: Any = (
    web.RequestKey("aiodelay", object) if hasattr(web, "RequestKey") else "aiodelay.lifetime"
)
NOT_SET_UP = (
    "aiodelay is not installed on this request's app: call aiodelay.setup(app) "
    "(or add aiodelay.middleware() to its middlewares)"
)
_HAS_UNCANCEL = sys.version_info >= (3, 11)
#: The message of the CancelledError that a disconnect raises in a handler.
CANCEL_MESSAGE = "aiodelay: the client left"

#: What ``aiodelay.shield()`` looks through to learn which request the task it runs in
#: serves (nothing per request: a connection is added once, when aiodelay first sees it):
#: the connections aiodelay watches, and the tasks ``aiodelay.spawn()`` started.
live: set[Connection] = set()
spawned: set[asyncio.Task[Any]] = set()


def fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # A client leaving is an expected outcome, not a bug: mark it retrieved so that an
        # unobserved future does not log "Future exception was never retrieved".
        future.exception()


class Connection:
    """aiodelay's side of one connection: the request in flight on it, if any.

    The middleware fills ``request``, ``task``, ``owner`` and ``started_at`` when a request
    starts and clears ``request`` and ``task`` when it ends; ``life`` is made on demand.
    """

    __slots__ = ("life", "owner", "request", "started_at", "task", "trailing", "watch")

    def __init__(self, watch: Watch | None, owner: Middleware) -> None:
        self.watch = watch
        self.owner = owner
        self.request: web.Request | None = None
        self.task: asyncio.Task[Any] | None = None
        self.started_at = 0.0
        self.life: Lifetime | None = None
        #: Called once, at the next request on this connection or when it closes: the
        #: response of an ended request that aiohttp was still writing is then settled.
        self.trailing: list[Callable[[], None]] | None = None
        live.add(self)

    def busy(self) -> bool:
        return self.request is not None

    def make_life(self) -> Lifetime:
        """The Lifetime of the request in flight, made now if it has none yet."""
        life = self.life
        if life is None:
            request, task = self.request, self.task
            assert request is not None and task is not None  # noqa: PT018 - only while busy
            policy = policy_of(request.match_info.handler, self.owner.policy)
            life = self.life = Lifetime(request, task, policy, self)
        return life

    def disconnected(self, lost: ConnectionLost) -> None:
        if self.request is not None:
            self.make_life().disconnected(lost)

    def closed(self) -> None:
        live.discard(self)
        self.run_trailing()

    def run_trailing(self) -> None:
        trailing, self.trailing = self.trailing, None
        for callback in trailing or ():
            callback()


class Lifetime:
    """What aiodelay knows and owns for one request, from the handler's start to its end.

    Stored on the request (so that calls after the end find the outcome); it lets go of the
    request and its task when the request ends, so that no reference cycle outlives it.
    """

    __slots__ = (
        "_cancel_requested",
        "_handles",
        "_tasks",
        "_waiters",
        "conn",
        "ended",
        "error",
        "lost",
        "lost_at",
        "method",
        "path",
        "policy",
        "request",
        "response",
        "shield_depth",
        "task",
        "websocket",
    )

    def __init__(
        self, request: web.BaseRequest, task: asyncio.Task[Any], policy: Policy, conn: Connection
    ) -> None:
        self.request: web.BaseRequest | None = request
        self.task: asyncio.Task[Any] | None = task
        self.policy = policy
        self.conn = conn
        self.method = request.method
        self.path = request.path
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
        request[lifetime_key] = self

    # -- what the middleware and the Watch call ------------------------------------------

    def disconnected(self, lost: ConnectionLost) -> None:
        """The client left (called by the connection's Watch, or by the middleware).

        In this order: pending completion futures fail; then, under the cancel policy,
        request-scoped timers and tasks are cancelled and the handler is cancelled at its
        current await (both deferred while an ``aiodelay.shield()`` section runs).
        """
        task = self.task
        if self.lost is not None or task is None:
            return
        self.lost = lost
        self.lost_at = monotonic()
        self.fail_waiters(lost)
        owner = self.conn.owner
        if self.request is not None:
            for observer in owner.observers:
                try:
                    observer.request_lost(self.request, lost)
                except Exception:  # called from the transport: must not break its close
                    logger.exception("observer %r failed", observer)
        if self.conn.watch is not None and self.conn.watch.is_websocket():
            # aiohttp ends a WebSocket handler's receive loop itself; cancelling it instead
            # would change how WebSocket handlers end.
            self.websocket = True
        elif self.policy is Policy.CANCEL and self.shield_depth == 0:
            self.release()
            if task is not asyncio.current_task():  # the middleware handles its own task
                self._cancel_requested = True
                task.cancel(CANCEL_MESSAGE)
            return
        # The handler runs on for now: shielded, in a shield() section, or a WebSocket.
        # Its timers and tasks go when it ends; at app cleanup it is cancelled.
        owner.orphans.add(self)

    def cancelled_by_disconnect(self) -> bool:
        """Called with a CancelledError in hand: is it the disconnect's, and nothing else's?"""
        task = self.task
        assert task is not None  # the request is still running
        remaining = 0
        if self._cancel_requested:
            self._cancel_requested = False
            if _HAS_UNCANCEL:
                remaining = task.uncancel()
        elif _HAS_UNCANCEL:
            remaining = task.cancelling()
        # Python 3.10 cannot count cancel requests: a foreign cancellation that coincides
        # with a disconnect is taken for the disconnect's.
        return self.lost is not None and self.policy is Policy.CANCEL and remaining == 0

    def end(self, response: web.StreamResponse | None) -> None:
        """The handler is done: take back an undelivered cancellation, cancel what the
        request owns, and let go of the request and its task."""
        if self._cancel_requested and _HAS_UNCANCEL and self.task is not None:
            self.task.uncancel()  # the handler caught it, or never reached an await
        self._cancel_requested = False
        self.ended = True
        self.release()
        self.response = response
        self.request = None
        self.task = None
        self.conn.owner.orphans.discard(self)

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
            fail(future, exc)

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
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.ended:
            if self.lost is not None:
                fail(future, self.lost)
            elif self._waiters is None:
                self._waiters = [future]
            else:
                self._waiters.append(future)
        elif self.lost is not None:
            fail(future, self.lost)
        elif self.error is not None:
            fail(future, self.error)
        elif self.response is None or response_completed(self.response):
            future.set_result(None)
        else:
            # aiohttp is still writing the response: the next request on this connection, or
            # its close, says how that went.
            conn = self.conn
            if conn.trailing is None:
                conn.trailing = []
            conn.trailing.append(lambda: self._settle(future))
        return future

    def _settle(self, future: asyncio.Future[None]) -> None:
        if future.done():
            return
        if self.response is not None and response_completed(self.response):
            future.set_result(None)
        else:
            watch = self.conn.watch
            fail(future, (watch.lost if watch is not None else None) or ConnectionLost("closed"))

    def call_later(
        self, delay: float, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> asyncio.TimerHandle:
        self._check_open("call_later")
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
            logger.exception("timer callback %r of %s %s raised", callback, self.method, self.path)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        if self.ended:
            coro.close()
        self._check_open("spawn")
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
            logger.error(
                "task %r spawned by %s %s raised", task, self.method, self.path, exc_info=exc
            )

    def _check_open(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"aiodelay.{what}(): the request has already ended")
