"""The public functions that take a request: notify_finish, is_disconnected, call_later, spawn."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from ._account import NOT_SET_UP, installed_on
from ._connection import Connection, Stopped, running_connection
from ._lifetime import Lifetime, lifetime_key
from ._watch import installed_watch, same_message

__all__ = ("call_later", "is_disconnected", "lifetime_of", "notify_finish", "spawn")

_T = TypeVar("_T")


def lifetime_of(request: web.BaseRequest, *, create: bool = True) -> Lifetime | None:
    """The request's Lifetime (made now if the request is in flight and ``create``), or None
    for a request that ended, or is in flight, without one. RuntimeError if aiodelay does
    not handle the request."""
    conn: object = None
    try:
        kept: Lifetime | Stopped = request[lifetime_key]
    except KeyError:
        watch = installed_watch(request)
        conn = watch.listener if watch is not None else None
        if conn is None:
            # The connection is gone (or a clone made before it went): from the handler's
            # own task the request is found on the call stack.
            conn = running_connection()
    else:
        if isinstance(kept, Lifetime):
            return kept
        if kept.conn is None:  # it was stopped quickly, and has ended
            life = request[lifetime_key] = Lifetime.after_quick_stop(kept.lost)
            return life
        conn = kept.conn  # it is being stopped quickly (Connection.stop_quickly)
    if (
        isinstance(conn, Connection)
        and conn.task is not None
        and conn.request is not None
        and same_message(conn.request, request)
    ):
        if not create and conn.life is None and conn.stopped is None:
            return None  # (a request stopped quickly gets its Lifetime: it has news)
        life = conn.make_life()
        if life.request is not request:
            request[lifetime_key] = life  # a clone: let it find the Lifetime after the end
        return life
    if not _installed(request):
        raise RuntimeError(NOT_SET_UP)
    return None


def _installed(request: web.BaseRequest) -> bool:
    apps = request.match_info.apps if isinstance(request, web.Request) else ()
    for app in apps:
        try:
            installed_on(app)
        except RuntimeError:
            continue
        return True
    return False


def notify_finish(request: web.BaseRequest) -> asyncio.Future[None]:
    """A new future that says how the request ended.

    It resolves to ``None`` once the complete response has been handed to the transport
    (``write_eof()`` finished), and fails with :class:`ConnectionLost` if the client left
    before that, also in the middle of a streamed body, or with ``reason="shutdown"`` if the
    server stopped the request. If the handler raised, it fails with that exception.
    Each call returns a new future: cancelling one does not affect another.

    Called after the request ended, it returns an already completed future with the outcome
    (unlike Twisted's, which then never fires). For a request that nothing asked aiodelay
    about while it ran, ``None`` there means that the handler finished without its client
    leaving first. A response that aiohttp was still writing when asked (e.g. from an
    ``on_response_prepare`` signal) of a request that did ask is settled when the next
    request on the connection starts, or the connection closes.
    A failure is marked retrieved: nobody awaiting it logs nothing.
    Not promised: a clone (``request.clone()``) made before its client left, asked only after
    the request ended and from outside the handler's task, does not know that the client left
    (the request itself, and a clone asked in the handler's task, do).
    """
    life = lifetime_of(request)
    if life is not None:
        return life.notify_finish()
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def is_disconnected(request: web.BaseRequest) -> bool:
    """True once the request's client is known to have left before its response was complete.

    After the request ended, it stays what it was then: a connection closed after a complete
    response does not count. False does not promise the client is there: a peer that vanished
    without FIN or RST, or whose FIN waits unread while aiohttp has paused reading, cannot be
    seen.
    """
    life = lifetime_of(request, create=False)
    return life is not None and life.lost is not None


def call_later(
    request: web.BaseRequest, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_later`` owned by the request: cancelled if still pending when the request
    ends, whichever way (under the cancel policy, as soon as the client leaves; for a
    shielded handler, when the handler ends). An exception in ``callback`` is logged with its
    traceback on the ``aiodelay`` logger."""
    return _open(request, "call_later").owned("call_later").call_later(delay, callback, args)


def spawn(request: web.BaseRequest, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """A task owned by the request: cancelled if still running when the request ends
    (see :func:`call_later` for when that is). An exception it raises is logged with its
    traceback on the ``aiodelay`` logger; awaiting the task still gives it to you."""
    try:
        owned = _open(request, "spawn").owned("spawn")
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
    running and logs the ones it leaves behind.
    """
    owned = _open(request, "to_thread").owned("to_thread")
    return await owned.to_thread(func, args, kwargs)


def _open(request: web.BaseRequest, what: str) -> Lifetime:
    life = lifetime_of(request)
    if life is None:
        raise RuntimeError(f"aiodelay.{what}(): the request has already ended")
    return life
