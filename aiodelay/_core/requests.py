"""The public functions that take a request: notify_finish, is_disconnected, call_later, spawn,
to_thread. Each finds the request's state where the middleware left it, on the request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import Any, TypeVar

from aiohttp import web

from . import aiohttp_internals, outcome
from .aiohttp_internals import state_of
from .installation import NOT_SET_UP, installation_of
from .policy import Policy
from .state import RequestState

__all__ = (
    "call_later",
    "is_disconnected",
    "notify_finish",
    "request_policy",
    "request_state",
    "spawn",
    "time_left",
    "to_thread",
)

_T = TypeVar("_T")


def request_state(request: web.BaseRequest) -> RequestState:
    """The state of a request that aiodelay handles or handled; RuntimeError if it does not
    (it is not installed on the request's app, or runs degraded)."""
    try:
        state: RequestState | None = state_of(request)
    except AttributeError:  # an aiohttp without the writer the state is kept on
        state = None
    if state is not None:
        return state
    if aiohttp_internals.MISSING:
        raise RuntimeError(
            f"aiodelay runs degraded on aiohttp {aiohttp_internals.AIOHTTP_VERSION}: it keeps "
            "no state of a request there, so the functions that take one are not available"
        )
    apps = request.match_info.apps if isinstance(request, web.Request) else ()
    if any(installation_of(app) is not None for app in apps):
        raise RuntimeError(
            "aiodelay has not seen this request: it is not the request aiodelay's middleware "
            "was handed, nor a clone made of that one (a middleware that runs before "
            "aiodelay's made it?)"
        )
    raise RuntimeError(NOT_SET_UP)


def request_policy(request: web.BaseRequest) -> Policy:
    """The policy the request runs under: its route's mark, else its app's default."""
    state = request_state(request)
    return state.installation.plan_for(request).policy


def notify_finish(request: web.BaseRequest) -> asyncio.Future[None]:
    """A new future that says how the request ended.

    It resolves to ``None`` once the complete response has been handed to the transport
    (``write_eof()`` finished), and fails with :class:`ConnectionLost` if the client left
    before that, also in the middle of a streamed body, or with ``reason="shutdown"`` if the
    server stopped the request, or with :class:`DeadlineExceeded` if its deadline passed first.
    If the handler raised, it fails with that exception (a copy, without its traceback).
    Each call returns a new future: cancelling one does not affect another.

    Called after the request ended, it returns a future with the outcome (unlike Twisted's,
    which then never fires): at once, or, if aiohttp is still writing the response, once it
    has. A failure is marked retrieved: nobody awaiting it logs nothing.
    """
    return outcome.notify_finish(request_state(request))


def is_disconnected(request: web.BaseRequest) -> bool:
    """True once the request's client is known to have left before its response was complete.

    After the request ended, it stays what it was then: a connection closed after a complete
    response does not count. False does not promise the client is there: a peer that vanished
    without FIN or RST, or whose FIN waits unread while aiohttp has paused reading, cannot be
    seen; and a client that left after the request's deadline had passed is not looked at.
    Degraded (on an aiohttp aiodelay does not know), it says whether the connection is gone.
    """
    try:
        return request_state(request).lost is not None
    except RuntimeError:
        if aiohttp_internals.MISSING:
            return aiohttp_internals.peer_gone(request) is not None
        raise


def call_later(
    request: web.BaseRequest, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_later`` owned by the request: cancelled if still pending when the request
    ends, whichever way (under the cancel policy, as soon as the client leaves; for a
    shielded handler, when the handler ends). An exception in ``callback`` is logged with its
    traceback on the ``aiodelay`` logger."""
    owned = request_state(request).owned("call_later")
    return owned.call_later(delay, callback, args)


def spawn(request: web.BaseRequest, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """A task owned by the request: cancelled if still running when the request ends
    (see :func:`call_later` for when that is). An exception it raises is logged with its
    traceback on the ``aiodelay`` logger; awaiting the task still gives it to you."""
    try:
        owned = request_state(request).owned("spawn")
    except RuntimeError:
        coro.close()  # never started: do not warn "never awaited" on top of the error
        raise
    return owned.spawn(coro)


async def to_thread(
    request: web.BaseRequest, func: Callable[..., _T], /, *args: Any, **kwargs: Any
) -> _T:
    """Run ``func(*args, **kwargs)`` in the event loop's default executor, owned by the request
    like :func:`spawn`: contextvars are copied into the thread, and the result or exception
    comes back here.

    When the request no longer wants the result (its client left under the cancel policy, its
    deadline passed, it ended), this ``await`` ends at once with ``CancelledError`` as any
    await does, and in the thread :func:`aiodelay.check_cancelled` raises from then on, so
    that the work stops at its next check. A thread cannot be stopped from outside: work that
    never checks runs to its end. The app's cleanup waits (up to 5 s) for threads still
    running and logs the ones it leaves behind; those run on, and the process cannot exit
    before they return (the executor's threads are joined at exit).
    """
    owned = request_state(request).owned("to_thread")
    return await owned.to_thread(func, args, kwargs)


def time_left(request: web.BaseRequest) -> float | None:
    """The seconds the request has left before its deadline (its route's, or the budget it
    came with from upstream: ``setup(app, budget_headers=...)``), ``0.0`` once it has passed,
    ``None`` if it has none or has ended (and where aiodelay runs degraded: it has no
    deadlines there); ``RuntimeError``, as the functions above, for a request that aiodelay
    does not handle.

    For work that is not an HTTP call (:func:`aiodelay.budget_trace` passes the budget on to
    those): a database's ``statement_timeout``, a queue's visibility timeout.
    """
    try:
        state = request_state(request)
    except RuntimeError:
        if aiohttp_internals.MISSING:
            return None  # degraded: no deadlines there (an answer, as is_disconnected gives)
        raise
    if state.timed_out is not None:
        return 0.0
    at = state.deadline_at()
    if at is None:
        return None
    return max(0.0, at - monotonic())
