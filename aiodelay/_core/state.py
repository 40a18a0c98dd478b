"""One request's state (:class:`RequestState`), from aiodelay's middleware to the final outcome.

A request gets its state when it reaches aiodelay's middleware. It is kept with the request's
HTTP message (every clone ``request.clone()`` makes shares it), so whatever asks about the
request (``notify_finish``, ``is_disconnected``, ``shield()``, the server's resources, a
question after the end) finds it in one place; the connection's events reach it through
``outcome``. What moves it on:

============  ==========================================================================
phase         what is true, and what comes next
============  ==========================================================================
RUNNING       The handler runs and nothing has stopped it. The client leaving or the
              deadline passing (whichever comes first is the ``cause``; the other is
              ignored from then on) leads to STOPPING, STOPPED or RUNNING_ON; the handler
              returning or raising to ENDED.
RUNNING_ON    The client left or the deadline passed, and the handler goes on for now: it
              is shielded (the policy), inside a ``shield()`` section, in its grace, or a
              WebSocket (aiohttp ends those itself). The end of the section leads to
              STOPPED, the end of the grace to STOPPING, unless the handler ended first.
STOPPING      aiodelay cancelled the handler's task; its ``CancelledError`` is on the way
              (STOPPED once the handler's end takes the cancellation back).
STOPPED       aiodelay raised ``CancelledError`` in the handler's own task (the end of a
              ``shield()`` section; a client gone before the handler started).
ENDED         The handler returned or raised, and its end was classified (by ``outcome``;
              a plain completion by the middleware, see ``outcome.end``); aiohttp
              writes the response. A request that completed, that nothing waits for, is
              counted here, and stays ENDED: if its client leaves before aiohttp has
              written the whole response, it is counted again, as truncated. Asked about
              then (``notify_finish``), it moves to WRITING.
WRITING       The handler returned a response for a client still there; ``outcome``
              settles the request once it is written (by the middleware, or by aiohttp:
              then in its task's done callback): observers or ``notify_finish``
              futures wait for that.
SETTLED       The outcome is final: counted, logged, observers told, ``notify_finish``
              resolved.
============  ==========================================================================

"Cancelled" (the request asked) and "stopped" (the ``CancelledError`` came back) are apart, as
in trio's ``CancelScope``: STOPPING and STOPPED say a cancellation was requested; whether the
``CancelledError`` that ends the handler is aiodelay's and nothing else's is decided at the
end (:meth:`RequestState.take_back_cancellation`). The state lets go of its request and task
once it is SETTLED, or, ENDED, when the connection moves on (its next request, or its close),
so no reference cycle outlives it.

Most requests only ever touch the first slots; what few need (``notify_finish`` futures, owned
timers and tasks, a ``shield()`` section, a grace) is made on first use, in ``extras``.

(The module is longer than most: every transition of the table is here, and only here.)
"""

from __future__ import annotations

import asyncio
import sys
from time import monotonic
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .aiohttp_internals import state_of
from .errors import ConnectionLost, DeadlineExceeded
from .owned import Owned
from .policy import Policy

if TYPE_CHECKING:
    from .aiohttp_internals import Watch
    from .budget import BudgetDeadline
    from .installation import Installation, RoutePlan

__all__ = (
    "CANCEL_MESSAGE",
    "DEADLINE_MESSAGE",
    "ENDED",
    "ONLY_THE_WATCH",
    "RUNNING",
    "RUNNING_ON",
    "SETTLED",
    "STOPPED",
    "STOPPING",
    "WRITING",
    "RequestState",
    "fail",
    "getrefcount",
    "new_state",
)

RUNNING, RUNNING_ON, STOPPING, STOPPED, ENDED, WRITING, SETTLED = range(7)
_PHASES = ("RUNNING", "RUNNING_ON", "STOPPING", "STOPPED", "ENDED", "WRITING", "SETTLED")

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


