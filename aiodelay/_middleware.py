"""``setup(app)`` and ``middleware()``: the policies applied to each request."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from ._errors import ConnectionLost
from ._lifetime import Lifetime
from ._observe import Outcome, OutcomeKind, RequestObserver
from ._policy import Policy, coerce_policy, policy_of
from ._shield import enter, leave
from ._stats import Counters, Stats
from ._watch import closing_reason, watch

__all__ = ("Middleware", "installed_on", "middleware", "setup", "stats")

logger = logging.getLogger("aiodelay")

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
        #: Requests whose handler runs on after their client left (shielded).
        self.orphans: set[Lifetime] = set()
        self.shutting_down = False

    def __repr__(self) -> str:
        return f"<aiodelay middleware policy={self.policy.value!r}>"

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = watch(request)
        if conn is not None and conn.listener is not None:
            # aiodelay is installed on an app and on a sub-app: the outer one watches.
            return await handler(request)
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs each request in a task of its own
        life = Lifetime(
            request, task, policy_of(request.match_info.handler, self.policy), self, conn
        )
        self.counters.in_flight += 1
        token = enter(life)
        if conn is None:
            life.disconnected(
                ConnectionLost("closed", "the connection was closed before the handler started")
            )
        else:
            conn.listener = life
            if conn.trailing:
                conn.run_trailing()  # the previous response on this connection is complete
        for observer in self.observers:
            observer.request_started(request)
        kind: OutcomeKind = "failed"
        try:
            if life.lost is not None and life.policy is Policy.CANCEL:
                raise asyncio.CancelledError  # do not start work for a client that is gone
            response = await self._respond(life, request, handler)
            kind = "completed" if life.lost is None else "ran_on"
        except asyncio.CancelledError:
            if not life.cancelled_by_disconnect():
                self._abandon(life)
                raise
            kind = "cancelled"
            response = web.Response(status=_CLIENT_CLOSED_REQUEST)
        except web.HTTPException as exc:
            kind = "completed" if life.lost is None else "ran_on"
            life.response = exc
            raise
        except ConnectionError as exc:
            lost = life.lost or closing_reason(request)
            if lost is None:
                # Not our client: an error of the handler's own (an upstream refused, ...).
                life.error = exc
                life.fail_waiters(exc)
                raise
            # Our client left and the handler tripped over it (a write or a body read
            # failed) before or instead of being cancelled. As quiet as a cancellation.
            life.disconnected(lost)
            kind = "cancelled" if life.policy is Policy.CANCEL else "ran_on"
            response = web.Response(status=_CLIENT_CLOSED_REQUEST)
        except BaseException as exc:
            life.error = exc
            life.fail_waiters(exc)
            raise
        finally:
            leave(token)
            self._end(life, conn, kind)
        life.response = response
        return response

    async def _respond(
        self, life: Lifetime, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            result: Any = await handler(request)
        except web.HTTPException as exc:
            if life.wants_completion():
                await _complete(life, request, exc)
            raise
        if not isinstance(result, web.StreamResponse):
            result = await _not_done_yet(request, result)
        response: web.StreamResponse = result
        if life.wants_completion():
            await _complete(life, request, response)
        return response

    def _abandon(self, life: Lifetime) -> None:
        """A cancellation that is not the disconnect's (shutdown, outer timeout) ends it."""
        if self.shutting_down:
            life.error = ConnectionLost("shutdown")
            life.fail_waiters(life.error)
        else:
            life.error = asyncio.CancelledError()
            life.cancel_waiters()

    def _end(self, life: Lifetime, conn: Any, kind: OutcomeKind) -> None:
        life.ended = True
        if conn is not None and conn.listener is life:
            conn.listener = None
        life.forget_cancel()
        life.release()
        counters = self.counters
        counters.in_flight -= 1
        lost = life.lost
        if lost is None:
            counters.completed += 1
        else:
            self.orphans.discard(life)
            counters.disconnected += 1
            if kind == "cancelled":
                counters.cancelled += 1
            elif kind == "ran_on":
                counters.shielded_ran_on += 1
            _log_interrupted(life, lost, kind)
        if self.observers:
            now = life.task.get_loop().time()
            outcome = Outcome(kind, lost, life.started_at, life.lost_at, now)
            for observer in self.observers:
                observer.request_ended(life.request, outcome)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.shutting_down = True

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self.shutting_down = False
        yield
        # aiohttp's graceful shutdown waited for these; what still runs now would be
        # destroyed pending when the loop closes. Cancel it and let its finally blocks run.
        tasks = [life.task for life in self.orphans if not life.task.done()]
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
    """Await a handler's "not done yet" result (a Future, Task or coroutine) to its response."""
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


def _log_interrupted(life: Lifetime, lost: ConnectionLost, kind: OutcomeKind) -> None:
    request = life.request
    spent = (life.lost_at or life.started_at) - life.started_at
    if kind == "cancelled":
        what = "cancelled"
    elif kind == "ran_on":
        total = life.task.get_loop().time() - life.started_at
        if life.websocket:
            how = "WebSocket: aiohttp ended it"
        elif life.policy is Policy.SHIELD:
            how = "shielded"
        else:
            how = "it caught the cancellation"
        what = f"ran on ({how}), ended after {total:.3f}s"
    else:
        what = "stopped (server shutdown or an outer cancellation)"
    logger.info(
        "%s %s from %s interrupted by %s after %.3fs: %s",
        request.method,
        request.path,
        request.remote,
        lost.reason,
        spent,
        what,
    )


_APP_KEY = web.AppKey("aiodelay", Middleware)


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
    if _APP_KEY in app or any(isinstance(m, Middleware) for m in app.middlewares):
        raise RuntimeError("aiodelay is already installed on this app")
    if app.frozen:
        raise RuntimeError("aiodelay.setup() must be called before the app starts")
    app[_APP_KEY] = mw
    app.middlewares.insert(0, mw)
    app.on_shutdown.append(mw._on_shutdown)
    app.cleanup_ctx.append(mw._lifecycle)


def installed_on(app: web.Application) -> Middleware:
    """The aiodelay middleware of ``app``; RuntimeError if there is none."""
    mw = app.get(_APP_KEY)
    if mw is None:
        for candidate in app.middlewares:
            if isinstance(candidate, Middleware):
                return candidate
        raise RuntimeError(
            "aiodelay is not installed on this app: call aiodelay.setup(app) "
            "(or add aiodelay.middleware() to its middlewares)"
        )
    return mw


def stats(app: web.Application) -> Stats:
    """A snapshot of what aiodelay counted on ``app`` since it was set up."""
    return installed_on(app).counters.snapshot()
