"""aiodelay's state of one connection (:class:`Connection`): the request in flight on it.

Every request pays only for a few attribute stores on its connection's Connection (one per
connection, reused by keep-alive requests). It is told by the connection's ``Watch`` that the
peer left (:meth:`Connection.disconnected`): it cancels the handler itself when that is all
there is to do (:meth:`Connection.stop_quickly`), and hands over to the request's ``Lifetime``
otherwise. It records the end of requests that made no Lifetime, and of requests whose
response was still being written when their client left.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
from time import monotonic
from types import CodeType, FrameType
from typing import Any

from aiohttp import web

from ._account import Book, books_of, record
from ._errors import ConnectionLost, DeadlineExceeded
from ._lifetime import CANCEL_MESSAGE, HAS_UNCANCEL, Lifetime, lifetime_key
from ._observe import OutcomeKind
from ._policy import Policy, grace_of, policy_of
from ._watch import Watch, bytes_written, log_length, response_written, still_writing

__all__ = ("Connection", "Stopped", "running_connection", "runs_requests")

_NO_CONTEXT = contextvars.Context()

#: The code of the coroutine that runs each request's handler (the middleware's
#: ``__call__``, registered by its module), whose local variable ``conn`` is the request's
#: Connection: how :func:`running_connection` finds it on the call stack.
_RUNNERS: set[CodeType] = set()


def runs_requests(code: CodeType) -> None:
    """Register the code of the coroutine that runs handlers (see :func:`running_connection`);
    it must have a local variable ``conn`` (its request's Connection)."""
    if "conn" not in code.co_varnames:
        name = getattr(code, "co_qualname", code.co_name)
        raise TypeError(f"{name} has no local variable 'conn' for aiodelay.shield() to find")
    _RUNNERS.add(code)


def running_connection() -> Connection | None:
    """The Connection of the request whose handler the current task runs, or None.

    Found on the call stack, where the middleware's coroutine frame is below its handler's
    (a cost that grows with the stack's depth, paid only by the caller, so that requests pay
    nothing for it). The caller must run in that task, called from the handler (also through
    other coroutines it awaits); in another task (one the handler started) it is not found.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code not in _RUNNERS:
        frame = frame.f_back
    if frame is None:
        return None
    # (Before Python 3.13 this leaves a snapshot of the frame's variables on the frame: the
    # same objects the frame holds anyway, for no longer than the frame lives.)
    conn = frame.f_locals.get("conn")
    if isinstance(conn, Connection) and conn.task is asyncio.current_task():
        return conn
    return None


class Connection:
    """aiodelay's side of one connection: the request on it, if any.

    The middleware fills ``request``, ``task``, ``book`` and ``started_at`` when a request
    starts, and clears ``task`` when its handler ends. A request counted ``completed`` at that
    moment (the hot path: no Lifetime, no observers) stays in ``request`` while aiohttp writes
    its response: if the client leaves before that is done, it is recorded again, as
    ``truncated``, once the connection is closed. A request with a Lifetime or observers is
    recorded only once aiohttp is done with it (:meth:`end`). ``life`` is made on demand.
    """

    __slots__ = (
        "book",
        "life",
        "request",
        "response",
        "started_at",
        "stopped",
        "task",
        "unsettled",
        "watch",
    )

    def __init__(self, watch: Watch | None, book: Book) -> None:
        self.watch = watch
        #: The installation whose middleware watches this connection (the outermost).
        self.book = book
        self.request: web.Request | None = None
        #: The response the last handler returned (for aiohttp's access log, if it is cut).
        self.response: web.StreamResponse | None = None
        self.task: asyncio.Task[Any] | None = None
        self.started_at = 0.0
        self.life: Lifetime | None = None
        #: The client of the request in flight left and :meth:`stop_quickly` cancelled its
        #: handler (what the request and its clones keep of it); detached at the end. While
        #: ``life`` is None, nothing else has been made of the request.
        self.stopped: Stopped | None = None
        #: A request counted completed whose client left before its response was written:
        #: (request, how the client left, when the request started), settled at the close.
        self.unsettled: tuple[web.Request, ConnectionLost, float] | None = None

    def busy(self) -> bool:
        return self.task is not None

    def make_life(self) -> Lifetime:
        """The Lifetime of the request in flight, made now if it has none yet."""
        life = self.life
        if life is None:
            request, task = self.request, self.task
            if request is None or task is None:
                raise RuntimeError("aiodelay: no request in flight on this connection")
            books = books_of(request, self.book)
            for inner in books[1:]:  # the watching book counted the start already
                inner.counters.started += 1
            life = self.life = Lifetime(request, task, books, self)
            stopped = self.stopped
            if stopped is not None:
                # Stopped quickly already: the Lifetime takes over what that did.
                life.took_over(stopped.lost, stopped.lost_at, cancelling=stopped.cancelling)
                stopped.cancelling = False
        return life

    def deadline_passed(self, task: asyncio.Task[Any], seconds: float, status: int) -> None:
        """The deadline timer of the request run by ``task`` fired."""
        if self.task is task:
            self.make_life().deadline_passed(DeadlineExceeded(seconds, status))

    def disconnected(self, lost: ConnectionLost) -> bool:
        if self.task is not None:
            if self.life is None and self.stop_quickly(lost):
                return True
            return self.make_life().disconnected(lost)
        response, self.response = self.response, None
        if response is not None:
            log_length(response)  # aiohttp logs 0 bytes for a response whose write failed
        request, self.request = self.request, None
        if request is None or response_written(request):
            return False
        if self.watch is not None and self.watch.is_websocket():
            return False  # its handler's end was recorded; the handshake response was complete
        # Counted completed when its handler returned; aiohttp may still get the rest out
        # (a client that half-closed, and reads on): the close of the connection tells.
        self.unsettled = (request, lost, self.started_at)
        return False

    def stop_quickly(self, lost: ConnectionLost) -> bool:
        """The drop path of most requests: the client left while the handler runs, under the
        cancel policy with no grace, nothing asked aiodelay about the request, and nobody
        observes it. The handler is cancelled with no Lifetime made (a storm of drops makes
        none); :meth:`make_life` takes over if something asks later. False (nothing done)
        for any other request."""
        request, task, book = self.request, self.task, self.book
        assert request is not None  # a request is in flight
        assert task is not None
        route = request.match_info.route
        quick = book.quick.get(route)
        if quick is None:
            books = books_of(request, book)
            handler = route.handler
            quick = (
                len(books) == 1
                and policy_of(handler, book.policy) is Policy.CANCEL
                and grace_of(handler) is None
            )
            if isinstance(route, web.ResourceRoute):  # a route of the app: kept (as books_of)
                book.quick[route] = quick
        if (
            not quick
            or book.observers
            or (lost.reason == "closed" and book.shutting_down)
            or (self.watch is not None and self.watch.is_websocket())
        ):
            return False
        # What is asked about the request from now on finds its way here, also once the
        # connection (and with it the Watch that leads here) is gone, and also through a
        # clone made from now on (it copies the state).
        self.stopped = request[lifetime_key] = Stopped(self, lost, monotonic())
        task.cancel(CANCEL_MESSAGE)
        return True

    def stopped_quickly(self) -> bool:
        """Called with a CancelledError in hand, for a request without a Lifetime: is it the
        one :meth:`stop_quickly` sent, and nothing else's?"""
        stopped = self.stopped
        if stopped is None:
            return False
        if not HAS_UNCANCEL:
            return True  # Python 3.10 cannot count cancel requests (see stopped_by_us)
        task = self.task
        assert task is not None  # the request is still running
        if stopped.cancelling:
            stopped.cancelling = False
            return task.uncancel() == 0
        return task.cancelling() == 0

    def end(
        self,
        request: web.Request,
        task: asyncio.Task[Any],
        response: web.StreamResponse | None,
        kind: OutcomeKind,
    ) -> None:
        """The handler of a request that made a Lifetime, or that observers watch, ended as
        ``kind``: record it, or, if it returned a response to a client still there, once
        aiohttp is done writing that response (``task`` is aiohttp's task of the request)."""
        life = self.life
        self.life = None
        self.request = None  # recorded here, now or once aiohttp is done: not provisionally
        self.response = response
        stopped = self.stopped
        if stopped is not None:  # from now on it says that the request ended
            stopped.conn = self.stopped = None
            if life is None:  # and nothing else was made of it: no Lifetime, no observers
                record((self.book,), request, kind, stopped.lost, self.started_at, stopped.lost_at)
                return
        lost: ConnectionLost | None = None
        if life is None:
            books: tuple[Book, ...] = (self.book,)
            lost_at = None
        else:
            books = life.books
            lost, lost_at = life.lost, life.lost_at
            life.end(response)
        if kind == "completed" and lost is None:
            task.add_done_callback(
                functools.partial(_written, books, request, self.started_at, life, self.watch),
                context=_NO_CONTEXT,  # needs none of the request's context variables
            )
            return
        if life is not None:
            life.settle(None)
        if kind == "timed_out" and life is not None and life.timed_out is not None:
            if life.answered_anyway:
                note = "the handler caught the cancellation and answered itself"
            elif response is not None and response.status == life.timed_out.status:
                note = f"cancelled, answered {response.status}"
            else:
                note = "cancelled, its response cut short"
            record(
                books,
                request,
                kind,
                None,
                self.started_at,
                None,
                note=note,
                deadline=life.timed_out.seconds,
            )
            return
        note = life.note(kind) if life is not None and lost is not None else ""
        record(books, request, kind, lost, self.started_at, lost_at, note=note)

    def closed(self) -> None:
        """The connection is closed; a handler may still run on it (shielded)."""
        self.watch = None
        unsettled, self.unsettled = self.unsettled, None
        if unsettled is not None:
            # After aiohttp's task had its turn: a write that the close let finish is done.
            asyncio.get_running_loop().call_soon(_cut_short, self.book, *unsettled)
        if self.task is None:
            self.request = self.response = None


class Stopped:
    """What a request stopped quickly (:meth:`Connection.stop_quickly`) keeps under
    ``lifetime_key``, shared with its clones: its Connection while it is in flight (then None),
    how and when its client left, and whether the cancellation is still on its way to the
    handler."""

    __slots__ = ("cancelling", "conn", "lost", "lost_at")

    def __init__(self, conn: Connection, lost: ConnectionLost, lost_at: float) -> None:
        self.conn: Connection | None = conn
        self.lost = lost
        self.lost_at = lost_at
        self.cancelling = True


def _written(
    books: tuple[Book, ...],
    request: web.Request,
    started_at: float,
    life: Lifetime | None,
    watch: Watch | None,
    task: asyncio.Task[Any],
) -> None:
    """aiohttp is done with the request's response: it got there, or its client left."""
    if response_written(request):
        if life is not None:
            life.settle(None)
        record(books, request, "completed", None, started_at, None)
        return
    lost = (watch.lost if watch is not None else None) or ConnectionLost("closed")
    if life is not None:
        life.settle(lost)
    _truncated(books, request, lost, started_at, recount=False)


def _truncated(
    books: tuple[Book, ...],
    request: web.Request,
    lost: ConnectionLost,
    started_at: float,
    *,
    recount: bool,
) -> None:
    """Record a request whose client left while aiohttp wrote the response it returned
    (``recount``: it was counted completed already)."""
    record(
        books,
        request,
        "truncated",
        lost,
        started_at,
        monotonic(),
        note=f"{bytes_written(request)} bytes handed to the transport",
        recount=recount,
    )


#: How many turns of the loop a closed connection's request may take aiohttp to finish.
_TURNS = 100


def _cut_short(
    book: Book, request: web.Request, lost: ConnectionLost, started_at: float, turns: int = 0
) -> None:
    """A request counted completed whose client left while aiohttp wrote its response, once
    its connection is closed and aiohttp is done with it."""
    if response_written(request):
        return  # all of it went out after all
    if still_writing(request) and turns < _TURNS:
        asyncio.get_running_loop().call_soon(_cut_short, book, request, lost, started_at, turns + 1)
        return
    _truncated(books_of(request, book), request, lost, started_at, recount=True)