class _Extras:
    """The parts of a request's state that most requests never need."""

    __slots__ = (
        "budget",
        "budget_from",
        "error",
        "grace_over",
        "grace_timer",
        "owned",
        "shield_depth",
        "waiters",
        "websocket",
    )

    def __init__(self) -> None:
        #: ``notify_finish`` futures not resolved yet.
        self.waiters: list[asyncio.Future[None]] = []
        #: The request's timers, tasks and threads (``call_later``, ``spawn``, ``to_thread``).
        self.owned: Owned | None = None
        #: Depth of the ``aiodelay.shield()`` sections the handler is in.
        self.shield_depth = 0
        #: The grace after the client left (``@aiodelay.grace``): its timer, and whether it
        #: is over.
        self.grace_timer: asyncio.TimerHandle | None = None
        self.grace_over = False
        #: What the handler raised, kept for ``notify_finish`` after the end (no traceback).
        self.error: BaseException | None = None
        #: The client left a WebSocket: aiohttp, not aiodelay, ends the handler.
        self.websocket = False
        #: Where the request waits for a deadline that a budget from upstream set (shorter
        #: than its route's), and the header that said so (``budget.py``).
        self.budget: BudgetDeadline | None = None
        self.budget_from: str | None = None


class RequestState:
    """What aiodelay knows about one request and what it owns; see the module's table.

    Made (:func:`new_state`) for the middleware of the installation that watches the request's
    connection, which starts it (RUNNING) and counts it as started; kept on the request, and as
    its connection's request in flight (the previous request on the connection lets go of its
    request then). The middleware may start it again for the connection's next request.
    """

    __slots__ = (
        "cause",
        "cause_at",
        "extras",
        "installation",
        "phase",
        "request",
        "response",
        "route_plan",
        "started_at",
        "task",
        "watch",
    )

    def __init__(self, installation: Installation, watch: Watch | None) -> None:
        # (the middleware fills in the request; a state object may serve a connection's next
        # request)
        self.request: web.BaseRequest | None = None
        #: aiohttp's task of the request, which runs the handler.
        self.task: asyncio.Task[Any] | None = None
        #: The installation that watches the request's connection (the outermost).
        self.installation = installation
        #: The connection's Watch, None once the connection is closed.
        self.watch = watch
        self.started_at = 0.0
        self.phase = RUNNING
        #: The response the handler returned (aiohttp's access log needs it if it is cut).
        self.response: web.StreamResponse | None = None
        #: What stopped the handler first: the client left, or the deadline passed; and when
        #: (``time.monotonic()``).
        self.cause: ConnectionLost | DeadlineExceeded | None = None
        self.cause_at: float | None = None
        self.extras: _Extras | None = None
        #: The plan of the request's route, once looked up (:attr:`plan`).
        self.route_plan: RoutePlan | None = None

    def __repr__(self) -> str:
        return f"<RequestState {self.where()} {_PHASES[self.phase]} cause={self.cause!r}>"

    @property
    def lost(self) -> ConnectionLost | None:
        """How the client left, if that is what stopped the request (or cut its response)."""
        cause = self.cause
        return cause if isinstance(cause, ConnectionLost) else None

    @property
    def timed_out(self) -> DeadlineExceeded | None:
        """The deadline, if its passing is what stopped the request."""
        cause = self.cause
        return cause if isinstance(cause, DeadlineExceeded) else None

    @property
    def plan(self) -> RoutePlan:
        """The plan of the request's route (its policy, grace, deadline...), looked up once."""
        plan = self.route_plan
        if plan is None:
            assert self.request is not None  # asked while the request is in flight
            plan = self.route_plan = self.installation.plan_for(self.request)
        return plan

    def more(self) -> _Extras:
        extras = self.extras
        if extras is None:
            extras = self.extras = _Extras()
        return extras

    def where(self) -> str:
        """ "METHOD /path" of the request, for error lines (the raw path: nothing decoded)."""
        request = self.request
        return "an ended request" if request is None else f"{request.method} {request.raw_path}"

    # -- what stops the handler ----------------------------------------------------------

    def client_left(self, lost: ConnectionLost, *, websocket: bool, in_task: bool = False) -> bool:
        """The client left while the handler runs (phase RUNNING; ``in_task``: the handler
        has not started, and this is its own task).

        In this order: pending ``notify_finish`` futures fail; then, under the cancel policy,
        the request's timers and tasks are cancelled and the handler is cancelled at its
        current await (both deferred while a ``shield()`` section runs, or for the grace).
        True if the handler is cancelled now; with ``in_task``, if it is to be stopped.
        """
        if lost.reason == "closed" and self.installation.shutting_down:
            lost = ConnectionLost("shutdown")  # aiohttp closes the connections it shuts down
        self.cause = lost
        self.cause_at = monotonic()
        if self.extras is not None:  # (most requests have none: no call on the drop path)
            self._fail_waiters(lost)
        if websocket:
            # aiohttp ends a WebSocket's receive loop itself; cancelling the handler instead
            # would change how WebSocket handlers end.
            self.more().websocket = True
            return self._run_on()
        plan = self.plan
        if plan.policy is not Policy.CANCEL:
            return self._run_on()  # shielded: it runs to its end
        # (That is cancels_for_client(), asked without its two calls: this is every drop.)
        extras = self.extras
        if plan.grace is not None:
            # It may run on this much longer (counted from now, also in a shield() section):
            # cancelled then, or when the section ends, if it has not ended.
            self.more().grace_timer = asyncio.get_running_loop().call_later(
                plan.grace, self._grace_ended
            )
            return self._run_on()
        if extras is not None and extras.shield_depth:
            return self._run_on()
        if in_task:
            self._release(CANCEL_MESSAGE)
            self.phase = STOPPED
        else:
            self._stop(CANCEL_MESSAGE)
        return True

    def deadline_passed(self, seconds: float, status: int) -> None:
        """The request's deadline timer fired: unless something stopped the request first,
        ``notify_finish`` fails, and the handler is cancelled (after the ``shield()`` section
        it is in, if any)."""
        if self.phase != RUNNING:
            return  # what came first decides
        extras = self.extras
        exc = DeadlineExceeded(seconds, status, None if extras is None else extras.budget_from)
        self.cause = exc
        self.cause_at = monotonic()
        self._fail_waiters(exc)
        extras = self.extras
        if extras is not None and extras.shield_depth:
            self._run_on()
        else:
            self._stop(DEADLINE_MESSAGE)

    def budget_spent(self, seconds: float, status: int, header: str) -> None:
        """The request came with a budget from upstream that is spent already (``seconds``
        is 0): it is stopped before its handler starts; in its own task, which raises the
        ``CancelledError`` (DEADLINE_MESSAGE) next."""
        self.more().budget_from = header
        self.cause = DeadlineExceeded(seconds, status, header)
        self.cause_at = monotonic()
        self.phase = STOPPED

    def deadline_at(self) -> float | None:
        """When the request's deadline passes (``time.monotonic()``), while it waits for it;
        None without one, or once it ended."""
        extras = self.extras
        if extras is not None and extras.budget is not None:
            return extras.budget.pending.get(self)
        plan = self.route_plan
        if plan is None or plan.deadlines is None:
            return None
        return plan.deadlines.pending.get(self)

    def _run_on(self) -> bool:
        self.phase = RUNNING_ON
        # Its timers and tasks go when it ends; at app cleanup it is cancelled.
        self.installation.running_on.add(self)
        return False

    def _stop(self, message: str) -> None:
        """Cancel what the request owns, and the handler at its current await."""
        if self.extras is not None:
            self._release(message)
        self.phase = STOPPING
        assert self.task is not None  # the handler runs
        self.task.cancel(message)

    def cancels_for_client(self) -> bool:
        """Whether the client leaving stops this handler (once any grace is over): the cancel
        policy, and not a WebSocket (aiohttp ends those)."""
        extras = self.extras
        if extras is not None and extras.websocket:
            return False
        return self.plan.policy is Policy.CANCEL

    def _stop_pending(self) -> str | None:
        """In RUNNING_ON: the message to stop the handler with now, if its cause stops it (a
        deadline; the client leaving, under the cancel policy, once any grace is over)."""
        if self.timed_out is not None:
            return DEADLINE_MESSAGE
        if not self.cancels_for_client():
            return None
        if self.plan.grace is not None and not self.more().grace_over:
            return None  # its grace, armed when the client left, still runs
        return CANCEL_MESSAGE

    def _grace_ended(self) -> None:
        """The grace after the client left is over: stop the handler, or, in a ``shield()``
        section, as soon as the section ends."""
        extras = self.more()
        extras.grace_timer = None
        extras.grace_over = True
        if self.phase == RUNNING_ON and not extras.shield_depth:
            self._stop(CANCEL_MESSAGE)

    def shield_entered(self) -> None:
        self.more().shield_depth += 1

    def shield_left(self) -> str | None:
        """An ``aiodelay.shield()`` section ended. If it was the outermost and a stop waited
        for it, what the request owns is cancelled, and the message of the CancelledError to
        raise now is returned."""
        extras = self.more()
        extras.shield_depth -= 1
        if extras.shield_depth or self.phase != RUNNING_ON or self.request is None:
            return None
        message = self._stop_pending()
        if message is not None:
            self._release(message)
            self.phase = STOPPED
            self.installation.running_on.discard(self)
        return message

    def take_back_cancellation(self) -> bool:
        """Called at the end with the handler's CancelledError in hand: take back aiodelay's
        cancel request, if it made one (STOPPING becomes STOPPED), and say whether the
        CancelledError is aiodelay's own (requested in STOPPING, raised in STOPPED) and
        nothing else's.

        Python 3.10 cannot count cancel requests: there a foreign cancellation that coincides
        with aiodelay's is taken for aiodelay's."""
        task = self.task
        assert task is not None  # the handler has just ended
        if self.phase == STOPPING:
            self.phase = STOPPED  # taken back: nothing to undo in ended()
            return not HAS_UNCANCEL or task.uncancel() == 0
        if self.phase == STOPPED:
            return not HAS_UNCANCEL or task.cancelling() == 0
        return False

    # -- the end ---------------------------------------------------------------------------

    def ended(self) -> None:
        """The handler is done: take back a cancellation it never saw (it caught it, or never
        reached an await), cancel what the request owns, and move to ENDED."""
        if self.phase == STOPPING and HAS_UNCANCEL:
            assert self.task is not None  # the handler has just ended
            self.task.uncancel()
        extras = self.extras
        if extras is not None:
            if extras.grace_timer is not None:
                extras.grace_timer.cancel()
                extras.grace_timer = None
            if extras.budget is not None:
                extras.budget.close()
            self._release(CANCEL_MESSAGE)
        if self.cause is not None:
            self.installation.running_on.discard(self)
        self.phase = ENDED

    def settle(self, error: BaseException | None = None) -> None:
        """The outcome is final (``error``: what the request ended with, if not its cause):
        resolve the ``notify_finish`` futures still waiting, and let go of the request."""
        self.phase = SETTLED
        if error is not None:
            self.more().error = error
        extras = self.extras
        if extras is not None:
            waiters, extras.waiters = extras.waiters, []
            result = self.result()
            for future in waiters:
                _resolve(future, result)
        self.request = self.task = self.response = self.watch = None  # (let_go, inlined)

    def let_go(self) -> None:
        """Keep only the outcome (SETTLED; or ENDED, and the connection moved on)."""
        self.request = self.task = self.response = self.watch = None

    def result(self) -> BaseException | None:
        """What ``notify_finish`` reports once the request ended: its cause, or the error it
        ended with, or None (it completed)."""
        if self.cause is not None:
            return self.cause
        return None if self.extras is None else self.extras.error

    # -- what the public functions use ------------------------------------------------------

    def notify_finish(self) -> asyncio.Future[None]:
        """A new future for ``aiodelay.notify_finish``: resolved now if the outcome is known
        (a cause, or a settled end), added to the waiters otherwise (``outcome`` settles
        them)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        result = self.result()
        if result is not None or self.phase == SETTLED:
            _resolve(future, result)
        else:
            self.more().waiters.append(future)
        return future

    def owned(self, what: str) -> Owned:
        """What the request owns (timers, tasks, threads), for starting one more."""
        if self.phase >= ENDED:
            raise RuntimeError(f"aiodelay.{what}(): the request has already ended")
        extras = self.more()
        owned = extras.owned
        if owned is None:
            owned = extras.owned = Owned(self.where(), self.installation.threads)
        return owned

    def _release(self, reason: str) -> None:
        """Cancel the request's pending timers and tasks; tell its threads to stop."""
        extras = self.extras
        if extras is not None and extras.owned is not None:
            extras.owned.release(reason)

    def _fail_waiters(self, exc: BaseException) -> None:
        extras = self.extras
        if extras is not None and extras.waiters:
            waiters, extras.waiters = extras.waiters, []
            for future in waiters:
                fail(future, exc)


