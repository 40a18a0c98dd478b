"""``setup(app)`` and ``middleware()``: the policies applied to each request."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import logging
import sys
from collections.abc import AsyncIterator
from time import monotonic
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from ._account import Book, book_key, books_of, installed_on, started
from ._connection import Connection, runs_requests
from ._errors import ConnectionLost, DeadlineExceeded
from ._lifetime import CANCEL_MESSAGE, Lifetime
from ._observe import OutcomeKind
from ._policy import Policy, deadline_of, marks_a_deadline, policy_of
from ._stats import Stats
from ._watch import (
    EMPTY_PAYLOAD,
    Watch,
    access_logged,
    closing_reason,
    cut,
    install_watch,
    payload_of,
    sent_as,
    status_line_sent,
)

__all__ = (
    "Middleware",
    "app_key",
    "middleware",
    "setup",
    "stats",
)

logger = logging.getLogger("aiodelay")

# asyncio.current_task() is C code from Python 3.12 on; on 3.10 and 3.11 it is a Python
# function around this dict, and its frame was a tenth of aiodelay's cost per request.
_current_tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = (
    None if sys.version_info >= (3, 12) else asyncio.tasks._current_tasks  # type: ignore[attr-defined]
)
_current_task = asyncio.current_task
_get_running_loop = asyncio.get_running_loop

_UNKNOWN: Any = object()
#: Hand a cancellation on to aiohttp when nothing is to be logged: from Python 3.11 on (on
#: 3.10 the cancelled task is left in a reference cycle; a 499 response is returned instead).
_HAND_ON = sys.version_info >= (3, 11)
_NO_CONTEXT = contextvars.Context()

#: How long the app's cleanup waits for functions that ``aiodelay.to_thread`` still runs.
THREAD_CLEANUP_TIMEOUT = 5.0

#: Classes known to be StreamResponse subclasses: isinstance() on StreamResponse goes
#: through ABCMeta (it is a MutableMapping), too slow to pay on every request.
_RESPONSE_CLASSES: set[type] = set()


class Middleware(Book):
    """The aiodelay middleware; one instance per :func:`setup` or :func:`middleware` call."""

    __middleware_version__ = 1  # aiohttp's marker of a new-style middleware
    __slots__ = ()

    def __repr__(self) -> str:
        return f"<aiodelay middleware policy={self.policy.value!r}>"

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The hot path: a few attribute stores on the connection's state; a Lifetime is
        # made only if the request uses aiodelay's API, or its client leaves and more is to
        # be done than cancelling the handler (Connection.stop_quickly).
        transport = request.transport
        w = None if transport is None else transport.get_protocol()
        if type(w) is not Watch:
            # The first request on this connection (on the next ones the Watch knows
            # whether the peer left); also when the transport is already closing, so that
            # aiohttp's connection_lost still goes through the Watch. None once it is gone.
            w = None if transport is None else install_watch(request, transport)
        if w is None:
            conn = Connection(None, self)
            gone: ConnectionLost | None = ConnectionLost(
                "closed", "the connection was closed before the handler started"
            )
        else:
            listener = w.listener
            if listener is None:
                conn = w.listener = Connection(w, self)
            else:
                conn = listener  # type: ignore[assignment]
            if conn.task is not None:
                # aiodelay is installed on an app and on a sub-app: the outer one watches;
                # the request is recorded in both, under the sub-app's policy.
                conn.make_life()
                if self.observers:
                    started(self.observers, request)
                return await handler(request)
            gone = w.lost  # a pipelined request read before the peer left
        if _current_tasks is None:
            task = _current_task()
        else:
            task = _current_tasks.get(_get_running_loop())
        assert task is not None  # aiohttp runs each request in a task of its own
        conn.request = request
        conn.task = task
        conn.book = self
        conn.started_at = monotonic()
        self.counters.started += 1
        kind: OutcomeKind = "completed"
        result: Any = None
        # aiohttp may pause reading for this request (an upload not all here yet, a full
        # pipelining queue): then only the kernel can tell that the client left.
        held = (
            w if w is not None and (payload_of(request) is not EMPTY_PAYLOAD or w.queued) else None
        )
        if held is not None:
            held.hold(request)
        timer = None if self.timed is False else self._arm(request, conn, task)
        try:
            if self.observers:
                started(self.observers, request)
            if gone is not None:
                gone_life = conn.make_life()
                gone_life.disconnected(gone, in_task=True)
                if gone_life.policy is Policy.CANCEL:
                    # Do not start work for a client that is gone.
                    raise asyncio.CancelledError(CANCEL_MESSAGE)
            result = await handler(request)
            if result.__class__ not in _RESPONSE_CLASSES:
                result = await _not_done_yet(request, result)
            if conn.life is not None or conn.stopped is not None:
                kind, result = _returned(conn, request, result)
        except BaseException as exc:
            kind, result = self._after(conn, request, exc)
            if result is None:
                raise
        finally:
            if timer is not None:
                timer.cancel()
            if held is not None:
                held.release()
            conn.task = None
            if conn.life is None and conn.stopped is None and not self.observers:
                conn.response = result  # settled if its client leaves before it is written
                self.counters.completed += 1
            else:
                conn.end(request, task, result, kind)
            if conn.watch is None:  # the connection is closed: nothing more comes on it
                conn.request = conn.response = None
        return result  # type: ignore[no-any-return]

    runs_requests(__call__.__code__)  # aiodelay.shield() finds the request's `conn` here

    def _after(
        self, conn: Connection, request: web.Request, exc: BaseException
    ) -> tuple[OutcomeKind, web.StreamResponse | None]:
        """What an exception from the handler means: a response for aiohttp to log instead,
        or None to let it propagate unchanged."""
        life = conn.life
        if life is None and conn.stopped is not None:
            # Its client left, and stop_quickly() cancelled it with no Lifetime.
            if isinstance(exc, asyncio.CancelledError) and conn.stopped_quickly():
                if _HAND_ON and not access_logged(request):
                    return "cancelled", None  # as below
                return "cancelled", sent_as(request, exc=exc)
            life = conn.make_life()  # anything else: the Lifetime takes over
        if isinstance(exc, asyncio.CancelledError):
            if life is not None and life.stopped_by_us():
                if life.timed_out is not None:
                    return "timed_out", _timed_out(request, life.timed_out, exc)
                assert life.lost is not None  # what stopped_by_us says, when not timed out
                # A connection that aiohttp closes at shutdown stops the request as the
                # shutdown's cancellation would: counted the same way, whichever came first.
                stopped: OutcomeKind = "failed" if life.lost.reason == "shutdown" else "cancelled"
                if _HAND_ON and not access_logged(request):
                    # Nothing to log, nothing to send: the CancelledError goes on to aiohttp,
                    # which ends the request as it does its own handler_cancellation.
                    return stopped, None
                return stopped, sent_as(request, exc=exc)
            if (
                life is not None
                and life.websocket
                and life.lost is not None
                and not self.shutting_down
            ):
                # aiohttp's handler_cancellation=True cancels a WebSocket handler whose
                # client left: it goes on to aiohttp, as without aiodelay.
                return "cancelled", None
            if life is None and self.shutting_down:
                life = conn.make_life()  # so that the shutdown is recorded as such
            if life is not None:
                self._abandon(life)
            return "failed", None
        if isinstance(exc, web.HTTPException):
            return "completed", None  # aiohttp sends it, exactly as without aiodelay
        if isinstance(exc, ConnectionError):
            lost = (life.lost if life is not None else None) or closing_reason(request)
            if lost is not None:
                # Our client left and the handler tripped over it (a write or a body read
                # failed) before or instead of being cancelled. As quiet as a cancellation.
                life = conn.make_life()
                life.disconnected(lost, in_task=True)
                kind: OutcomeKind = "cancelled" if life.policy is Policy.CANCEL else "ran_on"
                return kind, sent_as(request, exc=exc)
        # Not about our client: the handler's own error (an upstream refused, a bug).
        if life is not None:
            life.fail_waiters(exc)
            life.error = _without_traceback(exc)
        return "failed", None

    def _arm(
        self, request: web.Request, conn: Connection, task: asyncio.Task[Any]
    ) -> asyncio.TimerHandle | None:
        """The request's deadline timer, if it has a deadline: at most one timer a request,
        and nothing at all in an app where no route can have one."""
        if self.timed is None:
            self.timed = _has_deadlines(request.app, self)
            if not self.timed:
                return None
        route = request.match_info.route
        known = self.limits.get(route, _UNKNOWN)
        if known is _UNKNOWN:
            inner = books_of(request, self)[-1]
            handler = route.handler
            limit = deadline_of(handler, inner.deadline, policy_of(handler, inner.policy))
            known = (limit, limit is not None and limit is inner.deadline)
            if isinstance(route, web.ResourceRoute):  # a route of the app: kept (as books_of)
                self.limits[route] = known
        limit, by_default = known
        if limit is None:
            return None
        if by_default and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return None  # the app's default deadline is not for a WebSocket's whole life
        seconds, status = limit
        # The callback needs none of the request's context variables: no copy of them.
        return _get_running_loop().call_later(
            seconds, conn.deadline_passed, task, seconds, status, context=_NO_CONTEXT
        )

    def _abandon(self, life: Lifetime) -> None:
        """A cancellation that is not the disconnect's (shutdown, outer timeout) ends it.

        At shutdown the request counts as interrupted, with reason ``"shutdown"`` (unless its
        client had left already): ``disconnected`` and ``failed``, and an INFO line.
        """
        if self.shutting_down:
            life.error = ConnectionLost("shutdown")
            if life.lost is None:
                life.lost = life.error
                life.lost_at = monotonic()
            life.fail_waiters(life.error)
        else:
            life.error = asyncio.CancelledError()
            life.cancel_waiters()

    async def _on_shutdown(self, app: web.Application) -> None:
        self.shutting_down = True

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self.shutting_down = False
        yield
        # aiohttp's graceful shutdown waited for these; what still runs now would be
        # destroyed pending when the loop closes. Cancel it and let its finally blocks run.
        tasks = [life.task for life in self.orphans if life.task is not None]
        tasks = [task for task in tasks if not task.done()]
        for task in tasks:
            task.cancel("aiodelay: the server is shutting down")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Threads cannot be cancelled: they were told to stop when their requests ended.
        # Wait for them a bounded time, and say which ones are left behind.
        if self.threads:
            _, left = await asyncio.wait(
                [job.done for job in self.threads], timeout=THREAD_CLEANUP_TIMEOUT
            )
            for job in self.threads:
                if job.done in left:
                    logger.warning(
                        "%r still runs %.1fs after cleanup began: left behind",
                        job,
                        THREAD_CLEANUP_TIMEOUT,
                    )


def _returned(
    conn: Connection, request: web.Request, result: web.StreamResponse
) -> tuple[OutcomeKind, web.StreamResponse]:
    """A handler that aiodelay was asked about returned ``result``: what it counts as, and the
    response for aiohttp."""
    life = conn.make_life()
    if life.lost is not None:
        # The handler ran on to its end for a client that is gone: aiohttp logs what went
        # out (499 if nothing), and sends nothing more.
        return "ran_on", sent_as(request, result)
    if life.timed_out is not None:
        # Its deadline passed, and it caught the cancellation and answered: the answer goes
        # out, the request counts as timed out.
        life.answered_anyway = True
        return "timed_out", result
    return "completed", result


async def _not_done_yet(request: web.Request, result: object) -> web.StreamResponse:
    """Await a handler's "not done yet" result (a Future, Task or coroutine) to its response.

    Also where a response of a class not seen before is checked once."""
    if isinstance(result, web.StreamResponse):
        _RESPONSE_CLASSES.add(result.__class__)
        return result
    if inspect.isawaitable(result):
        later = await result
        if isinstance(later, web.StreamResponse):
            return later
        got = f"an awaitable that resolved to {later!r}"
    else:
        got = repr(result)
    handler = request.match_info.handler
    name = getattr(handler, "__qualname__", repr(handler))
    logger.error(
        "handler %s for %s %s returned %s, not a web.StreamResponse: answering 500",
        name,
        request.method,
        request.path,
        got,
    )
    return web.Response(status=500, text="500: Internal Server Error")


def _timed_out(
    request: web.Request, exceeded: DeadlineExceeded, exc: BaseException
) -> web.StreamResponse:
    """What a request whose deadline passed gets: its deadline's status with a short text, or,
    if its response had started, the connection closed so that the client sees it cut."""
    if status_line_sent(request):
        cut(request)
        return sent_as(request, exc=exc)
    status = exceeded.status
    return web.Response(
        status=status,
        text=f"{status}: the request exceeded its {exceeded.seconds:.3f}s deadline\n",
    )


def _has_deadlines(app: web.Application, book: Book) -> bool:
    """Whether any route of ``app`` or its sub-apps can have a deadline: a default of an
    installation on the way, or a route marked ``@aiodelay.deadline(seconds)``."""
    apps = [app]
    while apps:
        current = apps.pop()
        installed = current.get(app_key)
        if (installed or book).deadline is not None:
            return True
        for resource in current.router.resources():
            sub_app = resource.get_info().get("app")
            if isinstance(sub_app, web.Application):
                apps.append(sub_app)
            for route in resource:
                if marks_a_deadline(route.handler):
                    return True
    return False


def _without_traceback(exc: BaseException) -> BaseException:
    """A copy of ``exc`` to keep on the request for later ``notify_finish`` calls: the
    original's traceback holds the frames that hold the request (a reference cycle)."""
    try:
        kept = copy.copy(exc)
    except Exception:  # an exception class that cannot be copied: keep the original
        return exc
    kept.__traceback__ = None
    kept.__context__ = kept.__cause__ = None
    return kept


