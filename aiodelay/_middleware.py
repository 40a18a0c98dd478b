"""``setup(app)`` and ``middleware()``: the policies applied to each request."""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import sys
from collections.abc import AsyncIterator
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ._errors import ConnectionLost
from ._lifetime import CANCEL_MESSAGE, Connection, Lifetime, live
from ._observe import Outcome, OutcomeKind, RequestObserver
from ._policy import Policy, coerce_policy
from ._stats import Counters, Stats
from ._watch import Watch, closing_reason, install_watch

__all__ = (
    "Middleware",
    "app_key",
    "installed_on",
    "middleware",
    "owner_of",
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

#: Classes known to be StreamResponse subclasses: isinstance() on StreamResponse goes
#: through ABCMeta (it is a MutableMapping), too slow to pay on every request.
_RESPONSE_CLASSES: set[type] = set()

#: 499 is nginx's "client closed request": what the access log shows for a request whose
#: client left and whose handler was cancelled. Nothing is sent: the connection is gone.
_CLIENT_CLOSED_REQUEST = 499


class Middleware:
    """The aiodelay middleware; one instance per :func:`setup` or :func:`middleware` call."""

    __middleware_version__ = 1  # aiohttp's marker of a new-style middleware
    __slots__ = ("counters", "observers", "orphans", "policy", "shutting_down")

    def __init__(self, *, policy: Policy | str = Policy.CANCEL) -> None:
        self.policy = coerce_policy(policy)
        self.counters = Counters()
        self.observers: list[RequestObserver] = []
        #: Requests whose handler runs on after their client left (shielded, WebSockets).
        self.orphans: set[Lifetime] = set()
        self.shutting_down = False

    def __repr__(self) -> str:
        return f"<aiodelay middleware policy={self.policy.value!r}>"

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The hot path: a few attribute stores on the connection's state; a Lifetime is
        # made only if the request uses aiodelay's API or its client leaves.
        transport = request.transport
        w = None if transport is None else transport.get_protocol()
        if type(w) is not Watch:
            # The first request on this connection (on the next ones the Watch knows
            # whether the peer left), or its transport is already gone.
            if transport is not None and not transport.is_closing():
                w = install_watch(request, transport)
            else:
                w = None
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
                conn = listener
            if conn.request is not None:
                # aiodelay is installed on an app and on a sub-app: the outer one watches
                # and counts; the sub-app's policy applies to the sub-app's routes.
                conn.owner = self
                return await handler(request)
            elif conn.trailing:
                conn.run_trailing()  # the previous response on this connection is complete
            gone = w.lost  # a pipelined request read before the peer left
        if _current_tasks is None:
            task = _current_task()
        else:
            task = _current_tasks.get(_get_running_loop())
        assert task is not None  # aiohttp runs each request in a task of its own
        conn.request = request
        conn.task = task
        conn.owner = self
        conn.started_at = monotonic()
        counters = self.counters
        counters.started += 1
        kind: OutcomeKind = "completed"
        result: Any = None
        try:
            if self.observers:
                for observer in self.observers:
                    observer.request_started(request)
            if gone is not None:
                gone_life = conn.make_life()
                gone_life.disconnected(gone)
                if gone_life.policy is Policy.CANCEL:
                    # Do not start work for a client that is gone.
                    raise asyncio.CancelledError(CANCEL_MESSAGE)
            try:
                result = await handler(request)
            except web.HTTPException as exc:
                result = exc
                if conn.life is not None and conn.life.wants_completion():
                    await _complete(conn.life, request, exc)
                raise
            if result.__class__ not in _RESPONSE_CLASSES:
                result = await _not_done_yet(request, result)
            if conn.life is not None and conn.life.wants_completion():
                await _complete(conn.life, request, result)
        except BaseException as exc:
            kind, result = self._after(conn, request, exc)
            if result is None:
                raise
        finally:
            if w is None:
                live.discard(conn)  # made for this request only
            conn.request = None
            conn.task = None
            if conn.life is None and not self.observers:
                counters.completed += 1
            else:
                self._end(conn, request, result, kind)
        return result  # type: ignore[no-any-return]

    def _after(
        self, conn: Connection, request: web.Request, exc: BaseException
    ) -> tuple[OutcomeKind, web.StreamResponse | None]:
        """What an exception from the handler means: a response to return instead, or None
        to let it propagate unchanged."""
        life = conn.life
        if isinstance(exc, asyncio.CancelledError):
            if life is not None and life.cancelled_by_disconnect():
                return "cancelled", web.Response(status=_CLIENT_CLOSED_REQUEST)
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
                life.disconnected(lost)
                kind: OutcomeKind = "cancelled" if life.policy is Policy.CANCEL else "ran_on"
                return kind, web.Response(status=_CLIENT_CLOSED_REQUEST)
        # Not about our client: the handler's own error (an upstream refused, a bug).
        if life is not None:
            life.fail_waiters(exc)
            life.error = _without_traceback(exc)
        return "failed", None

    def _abandon(self, life: Lifetime) -> None:
        """A cancellation that is not the disconnect's (shutdown, outer timeout) ends it."""
        if self.shutting_down:
            life.error = ConnectionLost("shutdown")
            life.fail_waiters(life.error)
        else:
            life.error = asyncio.CancelledError()
            life.cancel_waiters()

    def _end(
        self,
        conn: Connection,
        request: web.Request,
        response: web.StreamResponse | None,
        kind: OutcomeKind,
    ) -> None:
        """The end of a request that made a Lifetime, or that observers watch."""
        counters = self.counters
        life = conn.life
        lost = lost_at = None
        if life is None:
            counters.completed += 1
        else:
            conn.life = None
            lost, lost_at = life.lost, life.lost_at
            life.end(response)
            if lost is None:
                counters.completed += 1
            else:
                if kind == "completed":
                    kind = "ran_on"
                counters.disconnected += 1
                if kind == "cancelled":
                    counters.cancelled += 1
                elif kind == "ran_on":
                    counters.shielded_ran_on += 1
                _log_interrupted(request, life, lost, kind, conn.started_at)
        if self.observers:
            outcome = Outcome(kind, lost, conn.started_at, lost_at, monotonic())
            for observer in self.observers:
                observer.request_ended(request, outcome)

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


async def _complete(life: Lifetime, request: web.Request, response: web.StreamResponse) -> None:
    """Write the response to its end ourselves, so that ``notify_finish`` futures resolve
    only once ``write_eof()`` is done (aiohttp's own ``prepare``/``write_eof`` then have
    nothing left to do). Only when somebody waits for that."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        life.disconnected(life.lost or closing_reason(request) or ConnectionLost("closed"))
        return
    life.complete()


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


def _log_interrupted(
    request: web.Request, life: Lifetime, lost: ConnectionLost, kind: OutcomeKind, started: float
) -> None:
    spent = (life.lost_at or started) - started
    if kind == "cancelled":
        what = "cancelled"
    elif kind == "ran_on":
        total = monotonic() - started
        if life.websocket:
            how = "WebSocket: aiohttp ended it"
        elif life.policy is Policy.SHIELD:
            how = "shielded"
        else:
            how = "it ended before the cancellation took effect"
        what = f"ran on ({how}), ended after {total:.3f}s"
    elif isinstance(life.error, (asyncio.CancelledError, ConnectionLost)):
        what = "stopped (server shutdown or an outer cancellation)"
    else:
        what = f"the handler raised {type(life.error).__name__}"
    _log(request, lost, spent, what)


def _log(request: web.Request, lost: ConnectionLost, spent: float, what: str) -> None:
    logger.info(
        "%s %s from %s interrupted by %s after %.3fs: %s",
        request.method,
        request.path,
        request.remote,
        lost.reason,
        spent,
        what,
    )


app_key = web.AppKey("aiodelay", Middleware)


def owner_of(middleware: object) -> Middleware | None:
    """The aiodelay Middleware behind an entry of ``app.middlewares``, if it is one."""
    return middleware if isinstance(middleware, Middleware) else None


def middleware(*, policy: Policy | str = Policy.CANCEL) -> Middleware:
    """The aiodelay middleware, for ``web.Application(middlewares=[...])``.

    Put it first so that it also cancels the middlewares after it. Unlike :func:`setup`, it
    has no app lifecycle hooks: at server shutdown, ``notify_finish`` futures of stopped
    requests are cancelled rather than failed with ``reason="shutdown"``, and shielded
    handlers still running after their client left are not cancelled at cleanup.
    """
    return Middleware(policy=policy)


def setup(app: web.Application, *, policy: Policy | str = Policy.CANCEL) -> None:
    """Install aiodelay on ``app``: the middleware outermost, and its lifecycle hooks.

    ``policy`` is what a disconnect does to handlers not marked with
    ``@aiodelay.cancellable`` or ``@aiodelay.shielded``: ``"cancel"`` (the default) or
    ``"shield"``. Raises ``ValueError`` for another policy, ``RuntimeError`` if aiodelay is
    already set up on ``app`` or ``app`` is frozen (already started).
    """
    if not isinstance(app, web.Application):
        raise TypeError(f"aiodelay.setup() takes a web.Application, got {app!r}")
    mw = Middleware(policy=policy)
    if app_key in app or any(owner_of(m) for m in app.middlewares):
        raise RuntimeError("aiodelay is already installed on this app")
    if app.frozen:
        raise RuntimeError("aiodelay.setup() must be called before the app starts")
    app[app_key] = mw
    app.middlewares.insert(0, mw)
    app.on_shutdown.append(mw._on_shutdown)
    app.cleanup_ctx.append(mw._lifecycle)


def installed_on(app: web.Application) -> Middleware:
    """The aiodelay middleware of ``app``; RuntimeError if there is none."""
    mw = app.get(app_key)
    if mw is None:
        for candidate in app.middlewares:
            owner = owner_of(candidate)
            if owner is not None:
                return owner
        raise RuntimeError(
            "aiodelay is not installed on this app: call aiodelay.setup(app) "
            "(or add aiodelay.middleware() to its middlewares)"
        )
    return mw


def stats(app: web.Application) -> Stats:
    """A snapshot of what aiodelay counted on ``app`` since it was set up."""
    return installed_on(app).counters.snapshot()