def new_state(
    request: web.BaseRequest, installation: Installation, watch: Watch | None
) -> RequestState | None:
    """A new state for ``request``, which starts now on ``watch``'s connection (None: it is
    closed already), to be started by ``installation``'s middleware (the watching one); None
    if the request has its state already (aiodelay is installed on an app and on a sub-app,
    and this is the sub-app's: the outer installation's middleware made it).

    The connection's previous request lets go of its request now (its response went out), so
    that no reference cycle is left. (Where that previous request ended plainly and nothing
    can reach its state any more, the middleware has its state serve this request instead:
    see ``Middleware.__call__``.)
    """
    if watch is None:
        if state_of(request) is not None:
            return None
        return RequestState(installation, None)
    previous = watch.state
    if previous is not None:
        if previous.phase < ENDED:
            if state_of(request) is previous:
                return None  # its request in flight is this one, in the outer installation
            # (aiohttp runs a connection's requests one at a time)
        else:
            previous.let_go()
    state = watch.state = RequestState(installation, watch)
    return state


#: ``sys.getrefcount`` (CPython has it; elsewhere no state ever serves again: see below).
getrefcount = getattr(sys, "getrefcount", None) or (lambda _: 1 << 30)
_NO_REFCOUNT = not hasattr(sys, "getrefcount")


class _Holder:
    __slots__ = ("state",)
    state: object


def _only_the_watch() -> int:
    """What ``getrefcount`` says of an object that only one attribute holds, as a Watch holds
    a state, asked the way ``Middleware.__call__`` asks (how many references the interpreter
    itself holds then differs between Python versions). 0 (never make a state serve again)
    without ``sys.getrefcount`` (PyPy), or if a trace or profile function runs now: one that
    reads a frame's variables holds one more reference to them, so the count would be too
    high for the code that runs untraced."""
    if sys.gettrace() is not None or sys.getprofile() is not None or _NO_REFCOUNT:
        return 0
    holder = _Holder()
    holder.state = object()
    state = holder.state
    return getrefcount(state)


#: What ``sys.getrefcount`` says of a state that only its connection's Watch holds, asked
#: as ``Middleware.__call__`` asks it (0: never).
ONLY_THE_WATCH = _only_the_watch()


def _resolve(future: asyncio.Future[None], result: BaseException | None) -> None:
    if future.done():
        return
    if result is None:
        future.set_result(None)
    elif isinstance(result, asyncio.CancelledError):
        future.cancel()
    else:
        fail(future, result)