#: Where setup() keeps the app's installation (typed as the Book every layer below knows).
app_key = book_key


def middleware(
    *, policy: Policy | str = Policy.CANCEL, deadline: float | None = None
) -> Middleware:
    """The aiodelay middleware, for ``web.Application(middlewares=[...])``.

    Put it first so that it also cancels the middlewares after it. Unlike :func:`setup`, it
    has no app lifecycle hooks: at server shutdown, ``notify_finish`` futures of stopped
    requests are cancelled rather than failed with ``reason="shutdown"``, shielded handlers
    still running after their client left are not cancelled at cleanup, and cleanup does not
    wait for ``aiodelay.to_thread`` functions still running.
    """
    return Middleware(policy=policy, deadline=deadline)


def setup(
    app: web.Application, *, policy: Policy | str = Policy.CANCEL, deadline: float | None = None
) -> None:
    """Install aiodelay on ``app``: the middleware outermost, and its lifecycle hooks.

    ``policy`` is what a disconnect does to handlers not marked with
    ``@aiodelay.cancellable`` or ``@aiodelay.shielded``: ``"cancel"`` (the default) or
    ``"shield"``. Raises ``ValueError`` for another policy, ``RuntimeError`` if aiodelay is
    already set up on ``app`` or ``app`` is frozen (already started).
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"aiodelay.setup() takes a web.Application, got {app!r}")
    mw = Middleware(policy=policy, deadline=deadline)
    if app_key in app or any(isinstance(m, Book) for m in app.middlewares):
        raise RuntimeError("aiodelay is already installed on this app")
    if app.frozen:
        raise RuntimeError("aiodelay.setup() must be called before the app starts")
    app[app_key] = mw
    app.middlewares.insert(0, mw)
    app.on_shutdown.append(mw._on_shutdown)
    app.cleanup_ctx.append(mw._lifecycle)


def stats(app: web.Application) -> Stats:
    """A snapshot of what aiodelay counted on ``app`` since it was set up.

    For a sub-app with aiodelay of its own, that is the requests routed into it; for the main
    app, all of its requests, the sub-app's included. See :class:`aiodelay.Stats`.
    """
    return installed_on(app).counters.snapshot()
