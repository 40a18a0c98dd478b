"""Deadlines that cost a request almost nothing: the requests of one deadline share a timer.

One asyncio timer per request (``loop.call_later``, cancelled when the request ends) is what a
deadline would naively cost: a ``TimerHandle``, a push onto the loop's heap of timers, and a
cancelled handle left in that heap until its time comes. With a default deadline of 30 s, every
request of the last 30 s sits in the heap, and nearly all of them ended long ago.

Here the requests of one deadline length wait in one :class:`DeadlineQueue`: a dict from the
request's state to the moment its deadline passes (``time.monotonic()``), in the order the
requests started, which is also the order their deadlines pass (one length, one clock). The
queue keeps at most one timer, for the oldest request in it. A request that ends (nearly all,
long before their deadline) leaves the queue: a dict delete, no timer to cancel. When the timer
fires, the requests whose deadline has passed are stopped, and the timer is set again for the
oldest one left, if any. A deadline passes on time, not rounded to a tick, as with a timer of
its own.

The watching installation keeps one queue per deadline (seconds and status) that its routes
have; a route's plan points at its queue (``installation.RoutePlan.deadlines``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import RequestState

__all__ = ("DeadlineQueue",)

logger = logging.getLogger("aiodelay")

_NO_CONTEXT = contextvars.Context()
_get_running_loop = asyncio.get_running_loop

#: The shortest wait the timer is set for: a loop whose clock counts in milliseconds and is
#: read once per turn (uvloop) may fire a timer up to a millisecond before the moment it was
#: set for; the deadlines are kept in ``time.monotonic()``, so that none passes early, and the
#: timer is set again, never for less than this. (A loop with a clock of its own, a test
#: loop's virtual time, does not move them.)
_MIN_WAIT = 0.001


class DeadlineQueue:
    """The requests in flight whose deadline is ``seconds`` (answered ``status``)."""

    __slots__ = ("loop", "pending", "seconds", "status", "timer")

    def __init__(self, seconds: float, status: int) -> None:
        self.seconds = seconds
        self.status = status
        #: The requests in flight, each with the moment its deadline passes
        #: (``time.monotonic()``), oldest first.
        self.pending: dict[RequestState, float] = {}
        #: The loop the queue serves (its requests' and its timer's), and the timer, set for
        #: the oldest request whenever the queue is not empty. While the timer is set on the
        #: running loop, :meth:`add` only puts the request in ``pending``, and the middleware
        #: does that itself, without the call.
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<DeadlineQueue {self.seconds}s -> {self.status}, {len(self.pending)} pending>"

    def add(self, state: RequestState, now: float) -> None:
        """``state``'s request starts now (``now``, its ``time.monotonic()``): its deadline runs
        from then. The request must leave the queue when it ends (``pending.pop(state,
        None)``)."""
        loop = _get_running_loop()
        if loop is not self.loop:
            self._use(loop)
        self.pending[state] = now + self.seconds
        if self.timer is None:
            self._arm(loop)

    def _use(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``loop`` from now on (the first, or another loop than before: a
        middleware() object used again, and what waited on the old loop went with it)."""
        self.loop = loop
        self.timer = None
        self.pending = {}

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set the timer for the oldest request waiting (the queue is not empty)."""
        at = next(iter(self.pending.values()))
        # The callback needs none of the request's context variables: no copy of them.
        self.timer = loop.call_later(
            max(at - monotonic(), _MIN_WAIT), self._expired, context=_NO_CONTEXT
        )

    def _expired(self) -> None:
        """The timer fired: stop the requests whose deadline has passed; set the timer for
        the oldest one left."""
        self.timer = None
        loop = self.loop
        assert loop is not None
        pending = self.pending
        now = monotonic()
        due = []
        for state, at in pending.items():
            if at > now:
                break
            due.append(state)
        for state in due:
            del pending[state]
        if pending:
            self._arm(loop)
        for state in due:
            try:
                state.deadline_passed(self.seconds, self.status)
            except Exception:  # one request's failure must not strand the others
                logger.exception("stopping %r at its deadline failed", state)
