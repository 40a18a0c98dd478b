"""Per-request state: the completion future, the disconnect flag, request-scoped timers and tasks.

Every request pays only for a few attribute stores on its connection's :class:`Connection`
(one per connection, reused by keep-alive requests). A :class:`Lifetime` is created for a
request only when something needs one: a call to ``notify_finish``, ``call_later``, ``spawn``,
``is_disconnected`` or ``shield``, a deadline, an observer, or the client leaving while its
handler runs under a policy that does more than cancel it at once (a plain cancellation is
:meth:`Connection.stop_quickly`, with no Lifetime). It allocates nothing more until asked: no
future until ``notify_finish`` is called, no list until a timer or task is started.
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

from ._account import NOT_SET_UP, Book, books_of, logger, record
from ._errors import ConnectionLost, DeadlineExceeded
from ._observe import OutcomeKind
from ._owned import Owned
from ._policy import Policy, grace_of, policy_of
from ._watch import Watch, bytes_written, log_length, response_written, still_writing

__all__ = (
    "CANCEL_MESSAGE",
    "DEADLINE_MESSAGE",
    "NOT_SET_UP",
    "Connection",
    "Lifetime",
    "fail",
    "lifetime_key",
    "running_connection",
    "runs_requests",
)

# aiohttp >= 3.12 warns about plain string keys on a request; older ones lack RequestKey.
lifetime_key: Any = (
    web.RequestKey("aiodelay", object) if hasattr(web, "RequestKey") else "aiodelay.lifetime"
)
_HAS_UNCANCEL = sys.version_info >= (3, 11)
#: The message of the CancelledError that a disconnect raises in a handler.
CANCEL_MESSAGE = "aiodelay: the client left"
#: The message of the CancelledError that a deadline raises in a handler.
DEADLINE_MESSAGE = "aiodelay: the request's deadline passed"

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


def fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # A client leaving is an expected outcome, not a bug: mark it retrieved so that an
        # unobserved future does not log "Future exception was never retrieved".
        future.exception()


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
        "lost",
        "lost_at",
        "request",
        "response",
        "started_at",
        "stopping",
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
        #: The client of the request in flight left, and its handler was cancelled without a
        #: Lifetime (see :meth:`stop_quickly`); cleared when the request is recorded.
        self.lost: ConnectionLost | None = None
        self.lost_at = 0.0
        #: That cancellation has not reached the handler yet.
        self.stopping = False
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
            if self.lost is not None:
                # Stopped quickly already: the Lifetime takes over what that did.
                life.lost, life.lost_at, life._cancel_requested = (
                    self.lost,
                    self.lost_at,
                    self.stopping,
                )
                self.lost, self.stopping = None, False
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
        self.lost = lost
        self.lost_at = monotonic()
        self.stopping = True
        # What is asked about the request from now on finds its way here, also once the
        # connection (and with it the Watch that leads here) is gone; replaced at the end.
        request[lifetime_key] = self
        task.cancel(CANCEL_MESSAGE)
        return True

    def stopped_quickly(self) -> bool:
        """Called with a CancelledError in hand, for a request without a Lifetime: is it the
        one :meth:`stop_quickly` sent, and nothing else's?"""
        if self.lost is None:
            return False
        if not _HAS_UNCANCEL:
            return True  # Python 3.10 cannot count cancel requests (see stopped_by_us)
        task = self.task
        assert task is not None  # the request is still running
        if self.stopping:
            self.stopping = False
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
        lost = self.lost
        if lost is not None:  # stopped quickly (and so without a Lifetime or observers)
            self.lost = None
            request[lifetime_key] = lost  # what notify_finish() says from now on
            record((self.book,), request, kind, lost, self.started_at, self.lost_at)
            return
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
    record(
        books,
        request,
        "truncated",
        lost,
        started_at,
        monotonic(),
        note=f"{bytes_written(request)} bytes handed to the transport",
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
    record(
        books_of(request, book),
        request,
        "truncated",
        lost,
        started_at,
        monotonic(),
        note=f"{bytes_written(request)} bytes handed to the transport",
        recount=True,
    )


class Lifetime:
    """What aiodelay knows and owns for one request, from the handler's start to its end.

    Stored on the request (so that calls after the end find the outcome); it lets go of the
    request and its task when the request ends, so that no reference cycle outlives it.
    """

    __slots__ = (
        "_cancel_requested",
        "_grace_spent",
        "_grace_timer",
        "_owned",
        "_waiters",
        "answered_anyway",
        "books",
        "conn",
        "ended",
        "error",
        "grace",
        "lost",
        "lost_at",
        "policy",
        "request",
        "settled",
        "shield_depth",
        "task",
        "timed_out",
        "websocket",
    )

    def __init__(
        self,
        request: web.Request,
        task: asyncio.Task[Any],
        books: tuple[Book, ...],
        conn: Connection,
    ) -> None:
        self.request: web.BaseRequest | None = request
        self.task: asyncio.Task[Any] | None = task
        #: Where the request is recorded; the last one's policy is its default.
        self.books = books
        handler = request.match_info.handler
        self.policy = policy_of(handler, books[-1].policy)
        #: Seconds a cancellable handler may run on after its client left (@aiodelay.grace).
        self.grace = grace_of(handler)
        self._grace_timer: asyncio.TimerHandle | None = None
        self._grace_spent = False
        #: Set once the request's deadline passed first.
        self.timed_out: DeadlineExceeded | None = None
        #: The handler caught the deadline's cancellation and returned a response all the same.
        self.answered_anyway = False
        self.conn = conn
        self.lost: ConnectionLost | None = None
        self.lost_at: float | None = None
        self.ended = False
        #: After the end: the exception the request ended with, if it did not complete.
        self.error: BaseException | None = None
        #: The outcome is final: the handler ended and aiohttp is done with its response.
        self.settled = False
        self.shield_depth = 0
        #: The client left a WebSocket: aiohttp, not aiodelay, ends the handler.
        self.websocket = False
        self._cancel_requested = False
        self._waiters: list[asyncio.Future[None]] | None = None
        self._owned: Owned | None = None
        request[lifetime_key] = self

    @classmethod
    def after_quick_stop(cls, lost: ConnectionLost) -> Lifetime:
        """The ended Lifetime of a request that :meth:`Connection.stop_quickly` stopped (made
        only if asked about after the end)."""
        life = cls.__new__(cls)
        life.request = life.task = None
        life.books = ()
        life.policy = Policy.CANCEL  # the only policy a request is stopped quickly under
        life.grace = None
        life._grace_timer = None
        life._grace_spent = False
        life.timed_out = None
        life.answered_anyway = False
        life.conn = None  # type: ignore[assignment]  # ended: nothing reaches its connection
        life.lost = life.error = lost
        life.lost_at = None
        life.ended = life.settled = True
        life.shield_depth = 0
        life.websocket = False
        life._cancel_requested = False
        life._waiters = None
        life._owned = None
        return life

    # -- what the middleware and the Watch call ------------------------------------------

    def disconnected(self, lost: ConnectionLost, *, in_task: bool = False) -> bool:
        """The client left (called by the connection's Watch, or, ``in_task``, by the
        middleware in the request's own task).

        In this order: pending completion futures fail; then, under the cancel policy,
        request-scoped timers and tasks are cancelled and the handler is cancelled at its
        current await (both deferred while an ``aiodelay.shield()`` section runs).
        """
        task = self.task
        if self.lost is not None or self.timed_out is not None or task is None:
            return False  # what came first decides
        if lost.reason == "closed" and self.books[0].shutting_down:
            lost = ConnectionLost("shutdown")  # aiohttp closes the connections it shuts down
        self.lost = lost
        self.lost_at = monotonic()
        self.fail_waiters(lost)
        if self.request is not None:
            for book in self.books:
                for observer in book.observers:
                    try:
                        observer.request_lost(self.request, lost)
                    except Exception:  # called from the transport: must not break its close
                        logger.exception("observer %r failed", observer)
        if self.conn.watch is not None and self.conn.watch.is_websocket():
            # aiohttp ends a WebSocket handler's receive loop itself; cancelling it instead
            # would change how WebSocket handlers end.
            self.websocket = True
        elif self.policy is Policy.CANCEL:
            if self.grace is not None:
                # It may run on this much longer (counted from now, also in a shield()
                # section): cancelled then, or when the section ends, if it has not ended.
                self._grace_timer = asyncio.get_running_loop().call_later(
                    self.grace, self._grace_over
                )
            elif self.shield_depth == 0:
                self._stop(CANCEL_MESSAGE, in_task)
                return True
        # The handler runs on for now: shielded, in a shield() section, in its grace, or a
        # WebSocket. Its timers and tasks go when it ends; at app cleanup it is cancelled.
        self.books[0].orphans.add(self)
        return False

    def deadline_passed(self, exc: DeadlineExceeded) -> None:
        """The request's deadline passed (its timer, armed by the middleware): unless its
        client left first, ``notify_finish`` fails, and the handler is cancelled (after the
        ``aiodelay.shield()`` section it is in, if any)."""
        if self.lost is not None or self.timed_out is not None or self.task is None:
            return  # what came first decides
        self.timed_out = exc
        self.fail_waiters(exc)
        if self.shield_depth == 0:
            self._stop(DEADLINE_MESSAGE)

    def _stop(self, message: str, in_task: bool = False) -> None:
        """Cancel what the request owns and the handler itself (at its current await), unless
        called from the request's own task (the middleware then raises by itself)."""
        task = self.task
        if task is None:
            return  # it ended meanwhile (a grace that was not needed)
        self.release(message)
        if not in_task:
            self._cancel_requested = True
            task.cancel(message)

    def stopped_by_us(self) -> bool:
        """Called with a CancelledError in hand: is it aiodelay's own (the client left, or
        the deadline passed), and nothing else's?"""
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
        if remaining:
            return False
        return self.timed_out is not None or (
            self.lost is not None and self.policy is Policy.CANCEL
        )

    def section_ended(self) -> str | None:
        """An ``aiodelay.shield()`` section ended. If it was the outermost and a stop waited
        for it (a deadline, or a disconnect under the cancel policy), what the request owns
        is cancelled and the message of the CancelledError to raise now is returned (for a
        disconnect with a grace, only once that grace is over)."""
        if self.shield_depth:
            return None
        if self.timed_out is not None:
            self.release(DEADLINE_MESSAGE)
            return DEADLINE_MESSAGE
        if self.lost is None or self.policy is not Policy.CANCEL:
            return None
        if self.grace is None or self._grace_spent:
            self.release()
            return CANCEL_MESSAGE
        return None  # its grace, armed when the client left, is still running

    def _grace_over(self) -> None:
        """The grace after the client left is over: stop the handler, or, in a ``shield()``
        section, as soon as the section ends."""
        self._grace_timer = None
        self._grace_spent = True
        if self.shield_depth == 0:
            self._stop(CANCEL_MESSAGE)

    def end(self, response: web.StreamResponse | None) -> None:
        """The handler is done: take back an undelivered cancellation, cancel what the
        request owns, and let go of the request and its task."""
        if self._cancel_requested and _HAS_UNCANCEL and self.task is not None:
            self.task.uncancel()  # the handler caught it, or never reached an await
        self._cancel_requested = False
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        self.ended = True
        self.release()
        self.request = None
        self.task = None
        self.books[0].orphans.discard(self)

    def note(self, kind: OutcomeKind) -> str:
        """What the INFO line says about how the handler ended, beyond ``kind``."""
        if kind == "cancelled":
            if self.websocket:
                return "a WebSocket, by aiohttp's handler_cancellation"
            return f"after its {self.grace:.3f}s grace" if self.grace is not None else ""
        if kind == "ran_on":
            if self.websocket:
                return "WebSocket: aiohttp ended it"
            if self.grace is not None and self.policy is Policy.CANCEL:
                return f"within its {self.grace:.3f}s grace"
            if self.policy is Policy.SHIELD:
                return "shielded"
            return "it ended before the cancellation took effect"
        error = self.error
        if (self.lost is not None and self.lost.reason == "shutdown") or (
            isinstance(error, ConnectionLost) and error.reason == "shutdown"
        ):
            return "stopped by the server's shutdown"
        if isinstance(error, asyncio.CancelledError):
            return "stopped by a cancellation that was not aiodelay's (an outer timeout?)"
        if error is not None:
            return f"the handler raised {type(error).__name__}"
        return ""

    def settle(self, lost: ConnectionLost | None) -> None:
        """The request's outcome is final (``lost``: its client left while aiohttp wrote its
        response): resolve the ``notify_finish`` futures still waiting."""
        if lost is not None and self.lost is None:
            self.lost = lost
        self.settled = True
        error = self.lost or self.timed_out or self.error
        if error is None:
            self.complete()
        elif isinstance(error, asyncio.CancelledError):
            self.cancel_waiters()
        else:
            self.fail_waiters(error)

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

    def release(self, reason: str = CANCEL_MESSAGE) -> None:
        """Cancel the request's pending timers and tasks; tell its threads to stop."""
        owned = self._owned
        if owned is not None:
            owned.release(reason)

    # -- what the public functions call ----------------------------------------------------

    def notify_finish(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.lost is not None or self.timed_out is not None:
            fail(future, self.lost or self.timed_out)  # type: ignore[arg-type]
        elif not self.settled:
            if self._waiters is None:
                self._waiters = [future]
            else:
                self._waiters.append(future)
        elif self.error is None:
            future.set_result(None)
        elif isinstance(self.error, asyncio.CancelledError):
            future.cancel()
        else:
            fail(future, self.error)
        return future

    def where(self) -> str:
        """ "METHOD /path" of the request, for error lines (the raw path: nothing decoded)."""
        request = self.request
        return "an ended request" if request is None else f"{request.method} {request.raw_path}"

    def owned(self, what: str) -> Owned:
        """What the request owns (timers, tasks, threads), for starting one more."""
        self._check_open(what)
        owned = self._owned
        if owned is None:
            owned = self._owned = Owned(self.where(), self.books[0].threads)
        return owned

    def _check_open(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"aiodelay.{what}(): the request has already ended")
