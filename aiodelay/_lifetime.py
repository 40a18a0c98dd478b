"""Per-request state: the completion future, the disconnect flag, request-scoped timers and tasks.

Every request pays only for a few attribute stores on its connection's :class:`Connection`
(one per connection, reused by keep-alive requests). A :class:`Lifetime` is created for a
request only when something needs one: a call to ``notify_finish``, ``call_later``, ``spawn``,
``is_disconnected`` or ``shield``, or the client leaving. It allocates nothing more until
asked: no future until ``notify_finish`` is called, no list until a timer or task is started.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from time import monotonic
from typing import Any

from aiohttp import web

from ._account import NOT_SET_UP, Book, books_of, logger, record
from ._errors import ConnectionLost
from ._observe import OutcomeKind
from ._owned import Owned
from ._policy import Policy, policy_of
from ._watch import Watch, bytes_written, log_length, response_completed

__all__ = (
    "CANCEL_MESSAGE",
    "NOT_SET_UP",
    "Connection",
    "Lifetime",
    "fail",
    "lifetime_key",
    "live",
)

# aiohttp >= 3.12 warns about plain string keys on a request; older ones lack RequestKey.
lifetime_key: Any = (
    web.RequestKey("aiodelay", object) if hasattr(web, "RequestKey") else "aiodelay.lifetime"
)
_HAS_UNCANCEL = sys.version_info >= (3, 11)
#: The message of the CancelledError that a disconnect raises in a handler.
CANCEL_MESSAGE = "aiodelay: the client left"

#: What ``aiodelay.shield()`` looks through to learn which request the task it runs in
#: serves (nothing per request: a connection is added once, when aiodelay first sees it):
#: the connections aiodelay watches, and the tasks ``aiodelay.spawn()`` started.
live: set[Connection] = set()


def fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # A client leaving is an expected outcome, not a bug: mark it retrieved so that an
        # unobserved future does not log "Future exception was never retrieved".
        future.exception()


class Connection:
    """aiodelay's side of one connection: the request on it, if any.

    The middleware fills ``request``, ``task``, ``book`` and ``started_at`` when a request
    starts, and clears ``task`` when its handler ends. ``request`` stays until aiohttp is
    known to have written its response (or the client is known to have left during that):
    a request counted ``completed`` whose client leaves before then is recorded again, as
    ``truncated``. ``life`` is made on demand.
    """

    __slots__ = (
        "book",
        "delivering",
        "life",
        "request",
        "response",
        "started_at",
        "task",
        "trailing",
        "watch",
    )

    def __init__(self, watch: Watch | None, book: Book) -> None:
        self.watch = watch
        #: The installation whose middleware watches this connection (the outermost).
        self.book = book
        self.request: web.Request | None = None
        #: The response the last handler returned, until it is known to be complete.
        self.response: web.StreamResponse | None = None
        self.task: asyncio.Task[Any] | None = None
        self.started_at = 0.0
        self.life: Lifetime | None = None
        #: The handler has returned and aiodelay writes its response: a disconnect now cuts
        #: the response short, there is no handler left to cancel.
        self.delivering = False
        #: Called once, at the next request on this connection or when it closes: the
        #: response of an ended request that aiohttp was still writing is then settled.
        self.trailing: list[Callable[[], None]] | None = None
        live.add(self)

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
        return life

    def disconnected(self, lost: ConnectionLost) -> None:
        if self.task is not None:
            self.make_life().disconnected(lost)
            return
        request, response = self.request, self.response
        self.request = self.response = None
        if request is None or response is None or response_completed(response):
            return
        if self.watch is not None and self.watch.is_websocket():
            return  # its handler's end was recorded; the handshake response was complete
        # The handler returned its response and was counted completed; aiohttp was still
        # writing that response when the client left.
        log_length(request, response)
        record(
            books_of(request, self.book),
            request,
            "truncated",
            lost,
            self.started_at,
            monotonic(),
            note=f"{bytes_written(request)} bytes handed to the transport",
            recount=True,
        )

    def end(
        self, request: web.Request, response: web.StreamResponse | None, kind: OutcomeKind
    ) -> None:
        """The handler of a request that made a Lifetime, or that observers watch, ended as
        ``kind``: record it."""
        life = self.life
        self.life = None
        if life is None:
            books: tuple[Book, ...] = (self.book,)
            lost = lost_at = None
            note = ""
        else:
            books = life.books
            lost, lost_at = life.lost, life.lost_at
            life.end(response)
            if lost is not None and kind == "completed":
                if response is not None and response_completed(response):
                    # aiodelay wrote the whole response before it learned that the client
                    # left (it read it all, then closed): that request completed.
                    lost = lost_at = None
                else:
                    kind = "ran_on"
            note = life.note(kind) if lost is not None else ""
        if kind == "completed" and lost is None:
            self.response = response  # settled when it is complete, or its client leaves
        record(books, request, kind, lost, self.started_at, lost_at, note=note)

    def closed(self) -> None:
        """The connection is closed; a handler may still run on it (shielded)."""
        self.run_trailing()
        self.watch = None
        if self.task is None:
            live.discard(self)
            self.request = self.response = None

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
        "_owned",
        "_waiters",
        "books",
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
        self.policy = policy_of(request.match_info.handler, books[-1].policy)
        self.conn = conn
        #: For error lines about its timers and tasks (the raw path: no decoding per drop).
        self.method = request.method
        self.path = request.raw_path
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
        self._owned: Owned | None = None
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
        elif self.policy is Policy.CANCEL and self.shield_depth == 0 and not self.conn.delivering:
            self.release()
            if task is not asyncio.current_task():  # the middleware handles its own task
                self._cancel_requested = True
                task.cancel(CANCEL_MESSAGE)
            return
        # The handler runs on for now: shielded, in a shield() section, or a WebSocket.
        # Its timers and tasks go when it ends; at app cleanup it is cancelled.
        self.books[0].orphans.add(self)

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
        self.books[0].orphans.discard(self)

    def note(self, kind: OutcomeKind) -> str:
        """What the INFO line says about how the handler ended, beyond ``kind``."""
        if kind == "cancelled":
            return "a WebSocket, by aiohttp's handler_cancellation" if self.websocket else ""
        if kind == "ran_on":
            if self.websocket:
                return "WebSocket: aiohttp ended it"
            if self.policy is Policy.SHIELD:
                return "shielded"
            return "it ended before the cancellation took effect"
        error = self.error
        if isinstance(error, ConnectionLost) and error.reason == "shutdown":
            return "stopped by the server's shutdown"
        if isinstance(error, asyncio.CancelledError):
            return "stopped by a cancellation that was not aiodelay's (an outer timeout?)"
        if error is not None:
            return f"the handler raised {type(error).__name__}"
        return ""

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

    def release(self, reason: str = CANCEL_MESSAGE) -> None:
        """Cancel the request's pending timers and tasks; tell its threads to stop."""
        owned = self._owned
        if owned is not None:
            owned.release(reason)

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

    def owned(self, what: str) -> Owned:
        """What the request owns (timers, tasks, threads), for starting one more."""
        self._check_open(what)
        owned = self._owned
        if owned is None:
            owned = self._owned = Owned(f"{self.method} {self.path}", self.books[0].threads)
        return owned

    def _check_open(self, what: str) -> None:
        if self.ended:
            raise RuntimeError(f"aiodelay.{what}(): the request has already ended")
