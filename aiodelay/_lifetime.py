"""A request's state, made on demand: the completion futures, how the client left, the deadline,
and the request-scoped timers, tasks and threads (:class:`Lifetime`).

A :class:`Lifetime` is created for a request only when something needs one: a call to
``notify_finish``, ``call_later``, ``spawn``, ``is_disconnected`` or ``shield``, a deadline, an
observer, or the client leaving while its handler runs under a policy that does more than
cancel it at once (a plain cancellation is ``Connection.stop_quickly``, with no Lifetime). It
allocates nothing more until asked: no future until ``notify_finish`` is called, no list until
a timer or task is started. What every request has is its connection's ``Connection``
(``_connection.py``).
"""

from __future__ import annotations

import asyncio
import sys
from time import monotonic
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._account import Book, logger
from ._errors import ConnectionLost, DeadlineExceeded
from ._observe import OutcomeKind
from ._owned import Owned
from ._policy import Policy, grace_of, policy_of

if TYPE_CHECKING:  # a type only: _connection imports this module
    from ._connection import Connection

__all__ = (
    "CANCEL_MESSAGE",
    "DEADLINE_MESSAGE",
    "HAS_UNCANCEL",
    "Lifetime",
    "fail",
    "lifetime_key",
)

# aiohttp >= 3.12 warns about plain string keys on a request; older ones lack RequestKey.
lifetime_key: Any = (
    web.RequestKey("aiodelay", object) if hasattr(web, "RequestKey") else "aiodelay.lifetime"
)
#: Whether asyncio counts cancel requests (``Task.uncancel``): from Python 3.11 on.
HAS_UNCANCEL = sys.version_info >= (3, 11)
#: The message of the CancelledError that a disconnect raises in a handler.
CANCEL_MESSAGE = "aiodelay: the client left"
#: The message of the CancelledError that a deadline raises in a handler.
DEADLINE_MESSAGE = "aiodelay: the request's deadline passed"


def fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # A client leaving is an expected outcome, not a bug: mark it retrieved so that an
        # unobserved future does not log "Future exception was never retrieved".
        future.exception()


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

    def took_over(self, lost: ConnectionLost, lost_at: float, *, cancelling: bool) -> None:
        """``Connection.stop_quickly`` cancelled the request's handler before this Lifetime
        was made, when its client left at ``lost_at``; ``cancelling``: the CancelledError has
        not reached the handler yet."""
        self.lost, self.lost_at, self._cancel_requested = lost, lost_at, cancelling

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
            if HAS_UNCANCEL:
                remaining = task.uncancel()
        elif HAS_UNCANCEL:
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
        if self._cancel_requested and HAS_UNCANCEL and self.task is not None:
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
